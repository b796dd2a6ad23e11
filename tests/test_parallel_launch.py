"""run_train.sh with several processes (torchrun, gloo) and the start-up errors of impossible
layouts (dry runs: test_dry_run.py; every shipped config through the start-up checks: below)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from titan.config import load_config
from titan.config.job_config import Parallelism
from titan.models.llama3 import FLAVORS
from titan.models.llama3.parallelize import check_tp_degree
from titan.parallelisms.parallel_dims import resolve_parallel_dims
from titan.trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, config: str, *args: str, timeout: int = 600, **env) -> str:
    env = {**os.environ, "TITAN_PYTHON": sys.executable, "CONFIG_FILE": config, **env}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [str(ROOT / "run_train.sh"), f"--job.dump_folder={tmp_path}", "--training.device=cpu"]
    out = subprocess.run(
        [*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    return log


DEBUG_TOML = str(ROOT / "titan/train_configs" / "debug_model.toml")
# Three steps log the losses after 0, 1 and 2 updates; the LR is nonzero for the first two.
LAUNCH_ARGS = [
    "--training.steps", "3", "--training.seq_len", "64", "--training.local_batch_size", "2",
    "--metrics.log_freq", "1",
]  # fmt: skip


PP2 = [
    "--parallelism.pipeline_parallel_degree",
    "2",
    "--parallelism.data_parallel_shard_degree",
    "1",
]


def _logged(log: str) -> tuple[list[float], list[float]]:
    """Every step's loss (6 decimals) and grad norm (4 decimals) from the metrics lines."""
    found = re.findall(r"step: +(\d+) +loss: (\d+\.\d{6}) +grad_norm: (\d+\.\d{4})", log)
    assert [int(step) for step, _, _ in found] == [1, 2, 3], log[-3000:]
    return [float(loss) for _, loss, _ in found], [float(norm) for _, _, norm in found]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """(losses, grad norms) of one process with the global batch of a dp-rank run as its local
    batch (2 x dp rows): a step's windows do not depend on the layout (each dp rank reads its
    slice of the step's global batch; tests/test_data.py), and the loss is the sum over every
    rank's tokens over the global target count."""
    cache: dict[tuple, tuple[list[float], list[float]]] = {}

    def run(dp: int, extra: tuple[str, ...] = ()) -> tuple[list[float], list[float]]:
        if (dp, extra) in cache:
            return cache[dp, extra]
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "COMM_MODE"):
            assert key not in os.environ, key  # the reference is one process
        local = 2  # LAUNCH_ARGS' local_batch_size: every dp rank's rows per step
        dump = str(tmp_path_factory.mktemp(f"one_process_dp{dp}"))
        cfg = load_config([
            "--job.config_file", DEBUG_TOML, "--job.dump_folder", dump, *LAUNCH_ARGS,
            "--training.device", "cpu", "--training.local_batch_size", str(local * dp), *extra,
        ])  # fmt: skip
        trainer = Trainer(cfg)
        data = iter(trainer.dataloader)
        losses, norms = [], []
        for _ in range(cfg.training.steps):
            loss, norm = trainer.train_step([next(data)])
            losses.append(loss)
            norms.append(norm)
        cache[dp, extra] = losses, norms
        return cache[dp, extra]

    return run


@pytest.mark.parametrize(
    "ngpu, layout, dp, args",
    [
        ("2", "dp_shard 2", 2, []),
        ("2", "dp_replicate 2", 2, ["--parallelism.data_parallel_replicate_degree", "2"]),
        ("2", "tp 2", 1, ["--parallelism.tensor_parallel_degree", "2"]),
        ("4", "dp_shard 2 x tp 2", 2, ["--parallelism.tensor_parallel_degree", "2"]),
        ("2", "pp 2", 1, PP2),
        # micro-batches of 2 rows: views of the windows, strided unlike their shape inference's
        ("2", "pp 2", 1, [*PP2, "--parallelism.pipeline_parallel_schedule", "GPipe",
                          "--parallelism.pipeline_parallel_microbatch_size", "2"]),
        ("2", "pp 2", 1, [*PP2, "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
                          "--parallelism.pipeline_parallel_module_names_per_stage",
                          "tok_embeddings layers.0,layers.1 layers.2,layers.3 layers.4,"
                          "layers.5 norm output"]),
        # the command: NGPU=2 ./run_train.sh --parallelism.context_parallel_degree 2
        # --parallelism.data_parallel_shard_degree 1 (here with block_causal masks too)
        ("2", "cp 2", 1, ["--parallelism.context_parallel_degree", "2",
                          "--parallelism.data_parallel_shard_degree", "1"]),
        ("2", "cp 2", 1, ["--parallelism.context_parallel_degree", "2",
                          "--parallelism.data_parallel_shard_degree", "1",
                          "--model.attn_mask_type", "block_causal"]),
    ],
    ids=["dp_shard2", "dp_replicate2", "tp2", "dp_shard2_tp2", "pp2_1f1b", "pp2_gpipe",
         "pp2_interleaved", "cp2", "cp2_block_causal"],
)  # fmt: skip
def test_run_train_sh_multi_process(tmp_path, one_process, ngpu, layout, dp, args):
    log = _run(tmp_path, DEBUG_TOML, *LAUNCH_ARGS, *args, NGPU=ngpu)
    assert f"parallel layout: {layout} over {ngpu} ranks" in log
    if "Interleaved1F1B" in args:
        assert "pp rank 0: stage 0 [tok_embeddings, layers.0]; stage 2 [layers.3-4]" in log
    losses, norms = _logged(log)
    block = "block_causal" in args  # the reference masks documents too
    expected_losses, expected_norms = one_process(
        dp, ("--model.attn_mask_type", "block_causal") if block else ()
    )
    # The log rounds losses to 6 decimals (5e-7) and norms to 4 (5e-5). TP sums the matmuls in
    # another order: after two updates its loss differs from one process's by 1.3e-6 in fp32.
    assert losses == pytest.approx(expected_losses, abs=3e-6, rel=0), log[-2000:]
    assert norms == pytest.approx(expected_norms, abs=6e-5, rel=0), log[-2000:]


def test_degrees_must_multiply_to_the_world():
    with pytest.raises(ValueError, match=r"= 6, but the world size is 8"):
        resolve_parallel_dims(
            Parallelism(tensor_parallel_degree=3, data_parallel_shard_degree=2), world_size=8
        )
    with pytest.raises(ValueError, match=r"world size 8 is not divisible by .* = 3"):
        resolve_parallel_dims(Parallelism(tensor_parallel_degree=3), world_size=8)
    dims = resolve_parallel_dims(
        Parallelism(data_parallel_replicate_degree=2, tensor_parallel_degree=2), world_size=8
    )
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp) == (2, 2, 2, 4)


def test_tp_degree_must_divide_heads():
    with pytest.raises(ValueError, match="does not divide the model's n_kv_heads = 8"):
        check_tp_degree(FLAVORS["8B"], 16)
    check_tp_degree(FLAVORS["70B"], 8)


def test_context_parallel_seq_len_is_checked_before_any_process_group():
    from titan.errors import ConfigError

    debug = str(ROOT / "titan/train_configs" / "debug_model.toml")
    cfg = load_config(["--job.config_file", debug, "--parallelism.context_parallel_degree", "2",
                       "--parallelism.data_parallel_shard_degree", "1", "--training.seq_len",
                       "34"])  # fmt: skip
    os.environ["WORLD_SIZE"] = "2"
    try:
        with pytest.raises(
            ConfigError,
            match=r"\[parallelism\] training.seq_len 34 does not "
            r"divide into 2 x context_parallel_degree 2 = 4 equal chunks",
        ):
            Trainer(cfg)
    finally:
        os.environ.pop("WORLD_SIZE")


def test_comm_modes_other_than_fake_backend_fail_clearly(monkeypatch):
    from titan.errors import ConfigError
    from titan.parallelisms.distributed import comm_mode

    monkeypatch.setenv("COMM_MODE", "local_tensor")
    with pytest.raises(ConfigError, match="FSDP2 wrongly"):
        comm_mode()
    monkeypatch.setenv("COMM_MODE", "fake")
    with pytest.raises(ConfigError, match="fake_backend for a one-process dry run"):
        comm_mode()
    monkeypatch.setenv("COMM_MODE", "fake_backend")
    assert comm_mode() == "fake_backend"


@pytest.mark.parametrize("ac", [["full"], ["selective", "2"]])
def test_tp_compile_with_whole_block_ac_is_refused(ac):
    import torch

    from titan.config.checks import converters_of
    from titan.models.llama3 import Transformer
    from titan.models.llama3.parallelize import parallelize_llama
    from titan.parallelisms.parallel_dims import ParallelDims

    args = ["--activation_checkpoint.mode", ac[0]]
    if len(ac) > 1:
        args += ["--activation_checkpoint.selective_ac_option", ac[1]]
    debug = str(ROOT / "titan/train_configs" / "debug_model.toml")
    cfg = load_config(["--job.config_file", debug, "--compile.enable", "true", *args])
    dims = ParallelDims(dp_replicate=1, dp_shard=1, tp=2, pp=1, cp=1, world_size=2)
    with torch.device("meta"):
        model = Transformer(FLAVORS["debugmodel"])
    with pytest.raises(ValueError, match="use mode = 'selective' with selective_ac_option = 'op'"):
        parallelize_llama(
            model, dims, {}, cfg.parallelism, cfg.activation_checkpoint, cfg.compile,
            converters_of(cfg), cfg.training.mixed_precision_param,
        )  # fmt: skip


@pytest.mark.parametrize(
    "path", sorted((ROOT / "titan/train_configs").glob("*.toml")), ids=lambda p: p.stem
)
def test_shipped_configs_pass_every_start_up_check(path):
    """Each shipped config, at the world size its degrees ask for (8 FSDP ranks where the
    shard degree fills the world), passes the checks a real start-up makes before any process
    group starts: a config titan itself refuses must not ship."""
    from titan.models.llama3.build import model_args_for
    from titan.models.llama3.parallelize import check_supported_layout
    from titan.parallelisms.pipeline import check_pipeline
    from titan.trainer.runtime import grad_accumulation_steps

    cfg = load_config([], config_file=str(path))
    p = cfg.parallelism
    world = max(p.data_parallel_shard_degree, 8 if p.data_parallel_shard_degree == -1 else 1)
    for degree in (p.data_parallel_replicate_degree, p.tensor_parallel_degree,
                   p.pipeline_parallel_degree, p.context_parallel_degree):  # fmt: skip
        world *= degree
    dims = resolve_parallel_dims(p, world)
    args = model_args_for(cfg.model, cfg.training.seq_len, tokenizer_words=0)
    check_supported_layout(dims, args, cfg)
    check_pipeline(p, args.n_layers, cfg.training.local_batch_size, cfg.compile.blocks)
    assert grad_accumulation_steps(cfg.training, dims.dp)[0][1] >= 1
