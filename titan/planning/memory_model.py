"""Analytic per-rank peak memory of a titan GPU run (bf16 compute through FSDP's mixed precision,
fp32 master weights, gradients and AdamW moments) for a parallel layout: the dry run's parts
(titan.trainer.dry_run) at the point of the step's schedule where they peak."""

import functools
import math
from dataclasses import dataclass

from titan.config.job_config import Parallelism
from titan.models.llama3.args import ModelArgs
from titan.parallelisms.parallel_dims import ParallelDims
from titan.planning.activation_sizes import block_activation_bytes, ring_attention_steps
from titan.planning.model_sizes import (
    Stage,
    float8_linears,
    linear_sizes,
    module_params,
    pipeline_split,
    rank_stage_ids,
    rank_stages,
    stage_params,
    untied,
)
from titan.planning.schedule_memory import (
    PARTS,
    StageBytes,
    peak_points,
    point_parts,
    point_total,
)

GIB = 1024**3
AC_MODES = ("none", "full", "selective")
DDP_BUCKET_BYTES = 100 * 2**20  # apply_ddp's bucket_cap_mb

LEAVES_OUT = (
    "Not counted: the CUDA context and NCCL's buffers (~1-2 GiB per GPU); the caching allocator's "
    "fragmentation and cached free blocks (often 5-15 % on top); torch.compile's changes to the "
    "blocks (modelled eager, as the dry run traces them; fused blocks need not keep RMSNorm's fp32 "
    "upcasts; compiled_loss covers the loss); flash attention's and cuBLAS's workspaces; "
    "float8's scales; the data loader's tensors. Checked against titan's dry run (a traced step): "
    "within a few percent for the shipped configs and the debug model's layouts."
)


@dataclass
class MemoryEstimate:
    """Bytes on one pipeline rank at its peak, by part: the dry run's parts (its trace's
    `peak` in dry_run.json), at the moment of the step the model finds the peak at."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int  # what forward left for backward (the eager loss's log-probs included)
    backward_temporaries: int  # the loss's gradients, a block's recompute, weight gradients
    gathered_parameters: int  # FSDP's gathered weights (no FSDP: autocast's bf16 copies)
    communication_buffers: int  # pipeline receive buffers, reduce-scatter and TP/CP gathers
    buffers: int  # the RoPE table
    pp_rank: int = 0  # the pipeline rank these figures are for
    moment: str = ""  # when in the step the peak is, e.g. "end of stage 0's backward"
    leaves_out: str = LEAVES_OUT

    @property
    def total(self) -> int:
        return sum(getattr(self, p) for p in PARTS)

    @property
    def dominant(self) -> str:
        """The largest part's name."""
        return max(PARTS, key=lambda p: getattr(self, p))


# ---- the estimate --------------------------------------------------------------------------


def estimate_memory(
    args: ModelArgs,
    par: Parallelism,
    dims: ParallelDims,
    seq_len: int,
    local_batch_size: int,
    ac_mode: str = "none",
    float8: bool = False,
    ac_option: str = "op",
    float8_all_gather: bool = True,
    compiled_loss: bool = False,
    grad_accumulation: int = 1,
    pp_rank: int | None = None,
    moment_bytes: int = 8,
    cp_rank: int | None = None,
    loss_chunk_tokens: int = 1024,
    activation_offload: bool = False,
    muon: bool = False,
) -> MemoryEstimate:
    """Peak bytes of a training step of the layout `par` (`dims`: its degrees, as titan
    resolves them) on pipeline rank `pp_rank`, or (None) on the one that peaks highest among
    the first, the last and the one with the most blocks (pp 1: the only one). ac_mode: none,
    full or selective (ac_option "op", or "N": every N-th block, full); float8: titan's float8
    converter (default settings); float8_all_gather: FSDP gathers the float8 linears' weights
    in float8 (quantize.linear.float8.enable_fsdp_float8_all_gather); compiled_loss:
    compile.components includes "loss" (the dry run traces the eager loss); grad_accumulation:
    micro-batch steps of local_batch_size per optimizer step; moment_bytes: Adam's two moments
    per parameter (8 fp32, 4 with optimizer.state_dtype bfloat16); cp_rank: the context-parallel
    rank (None: the last, whose causal ring attention keeps the most under selective AC);
    loss_chunk_tokens: training.loss_chunk_tokens (0: the plain loss, eager or compiled);
    activation_offload: activation_checkpoint.offload (what blocks save kept on the host, but
    the last block's of each stage and what AC keeps). parallelism.fsdp_cpu_offload: the weight,
    gradient and optimizer state shards on the host; muon: optimizer.name = "Muon" (one fp32
    momentum buffer for the blocks' matrices, AdamW's moments for the rest; its step's gathered
    matrix, freed before the next is gathered, stays below the backward's peak and is left out:
    the dry run traces it). Host memory is left out of the estimate."""
    if ac_mode not in AC_MODES:
        raise ValueError(f"ac_mode {ac_mode!r}: use one of {', '.join(AC_MODES)}")
    ranks = rank_stages(args.n_layers, pipeline_split(par))
    step = _Step(
        args, par, dims, seq_len, local_batch_size, ac_mode, ac_option, float8,
        float8 and float8_all_gather, compiled_loss, grad_accumulation, moment_bytes,
        dims.cp - 1 if cp_rank is None else cp_rank, loss_chunk_tokens, activation_offload, muon,
    )  # fmt: skip
    if pp_rank is not None:
        return step.rank(pp_rank, ranks[pp_rank])
    blocks = [sum(st.blocks for st in stages) for stages in ranks]
    peaks = {0, dims.pp - 1, blocks.index(max(blocks))}
    return max((step.rank(r, ranks[r]) for r in sorted(peaks)), key=lambda e: e.total)


def state_bytes(args: ModelArgs, par: Parallelism, dims: ParallelDims) -> int:
    """fp32 weights and AdamW's two fp32 moments of pipeline rank 0's shards: a lower bound on
    estimate_memory, for ruling layouts out quickly."""
    ranks = rank_stages(args.n_layers, pipeline_split(par))
    return 12 * stage_params(args, list(ranks[0]), dims.tp, dims.fsdp_degree)


@dataclass
class _Step:
    """One training step's settings; its methods give one pipeline rank's terms."""

    args: ModelArgs
    par: Parallelism
    dims: ParallelDims
    seq_len: int
    local_batch_size: int
    ac_mode: str
    ac_option: str
    float8: bool
    float8_all_gather: bool = False
    compiled_loss: bool = False
    grad_accumulation: int = 1
    moment_bytes: int = 8  # Adam's two moments per parameter (bf16: 4)
    cp_rank: int = 0
    loss_chunk: int = 0  # tokens per chunk of the loss (0: the plain loss)
    activation_offload: bool = False  # blocks' saved tensors on the host (but the last's)
    muon: bool = False  # Muon: one fp32 buffer for the blocks' matrices

    @property
    def per_micro_sync(self) -> bool:
        """Pipelined FSDP stages reduce-scatter after every micro-batch's backward
        (parallelism.pipeline_parallel_grad_reduce = microbatch): sharded accumulation."""
        d = self.dims
        return (
            d.pp > 1
            and d.fsdp_degree > 1
            and self.par.pipeline_parallel_grad_reduce == "microbatch"
        )

    @property
    def n_micro(self) -> int:
        """Pipeline micro-batches per local batch (1 without pipeline parallel)."""
        mbs = self.par.pipeline_parallel_microbatch_size
        return self.local_batch_size // mbs if self.dims.pp > 1 else 1

    @property
    def tokens(self) -> float:
        """Tokens one rank runs through its blocks at once: a micro-batch (pp) or the local
        batch, of seq_len / cp tokens each."""
        pipelined = self.dims.pp > 1
        seqs = self.par.pipeline_parallel_microbatch_size if pipelined else self.local_batch_size
        return seqs * self.seq_len / self.dims.cp

    @property
    def sp(self) -> int:
        """The factor sequence parallel shards activations between blocks by."""
        tp = self.dims.tp
        return tp if self.par.enable_sequence_parallel and tp > 1 else 1

    @functools.cached_property
    def per_token(self) -> tuple[float, float]:
        """block_activation_bytes for this step: (kept per token, kept with no AC)."""
        a, d = self.args, self.dims
        autocast = d.fsdp_degree == 1
        sp = self.par.enable_sequence_parallel
        ring = ring_attention_steps(d.cp, self.cp_rank, a.attn_mask_type == "causal")
        return block_activation_bytes(a, d.tp, sp, self.ac_mode, autocast, ring)

    @property
    def edge(self) -> float:
        """Bytes of one micro-batch's activation between blocks and stages: bf16, fp32 with
        autocast (no FSDP: the residual stream stays fp32)."""
        width = 2 if self.dims.fsdp_degree > 1 else 4
        return self.tokens * width * self.args.dim / self.sp

    @property
    def vocab(self) -> float:
        """Logits per token on a rank (loss parallel keeps them sharded over tp)."""
        loss_parallel = not self.par.disable_loss_parallel
        return self.args.vocab_size / (self.dims.tp if loss_parallel else 1)

    def rank(self, pp_rank: int, stages: tuple[Stage, ...]) -> MemoryEstimate:
        """The rank's peak over the points of its step (schedule_memory.peak_points): its
        static state (fp32 weights and AdamW's two moments of its shards, fp32 or bf16) plus, at
        each point, the micro-batches in flight, gradients, gathered weights and transients."""
        d, schedule = self.dims, self.par.pipeline_parallel_schedule
        local = stage_params(self.args, list(stages), d.tp, d.fsdp_degree)
        split = pipeline_split(self.par)
        held = rank_stage_ids(self.args.n_layers, split)
        terms = [self.stage(st) for st in stages]
        n_micro = self.n_micro if d.pp > 1 else min(self.grad_accumulation, 2)
        points = peak_points(
            schedule, d.pp, pp_rank, n_micro, held[pp_rank], split.csv, self.per_micro_sync
        )
        prior = d.pp > 1 and self.grad_accumulation > 1  # earlier schedule steps' gradients
        # the first point of the highest total: points come in the order of the step
        where = max(points, key=lambda p: point_total(p, terms, prior))
        best = point_parts(where, terms, prior)
        if not self.par.fsdp_cpu_offload or d.fsdp_degree == 1:  # else on the host
            best["parameters"] += 4 * local
            best["optimizer_state"] += self.moment_bytes * local - self.muon_saves(stages)
        best["buffers"] += self.seq_len * self.args.head_dim * 4  # RoPE's cos and sin, fp32
        moment = f"{where.moment} of stage {held[pp_rank][where.stage]}'s backward"
        return MemoryEstimate(
            **{k: round(v) for k, v in best.items()}, pp_rank=pp_rank, moment=moment
        )

    def muon_saves(self, stages: tuple[Stage, ...]) -> int:
        """Bytes of optimizer state Muon does not hold against AdamW: it keeps one fp32 buffer
        for each block matrix (all of a block but its two norms) where AdamW keeps two moments."""
        if not self.muon:
            return 0
        d, blocks = self.dims, sum(st.blocks for st in stages)
        norms = 2 * math.ceil(self.args.dim / d.fsdp_degree)  # replicated by TP
        matrices = module_params(self.args, "layers.0", d.tp, d.fsdp_degree) - norms
        return (self.moment_bytes - 4) * blocks * matrices

    def stage(self, st: Stage) -> StageBytes:
        """One stage's terms (schedule_memory.StageBytes)."""
        a, d, tokens = self.args, self.dims, self.tokens
        first, last = "tok_embeddings" in st.extras, "output" in st.extras
        out = StageBytes(micro_batch=self.saved(st), in_block=self.block_backward)
        if d.pp > 1:
            # torch's stage allocates a receive buffer per micro-batch for its input (all but
            # the first stage) and its output's gradient (all but the last), kept all step
            out.persistent = ((not first) + (not last)) * self.n_micro * self.edge
        self.weights(st, out)
        if last:
            logits = tokens * self.vocab
            if self.loss_chunk:  # the loss's forward: its fp32 chunk beside the logits and
                # its gradient buffer (pipelined, both are in saved: micro-batches in flight)
                chunk = 4 * min(self.loss_chunk, tokens) * self.vocab
                out.at_start = {"activations": chunk + (4 * logits if d.pp == 1 else 0)}
            elif self.compiled_loss:  # inductor's backward writes the bf16 gradient directly
                out.at_start = {"backward_temporaries": 2 * logits}
            else:  # nll_loss's and log_softmax's fp32 gradients (loss parallel: 3 of them)
                n = 3 if d.tp > 1 and not self.par.disable_loss_parallel else 2
                out.at_start = {"backward_temporaries": 4 * n * logits}
        if first:  # the embedding's bf16 weight gradient (TP: the rank's vocabulary rows)
            out.at_end = {"backward_temporaries": 2 * a.vocab_size / d.tp * a.dim}
            if (d.pp == 1 or self.per_micro_sync) and d.fsdp_degree > 1:  # the root's fp32
                # reduce-scatter input
                extras = untied(a, ["tok_embeddings", "norm", "output"])
                root = sum(module_params(a, n, d.tp) for n in extras)
                out.at_end["communication_buffers"] = 4 * root
        return out

    def saved(self, st: Stage) -> float:
        """Bytes one micro-batch leaves on the stage for its backward: the blocks' saved
        tensors and FSDP's bf16 copy of the RoPE table per block, the stage's output (pp),
        and on the last stage the final norm's and the output layer's inputs and the loss's:
        chunked, its gradient in the logits' dtype (bf16); plain and eager, fp32 log-probs;
        compiled, bf16 logits and two fp32 per token; pipelined, the stage's output (the bf16
        logits) until backward."""
        a, d, tokens, s = self.args, self.dims, self.tokens, self.sp
        autocast = d.fsdp_degree == 1
        kept, none = self.per_token
        if self.ac_mode == "selective" and self.ac_option != "op":
            every = int(self.ac_option)  # apply_ac wraps blocks 0, N, 2N, ... of each stage
            wrapped = math.ceil(st.blocks / every)
            block_input = (4 if autocast else 2) * a.dim / s
            per_token = wrapped * block_input + (st.blocks - wrapped) * none
        else:
            per_token = st.blocks * kept
        if self.activation_offload and st.blocks:  # the stage's last block keeps its own
            if self.ac_mode == "selective" and self.ac_option != "op":
                every = int(self.ac_option)
                wrapped = math.ceil(st.blocks / every)
                last_kept = (st.blocks - 1) % every != 0  # an unwrapped last block
                per_token = wrapped * block_input + last_kept * none
            else:  # mode none (full and op-level AC refuse offload at start-up)
                per_token = kept
        out = tokens * per_token
        if d.fsdp_degree > 1:  # FSDP casts the fp32 table to bf16 as each block's input
            rope = self.seq_len / d.cp * a.head_dim
            out += st.blocks * rope * (2 if self.ac_mode != "none" else 4)
        first, last = "tok_embeddings" in st.extras, "output" in st.extras
        if d.pp > 1 and not first and self.ac_mode != "none":
            out -= self.edge  # the first block's saved input is the stage's receive buffer
        if d.pp > 1 and not last:
            out += self.edge  # the stage's output, kept for its backward
        if last:  # the final norm's saves (autocast: and its fp32 input), the output's input
            out += tokens * ((8 if autocast else 6) * a.dim + 4) / s + tokens * 2 * a.dim
            logits = tokens * self.vocab
            if self.loss_chunk:  # pipelined: the output and its gradient, until backward
                # (one micro-batch at a time otherwise: in stage()'s at_start, spent before
                # the blocks' backward starts)
                out += 4 * logits if d.pp > 1 else 0
            elif self.compiled_loss:
                out += 2 * logits + 8 * tokens
            else:
                out += 4 * logits + (2 * logits if d.pp > 1 else 0)
        return out

    def weights(self, st: Stage, out: StageBytes) -> None:
        """The stage's gathered weights and gradients. FSDP: bf16 (float8) gathers; pipelined,
        all of the stage's blocks stay gathered (reshard_after_forward "never") and, with the
        schedule's gradient sync off until the last micro-batch, gradients accumulate
        unsharded in fp32 (under TP each rank's part: the embedding's too, its vocabulary
        rows); else the root and the last block, gradients reduce-scattered per block.
        No FSDP: autocast's bf16 copies of the weights, fp32 gradients."""
        a, d = self.args, self.dims
        extras = untied(a, list(st.extras))
        if d.fsdp_degree == 1:  # autocast's cached bf16 casts (not of the embedding)
            local = stage_params(a, [st], d.tp)
            out.accumulating = out.synced = 4 * local
            embedding = "tok_embeddings" in extras and not a.tie_word_embeddings
            out.gathered = 2 * (local - embedding * module_params(a, "tok_embeddings", d.tp))
            return
        root = sum(2 * module_params(a, n, d.tp) for n in extras)
        blocks = st.blocks if d.pp > 1 else min(1, st.blocks)
        out.gathered = blocks * self.gathered_block + root
        out.synced = 4 * stage_params(a, [st], d.tp, d.fsdp_degree)
        out.accumulating = 4 * stage_params(a, [st], d.tp)
        if self.par.fsdp_cpu_offload:  # reduced shards go to the host
            out.synced = 0.0
        if self.per_micro_sync:  # never unsharded (peak_points: synced from the first)
            out.accumulating = out.synced

    @functools.cached_property
    def block_backward(self) -> dict[str, float]:
        """One block's backward: its recomputed activations (AC), its activation gradients,
        its bf16 weight gradients (FSDP: and their fp32 reduce-scatter input, and the next
        block's gathered weights), TP's gathered activation and CP's gathered keys/values."""
        a, d, tokens, s = self.args, self.dims, self.tokens, self.sp
        kept, none = self.per_token
        whole = self.ac_mode == "full" or self.ac_option != "op"  # selective "N": full blocks
        recompute = 0.0 if self.ac_mode == "none" else none if whole else none - kept
        # checkpointing frees each recomputed tensor once backward used it: the FFN's three
        # gradients come when part of the recompute is gone
        ffn_grads = 3 * 2 * a.ffn_hidden_dim / d.tp
        per_token = max(recompute, ffn_grads) + 2 * 2 * a.dim / s
        block = module_params(a, "layers.0", d.tp)
        out = {"backward_temporaries": tokens * per_token + 2 * block}
        comm = 0.0
        if d.fsdp_degree > 1 and d.pp == 1:
            out["gathered_parameters"] = self.gathered_block
            comm += 4 * block
        elif self.per_micro_sync:  # the block's fp32 reduce-scatter input, each micro-batch
            comm += 4 * block
        elif d.fsdp_degree == 1 and d.dp_replicate > 1:
            comm += 2 * DDP_BUCKET_BYTES
        if d.tp > 1:
            comm += tokens * a.dim * 2 / s * d.tp  # one sequence-parallel activation, gathered
        if d.cp > 1:  # all cp ranks' keys and values of one block (allgather rotation)
            comm += tokens * d.cp * 2 * (a.n_kv_heads / d.tp) * a.head_dim * 2
        out["communication_buffers"] = comm
        return out

    @functools.cached_property
    def gathered_block(self) -> float:
        """One block's unsharded weights as FSDP gathers them: bf16, float8 linears in float8
        with the float8 all-gather."""
        a, tp = self.args, self.dims.tp
        f8 = float8_linears(a) if self.float8_all_gather else frozenset()
        total = sum((1 if n in f8 else 2) * size / tp for n, size in linear_sizes(a).items())
        return total + 2 * 2 * a.dim  # the two norms, replicated over tp
