"""Llama 3 model: flavor sizes, shapes, RoPE vs a complex reference, logits vs transformers."""

import dataclasses
import math

import pytest
import torch
import transformers
from torch import nn

from titan.compat import torch_at_least
from titan.models.llama3 import FLAVORS, ModelArgs, RoPEScaling, Transformer
from titan.models.llama3.model import apply_rope, rope_cache, trunc_normal_
from titan.models.llama3.state_dict_adapter import from_hf, hf_config_dict, to_hf

# Parameter counts of Meta's / Hugging Face's published checkpoints.
HF_PARAM_COUNTS = {
    "1B": 1_235_814_400,  # meta-llama/Llama-3.2-1B
    "3B": 3_212_749_824,  # meta-llama/Llama-3.2-3B
    "8B": 8_030_261_248,  # meta-llama/Llama-3.1-8B
    "70B": 70_553_706_496,  # meta-llama/Llama-3.1-70B
    "405B": 405_853_388_800,  # meta-llama/Llama-3.1-405B
}


def build(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


@pytest.mark.parametrize("flavor", sorted(HF_PARAM_COUNTS))
def test_flavor_parameter_counts_match_hf(flavor):
    with torch.device("meta"):
        model = Transformer(FLAVORS[flavor])
    assert sum(p.numel() for p in model.parameters()) == HF_PARAM_COUNTS[flavor]


def test_flavor_shapes_match_meta_params():
    # ffn hidden sizes from Meta's params.json (dim, multiplier, multiple_of)
    expected = {"1B": 8192, "3B": 8192, "8B": 14336, "70B": 28672, "405B": 53248}
    for flavor, hidden in expected.items():
        assert FLAVORS[flavor].ffn_hidden_dim == hidden
    assert FLAVORS["1B"].tie_word_embeddings and FLAVORS["3B"].tie_word_embeddings
    assert not FLAVORS["8B"].tie_word_embeddings


def test_forward_shape_and_layer_names():
    args = dataclasses.replace(FLAVORS["debugmodel"], max_seq_len=64)
    model = build(args)
    tokens = torch.randint(0, args.vocab_size, (3, 17))
    assert model(tokens).shape == (3, 17, args.vocab_size)
    names = set(dict(model.named_parameters()))
    assert "layers.0.attention.wq.weight" in names and "layers.5.feed_forward.w3.weight" in names
    assert {"tok_embeddings.weight", "norm.weight", "output.weight"} <= names


def test_tied_embeddings_survive_meta_init():
    args = dataclasses.replace(FLAVORS["debugmodel"], tie_word_embeddings=True, max_seq_len=32)
    model = build(args)
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == 5_704_960 - args.vocab_size * args.dim


def test_init_is_seeded_and_finite():
    args = dataclasses.replace(FLAVORS["debugmodel"], max_seq_len=32)
    a, b, c = build(args, seed=1), build(args, seed=1), build(args, seed=2)
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        assert torch.isfinite(pa).all(), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    assert torch.equal(a.layers["0"].attention_norm.weight, torch.ones(args.dim))


def test_truncated_normal_draws_the_same_on_every_torch():
    """titan's truncated normal draws what torch 2.13+'s nn.init.trunc_normal_ draws (normal
    values, those out of bounds drawn again), so a seed starts the same weights on every torch
    titan supports: torch 2.11's own init samples by the inverse CDF and gives other values.
    The values below are torch 2.13's; bounds of one std make a third of the draws repeat."""
    torch.manual_seed(0)
    w = torch.empty(4, 1000)
    trunc_normal_(w, std=1.0, a=-1.0, b=1.0)
    assert w.abs().max() <= 1.0
    assert w[0, :4].tolist() == [0.6394069194793701, 0.956139326095581, -0.2505785822868347,
                                 -0.4338788092136383]  # fmt: skip
    assert w.sum().item() == pytest.approx(-40.5012092590332, abs=1e-4)
    if torch_at_least("2.13"):
        torch.manual_seed(0)
        assert torch.equal(w, nn.init.trunc_normal_(torch.empty(4, 1000), std=1.0, a=-1.0, b=1.0))


def _reference_frequencies(head_dim: int, theta: float, s: RoPEScaling) -> list[float]:
    """Llama 3.1 frequency scaling written out per frequency, as the Llama 3.1 release describes."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(freq)
        elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(freq / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * freq / s.factor + smooth * freq)
    return out


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("head_dim", [16, 128])
def test_rope_matches_complex_exponential_reference(head_dim, compiled):
    scaling = RoPEScaling(factor=8.0, original_max_position_embeddings=8192)
    freqs = torch.tensor(_reference_frequencies(head_dim, 500000.0, scaling), dtype=torch.float64)
    # all three regimes of the scaling are exercised at head_dim 128
    seqlen = 40
    x = torch.randn(2, seqlen, 3, head_dim, dtype=torch.float64)
    pos = torch.arange(seqlen, dtype=torch.float64)
    rot = torch.exp(1j * torch.outer(pos, freqs))  # (seqlen, head_dim // 2)
    xc = torch.view_as_complex(x.reshape(2, seqlen, 3, head_dim // 2, 2).contiguous())
    expected = torch.view_as_real(xc * rot[None, :, None, :]).reshape(x.shape)
    # eager multiplies complex numbers; under torch.compile the real formulation runs
    rope = apply_rope
    if compiled:
        rope = torch.compile(apply_rope, backend="aot_eager", fullgraph=True)
    got = rope(x.float(), rope_cache(head_dim, seqlen, 500000.0, scaling))
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-5)


def _hf_model(args: ModelArgs):
    config = transformers.LlamaConfig(**hf_config_dict(args))
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(tied):
    args = dataclasses.replace(
        FLAVORS["debugmodel"], n_layers=2, tie_word_embeddings=tied, max_seq_len=16384
    )
    model = build(args).eval()
    hf = _hf_model(args)
    missing, unexpected = hf.load_state_dict(to_hf(model.state_dict(), args), strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if tied else [])
    tokens = torch.randint(0, args.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    # and back: transformers' weights map to titan's exactly
    back = from_hf(hf.state_dict(), args)
    assert set(back) == set(model.state_dict())
    for name, w in model.state_dict().items():
        assert torch.equal(back[name], w), name


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_rope_takes_a_bf16_table(compiled):
    """FSDP with bf16 parameters casts block inputs, the RoPE table included, to bf16: the
    rotation still runs (in fp32) and differs from the fp32 table's only by bf16 rounding."""
    x = torch.randn(2, 40, 3, 16, dtype=torch.bfloat16)
    cache = rope_cache(16, 40, 500000.0, None)
    rope = (
        torch.compile(apply_rope, backend="aot_eager", fullgraph=True) if compiled else apply_rope
    )
    got, full = rope(x, cache.bfloat16()), rope(x, cache)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), full.float(), atol=0.05, rtol=0.02)
