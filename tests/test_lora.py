"""LoRA and DoRA adapters: the base model's logits at init, exports that transformers and peft
load with the adapter model's logits, FSDP/TP/PP parity with one process and a frozen base, exact
resume, loading base weights, config errors, the start-up parameter counts and dry-run sizes."""

import logging
from pathlib import Path

import pytest
import torch
from dry_run_harness import dry_run
from parallel_harness import (
    assert_matches,
    load_script,
    make_batches,
    run_layouts,
    run_single,
)

from titan.checkpoint.dcp_io import save_dcp_model
from titan.config import load_config
from titan.config.manager import to_toml
from titan.converters.lora import is_adapter_key, lora_modules
from titan.errors import ConfigError
from titan.logger import logger
from titan.models.llama3 import FLAVORS
from titan.models.llama3.hf_io import empty_model, save_hf_checkpoint
from titan.trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEBUG_TOML = str(ROOT / "titan/train_configs/debug_model.toml")
LORA = ["--model.converters", "lora", "--lora.target_modules", "wq,wk,wv,wo,w1,w2,w3,output"]
DORA = [*LORA, "--lora.use_dora"]
KINDS = {"lora": LORA, "dora": DORA}


def make_trainer(dump: Path, *overrides: str) -> Trainer:
    args = [
        "--job.dump_folder", str(dump), "--training.device", "cpu", "--training.seq_len", "32",
        "--training.local_batch_size", "2", "--metrics.log_freq", "100",
        "--data.dataset", "synthetic", *overrides,
    ]  # fmt: skip
    return Trainer(load_config(args, config_file=DEBUG_TOML))


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2304, (2, 32), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(trainer: Trainer, x: torch.Tensor, train: bool = False) -> torch.Tensor:
    trainer.model.train(train)
    return trainer.model(x)


def test_zero_b_gives_the_base_models_logits_exactly(tmp_path):
    """B starts at zero, so LoRA and DoRA (m / ||W|| = 1) compute the base model bit for bit, in
    eval and in train mode with adapter dropout; the base weights are the seed's as without
    adapters (the adapters draw from their own generators)."""
    x = tokens()
    base = make_trainer(tmp_path / "base")
    expected = logits(base, x)
    for kind, flags in KINDS.items():
        trainer = make_trainer(tmp_path / kind, *flags, "--lora.dropout", "0.1")
        modules = lora_modules(trainer.model)
        assert len(modules) == 6 * 7 + 1, kind
        for m in modules:
            assert not m.lora_b.any() and m.lora_a.abs().min() > 0, (kind, m.adapter_name)
            bound = m.in_features**-0.5  # kaiming-uniform with a = sqrt(5), as peft
            assert m.lora_a.abs().max() <= bound and m.lora_a.abs().max() > 0.9 * bound
        assert torch.equal(logits(trainer, x), expected), kind
        assert torch.equal(logits(trainer, x, train=True), expected), kind


def train_with_exports(tmp: Path, flags: list[str]) -> tuple[torch.Tensor, dict[str, Path]]:
    """Train 4 steps (B and DoRA's m move far from their init), write the base, merged and PEFT
    exports of the last checkpoint; returns the adapter model's logits and the folders."""
    args = [*flags, "--optimizer.lr", "1e-2", "--training.steps", "4", "--checkpoint.enable"]
    trainer = make_trainer(tmp, *args, "--checkpoint.interval", "2")
    (tmp / "config.toml").write_text(to_toml(trainer.cfg))  # as train.main writes it
    trainer.train()
    expected = logits(trainer, tokens(1))
    convert = load_script("convert_to_hf").main
    ckpt = str(tmp / "checkpoint" / "step-4")  # the last save: model-only
    out = {name: tmp / name for name in ("base", "merged", "peft")}
    common = ["--flavor", "debugmodel", "--dtype", "float32"]
    assert convert([ckpt, str(out["base"]), *common]) == 0
    assert convert([ckpt, str(out["merged"]), *common, "--merge-lora"]) == 0
    assert convert([ckpt, str(out["peft"]), *common, "--peft", "--base-model", "base"]) == 0
    return expected, out


def relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("kind", KINDS)
def test_merged_and_peft_exports_give_the_adapter_models_logits(tmp_path, kind):
    import peft
    import transformers

    expected, out = train_with_exports(tmp_path, KINDS[kind])
    load = transformers.LlamaForCausalLM.from_pretrained
    x = tokens(1)
    with torch.no_grad():
        base = load(out["base"], dtype=torch.float32).eval()
        assert relative(base(x).logits, expected) > 0.05  # the adapters matter
        merged = load(out["merged"], dtype=torch.float32).eval()
        assert relative(merged(x).logits, expected) < 1e-5
        adapted = peft.PeftModel.from_pretrained(base, out["peft"]).eval()
        assert relative(adapted(x).logits, expected) < 1e-5
    config = adapted.peft_config["default"]
    assert (config.r, config.lora_alpha, config.use_dora) == (8, 16, kind == "dora")
    assert config.base_model_name_or_path == "base"


def placements(result: dict, key: str) -> tuple[str, ...]:
    return result["layout"]["placements"][key][1]


def check_tp_placements(tp: dict, kind: str) -> None:
    """A whole and B, m row-sharded on column-parallel linears; the reverse on row-parallel."""
    names = ("lora_a", "lora_b", "lora_magnitude")[: 3 if kind == "dora" else 2]
    for linear, want in (
        ("attention.wq", ("R", "S(0)", "S(0)")),
        ("attention.wo", ("S(1)", "R", "R")),
        ("feed_forward.w2", ("S(1)", "R", "R")),
        ("output", ("R", "S(0)", "S(0)")),
    ):
        module = linear if linear == "output" else f"layers.1.{linear}"
        found = tuple(placements(tp, f"{module}.{n}")[0] for n in names)
        assert found == want[: len(names)], (kind, linear, found)


def test_fsdp_tp_and_pp_match_one_process_and_leave_the_base_frozen(tmp_path):
    """Every layout starts from the one-process weights, adapters included. From a one-process
    checkpoint after one step (B, and so A's gradient, nonzero), the next step under FSDP 2
    (with activation checkpointing), TP 2 and PP 2 gives the one-process loss and every adapter
    gradient, and no base weight moves."""
    batches = make_batches(2, 4)
    layouts = {
        "fsdp": ["--training.local_batch_size", "2", "--activation_checkpoint.mode", "full"],
        "tp": ["--training.local_batch_size", "4", "--parallelism.tensor_parallel_degree", "2"],
        "pp": ["--training.local_batch_size", "4", "--parallelism.pipeline_parallel_degree", "2"],
    }
    one = ["--training.local_batch_size", "4"]
    refs, initial, cases = {}, {}, []
    for kind, flags in KINDS.items():
        folder = ["--job.dump_folder", str(tmp_path / kind)]
        save = ["--checkpoint.interval", "1", "--checkpoint.last_save_model_only", "false"]
        resume = ["--checkpoint.interval", "1000", "--checkpoint.load_step", "1"]
        common = [*flags, *folder, "--checkpoint.enable"]
        initial[kind] = run_single([*flags, *folder, *one], batches, stop=0)["params"]
        run_single([*common, *save, *one], batches, stop=1)
        refs[kind] = run_single([*common, *resume, *one], batches)
        for layout in layouts.values():
            cases += [([*flags, *folder, *layout], 0), [*common, *resume, *layout]]
    results = iter(run_layouts(2, cases, batches))
    for kind in KINDS:
        ref, start = refs[kind], initial[kind]
        assert ref["start"] == 1 and ref["grads"]["layers.0.attention.wq.lora_a"].abs().max() > 0
        for layout, where in (("fsdp", "dp_shard 2"), ("tp", "tp 2"), ("pp", "pp 2")):
            fresh, got = next(results), next(results)
            assert where in got["layout"]["layout"] and got["start"] == 1
            assert layout != "fsdp" or got["layout"]["checkpointed_blocks"] == 6
            assert_matches(f"{kind} {layout}", got, ref)
            assert all(is_adapter_key(k) for k in got["grads"]), sorted(got["grads"])
            for key, weight in start.items():
                assert torch.equal(fresh["params"][key], weight), f"{kind} {layout} init: {key}"
                same = torch.equal(got["params"][key], weight)  # adapters moved, nothing else
                assert same != is_adapter_key(key), f"{kind} {layout}: {key} changed: {not same}"
            if layout == "tp":
                check_tp_placements(got, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_is_exact(tmp_path, kind):
    """4 steps, or 2 and a resume for 2 more: the same losses bitwise (adapters, frozen base,
    optimizer, and the RNG state adapter dropout draws from)."""
    args = [*KINDS[kind], "--lora.dropout", "0.1", "--training.steps", "4"]
    whole = make_trainer(tmp_path / "whole", *args).train()
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2"]
    first = make_trainer(tmp_path / "run", *args, *ckpt)
    step = first.train_step

    def stop_after_2(microbatches):  # as a killed job: step 3 never applies
        if first.step > 2:
            raise KeyboardInterrupt
        return step(microbatches)

    first.train_step = stop_after_2
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = make_trainer(tmp_path / "run", *args, *ckpt)
    assert resumed.step == 2
    assert resumed.train() == whole[2:]


def test_initial_weights_load_into_the_base_and_adapters_keep_their_init(tmp_path):
    """checkpoint.initial_load_path (DCP, or HF with initial_load_in_hf) of a base model without
    adapters: the base weights are loaded, A and B are as without loading, DoRA's magnitudes are
    the loaded weights' row norms."""
    other = make_trainer(tmp_path / "other", "--training.seed", "7")
    weights = {k: v.clone() for k, v in other.model.state_dict().items()}
    save_dcp_model(weights, tmp_path / "dcp")
    save_hf_checkpoint(weights, FLAVORS["debugmodel"], tmp_path / "hf", dtype=torch.float32)
    fresh = make_trainer(tmp_path / "fresh", *DORA).model.state_dict()
    for source, hf in (("dcp", "false"), ("hf", "true")):
        load = ["--checkpoint.initial_load_path", str(tmp_path / source)]
        load += ["--checkpoint.initial_load_in_hf", hf]
        state = make_trainer(tmp_path / source, *DORA, *load).model.state_dict()
        for key, value in state.items():
            if key.endswith((".lora_a", ".lora_b")):
                assert torch.equal(value, fresh[key]), (source, key)
            elif key.endswith(".lora_magnitude"):
                weight = weights[key.replace("lora_magnitude", "weight")]
                assert torch.equal(value, torch.linalg.vector_norm(weight, dim=1)), (source, key)
            else:
                assert torch.equal(value, weights[key]), (source, key)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora.rank", "0"], "lora.rank = 0 must be >= 1"),
        (["--lora.alpha", "0"], "lora.alpha = 0.0 must be > 0"),
        (["--lora.dropout", "1.0"], "lora.dropout = 1.0 must be in [0, 1)"),
        (
            ["--lora.target_modules", "wq,q_proj"],
            "['q_proj'] are not linears of Llama 3; valid ones are wq, wk, wv, wo, w1, w2, w3, "
            "output",
        ),
        (
            ["--model.converters", "float8,lora"],
            "lora cannot be combined with float8, mx or nvfp4",
        ),
    ],
)
def test_config_errors(flags, message):
    with pytest.raises(ConfigError) as e:
        load_config(flags, config_file=DEBUG_TOML)
    assert message in str(e.value)


def test_peft_export_of_a_checkpoint_without_adapters_is_an_error(tmp_path, capsys):
    model = empty_model(FLAVORS["debugmodel"])
    save_dcp_model(model.state_dict(), tmp_path / "base")
    for flag in ("--peft", "--merge-lora"):
        argv = [str(tmp_path / "base"), str(tmp_path / "out"), "--flavor", "debugmodel", flag]
        assert load_script("convert_to_hf").main(argv) == 2
        err = capsys.readouterr().err
        assert "holds no LoRA adapters" in err and "without --merge-lora / --peft" in err, err
        assert not (tmp_path / "out").exists()


def test_start_up_log_reports_trainable_and_total_parameters(tmp_path):
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        make_trainer(tmp_path, "--model.converters", "lora")  # rank 8 on wq, wk, wv, wo
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    # per block: wq and wo 8 x (256 + 256), wk and wv 8 x (256 + 64); six blocks
    adapters = 6 * 8 * (2 * (256 + 256) + 2 * (256 + 64))
    line = f"model llama3 debugmodel: {5_704_960 + adapters:,} parameters, {adapters:,} trainable"
    assert line in records, records


def test_dry_run_holds_gradients_and_optimizer_state_of_the_adapters_only(tmp_path):
    """A fake-backend dry run (rank 0 of 8, dp_shard 4 x tp 2) with DoRA on wq, wk, wv, wo."""
    args = ["--training.seq_len", "32", "--parallelism.tensor_parallel_degree", "2"]
    _, out = dry_run(tmp_path, *args, "--model.converters", "lora", "--lora.use_dora")
    (rank0,) = out["ranks"]
    sizes = {name: n / 4 for name, n in rank0["held"].items()}  # fp32 elements
    # rank 0's adapters per block (tp shards, then FSDP shards dim 0 by 4): wq A 8/4 x 256, B
    # 256/2/4 x 8, m 256/2/4 = 800; wk, wv 512 + 64 + 8 = 584 each; wo A 8/4 x 256/2, B 256/4 x 8,
    # m 256/4 = 832
    assert sizes["gradients"] == 6 * (800 + 2 * 584 + 832), sizes
    assert sizes["optimizer state"] == 2 * sizes["gradients"]  # AdamW's two moments
    assert sizes["parameters"] > 40 * sizes["gradients"]  # the frozen base: ~5.7M / 8


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The gradients of the second step (after the first, B is no longer zero: A has some)."""
    x = tokens(2)
    for _ in range(2):
        trainer.optimizer.zero_grad()
        loss = trainer.forward_backward([(x, x.roll(-1, dims=1))])
        grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                 for n, p in trainer.model.named_parameters() if p.grad is not None}  # fmt: skip
        trainer.optimizer_step(loss)
    return grads


def test_dropout_with_activation_checkpointing_and_validation(tmp_path):
    """Adapter dropout: recomputing a checkpointed block draws the same masks (the gradients
    of no checkpointing), and validation runs without dropout and leaves training's RNG alone
    (the same losses as without validation, the same validation loss twice)."""
    flags = [*LORA, "--lora.dropout", "0.5", "--optimizer.lr", "1e-2"]
    expected = _grads(make_trainer(tmp_path / "plain", *flags))
    assert all(g.abs().max() > 0 for g in expected.values())
    for mode in (["full"], ["selective", "--activation_checkpoint.selective_ac_option", "op"]):
        got = _grads(make_trainer(tmp_path / mode[0], *flags, "--activation_checkpoint.mode",
                                  *mode))  # fmt: skip
        assert got.keys() == expected.keys()
        for name, g in expected.items():
            assert relative(got[name], g) < 1e-6, (mode[0], name)
    steps = [*flags, "--training.steps", "3", "--optimizer.lr", "1e-2"]
    plain = make_trainer(tmp_path / "no_val", *steps).train()
    validation = ["--validation.enable", "--validation.dataset", "synthetic", "--validation.steps",
                  "1", "--validation.freq", "1"]  # fmt: skip
    validating = make_trainer(tmp_path / "val", *steps, *validation)
    assert validating.train() == plain
    assert validating.validate() == validating.validate()


def test_a_lora_checkpoint_loads_with_its_adapters(tmp_path):
    """initial_load_path of a LoRA run's checkpoint loads its adapters too (evaluate.py scores
    the adapted model); a model with other adapters is told so; generation asks for a merge."""
    from titan.errors import CheckpointError
    from titan.models.llama3.load import load_model

    flags = ["--model.converters", "lora", "--lora.target_modules", "wq,wv", "--lora.use_dora"]
    trained = make_trainer(tmp_path / "run", *flags, "--optimizer.lr", "1e-2", "--training.steps",
                           "2", "--checkpoint.enable", "--checkpoint.interval", "2")  # fmt: skip
    trained.train()
    ckpt = str(tmp_path / "run" / "checkpoint" / "step-2")
    loaded = make_trainer(tmp_path / "load", *flags, "--checkpoint.initial_load_path", ckpt)
    for name, value in trained.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    assert any(m.lora_b.any() for m in lora_modules(loaded.model))  # trained, not fresh
    with pytest.raises(CheckpointError, match="adapters for 24 of this model's 86 adapter"):
        make_trainer(tmp_path / "other", *LORA, "--checkpoint.initial_load_path", ckpt)
    with pytest.raises(CheckpointError, match="holds LoRA adapters: merge them into the weights"):
        load_model(ckpt, FLAVORS["debugmodel"])
