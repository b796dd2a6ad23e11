"""What one transformer block keeps for its backward per token, by activation checkpointing
mode and layout (the activations part of memory_model's estimate)."""

from titan.models.llama3.args import ModelArgs
from titan.planning.model_sizes import sac_saved_linears


def block_activation_bytes(
    args: ModelArgs,
    tp: int,
    sequence_parallel: bool,
    ac_mode: str,
    autocast: bool = False,
    ring_steps: float = 1.0,
) -> tuple[float, float]:
    """(bytes one block keeps for backward per token, bytes it keeps with no AC per token).

    No AC, bf16 weights (FSDP's mixed precision): each RMSNorm saves its fp32 upcast (4 dim),
    the rsqrt (4) and the bf16 normalized input of `* weight` (2 dim); wq/wk/wv and w1/w3 save
    their (TP: all-gathered) input (2 dim each); flash attention saves the rotated q, k, v, its
    output (shared with wo's input) and the fp32 logsumexp per head; SwiGLU saves w1's and
    w3's outputs, silu's output and the product. autocast (fp32 weights, no FSDP): the residual
    stream is fp32 (the block input and its midpoint, 4 dim each), each norm saves the rsqrt
    and its fp32 output, and each of wq, wk, wv, w1 and w3 saves its own bf16 cast of its input.
    Sequence parallel shards what lies between the matmuls by tp. Full AC: the block input.
    Selective op (titan's policy): the block input, attention's output and logsumexp, and every
    second matmul output, float8 or not. Context parallel's causal ring runs attention once per
    rotation step and the policy keeps every step's output and logsumexp: ring_steps of them,
    counted in whole-query outputs (ring_attention_steps).
    """
    d, hd, t = args.dim, args.head_dim, tp
    s = tp if sequence_parallel and tp > 1 else 1
    h, kv, ffn = args.n_heads / t, args.n_kv_heads / t, args.ffn_hidden_dim / t
    if autocast:
        norms = (2 * (4 * d + 4) + 2 * 4 * d) / s  # and the fp32 residual stream
        inputs = 5 * 2 * d
    else:
        norms = 2 * (4 * d + 4 + 2 * d) / s
        inputs = 2 * (2 * d)  # attention's and the FFN's matmul input, whole sequence
    attention = 2 * (h + 2 * kv) * hd + 2 * h * hd + 4 * h
    none = norms + inputs + attention + 4 * 2 * ffn
    block_input = (4 if autocast else 2) * d / s
    if ac_mode == "none":
        return none, none
    if ac_mode == "full":
        return block_input, none
    outputs = {"wq": h * hd, "wk": kv * hd, "wv": kv * hd, "wo": d, "w1": ffn, "w3": ffn, "w2": d}
    saved_mm = sum(2 * outputs[n] for n in sac_saved_linears())
    return block_input + ring_steps * (2 * h * hd + 4 * h) + saved_mm, none


def ring_attention_steps(cp: int, cp_rank: int, causal: bool) -> float:
    """Attention outputs, in whole-query outputs, that context-parallel rank cp_rank's attention
    makes per block: torch's load-balanced causal ring attends all of the rank's queries at
    rotation steps 0 to cp_rank and their second half at the cp - 1 - cp_rank later ones;
    block_causal (titan's all-gathered keys and values) attends once."""
    if cp == 1 or not causal:
        return 1.0
    return (cp + 1 + cp_rank) / 2
