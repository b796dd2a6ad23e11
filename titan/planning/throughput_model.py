"""Estimated step time of a titan layout on a GPU cluster: compute at a stated fraction of the
peak, collectives at stated bandwidths with a stated overlap, and each pipeline schedule's
bubble. The model is THROUGHPUT_MODEL below (titan-plan --explain prints it)."""

import functools
import math
from dataclasses import dataclass

from titan.config.job_config import Parallelism
from titan.models.llama3.args import ModelArgs
from titan.parallelisms.parallel_dims import ParallelDims
from titan.parallelisms.pipeline import SCHEDULES
from titan.planning.memory_model import DDP_BUCKET_BYTES
from titan.planning.model_sizes import (
    LINEAR_ORDER,
    Stage,
    float8_linears,
    linear_sizes,
    module_params,
    output_flops,
    parameter_count,
    pipeline_split,
    rank_stages,
    sac_saved_linears,
    untied,
)
from titan.trainer.metrics import model_flops, peak_flops

# Achieved fraction of the dense bf16 peak on titan's FLOP count (recompute included), with
# compiled blocks. References: torchao's float8 README (Llama3-8B, 8 H100, FSDP, seq 8192,
# compile, per-op SAC, bf16: 6,150 tokens/s/GPU = 36 % MFU on titan's count); titan's
# benchmarks/README (1B, one H100, compile + SAC: 44.6 % MFU); the Llama 3 paper (405B on 8K
# and 16K H100s: 38-43 % BF16 MFU).
BF16_EFFICIENCY = 0.40
# Blocks left eager (titan refuses compiled blocks for the layout): titan's own H100 benchmark
# measured eager at 35.0 % MFU against 44.6 % compiled (with more recompute) on 1B; assumed 15 %
# slower at these sizes, where matmuls weigh more than the elementwise ops compile fuses.
EAGER_EFFICIENCY = 0.85
# A float8 linear's matmuls run this much faster than in bf16 (casts and scales included),
# calibrated on torchao's float8 README: Llama3-8B on 8 H100 (FSDP, seq 8192, compile, per-op
# SAC), tensorwise with float8 all-gather, +25.0 % tokens/s over bf16; this model gives that
# layout +25 % (titan's SAC policy keeps float8 matmul outputs as it keeps bf16 ones: it sees
# them as aten.mm on torchao's float8 tensors), 70B/405B +30 % (the README: up to 1.5x).
FLOAT8_MATMUL_SPEEDUP = 1.39
# Seconds each step of a ring collective waits besides moving its bytes (the alpha of an
# alpha-beta model; assumed: a few microseconds, as NCCL's ring protocols take per hop). A ring
# over n ranks takes n - 1 steps, which prices very large FSDP groups.
STEP_LATENCY = {"nvlink": 2e-6, "network": 6e-6}


@dataclass(frozen=True)
class GPU:
    name: str
    device_name: str  # as torch.cuda.get_device_name() says it: titan's peak-FLOP/s table key
    memory_gib: float
    nvlink_gb_s: float  # per GPU per direction, inside a node
    network_gb_s: float  # per GPU per direction, between nodes (one NIC per GPU)
    float8: bool  # float8 tensor cores
    gpus_per_node: int = 8

    @functools.cached_property
    def peak_bf16(self) -> float:
        return peak_flops(self.device_name, "bfloat16")


GPUS = {
    # H100 SXM5 datasheet: 80 GB HBM3, NVLink 4 at 900 GB/s (both directions); DGX H100: one
    # ConnectX-7 400 Gb/s InfiniBand port (50 GB/s) per GPU. Peaks: titan.trainer.metrics.
    "h100": GPU("h100", "NVIDIA H100 80GB HBM3", 80, 450, 50, True),
    # H200 SXM datasheet: 141 GB HBM3e, the H100's NVLink 4; HGX H200: ConnectX-7 400 Gb/s.
    "h200": GPU("h200", "NVIDIA H200", 141, 450, 50, True),
    # A100 SXM4 80GB datasheet: NVLink 3 at 600 GB/s; DGX A100: ConnectX-6 200 Gb/s per GPU;
    # no float8 tensor cores.
    "a100": GPU("a100", "NVIDIA A100-SXM4-80GB", 80, 300, 25, False),
    # DGX B200 datasheet: 1,440 GB for 8 GPUs (180 GB each), NVLink 5 at 1.8 TB/s, ConnectX-7
    # 400 Gb/s per GPU.
    "b200": GPU("b200", "NVIDIA B200", 180, 900, 50, True),
}

ZERO_BUBBLE = tuple(name for name, kind in SCHEDULES.items() if kind.zero_bubble)

THROUGHPUT_MODEL = f"""\
Throughput model (titan.planning.throughput_model), per optimizer step:
- Compute: each rank's FLOPs by titan's count (metrics.model_flops: 6 per parameter per
  token plus 12 x layers x heads x head_dim x seq_len for attention, output layer included;
  tp and cp split a rank's FLOPs evenly), plus recompute (full AC: every block's forward
  again; selective op: the forward of the linears titan's policy does not save: wk, wo, w3,
  float8 or not), at {BF16_EFFICIENCY:.0%} of the dense bf16 peak (x
  {EAGER_EFFICIENCY} where titan refuses compiled blocks for the layout). float8: the converted
  linears' matmuls run {FLOAT8_MATMUL_SPEEDUP}x faster (8B FSDP with SAC: +25 % end to end, as
  torchao's float8 README measured; 70B/405B: +30 %).
  A pipeline runs at the pace of its slowest rank.
- Collectives: a ring all-gather or reduce-scatter over n ranks takes n-1 steps of a fixed
  latency ({STEP_LATENCY["nvlink"] * 1e6:g} us on NVLink, {STEP_LATENCY["network"] * 1e6:g} us \
on the network) plus (n-1)/n x bytes / bandwidth; an
  all-reduce twice that. NVLink inside a node (8 GPUs), the per-GPU network bandwidth once a
  group leaves it; titan's mesh puts tp innermost, then cp, dp_shard, dp_replicate, pp: a
  group stays inside a node while its stride x its size <= 8.
  FSDP (over dp_shard x cp): a bf16 all-gather of the rank's weights (float8 linears in
  float8) twice per accumulation pass (forward and backward; pipelined once: titan keeps
  stages gathered) and an fp32 reduce-scatter of the gradients each pass (pipelined with
  pipeline_parallel_grad_reduce = microbatch: each micro-batch's backward); HSDP adds an fp32
  all-reduce of the gradient shards over dp_replicate (as often), DDP one of all gradients.
  TP (sequence parallel): per block 2 all-gathers and 2 reduce-scatters of a (tokens, dim)
  bf16 activation in forward, 4 in backward, 4 more when AC recomputes (float8: forward
  all-gathers in float8). CP: per block an all-gather of the keys and values in forward, an
  all-gather and a reduce-scatter in backward, one more all-gather with AC. PP: each
  micro-batch's activation out and its gradient back at every stage boundary.
- Overlap: FSDP/HSDP/DDP collectives overlap the compute of the pass they serve (pipelined:
  the all-gather the first micro-batch's forward, the reduce-scatter the last one's
  backward, or each micro-batch's its own); what exceeds it is exposed, plus one block's
  all-gather and reduce-scatter (the first and the last). TP, CP and PP transfers are not
  overlapped (async TP is off).
- Bubble, a fraction of the pipeline's time (p ranks, m micro-batches, v stages per rank):
  GPipe, 1F1B: (p-1)/(m+p-1); Interleaved1F1B, LoopedBFS: that / v; zero-bubble schedules
  ({", ".join(ZERO_BUBBLE)}): 0 when m >= 2p (the weight-gradient
  passes fill it), else the interleaved value.
  Per pass: (compute + TP + CP) / (1 - bubble) + PP + exposed FSDP; a step is the global
  batch / (dp x local batch) passes.
- Not modelled: kernel efficiency changing with micro-batch size or TP's smaller matmuls,
  stragglers, the optimizer step, data loading, congestion and topology beyond nodes.
  MFU is against the dense bf16 peak (titan's metrics line uses a bf16/float8 mixed peak
  for float8 runs, so float8 rows here can exceed {BF16_EFFICIENCY:.0%}).
GPUs (memory GiB, NVLink / network GB/s per GPU per direction, bf16 dense peak):
""" + "\n".join(
    f"  {g.name}: {g.memory_gib:g}, {g.nvlink_gb_s:g} / {g.network_gb_s:g}, "
    f"{g.peak_bf16 / 1e12:.0f} TFLOP/s{', float8' if g.float8 else ''}"
    for g in GPUS.values()
)


@dataclass
class StepTime:
    """Seconds per optimizer step and its parts (per step, on the slowest rank)."""

    compute: float
    tp: float
    cp: float
    pp: float
    fsdp_exposed: float
    bubble: float  # fraction of the pipeline's time
    step: float
    tokens_per_s_per_gpu: float
    mfu: float


def bubble_fraction(schedule: str, pp: int, n_micro: int, stages_per_rank: int) -> float:
    """The pipeline bubble as a fraction of a pass (see THROUGHPUT_MODEL)."""
    if pp == 1:
        return 0.0
    one_stage = (pp - 1) / (n_micro + pp - 1)
    kind = SCHEDULES[schedule]
    if kind.placement == "single":
        return one_stage
    if kind.zero_bubble and n_micro >= 2 * pp:
        return 0.0
    return one_stage / stages_per_rank


def _collective(
    size: float, n: int, link: tuple[float, float], count: int = 1, all_reduce: bool = False
) -> float:
    """Seconds of `count` ring all-gathers or reduce-scatters (or all-reduces: twice) of `size`
    bytes in all (whole tensors) over n ranks: n - 1 steps of each, a latency per step, and
    (n-1)/n of the bytes through each rank's link of (GB/s, step latency s)."""
    if n <= 1:
        return 0.0
    steps = (2 if all_reduce else 1) * (n - 1)
    return count * steps * link[1] + steps / n * size / (link[0] * 1e9)


def _link(gpu: GPU, stride: int, size: int) -> tuple[float, float]:
    """(GB/s, ring-step latency) of a group of `size` ranks `stride` apart."""
    if stride * size <= gpu.gpus_per_node:
        return gpu.nvlink_gb_s, STEP_LATENCY["nvlink"]
    return gpu.network_gb_s, STEP_LATENCY["network"]


@dataclass
class _Pass:
    """One accumulation pass (a local batch through the rank's stages) on one pp rank."""

    args: ModelArgs
    par: Parallelism
    dims: ParallelDims
    seq_len: int
    local_batch_size: int
    ac_mode: str
    float8: bool
    gpu: GPU
    compile_blocks: bool

    def compute(self, stages: tuple[Stage, ...]) -> float:
        """Seconds of this rank's FLOPs for the pass."""
        a, d = self.args, self.dims
        f8 = float8_linears(a) if self.float8 else frozenset()
        sizes = linear_sizes(a)
        attention = 12 * a.n_heads * a.head_dim * self.seq_len
        linear = 6 * sum(sizes.values())
        fast = 6 * sum(sizes[n] for n in f8)
        norms = 6 * module_params(a, "layers.0") - linear
        recompute_fast, recompute_slow = self._recompute(sizes, f8, attention, norms)
        per_block = (linear - fast + attention + norms + recompute_slow) + (
            fast + recompute_fast
        ) / FLOAT8_MATMUL_SPEEDUP
        n_blocks = sum(st.blocks for st in stages)
        flops = n_blocks * per_block
        if any("output" in st.extras for st in stages):
            flops += output_flops(a)
        tokens = self.local_batch_size * self.seq_len / (d.tp * d.cp)
        efficiency = BF16_EFFICIENCY * (1.0 if self.compile_blocks else EAGER_EFFICIENCY)
        return flops * tokens / (self.gpu.peak_bf16 * efficiency)

    def _recompute(
        self, sizes: dict, f8: frozenset, attention: int, norms: int
    ) -> tuple[float, float]:
        """(float8, bf16) FLOPs per token a block recomputes under the AC mode (selective: op)."""
        if self.ac_mode == "full":
            redo, extra = list(LINEAR_ORDER), (attention + norms) / 3
        elif self.ac_mode == "selective":
            redo, extra = [n for n in LINEAR_ORDER if n not in sac_saved_linears()], 0
        else:
            return 0.0, 0.0
        fast = 2 * sum(sizes[n] for n in redo if n in f8)
        return fast, 2 * sum(sizes[n] for n in redo if n not in f8) + extra

    @property
    def n_micro(self) -> int:
        """Forward passes of the blocks per accumulation pass (pipeline micro-batches)."""
        mbs = self.par.pipeline_parallel_microbatch_size
        return self.local_batch_size // mbs if self.dims.pp > 1 else 1

    def tp_cp(self, n_blocks: int) -> tuple[float, float]:
        """Seconds of TP and CP collectives for the pass (not overlapped)."""
        a, d, gpu = self.args, self.dims, self.gpu
        tokens = self.local_batch_size * self.seq_len / d.cp  # through each block, per rank
        recompute = self.ac_mode != "none"
        runs = n_blocks * self.n_micro
        tp = 0.0
        if d.tp > 1:
            f8 = float8_linears(a) if self.float8 else frozenset()
            gather = 1 if {"wq", "wk", "wv", "w1", "w3"} <= f8 else 2  # float8 all-gathers
            forward = 2 * 2 + 2 * gather  # two reduce-scatters in bf16, two all-gathers
            volume = forward * (2 if recompute else 1) + 4 * 2
            count = runs * (12 if recompute else 8)
            size = n_blocks * tokens * a.dim * volume
            tp = _collective(size, d.tp, _link(gpu, 1, d.tp), count)
        cp = 0.0
        if d.cp > 1:
            kv = self.local_batch_size * self.seq_len * 2 * a.n_kv_heads / d.tp * a.head_dim * 2
            n_coll = 4 if recompute else 3
            size = n_blocks * kv * n_coll
            cp = _collective(size, d.cp, _link(gpu, d.tp, d.cp), runs * n_coll)
        return tp, cp

    def pp_sends(self, local_stages: int) -> float:
        """Seconds of this rank's stage-boundary sends for the pass (activations forward,
        gradients backward), to the neighbouring pp rank."""
        d = self.dims
        if d.pp == 1:
            return 0.0
        s = d.tp if self.par.enable_sequence_parallel and d.tp > 1 else 1
        size = self.local_batch_size * self.seq_len / d.cp * self.args.dim * 2 / s
        bandwidth, latency = _link(self.gpu, d.tp * d.cp * d.dp, 2)
        return 2 * local_stages * (size / (bandwidth * 1e9) + self.n_micro * latency)

    def fsdp_exposed(self, stages: tuple[Stage, ...], compute: float) -> float:
        """Seconds of data-parallel collectives the pass's compute does not hide."""
        a, d, gpu = self.args, self.dims, self.gpu
        n, tp = d.fsdp_degree, d.tp
        n_blocks = sum(st.blocks for st in stages)
        extras = untied(a, [m for st in stages for m in st.extras])
        block = module_params(a, "layers.0", tp)
        params = n_blocks * block + sum(module_params(a, m, tp) for m in extras)
        units = n_blocks + 1  # FSDP units: the blocks and the root
        if d.dp_replicate > 1:  # HSDP: the gradient shards; DDP: all gradients
            link = _link(gpu, tp * d.cp * d.dp_shard, d.dp_replicate)
            count = units if n > 1 else math.ceil(4 * params / DDP_BUCKET_BYTES)
            all_reduce = _collective(4 * params / n, d.dp_replicate, link, count, True)
        else:
            all_reduce = 0.0
        if n == 1:
            return max(0.0, all_reduce - 2 * compute / 3)
        link = _link(gpu, tp, n)
        f8 = float8_linears(a) if self.float8 else frozenset()
        sizes = linear_sizes(a)
        gathered = 2 * block - sum(sizes[m] for m in f8) / tp  # float8 linears gather in float8
        root = 2 * sum(module_params(a, m, tp) for m in extras)
        times = 1 if d.pp > 1 else 2
        gather = _collective(n_blocks * gathered + root, n, link, units) * times
        scatter = _collective(4 * params, n, link, units)
        ends = _collective(gathered, n, link) + _collective(4 * block, n, link)
        if d.pp == 1:
            return max(0.0, gather + scatter + all_reduce - compute) + ends
        n_micro = self.local_batch_size // self.par.pipeline_parallel_microbatch_size
        micro = compute / n_micro
        if self.par.pipeline_parallel_grad_reduce == "microbatch":  # each micro-batch's own
            per_micro = max(0.0, scatter + all_reduce - 2 * micro / 3)
            return max(0.0, gather - micro / 3) + n_micro * per_micro + ends
        return max(0.0, gather - micro / 3) + max(0.0, scatter + all_reduce - 2 * micro / 3) + ends


def estimate_step(
    args: ModelArgs,
    par: Parallelism,
    dims: ParallelDims,
    seq_len: int,
    local_batch_size: int,
    global_batch_size: int,
    ac_mode: str,
    float8: bool,
    gpu: GPU,
    compile_blocks: bool = True,
) -> StepTime:
    """Seconds per optimizer step of `global_batch_size` sequences of seq_len tokens (see
    THROUGHPUT_MODEL); args.max_seq_len should be seq_len (titan sizes RoPE to it)."""
    if par.pipeline_parallel_schedule_csv:
        raise ValueError(
            "the throughput model has no bubble for a CSV schedule "
            f"({par.pipeline_parallel_schedule_csv!r}): name one of {', '.join(SCHEDULES)} in "
            "pipeline_parallel_schedule instead (its memory: plan_config.config_estimate)"
        )
    one = _Pass(args, par, dims, seq_len, local_batch_size, ac_mode, float8, gpu, compile_blocks)
    ranks = rank_stages(args.n_layers, pipeline_split(par))
    blocks = [sum(st.blocks for st in stages) for stages in ranks]
    parts = []
    for r in sorted({0, dims.pp - 1, blocks.index(max(blocks))}):
        compute = one.compute(ranks[r])
        tp, cp = one.tp_cp(blocks[r])
        parts.append(
            (compute, tp, cp, one.pp_sends(len(ranks[r])), one.fsdp_exposed(ranks[r], compute))
        )
    compute, tp, cp, pp, fsdp = (max(p[i] for p in parts) for i in range(5))
    n_micro = local_batch_size // par.pipeline_parallel_microbatch_size
    bubble = bubble_fraction(par.pipeline_parallel_schedule, dims.pp, n_micro, len(ranks[0]))
    passes = global_batch_size // (dims.dp * local_batch_size)
    step = passes * ((compute + tp + cp) / (1 - bubble) + pp + fsdp)
    tokens = global_batch_size * seq_len
    fpt = flops_per_token(args)
    world = dims.world_size
    return StepTime(
        compute=passes * compute, tp=passes * tp, cp=passes * cp, pp=passes * pp,
        fsdp_exposed=passes * fsdp, bubble=bubble, step=step,
        tokens_per_s_per_gpu=tokens / step / world,
        mfu=fpt * tokens / (step * world * gpu.peak_bf16),
    )  # fmt: skip


def flops_per_token(args: ModelArgs) -> int:
    """Training FLOPs per token as titan's metrics line counts them (metrics.model_flops), for
    sequences of args.max_seq_len."""
    key = (args.dim, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim, args.vocab_size)
    return _flops_per_token(key, args.n_layers, args.max_seq_len, args.tie_word_embeddings)


@functools.lru_cache(maxsize=256)
def _flops_per_token(key: tuple, n_layers: int, seq_len: int, tied: bool) -> int:
    import torch

    dim, n_heads, n_kv_heads, ffn, vocab = key
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     vocab_size=vocab, max_seq_len=seq_len, tie_word_embeddings=tied)  # fmt: skip
    args.ffn_hidden_dim = ffn
    return model_flops(args, parameter_count(args), 0, torch.device("cpu"), torch.bfloat16)[0]
