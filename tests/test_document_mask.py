"""Document masking (model.attn_mask_type = "block_causal"): no attention across the documents
packed into one window, the same function through flex attention (CUDA) and masked SDPA (CPU),
and the same losses and gradients under FSDP, TP and PP as in one process."""

import dataclasses

import pytest
import torch
from parallel_harness import assert_matches, make_batches, run_layouts, run_single

from titan.data.dataloader import document_ids
from titan.data.tokenizer import SHIPPED_TOKENIZER, build_tokenizer
from titan.models.llama3 import FLAVORS
from titan.models.llama3.model import Transformer, attention, attention_mask

BOS = build_tokenizer(SHIPPED_TOKENIZER).bos_id
BLOCK = ["--model.attn_mask_type", "block_causal"]


def _model(mask_type: str, seq_len: int = 64) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(
        dataclasses.replace(FLAVORS["debugmodel"], max_seq_len=seq_len, attn_mask_type=mask_type)
    )
    model.init_weights()
    return model


def test_document_ids_start_at_each_bos():
    tokens = torch.tensor([[5, 6, BOS, 7, BOS, BOS, 8], [BOS, 1, 2, 3, 4, 5, 6]])
    assert document_ids(tokens, BOS).tolist() == [[0, 0, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_flex_attention_and_masked_sdpa_compute_the_same_function(n_kv_heads):
    """flex attention has a forward on CPU (not a backward): compare it with the SDPA path."""
    gen = torch.Generator().manual_seed(0)
    bs, heads, seqlen, dim = 2, 4, 48, 16
    q = torch.randn(bs, heads, seqlen, dim, generator=gen)
    k, v = (torch.randn(bs, n_kv_heads, seqlen, dim, generator=gen) for _ in range(2))
    docs = torch.cumsum(torch.rand(bs, seqlen, generator=gen) < 0.15, dim=1)
    positions = torch.arange(seqlen).expand(bs, seqlen)
    # keys in another order, as context parallel gathers them: the mask follows their positions
    perm = torch.randperm(seqlen, generator=gen)
    kp, kd, k, v = positions[:, perm], docs[:, perm], k[:, :, perm], v[:, :, perm]
    flex = attention(q, k, v, attention_mask(positions, kp, docs, kd, flex=True))
    sdpa = attention(q, k, v, attention_mask(positions, kp, docs, kd, flex=False))
    torch.testing.assert_close(flex, sdpa, atol=1e-6, rtol=1e-5)
    causal = attention(q, k, v, attention_mask(positions, kp, None, None, flex=False))
    assert (causal - sdpa).abs().max() > 0.1  # the documents' mask changed something
    in_order = attention(q, k[:, :, perm.argsort()], v[:, :, perm.argsort()], None)
    torch.testing.assert_close(causal, in_order, atol=1e-6, rtol=1e-5)  # = is_causal


def test_each_document_gets_the_logits_it_gets_alone():
    """A window holding the tail of a document, then documents of 17, 1 and 24 tokens: each
    document's logits are those of the document run alone (at position 0: RoPE makes the scores
    depend on distances only; measured 3.6e-7 of the largest logit). Causal masking differs."""
    gen = torch.Generator().manual_seed(1)
    lengths = [22, 17, 1, 24]
    docs = [torch.randint(0, 2000, (n,), generator=gen) for n in lengths]
    for doc in docs[1:]:
        doc[0] = BOS
    window = torch.cat(docs)[None]  # (1, 64)
    model, causal = _model("block_causal"), _model("causal")
    with torch.no_grad():
        packed = model(window, document_ids(window, BOS))[0]
        start = 0
        for doc in docs:
            alone = model(doc[None], document_ids(doc[None], BOS))[0]
            got = packed[start : start + len(doc)]
            torch.testing.assert_close(got, alone, atol=1e-5 * alone.abs().max().item(), rtol=0)
            start += len(doc)
        assert (causal(window)[0] - packed)[lengths[0] :].abs().max() > 1e-2
        with pytest.raises(ValueError, match="needs each token's document_ids"):
            model(window)


def _packed_batches(steps: int, global_batch: int, seq_len: int = 32) -> torch.Tensor:
    """Random tokens with documents of random lengths: a BOS starts each (none in some rows)."""
    tokens = make_batches(steps, global_batch, seq_len)
    gen = torch.Generator().manual_seed(5)
    starts = torch.rand(tokens.shape, generator=gen) < 0.12
    starts[:, 0] = False  # the first row of each step: one document's tail, no BOS
    tokens[starts] = BOS
    return tokens


def test_block_causal_layouts_match_one_process():
    batches = _packed_batches(3, 4)
    reference = run_single([*BLOCK, "--training.local_batch_size", "4"], batches)
    causal = run_single(["--training.local_batch_size", "4"], batches)
    assert abs(reference["losses"][0] - causal["losses"][0]) > 1e-3  # the mask mattered
    cases = {
        "fsdp": ["--training.local_batch_size", "2"],
        "tp": ["--training.local_batch_size", "4", "--parallelism.tensor_parallel_degree", "2"],
        "pp": ["--training.local_batch_size", "4", "--parallelism.pipeline_parallel_degree", "2",
               "--parallelism.data_parallel_shard_degree", "1"],
    }  # fmt: skip
    results = run_layouts(2, [[*BLOCK, *args] for args in cases.values()], batches)
    for name, got in zip(cases, results, strict=True):
        assert_matches(f"block_causal {name}", got, reference)
