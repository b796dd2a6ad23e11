"""The float8 and MX converters in one process (torchao, emulated on CPU): every recipe trains
the debug model close to fp32, the filters keep the layers they name in high precision, the
recipes use the formats they claim, and MFU counts float8 FLOPs at the float8 peak."""

import logging

import pytest
import torch
from parallel_harness import DEBUG_TOML, run_single
from torch import nn

from titan.compat import mx_training_unsupported
from titan.config import load_config
from titan.config.checks import Converters
from titan.config.job_config import Float8, Metrics, QuantizeLinear
from titan.converters import apply_converters
from titan.converters.float8 import float8_linear_config
from titan.converters.mx import is_mx_linear
from titan.data.dataloader import build_dataloader
from titan.data.tokenizer import build_tokenizer
from titan.errors import ConfigError
from titan.models.llama3 import FLAVORS
from titan.models.llama3.model import Transformer
from titan.trainer.metrics import MetricsLogger, mixed_precision_peak, peak_flops
from titan.trainer.trainer import Trainer

STEPS, BATCH, SEQ_LEN = 20, 8, 64
# 20 steps of the debug model on the embedded corpus (the loss falls 8.19 -> 7.87). Measured
# largest loss difference from fp32 over the 20 steps: tensorwise and hybrid 0.0017, rowwise
# 0.0020, rowwise_with_gw_hp 0.0017, mx 0.0020, mx wgrad_with_hp 0.0018. Tolerance 0.01; and
# at least 1e-4 somewhere, else the layers did not compute in low precision at all.
LOSS_TOL, MIN_EFFECT = 0.01, 1e-4
TRAIN = ["--training.seq_len", str(SEQ_LEN), "--optimizer.lr", "8e-4",
         "--lr_scheduler.warmup_steps", "2"]  # fmt: skip
F8 = ["--model.converters", "float8", "--quantize.linear.float8.auto_filter_small_kn", "false"]
RECIPES = {
    "tensorwise": F8,
    "hybrid": [*F8, "--quantize.linear.float8.recipe_name", "hybrid"],
    "rowwise": [*F8, "--quantize.linear.float8.recipe_name", "rowwise"],
    "rowwise_with_gw_hp": [*F8, "--quantize.linear.float8.recipe_name", "rowwise_with_gw_hp"],
    "mx": ["--model.converters", "mx"],
    "mx_wgrad_with_hp": ["--model.converters", "mx",
                         "--quantize.linear.mx.recipe_name", "mxfp8_rceil_wgrad_with_hp"],
}  # fmt: skip


@pytest.fixture(scope="module")
def text_batches() -> tuple[torch.Tensor, torch.Tensor]:
    cfg = load_config(["--job.config_file", DEBUG_TOML])
    loader = build_dataloader(
        cfg.data, build_tokenizer(cfg.model.tokenizer_path), seq_len=SEQ_LEN,
        local_batch_size=BATCH,
    )  # fmt: skip
    it = iter(loader)
    pairs = [next(it) for _ in range(STEPS)]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


@pytest.fixture(scope="module")
def fp32_run(text_batches) -> dict:
    return run_single(TRAIN, text_batches)


@pytest.mark.heavy
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_trains_close_to_fp32(recipe, text_batches, fp32_run):
    got = run_single([*TRAIN, *RECIPES[recipe]], text_batches)
    kinds = got["layout"]["linears"]
    low = "mx" if recipe.startswith("mx") else "float8"
    # every block's linears in low precision; the output layer (filter_fqns' default) not
    assert {n for n, k in kinds.items() if k != low} == {"output"}, kinds
    assert kinds["output"] == "high"
    losses, ref = torch.tensor(got["losses"]), torch.tensor(fp32_run["losses"])
    assert torch.isfinite(losses).all(), losses
    assert losses[-1] < losses[0] - 0.2, f"{recipe} did not train: {losses}"
    diff = (losses - ref).abs().max().item()
    assert MIN_EFFECT < diff <= LOSS_TOL, f"{recipe}: largest loss difference from fp32 {diff}"


def _meta_model(flavor: str) -> Transformer:
    with torch.device("meta"):
        return Transformer(FLAVORS[flavor])


def _precision(model: nn.Module) -> dict[str, str]:
    from torchao.float8.float8_linear import Float8Linear

    return {
        n: "float8" if isinstance(m, Float8Linear) else "mx" if is_mx_linear(m) else "high"
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }


def test_filter_fqns_keep_layers_in_high_precision():
    cfg = QuantizeLinear()
    cfg.float8.filter_fqns = ["output", "attention.wk", "layers.1."]
    cfg.float8.auto_filter_small_kn = False
    model = _meta_model("debugmodel")
    apply_converters(model, Converters(float8=cfg.float8), torch.device("cpu"), fsdp=False)
    kinds = _precision(model)
    high = {n for n, k in kinds.items() if k == "high"}
    assert high == {"output"} | {f"layers.{i}.attention.wk" for i in range(6)} | {
        n for n in kinds if n.startswith("layers.1.")
    }
    assert set(kinds.values()) == {"high", "float8"}


@pytest.mark.skipif(bool(mx_training_unsupported()), reason="torchao's MX needs torch 2.12+")
def test_mx_filter_fqns_keep_layers_in_high_precision():
    cfg = QuantizeLinear()
    cfg.mx.filter_fqns = ["output", "feed_forward"]
    model = _meta_model("debugmodel")
    apply_converters(model, Converters(mx=cfg.mx), torch.device("cpu"), fsdp=False)
    assert {n for n, k in _precision(model).items() if k == "mx"} == {
        f"layers.{i}.attention.{w}" for i in range(6) for w in ("wq", "wk", "wv", "wo")
    }


def test_mx_on_a_torch_without_it_stops_start_up(monkeypatch):
    """Where torch lacks what torchao's MX training tensor dispatches to (torch 2.11), start-up
    names the version needed instead of torchao's assertion at the first conversion."""
    from torch.distributed.tensor import _ops

    monkeypatch.delattr(_ops, "scaled_mm_single_dim_strategy", raising=False)
    with pytest.raises(ConfigError) as e:
        load_config(["--model.converters", "mx"])
    message = str(e.value)
    assert message.startswith("model.converters = ['mx']: torchao's MXFP8 training needs torch "
                              "2.12 or newer (installed: ")  # fmt: skip
    assert message.endswith("): upgrade, or use the float8 converter") and "\n" not in message


def test_size_filter_keeps_small_linears_in_high_precision():
    """torchao's H100 thresholds on the 8B shapes: both recipes keep the key/value projections
    (4096 -> 1024) in bf16; rowwise keeps also the 1B's layers with 2048 outputs (wq, wo, w2)."""
    expect = {
        ("8B", "tensorwise"): {"attention.wk", "attention.wv"},
        ("8B", "rowwise"): {"attention.wk", "attention.wv"},
        ("1B", "tensorwise"): {"attention.wk", "attention.wv"},
        ("1B", "rowwise"): {
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "feed_forward.w2",
        },
    }
    for (flavor, recipe), small in expect.items():
        cfg = QuantizeLinear()
        cfg.float8.recipe_name = recipe
        model = _meta_model(flavor)
        apply_converters(model, Converters(float8=cfg.float8), torch.device("cpu"), fsdp=False)
        kinds = _precision(model)
        assert {n.split(".", 2)[2] for n, k in kinds.items() if k == "high" and "layers" in n} == (
            small
        ), (flavor, recipe)
        assert kinds["layers.0.feed_forward.w1"] == "float8"


def test_a_filter_that_keeps_every_layer_is_an_error():
    """The debug model's linears are all below torchao's size thresholds."""
    with pytest.raises(ConfigError, match="float8 converted none of the model's 43 linears"):
        Trainer(load_config(["--job.config_file", DEBUG_TOML, "--model.converters", "float8",
                             "--training.device", "cpu"]))  # fmt: skip


def test_recipe_formats():
    """hybrid is Megatron-LM's e4m3 forward / e5m2 backward; rowwise uses e4m3 throughout."""
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2

    def formats(recipe: str) -> tuple:
        c = float8_linear_config(Float8(recipe_name=recipe), emulate=True, fsdp_all_gather=False)
        return (c.cast_config_input.target_dtype, c.cast_config_weight.target_dtype,
                c.cast_config_grad_output.target_dtype, c.emulate)  # fmt: skip

    assert formats("hybrid") == (e4, e4, e5, True)
    assert formats("tensorwise") == (e4, e4, e5, True)
    assert formats("rowwise") == (e4, e4, e4, True)
    with pytest.raises(ConfigError, match="per-tensor scales"):
        load_config(["--model.converters", "float8", "--quantize.linear.float8.recipe_name",
                     "rowwise_with_gw_hp", "--quantize.linear.float8.enable_fsdp_float8_all_gather",
                     "true"])  # fmt: skip


def test_emulation_is_logged_on_cpu(caplog):
    model = _meta_model("debugmodel")
    cfg = QuantizeLinear()
    cfg.float8.auto_filter_small_kn = False
    with caplog.at_level(logging.INFO, logger="titan"):
        flops = apply_converters(
            model, Converters(float8=cfg.float8), torch.device("cpu"), fsdp=False
        )
    assert flops == 0  # emulated: no FLOPs at the float8 peak
    assert "cpu has no float8 tensor cores (CUDA SM 8.9+): the matmuls are emulated" in caplog.text
    assert "float8 tensorwise (emulated): 42 of 43 linears; in high precision: output" in (
        caplog.text
    )


def test_mfu_counts_float8_flops_at_the_float8_peak(caplog):
    h100_bf16, h100_fp8 = (peak_flops("NVIDIA H100 80GB HBM3", p) for p in ("bfloat16", "float8"))
    assert (h100_bf16, h100_fp8) == (989.5e12, 1979e12)
    # 3/4 of the FLOPs at 2x speed: the step needs 1/4 + 3/8 of the bf16 time -> peak x 1.6
    peak = mixed_precision_peak(400, 300, h100_bf16, h100_fp8)
    assert peak == pytest.approx(h100_bf16 * 1.6)
    assert mixed_precision_peak(400, 0, h100_bf16, None) == h100_bf16
    assert mixed_precision_peak(400, 300, h100_bf16, None) is None  # no float8 peak known
    logger = MetricsLogger(
        Metrics(), "/tmp", rank=0, device=torch.device("cpu"), flops_per_token=400,
        peak_flops=peak, peak_label="of bf16 + float8 peaks",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="titan"):
        m = logger.log(1, loss=1.0, grad_norm=1.0, lr=1e-3, ntokens=int(1e12), elapsed_s=1.0,
                       data_s=0.0)  # fmt: skip
    assert m["mfu_pct"] == pytest.approx(100 * 400e12 / peak)
    assert f"mfu: {m['mfu_pct']:.2f}% (of bf16 + float8 peaks)" in caplog.text
