"""The planner's memory model against titan: exact parameter counts of meta-device models and
their pipeline stages, activations against the tensors autograd saves and titan's SAC policy,
and peaks against the dry run's traces (recorded and live): the shipped configs, the debug
model's layouts and stage splits, the Llama 3 paper's layouts at 16,384 ranks."""

import dataclasses
import sys

import pytest
import torch
from dry_run_harness import dry_run
from test_plan import DEBUG_TOML, H100, ROOT, parallelism  # the planner tests' own helpers

from titan.config import load_config
from titan.config.checks import Converters
from titan.config.job_config import Float8, Parallelism
from titan.converters import apply_converters
from titan.models.llama3.args import FLAVORS, ModelArgs
from titan.models.llama3.model import Transformer, TransformerBlock, rope_cache
from titan.models.llama3.pipeline import split_module_names, stage_module
from titan.parallelisms import activation_checkpoint as ac_module
from titan.planning.activation_sizes import block_activation_bytes, ring_attention_steps
from titan.planning.memory_model import GIB, estimate_memory
from titan.planning.model_sizes import (
    LINEAR_ORDER,
    Split,
    block_flops,
    output_flops,
    parameter_count,
    rank_modules,
    rank_stages,
    sac_saved_linears,
    stage_params,
)
from titan.planning.plan_config import (
    Candidate,
    Request,
    config_estimate,
    overrides,
    parse_tokens,
    toml_tables,
)
from titan.planning.throughput_model import (
    flops_per_token,
)
from titan.trainer.loss import cross_entropy_sum


def meta_model(flavor: str) -> Transformer:
    with torch.device("meta"):
        return Transformer(dataclasses.replace(FLAVORS[flavor], max_seq_len=16))


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_8b_fsdp8_state_bytes_are_the_exact_parameter_count():
    """The first micro-batch peaks at the loss's backward, before any gradient exists; with
    gradient accumulation a later one also holds the reduce-scattered fp32 gradients."""
    n = numel(meta_model("8B"))
    assert parameter_count(FLAVORS["8B"]) == n == 8_030_261_248
    fsdp8 = parallelism(8, data_parallel_shard_degree=8)
    first = estimate_memory(FLAVORS["8B"], *fsdp8, 8192, 1, "selective")
    assert (first.parameters, first.gradients, first.optimizer_state) == (n * 4 // 8, 0, n)
    later = estimate_memory(FLAVORS["8B"], *fsdp8, 8192, 1, "selective", grad_accumulation=2)
    assert later.gradients == n * 4 // 8 == later.total - first.total


EXPLICIT_8B = (
    "tok_embeddings layers.0 layers.1 layers.2", " ".join(f"layers.{i}" for i in range(3, 20)),
    " ".join(f"layers.{i}" for i in range(20, 31)), "layers.31 norm output",
)  # fmt: skip


@pytest.mark.parametrize(
    "split",
    [Split(4, "1F1B"), Split(4, "Interleaved1F1B", 4), Split(4, "ZBVZeroBubble"),
     Split(4, "1F1B", first_less=1, last_less=3), Split(4, "Interleaved1F1B", 4, 1, 1),
     Split(2, "Interleaved1F1B", module_names=EXPLICIT_8B)],
)  # fmt: skip
def test_stage_parameters_match_the_meta_models_stages(split):
    """Each pp rank's stages, split by titan's own split_module_names (even, with lighter
    first/last stages, explicit) and built with its stage_module from a meta-device 8B."""
    args, model = FLAVORS["8B"], meta_model("8B")
    stages = rank_stages(args.n_layers, split)
    for rank, names in enumerate(rank_modules(args, split)):
        expected = sum(numel(stage_module(model, stage)) for stage in names)
        assert stage_params(args, list(stages[rank])) == expected, rank
    assert sum(stage_params(args, list(s)) for s in stages) == numel(model)


def test_no_ac_block_activations_are_what_autograd_saves():
    """bf16 block on CPU (flash attention for CPU, GQA): every distinct saved storage."""
    args = ModelArgs(dim=256, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=512)
    block = TransformerBlock(0, args).to(torch.bfloat16)
    bs, seq = 2, 64
    x = torch.randn(bs, seq, args.dim, dtype=torch.bfloat16, requires_grad=True)
    rope = rope_cache(args.head_dim, seq, args.rope_theta, None)
    keep = {p.untyped_storage().data_ptr() for p in block.parameters()}
    keep.add(rope.untyped_storage().data_ptr())
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in keep and t.dtype != torch.complex64:  # params, RoPE table
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, rope)
    per_token, none = block_activation_bytes(args, 1, True, "none")
    assert per_token == none
    assert sum(saved.values()) == per_token * bs * seq == 1_479_680


@pytest.mark.parametrize("float8", [False, True])
def test_sac_saves_the_matmuls_titans_policy_saves(monkeypatch, float8):
    """titan's op policy, spied on: the matmul outputs it must save, in forward order, with the
    block's linears in bf16 or float8 (which reach the policy as aten.mm on torchao's tensors)."""
    decisions = []
    real = ac_module.create_selective_checkpoint_contexts

    def spy(policy):
        def record(ctx, func, *args, **kwargs):
            decision = policy(ctx, func, *args, **kwargs)
            if func is torch.ops.aten.mm.default and not ctx.is_recompute:
                decisions.append(decision.name)
            return decision

        return real(record)

    monkeypatch.setattr(ac_module, "create_selective_checkpoint_contexts", spy)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64))
    if float8:
        f8 = Float8(auto_filter_small_kn=False, filter_fqns=["output"])
        apply_converters(model, Converters(float8=f8), torch.device("cpu"), fsdp=False)
        assert sum(type(m).__name__ == "Float8Linear" for m in model.modules()) == 7
    ac_module.apply_ac(model, ac_module.ActivationCheckpoint(mode="selective"))
    model(torch.randint(0, 64, (1, 8))).sum().backward()
    saved = [name for name, d in zip(LINEAR_ORDER, decisions, strict=True) if d == "MUST_SAVE"]
    assert saved == sac_saved_linears() == ["wq", "wv", "w1", "w2"]


def test_memory_models_the_float8_matmuls_selective_ac_saves():
    """8B on 8 GPUs, FSDP, selective op AC, with the float8 converter (wk and wv stay bf16) and
    the plain loss: the trace holds what the bf16 run holds, 44,207,372,300 bytes
    (COMM_MODE=fake_backend NGPU=8 CONFIG_FILE=titan/train_configs/llama3_8b.toml ./run_train.sh
    --model.converters float8 --training.loss_chunk_tokens 0 --training.local_batch_size 1);
    the estimate is within 0.1 %.
    (Modelled with float8 matmul outputs recomputed, it was 32,396,212,224: 12 % low.)"""
    toml = str(ROOT / "titan/train_configs/llama3_8b.toml")
    over = ["--model.converters", "float8", "--training.loss_chunk_tokens", "0"]
    cfg = load_config([*over, "--training.local_batch_size", "1"], toml)
    assert config_estimate(cfg, 8, 0).total == pytest.approx(44_207_372_300, rel=0.001)


MOMENTS = """
from titan.config.job_config import Parallelism
from titan.models.llama3.args import FLAVORS
from titan.parallelisms.parallel_dims import resolve_parallel_dims
from titan.planning.memory_model import estimate_memory
par = Parallelism(pipeline_parallel_degree=8, data_parallel_shard_degree=8,
                  tensor_parallel_degree=8, pipeline_parallel_schedule="Interleaved1F1B",
                  pipeline_parallel_layers_per_stage=8)
dims = resolve_parallel_dims(par, 512)
print([estimate_memory(FLAVORS["405B"], par, dims, 8192, 8, pp_rank=r).moment for r in range(4)])
"""


def test_the_reported_moment_does_not_depend_on_the_process():
    """405B, PP 8 interleaved x FSDP 8 x TP 8, no AC: pp ranks 0-3 peak equally at the start
    and at the end of a backward of their second stage. The first in the step is reported in
    every process (with the points in a set, PYTHONHASHSEED 0 and 1 reported different ones)."""
    import os
    import subprocess

    seen = set()
    for seed in ("0", "1", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", MOMENTS], env=env, capture_output=True,
                             text=True, check=True, timeout=120).stdout  # fmt: skip
        seen.add(out.strip().splitlines()[-1])
    expected = [f"end of stage {s}'s backward" for s in range(8, 12)]
    assert seen == {str(expected)}


def test_eager_loss_saves_an_fp32_log_softmax():
    """The eager loss term: 4 bytes per logit held until backward (plus ids and the sum)."""
    logits = torch.randn(2, 16, 128, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cross_entropy_sum(logits, torch.randint(0, 128, (2, 16)))
    floats = {t.untyped_storage().data_ptr(): t for t in saved if t.is_floating_point()}
    big = [(t.dtype, t.numel()) for t in floats.values() if t.numel() > 1]
    assert big == [(torch.float32, logits.numel())]  # saved by log_softmax and nll_loss


# Live traces compared with the model run the plain cross-entropy over a whole micro-batch
# (training.loss_chunk_tokens 0: fp32 log-probs) unless a case says otherwise (the chunked loss)
PLAIN_LOSS = ("--training.loss_chunk_tokens", "0")


# Traced peaks (dry_run.json "total", bytes, eager loss) of the shipped configs at their NGPU,
# by pipeline rank (torch 2.13): COMM_MODE=fake_backend NGPU=N CONFIG_FILE=X ./run_train.sh
TRACED = {
    ("llama3_8b.toml", 8): {0: 58_000_533_512},
    ("llama3_2_1b.toml", 8): {0: 21_136_223_240},
    ("llama3_2_3b.toml", 8): {0: 21_213_231_632},
    ("llama3_70b.toml", 64): {0: 32_678_729_952},
    ("llama3_8b_128k.toml", 8): {0: 43_572_226_060},
    ("llama3_405b.toml", 512): {0: 27_399_561_692, 7: 26_305_208_872},
}


@pytest.mark.parametrize("name, gpus", list(TRACED))
def test_memory_matches_the_shipped_configs_traced_peaks(name, gpus):
    """Each traced pipeline rank's peak (8B/1B/3B FSDP selective AC, 70B FSDP x TP float8,
    8B 128K FSDP x CP, 405B PP x FSDP x TP interleaved: pp ranks 0 and 7). Stated: 5 %."""
    cfg = load_config([], config_file=str(ROOT / "titan/train_configs" / name))
    for pp_rank, traced in TRACED[name, gpus].items():
        assert config_estimate(cfg, gpus, pp_rank).total == pytest.approx(traced, rel=0.05)


def test_memory_models_bf16_moments():
    """optimizer.state_dtype = bfloat16 halves the estimate's optimizer state as it halves the
    trace's: the 8B on 8 GPUs at local batch 1 traces at 32,837,623,824 bytes (30.58 GiB, from
    34.32)."""
    toml = str(ROOT / "titan/train_configs/llama3_8b.toml")
    one = ["--training.local_batch_size", "1"]
    bf16 = config_estimate(load_config([*one, "--optimizer.state_dtype", "bfloat16"], toml), 8, 0)
    fp32 = config_estimate(load_config(one, toml), 8, 0)
    assert fp32.optimizer_state == 2 * bf16.optimizer_state
    assert bf16.total == pytest.approx(32_837_623_824, rel=0.05)


def test_memory_models_muon_state():
    """Muon keeps one fp32 buffer per block matrix and AdamW's two moments for the rest: the
    estimate's optimizer state is the dry run's held state (tests/test_dry_run.py), to the byte,
    at the debug model's FSDP 4 x TP 2: 3,447,296 bytes, AdamW's 5,708,288."""
    toml = str(ROOT / "titan/train_configs/debug_model.toml")
    tp2 = ["--training.seq_len", "32", "--parallelism.tensor_parallel_degree", "2"]
    muon = config_estimate(load_config([*tp2, "--optimizer.name", "Muon"], toml), 8, 0)
    adamw = config_estimate(load_config(tp2, toml), 8, 0)
    assert (muon.optimizer_state, adamw.optimizer_state) == (3_447_296, 5_708_288)
    assert adamw.total - muon.total == 5_708_288 - 3_447_296


@pytest.mark.parametrize(
    "layout",
    [("--parallelism.tensor_parallel_degree", "2"),  # FSDP 4 x TP 2, no AC
     ("--parallelism.pipeline_parallel_degree", "2",
      "--activation_checkpoint.mode", "full"),  # PP 2 (1F1B) x FSDP 4, full AC
     # the chunked loss (its later key wins over PLAIN_LOSS); per-micro-batch gradient sync
     ("--parallelism.tensor_parallel_degree", "2", "--training.loss_chunk_tokens", "128"),
     ("--parallelism.pipeline_parallel_degree", "2", "--activation_checkpoint.mode", "full",
      "--parallelism.pipeline_parallel_grad_reduce", "microbatch",
      "--training.loss_chunk_tokens", "128")],
)  # fmt: skip
def test_memory_matches_the_traced_step_of_the_debug_model(tmp_path, layout):
    """The estimate of every traced rank (PP: the first and the last) against the dry run's
    traced peak, seq_len 256, local batch 4 (4 pipeline micro-batches). Stated: 10 %. (With
    PP, the unsharded fp32 gradients FSDP accumulates are about a third of the peak.)"""
    args = ("--training.seq_len", "256", "--training.local_batch_size", "4", *PLAIN_LOSS, *layout)
    traced = dry_run(tmp_path, *args)[1]["ranks"]
    cfg = load_config(list(args), config_file=str(DEBUG_TOML))
    pp = cfg.parallelism.pipeline_parallel_degree
    assert len(traced) == pp
    for rank in traced:
        estimate = config_estimate(cfg, 8, pp_rank=rank["rank"] // (8 // pp))
        assert estimate.total == pytest.approx(rank["total"], rel=0.10), rank["label"]


# a CSV schedule for 2 ranks whose rank 0 runs every forward before any backward (GPipe's
# order) and rank 1 a backward after each forward
CSV_FORWARDS_FIRST = ["0F0,0F1,0F2,0F3,0B0,0B1,0B2,0B3", "1F0,1B0,1F1,1B1,1F2,1B2,1F3,1B3"]


SPLITS = {
    "first stage lighter": ("--parallelism.pipeline_parallel_first_stage_less_layers", "2"),
    "explicit 4 stages": (
        "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
        "--parallelism.pipeline_parallel_module_names_per_stage",
        "tok_embeddings layers.0,layers.1 layers.2 layers.3,layers.4,layers.5 norm output",
    ),
    "CSV schedule": ("--parallelism.pipeline_parallel_schedule_csv", "CSV"),
}  # fmt: skip


@pytest.mark.parametrize("split", list(SPLITS))
def test_memory_follows_uneven_explicit_and_csv_pipeline_splits(tmp_path, split):
    """PP 2 x FSDP 4, no AC, seq_len 256, 4 micro-batches: the first stage 2 blocks lighter (2
    and 4 blocks), explicit stages of 1, 3, 1 and 1 blocks (Interleaved1F1B), a CSV schedule
    (CSV_FORWARDS_FIRST). Each traced rank's peak within 10 % (measured: +7.8 % and -0.4 %,
    +7.2 % and +0.2 %, +2.7 % and -0.1 %). Modelled as the plain layout (even split, 1F1B), as
    the planner did before, rank 0 is 48 % and 55 % over and 14 % under."""
    csv = tmp_path / "forwards_first.csv"
    csv.write_text("\n".join(CSV_FORWARDS_FIRST) + "\n")
    layout = [str(csv) if a == "CSV" else a for a in SPLITS[split]]
    args = ("--training.seq_len", "256", "--training.local_batch_size", "4", *PLAIN_LOSS,
            "--parallelism.pipeline_parallel_degree", "2", *layout)  # fmt: skip
    traced = dry_run(tmp_path, *args)[1]["ranks"]
    cfg = load_config(list(args), config_file=str(DEBUG_TOML))
    assert len(traced) == 2
    for rank in traced:
        estimate = config_estimate(cfg, 8, pp_rank=rank["rank"] // 4)
        assert estimate.total == pytest.approx(rank["total"], rel=0.10), rank["label"]


def test_memory_matches_titans_measured_1b_run_and_flops_are_titans():
    """benchmarks/README: 1B, one H100, eager, no AC, local batch 4 x 2048, bf16 autocast:
    44.8 GiB max allocated, measured with the plain loss. Stated tolerance 10 %."""
    est = estimate_memory(FLAVORS["1B"], *parallelism(1), 2048, 4, "none", loss_chunk_tokens=0)
    assert est.total / GIB == pytest.approx(44.8, rel=0.10)
    args = dataclasses.replace(FLAVORS["405B"], max_seq_len=8192)
    assert flops_per_token(args) == args.n_layers * block_flops(args, 8192) + output_flops(args)


# Traced peaks (dry_run.json "total", bytes, plain loss) of the paper's layouts as the planner
# lists them with selective AC (_paper_config), by (pp rank, cp rank): the config that
# titan-plan's TOML makes of llama3_405b.toml, COMM_MODE=fake_backend NGPU=16384 ./run_train.sh
# --training.loss_chunk_tokens 0 --dry_run.ranks R (R = 1024 x pp rank + 8 x cp rank)
TRACED_PAPER = {
    8192: {(0, 0): 64_739_767_516, (1, 0): 72_476_164_344, (15, 0): 58_749_414_236},
    131072: {(0, 0): 94_602_969_308, (1, 0): 106_518_094_072, (15, 0): 85_542_396_124,
             (0, 15): 122_516_848_860, (1, 15): 138_466_894_072},
}  # fmt: skip


def _paper_config(seq: int):
    """The paper's layout at seq as the planner writes it (Interleaved1F1B over 64 stages, the
    first and last a block lighter; 16 micro-batches, selective AC, float8) merged into
    llama3_405b.toml, with the plain loss."""
    req = Request("405B", 16384, seq, parse_tokens("16M"), H100, 80)
    split = Parallelism(pipeline_parallel_first_stage_less_layers=1,
                        pipeline_parallel_last_stage_less_layers=1)  # fmt: skip
    names = [" ".join(s) for s in split_module_names(req.args, split, 64)]
    rep, shard, cp = (1, 128, 1) if seq == 8192 else (8, 1, 16)
    par, dims = parallelism(
        16384, data_parallel_replicate_degree=rep, data_parallel_shard_degree=shard,
        tensor_parallel_degree=8, context_parallel_degree=cp, pipeline_parallel_degree=16,
        pipeline_parallel_schedule="Interleaved1F1B",
        pipeline_parallel_module_names_per_stage=names,
    )  # fmt: skip
    tables = toml_tables(req, Candidate(par, dims, 16, "selective", True))
    toml = str(ROOT / "titan/train_configs/llama3_405b.toml")
    return load_config([*overrides(tables), *PLAIN_LOSS], config_file=toml)


@pytest.mark.parametrize("seq", [8192, 131072])
def test_memory_matches_the_traced_peaks_of_the_papers_layouts(seq):
    """Each traced rank within 3 % (measured: +1.0 % to +2.1 %). At 128K the causal ring's
    attention outputs, all kept by selective AC, are 8.5 whole-query outputs per block on cp
    rank 0 and 16 on cp rank 15 (modelled as one, the estimate was 28 % low on every rank)."""
    cfg = _paper_config(seq)
    assert ring_attention_steps(16, 0, True) == 8.5 and ring_attention_steps(16, 15, True) == 16
    for (pp_rank, cp_rank), traced in TRACED_PAPER[seq].items():
        estimate = config_estimate(cfg, 16384, pp_rank, cp_rank=cp_rank)
        assert estimate.total == pytest.approx(traced, rel=0.03), (pp_rank, cp_rank)


# Traced peaks (GiB, dry_run.json "total" / 2**30, torch 2.13) of shipped configs with the
# memory options of issue 25: COMM_MODE=fake_backend NGPU=N CONFIG_FILE=X ./run_train.sh ARGS
OPTIONS_TRACED = [
    ("llama3_405b.toml", 512, ["--parallelism.pipeline_parallel_grad_reduce", "stage"],
     {0: 34.43, 7: 34.30}),
    ("llama3_405b.toml", 512, ["--parallelism.pipeline_parallel_degree", "4",
                               "--parallelism.data_parallel_shard_degree", "16",
                               "--parallelism.pipeline_parallel_grad_reduce", "microbatch"],
     {0: 33.97, 3: 32.86}),
    ("llama3_8b.toml", 8, ["--training.local_batch_size", "1",
                           "--parallelism.fsdp_cpu_offload", "true"], {0: 23.10}),
    ("llama3_70b.toml", 64, ["--parallelism.fsdp_cpu_offload", "true"], {0: 18.06}),
    ("llama3_8b.toml", 8, ["--activation_checkpoint.mode", "none", "--compile.components", "loss",
                           "--activation_checkpoint.offload", "true"], {0: 25.96}),
    ("llama3_8b.toml", 8, ["--activation_checkpoint.mode", "none", "--compile.components", "loss"],
     {0: 121.21}),
    ("llama3_8b.toml", 8, ["--training.loss_chunk_tokens", "0"], {0: 68.69}),
]  # fmt: skip


@pytest.mark.parametrize("name, gpus, args, traced", OPTIONS_TRACED)
def test_memory_models_the_memory_options(name, gpus, args, traced):
    """Per-micro-batch gradient reduce-scatters under PP, FSDP's CPU offload, activation
    offload and the plain loss (against the chunked default), each traced rank within 5 %."""
    cfg = load_config(args, config_file=str(ROOT / "titan/train_configs" / name))
    for pp_rank, gib in traced.items():
        assert config_estimate(cfg, gpus, pp_rank).total / GIB == pytest.approx(gib, rel=0.05)
