"""The GPU check's cases: what each measures, its shapes (full on one GPU, or --smoke on a CPU),
its time limits and its order, and the comparisons the report draws between them."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3

# Cases run one at a time, in this order: if the budget runs out, the last ones are lost.
ORDER = [
    "titan_bf16",
    "torchtitan_bf16",
    "hf_bf16",
    "generate_1b",
    "titan_float8_tensorwise",
    "titan_float8_rowwise",
    "titan_flex_block_causal",
    "titan_bf16_eager",
    "titan_muon",
]
STATUSES = ("ok", "skipped", "failed", "timeout", "out_of_time")

# Llama 3 8B's sizes, for the default number of blocks (titan.models.llama3.FLAVORS["8B"]).
_8B_BLOCK_PARAMS = 218_112_000  # attention 41.9 M + SwiGLU 176.2 M + two norms
_8B_EMBED_OUTPUT_PARAMS = 2 * 128_256 * 4_096


@dataclass(frozen=True)
class Case:
    name: str
    leg: str  # titan | hf | torchtitan | generate: which worker runs it
    title: str  # what the report calls it
    spec: dict  # what the worker reads
    timeout_s: int  # its own limit
    min_s: int  # not started with less than this left of the budget
    dry_run: bool = False  # also trace its config with titan's dry run (titan cases)


@dataclass(frozen=True)
class Comparison:
    name: str
    numerator: str  # case names; the ratio is of tokens/s
    denominator: str


COMPARISONS = [
    Comparison("titan / torchtitan 0.3.0", "titan_bf16", "torchtitan_bf16"),
    Comparison("titan / HF loop", "titan_bf16", "hf_bf16"),
    Comparison("float8 tensorwise / bf16", "titan_float8_tensorwise", "titan_bf16"),
    Comparison("float8 rowwise / bf16", "titan_float8_rowwise", "titan_bf16"),
    Comparison("flex block_causal / causal", "titan_flex_block_causal", "titan_bf16"),
    Comparison("compile / eager", "titan_bf16", "titan_bf16_eager"),
    Comparison("Muon / AdamW", "titan_muon", "titan_bf16"),
]


@dataclass(frozen=True)
class Shapes:
    """The model and run every training case shares, and the generation run's."""

    config: str  # titan's TOML the training cases start from
    flavor: str
    layers: int
    seq_len: int
    batch: int
    warmup: int
    steps: int
    compile: bool
    device: str  # cuda | cpu
    gen_flavor: str
    gen_batches: list[int] = field(default_factory=list)
    gen_prompt_len: int = 128
    gen_new_tokens: int = 128
    gen_repeats: int = 2


def default_layers(memory_bytes: int) -> int:
    """The most 8B-shaped blocks the hungriest leg fits on a device of `memory_bytes`.

    That leg is the HF loop (eager, no activation checkpointing): its AdamW state and fp32
    weights and gradients (16 bytes a parameter) plus titan's fp32 weights it was copied from (4),
    about 2 GiB of saved activations a block at seq 8192, about 16 GiB around the loss (bf16 and
    fp32 logits, log-probabilities and their gradient) and 2 GiB of CUDA context and workspaces,
    within 90 % of the device. H100 80 GB: 5 blocks; H200 141 GB: 14. An estimate, not a
    measurement: --layers overrides it.
    """
    block = _8B_BLOCK_PARAMS * 20 + 2 * GIB
    fixed = _8B_EMBED_OUTPUT_PARAMS * 20 + 18 * GIB
    return max(1, min(32, int((0.9 * memory_bytes - fixed) // block)))


def full_shapes(layers: int) -> Shapes:
    """One H100/H200: 8B's shape with `layers` blocks, seq 8192, bf16, compile, selective AC."""
    return Shapes(
        config="titan/train_configs/llama3_8b.toml", flavor="8B", layers=layers, seq_len=8192,
        batch=1, warmup=3, steps=8, compile=True, device="cuda",
        gen_flavor="1B", gen_batches=[1, 16],
    )  # fmt: skip


def smoke_shapes(device: str) -> Shapes:
    """Tiny and eager (a cold compile takes minutes on a CPU): checks the plumbing, not speed."""
    return Shapes(
        config="titan/train_configs/debug_model.toml", flavor="debugmodel", layers=2, seq_len=64,
        batch=2, warmup=2, steps=2, compile=False, device=device,
        gen_flavor="debugmodel", gen_batches=[1, 2], gen_prompt_len=8, gen_new_tokens=4,
        gen_repeats=1,
    )  # fmt: skip


def _training_spec(s: Shapes, **extra) -> dict:
    keys = ("flavor", "layers", "seq_len", "batch", "warmup", "steps", "compile", "device")
    spec = {k: getattr(s, k) for k in keys} | {"config": str(ROOT / s.config)}
    # float8's size filter keeps linears too small to gain in bf16: all of a smoke model's
    spec |= {"converters": [], "recipe": None, "float8_auto_filter": s.flavor != "debugmodel"}
    spec |= {"optimizer": "AdamW"}
    return spec | {"mask": "causal"} | extra


def plan(shapes: Shapes, smoke: bool) -> list[Case]:
    """Every case, in ORDER, with its spec and limits (seconds on one H100/H200; smoke: CPU)."""
    s = shapes
    scale = 0.5 if smoke else 1.0  # smoke cases are small, but import torch all the same

    def limits(timeout: int, least: int) -> dict:
        return {"timeout_s": int(timeout * scale), "min_s": int(least * scale)}

    gen = {
        "flavor": s.gen_flavor, "batches": s.gen_batches, "prompt_len": s.gen_prompt_len,
        "new_tokens": s.gen_new_tokens, "repeats": s.gen_repeats, "device": s.device,
    }  # fmt: skip
    dt = "bf16" if s.device == "cuda" else "fp32"  # titan and the HF loop: fp32 on a CPU
    cases = [
        Case("titan_bf16", "titan", f"titan, {dt}, causal (SDPA)", _training_spec(s),
             **limits(180, 60), dry_run=True),
        Case("torchtitan_bf16", "torchtitan", "torchtitan 0.3.0, bf16, flex (a document a row)",
             _training_spec(s), **limits(180, 30)),
        Case("hf_bf16", "hf", f"HF transformers loop, {dt}, eager, no AC", _training_spec(s),
             **limits(120, 40)),
        Case("generate_1b", "generate", f"generation, {s.gen_flavor}, KV cache, eager",
             gen, **limits(90, 30)),
        Case("titan_float8_tensorwise", "titan", "titan, float8 tensorwise",
             _training_spec(s, converters=["float8"], recipe="tensorwise"),
             **limits(180, 60), dry_run=True),
        Case("titan_float8_rowwise", "titan", "titan, float8 rowwise",
             _training_spec(s, converters=["float8"], recipe="rowwise"),
             **limits(180, 60), dry_run=True),
        Case("titan_flex_block_causal", "titan", f"titan, {dt}, block_causal (flex on CUDA)",
             _training_spec(s, mask="block_causal"), **limits(180, 60), dry_run=True),
        # the dry run traces the eager step: this is the case its estimate should match
        Case("titan_bf16_eager", "titan", f"titan, {dt}, causal (SDPA), eager",
             _training_spec(s, compile=False), **limits(120, 40), dry_run=True),
        # Muon's step: the gathered Newton-Schulz per block matrix against AdamW's (last: the
        # case a short budget drops first)
        Case("titan_muon", "titan", f"titan, {dt}, Muon on the blocks' matrices",
             _training_spec(s, optimizer="Muon"), **limits(180, 60), dry_run=True),
    ]  # fmt: skip
    assert [c.name for c in cases] == ORDER
    return cases


def describe(shapes: Shapes) -> str:
    """The model line of the report."""
    s = shapes
    dtype = "bf16" if s.device == "cuda" else "fp32"
    compiled = "compile" if s.compile else "eager"
    return (
        f"{s.flavor}'s shape with {s.layers} blocks, seq {s.seq_len}, local batch {s.batch}, "
        f"{dtype}, {compiled}, selective AC; {s.warmup} warmup + {s.steps} timed steps on "
        f"{s.device}"
    )


def as_dict(shapes: Shapes) -> dict:
    return dataclasses.asdict(shapes)
