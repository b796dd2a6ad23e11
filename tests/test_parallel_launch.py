"""run_train.sh with several processes (torchrun, gloo), dry runs with the fake backend, and the
start-up errors of impossible layouts."""

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
from titan.train import Trainer

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


DEBUG_TOML = str(ROOT / "train_configs" / "debug_model.toml")
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
    ids=["dp_shard2", "dp_replicate2", "tp2", "dp_shard2_tp2", "pp2_1f1b", "pp2_interleaved",
         "cp2", "cp2_block_causal"],
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


def _dry_run_sizes(log: str) -> dict[str, int]:
    found = re.findall(r"(parameters|gradients|optimizer state): +([\d,]+) elements", log)
    return {name: int(n.replace(",", "")) for name, n in found}


def test_dry_run_debug_model_fsdp_tp_at_8(tmp_path):
    log = _run(
        tmp_path, str(ROOT / "train_configs" / "debug_model.toml"), "--training.seq_len", "32",
        "--parallelism.tensor_parallel_degree", "2", COMM_MODE="fake_backend", NGPU="8",
    )  # fmt: skip
    assert "parallel layout: dp_shard 4 x tp 2 over 8 ranks" in log
    sizes = _dry_run_sizes(log)
    total = 5_704_960
    assert total / 8 <= sizes["parameters"] <= total / 8 * 1.05, sizes
    assert sizes["gradients"] == sizes["parameters"]
    assert sizes["optimizer state"] == 2 * sizes["parameters"]


@pytest.mark.parametrize("schedule", ["1F1B", "ZBVZeroBubble"])
def test_dry_run_debug_model_pp_tp_at_8(tmp_path, schedule):
    """A pipelined dry run runs its schedule: every stage is given its shapes, since the fake
    collectives carry none (with ZBV rank 0 also holds the last stage and its sharded logits)."""
    log = _run(
        tmp_path, DEBUG_TOML, "--training.seq_len", "32", "--training.local_batch_size", "4",
        "--parallelism.pipeline_parallel_degree", "2", "--parallelism.tensor_parallel_degree", "2",
        "--parallelism.pipeline_parallel_schedule", schedule,
        COMM_MODE="fake_backend", NGPU="8",
    )  # fmt: skip
    assert "parallel layout: pp 2 x dp_shard 2 x tp 2 over 8 ranks" in log
    rank_0 = {
        "1F1B": "stage 0 [tok_embeddings, layers.0-2]",
        "ZBVZeroBubble": "stage 0 [tok_embeddings, layers.0-1]; stage 3 [layers.4-5, norm, output]",
    }
    assert f"pp rank 0: {rank_0[schedule]}" in log
    assert "schedule not run" not in log  # the schedule ran
    assert re.search(r"step: +1 +loss: ", log)
    sizes = _dry_run_sizes(log)
    # rank 0's stages split 4 ways (TP 2 x FSDP 2; norm weights are whole on each TP rank)
    embedding, block = 2304 * 256, 754_176  # debugmodel: 2 x embedding + norm + 6 blocks
    held = {"1F1B": embedding + 3 * block, "ZBVZeroBubble": 2 * embedding + 256 + 4 * block}
    expected = held[schedule] / 4
    assert expected <= sizes["parameters"] <= expected * 1.01, sizes
    assert sizes["optimizer state"] == 2 * sizes["parameters"]


def test_dry_run_405b_pp_fsdp_tp_at_512(tmp_path):
    """The 405B config exactly as shipped (PP 8 x FSDP 8 x TP 8, Interleaved1F1B, 16 stages,
    seq 8192) at 512 ranks: rank 0's state does not fit this host, so the stages are built and
    the schedule is not run (see README); 20-40 s and ~8 GiB here, so it runs with the suite."""
    log = _run(
        tmp_path, str(ROOT / "train_configs" / "llama3_405b.toml"), COMM_MODE="fake_backend",
        NGPU="512", timeout=900,
    )  # fmt: skip
    assert "dry run: stages built, schedule not run" in log
    assert "parallel layout: pp 8 x dp_shard 8 x tp 8 over 512 ranks" in log
    assert "pipeline: 16 stages over 8 ranks" in log
    assert (
        "float8 tensorwise (emulated): 882 of 883 linears; in high precision: output; FSDP " in log
    )
    assert "pp rank 0: stage 0 [tok_embeddings, layers.0-7]; stage 8 [layers.63-70]" in log
    assert "pp rank 7: stage 7 [layers.55-62]; stage 15 [layers.118-125, norm, output]" in log
    args = FLAVORS["405B"]
    sizes = _dry_run_sizes(log)
    # rank 0: 16 blocks and the embedding, each split 8 ways by TP and 8 ways by FSDP
    total = 405_853_388_800
    embedding = args.vocab_size * args.dim
    block = (total - 2 * embedding - args.dim) // args.n_layers  # norms: dim each
    expected = (16 * block + embedding) / 64
    assert expected <= sizes["parameters"] <= expected * 1.01, sizes
    assert sizes["gradients"] == sizes["parameters"]
    assert sizes["optimizer state"] == 2 * sizes["parameters"]


@pytest.mark.big_dry_run
def test_dry_run_70b_fsdp_tp8_at_256(tmp_path):
    log = _run(
        tmp_path, str(ROOT / "train_configs" / "llama3_70b.toml"), "--training.seq_len", "16",
        "--training.local_batch_size", "1", "--compile.enable", "false",
        COMM_MODE="fake_backend", NGPU="256", timeout=1500,
    )  # fmt: skip
    assert "parallel layout: dp_shard 32 x tp 8 over 256 ranks" in log
    assert "model llama3 70B: 70,553,706,496 parameters" in log
    # as shipped: float8 (torchao's float8 TP styles: the fake backend is not gloo)
    assert (
        "float8 tensorwise (emulated): 560 of 561 linears; in high precision: output; FSDP " in log
    )
    sizes = _dry_run_sizes(log)
    # rank 0 holds a 1/256 slice (norm weights are replicated over TP; FSDP pads to 32 rows)
    total = 70_553_706_496
    assert total / 256 <= sizes["parameters"] <= total / 256 * 1.01, sizes
    assert sizes["gradients"] == sizes["parameters"]
    assert sizes["optimizer state"] == 2 * sizes["parameters"]  # AdamW's two moments
    assert re.search(r"step: +1 +loss: \d+\.\d{6}", log)


@pytest.mark.slow_dry_run
def test_dry_run_8b_128k_fsdp_cp4_at_8(tmp_path):
    """The 128K long-context config's layout (FSDP 2 x CP 4, block_causal, full AC) on a short
    sequence (the dry run computes rank 0's step: 128K tokens would take hours here)."""
    log = _run(
        tmp_path, str(ROOT / "train_configs" / "llama3_8b_128k.toml"), "--training.seq_len", "64",
        "--compile.enable", "false", COMM_MODE="fake_backend", NGPU="8", timeout=1500,
    )  # fmt: skip
    assert "parallel layout: dp_shard 2 x cp 4 over 8 ranks" in log
    assert "block_causal attention" in log
    sizes = _dry_run_sizes(log)
    total = 8_030_261_248  # FSDP shards over dp_shard x cp = 8 ranks
    assert total / 8 <= sizes["parameters"] <= total / 8 * 1.001, sizes
    assert re.search(r"step: +1 +loss: \d+\.\d{6}", log)


@pytest.mark.slow_dry_run
def test_dry_run_8b_fsdp_at_8(tmp_path):
    log = _run(
        tmp_path, str(ROOT / "train_configs" / "llama3_8b.toml"), "--training.seq_len", "16",
        "--compile.enable", "false", COMM_MODE="fake_backend", NGPU="8", timeout=1500,
    )  # fmt: skip
    assert "parallel layout: dp_shard 8 over 8 ranks" in log
    sizes = _dry_run_sizes(log)
    total = 8_030_261_248
    assert total / 8 <= sizes["parameters"] <= total / 8 * 1.001, sizes
    assert sizes["optimizer state"] == 2 * sizes["parameters"]


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
    from titan.config import ConfigError

    debug = str(ROOT / "train_configs" / "debug_model.toml")
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


def test_cpu_offload_is_refused_where_it_cannot_apply(monkeypatch):
    from titan.config import ConfigError
    from titan.parallelisms.data_parallel import check_cpu_offload

    debug = str(ROOT / "train_configs" / "debug_model.toml")
    cfg = load_config(["--job.config_file", debug, "--training.device", "cpu",
                       "--parallelism.fsdp_cpu_offload", "true"])  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before any process group starts
    with pytest.raises(ConfigError, match="fsdp_cpu_offload .* needs CUDA"):
        Trainer(cfg)
    with pytest.raises(ValueError, match="applies no FSDP"):
        check_cpu_offload(True, fsdp_enabled=False, device_type="cuda")
    check_cpu_offload(True, fsdp_enabled=True, device_type="cuda")
    check_cpu_offload(False, fsdp_enabled=False, device_type="cpu")


def test_comm_modes_other_than_fake_backend_fail_clearly(monkeypatch):
    from titan.config import ConfigError
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

    from titan.models.llama3 import Transformer
    from titan.models.llama3.parallelize import parallelize_llama
    from titan.parallelisms.parallel_dims import ParallelDims

    args = ["--activation_checkpoint.mode", ac[0]]
    if len(ac) > 1:
        args += ["--activation_checkpoint.selective_ac_option", ac[1]]
    debug = str(ROOT / "train_configs" / "debug_model.toml")
    cfg = load_config(["--job.config_file", debug, "--compile.enable", "true", *args])
    dims = ParallelDims(dp_replicate=1, dp_shard=1, tp=2, pp=1, cp=1, world_size=2)
    with torch.device("meta"):
        model = Transformer(FLAVORS["debugmodel"])
    with pytest.raises(ValueError, match="use mode = 'selective' with selective_ac_option = 'op'"):
        parallelize_llama(model, dims, {}, cfg)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "train_configs").glob("*.toml")), ids=lambda p: p.stem
)
def test_shipped_configs_pass_every_start_up_check(path):
    """Each shipped config, at the world size its degrees ask for (8 FSDP ranks where the
    shard degree fills the world), passes the checks a real start-up makes before any process
    group starts: a config titan itself refuses must not ship."""
    from titan.models.llama3.build import model_args_for
    from titan.models.llama3.parallelize import check_supported_layout
    from titan.parallelisms.pipeline import check_pipeline
    from titan.train import grad_accumulation_steps

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
