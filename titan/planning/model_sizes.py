"""Sizes of Llama 3 as titan builds and splits it: each module's parameters (TP- and
FSDP-sharded), the pipeline stages each rank holds (titan's own split), the linears titan's
float8 converter swaps, and training FLOPs per token of a block and of the output layer."""

import functools
import logging
import math
from typing import NamedTuple

from titan.config.job_config import Float8, Parallelism
from titan.models.llama3.args import ModelArgs

# a block's linears in the order its forward calls them (SAC's policy counts matmuls in order)
LINEAR_ORDER = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")


def module_shapes(args: ModelArgs, name: str) -> list[tuple[tuple[int, ...], int | None]]:
    """(shape, the dim tensor parallel shards or None) of each parameter of a top-level module:
    tok_embeddings, layers.N, norm or output (titan's TP plan: colwise in, rowwise out)."""
    dim, hd = args.dim, args.head_dim
    if name == "tok_embeddings":
        return [((args.vocab_size, dim), 0)]
    if name == "output":
        return [((args.vocab_size, dim), 0)]
    if name == "norm":
        return [((dim,), None)]
    q, kv, ffn = args.n_heads * hd, args.n_kv_heads * hd, args.ffn_hidden_dim
    return [
        ((q, dim), 0), ((kv, dim), 0), ((kv, dim), 0), ((dim, q), 1),  # wq wk wv wo
        ((ffn, dim), 0), ((dim, ffn), 1), ((ffn, dim), 0),  # w1 w2 w3
        ((dim,), None), ((dim,), None),  # attention_norm, ffn_norm
    ]  # fmt: skip


def module_params(args: ModelArgs, name: str, tp: int = 1, shard: int = 1) -> int:
    """Elements of a module's parameters on one rank: TP-sharded, then FSDP-sharded on dim 0
    over `shard` ranks (FSDP2 pads dim 0 to a multiple of the shards: ceil)."""
    if name.startswith("layers."):
        name = "layers.0"  # every block has the same shapes
    return _module_params(_key(args), name, tp, shard)


def _key(args: ModelArgs) -> tuple:
    return (args.dim, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim, args.vocab_size)


@functools.lru_cache(maxsize=4096)
def _module_params(key: tuple, name: str, tp: int, shard: int) -> int:
    dim, n_heads, n_kv_heads, ffn, vocab = key
    args = ModelArgs(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab)
    args.ffn_hidden_dim = ffn
    total = 0
    for shape, tp_dim in module_shapes(args, name):
        local = list(shape)
        if tp_dim is not None:
            local[tp_dim] //= tp
        local[0] = math.ceil(local[0] / shard)
        total += math.prod(local)
    return total


def parameter_count(args: ModelArgs) -> int:
    """Parameters of the whole model (tied embeddings once)."""
    extras = untied(args, ["tok_embeddings", "norm", "output"])
    return args.n_layers * module_params(args, "layers.0") + sum(
        module_params(args, n) for n in extras
    )


class Stage(NamedTuple):
    """A pipeline stage's contents: its block count and its other top-level modules."""

    blocks: int
    extras: tuple[str, ...]  # of tok_embeddings, norm, output


def stage_params(args: ModelArgs, stages: list[Stage], tp: int = 1, shard: int = 1) -> int:
    """module_params summed over the stages' modules (every block has the same shapes)."""
    extras = untied(args, [n for st in stages for n in st.extras])
    n_blocks = sum(st.blocks for st in stages)
    others = sum(module_params(args, n, tp, shard) for n in extras)
    return others + (n_blocks and n_blocks * module_params(args, "layers.0", tp, shard))


def untied(args: ModelArgs, names: list[str]) -> list[str]:
    """`names` without output when it is tied to tok_embeddings (one parameter, counted once)."""
    if args.tie_word_embeddings and "tok_embeddings" in names:
        return [n for n in names if n != "output"]
    return names


class Split(NamedTuple):
    """The [parallelism] keys that decide a pipeline's stages and which rank runs them
    (hashable, for the caches below): the degree, the schedule, the split (layers_per_stage,
    first/last_stage_less_layers, or explicit module names per stage) and a CSV schedule."""

    pp: int
    schedule: str = "1F1B"
    layers_per_stage: int | None = None
    first_less: int = 0
    last_less: int = 0
    module_names: tuple[str, ...] = ()
    csv: str = ""

    def parallelism(self) -> Parallelism:
        """A [parallelism] section with these keys (titan's defaults elsewhere)."""
        return Parallelism(
            pipeline_parallel_degree=self.pp,
            pipeline_parallel_schedule=self.schedule,
            pipeline_parallel_layers_per_stage=self.layers_per_stage,
            pipeline_parallel_first_stage_less_layers=self.first_less,
            pipeline_parallel_last_stage_less_layers=self.last_less,
            pipeline_parallel_module_names_per_stage=list(self.module_names),
            pipeline_parallel_schedule_csv=self.csv,
        )


def pipeline_split(par: Parallelism) -> Split:
    """The keys of `par` that the stage functions below read."""
    return Split(
        par.pipeline_parallel_degree,
        par.pipeline_parallel_schedule,
        par.pipeline_parallel_layers_per_stage,
        par.pipeline_parallel_first_stage_less_layers,
        par.pipeline_parallel_last_stage_less_layers,
        tuple(par.pipeline_parallel_module_names_per_stage),
        par.pipeline_parallel_schedule_csv,
    )


@functools.lru_cache(maxsize=4096)
def _rank_stage_names(n_layers: int, split: Split) -> tuple[tuple[tuple[str, ...], ...], ...]:
    from titan.models.llama3.pipeline import split_module_names
    from titan.parallelisms.pipeline import num_stages, rank_stages

    cfg = split.parallelism()
    n_stages = num_stages(cfg, n_layers)
    names = split_module_names(ModelArgs(n_layers=n_layers), cfg, n_stages)  # blocks only matter
    return tuple(tuple(tuple(names[s]) for s in held) for held in rank_stages(cfg, n_stages))


def rank_modules(args: ModelArgs, split: Split) -> list[list[list[str]]]:
    """Per pipeline rank, its stages' top-level module names, from titan's own split
    (titan.models.llama3.pipeline.split_module_names) and stage placement (rank_stages)."""
    held = _rank_stage_names(args.n_layers, split)
    return [[list(stage) for stage in stages] for stages in held]


@functools.lru_cache(maxsize=4096)
def rank_stage_ids(n_layers: int, split: Split) -> tuple[tuple[int, ...], ...]:
    """Per pipeline rank, the indices of the stages it holds (titan's rank_stages); pp 1: 0."""
    if split.pp == 1:
        return ((0,),)
    from titan.parallelisms.pipeline import num_stages
    from titan.parallelisms.pipeline import rank_stages as placement

    cfg = split.parallelism()
    return tuple(tuple(held) for held in placement(cfg, num_stages(cfg, n_layers)))


@functools.lru_cache(maxsize=4096)
def rank_stages(n_layers: int, split: Split) -> tuple[tuple[Stage, ...], ...]:
    """Per pipeline rank, its stages' contents (block count and other modules), in order."""

    def stage(names: tuple[str, ...]) -> Stage:
        blocks = sum(n.startswith("layers.") for n in names)
        return Stage(blocks, tuple(n for n in names if not n.startswith("layers.")))

    held = _rank_stage_names(n_layers, split)
    return tuple(tuple(stage(names) for names in stages) for stages in held)


@functools.lru_cache(maxsize=64)
def _float8_linears(dim: int, n_heads: int, n_kv_heads: int, ffn: int) -> frozenset[str]:
    import torch
    from torch import nn

    from titan.converters.float8 import module_filter

    logging.getLogger("torchao").setLevel(logging.ERROR)  # CUDA kernel libraries absent on CPU
    keep = module_filter(Float8())  # titan's filter with the default recipe and thresholds
    hd = dim // n_heads
    shapes = {"wq": (dim, n_heads * hd), "wk": (dim, n_kv_heads * hd),
              "wv": (dim, n_kv_heads * hd), "wo": (n_heads * hd, dim), "w1": (dim, ffn),
              "w3": (dim, ffn), "w2": (ffn, dim)}  # fmt: skip
    with torch.device("meta"):
        return frozenset(n for n, s in shapes.items() if keep(nn.Linear(*s, bias=False), n))


def float8_linears(args: ModelArgs) -> frozenset[str]:
    """The block linears (wq ... w2) titan's float8 converter swaps with its default settings
    (quantize.linear.float8: tensorwise, auto_filter_small_kn); the output layer stays bf16."""
    return _float8_linears(args.dim, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim)


def linear_sizes(args: ModelArgs) -> dict[str, int]:
    """Weight elements of each block linear, in LINEAR_ORDER."""
    return _linear_sizes(_key(args))


@functools.lru_cache(maxsize=64)
def _linear_sizes(key: tuple) -> dict[str, int]:
    dim, n_heads, n_kv_heads, ffn, _ = key
    head_dim = dim // n_heads
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    sizes = (q, kv, kv, q, ffn, ffn, ffn)
    return {name: size * dim for name, size in zip(LINEAR_ORDER, sizes, strict=True)}


def block_flops(args: ModelArgs, seq_len: int) -> int:
    """Training FLOPs per token of one block, by titan's count (metrics.flops_per_token): 6 per
    parameter plus 12 x heads x head_dim x seq_len for attention."""
    return 6 * module_params(args, "layers.0") + 12 * args.n_heads * args.head_dim * seq_len


def output_flops(args: ModelArgs) -> int:
    """Training FLOPs per token of the final norm and the output layer, by titan's count (the
    embedding lookup does none)."""
    return 6 * (args.vocab_size * args.dim + args.dim)


def sac_saved_linears() -> list[str]:
    """The block linears whose outputs titan's op-level selective AC saves: every second matmul
    in forward order, from the first, float8 or not (the policy sees a float8 linear's matmul
    as aten.mm on torchao's float8 tensors, and counts it with the others)."""
    return list(LINEAR_ORDER[::2])
