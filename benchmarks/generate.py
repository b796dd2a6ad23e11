"""Generation speed: prefill and decode tokens/s of a flavor with random weights, per batch size.

    python benchmarks/generate.py                     # the 1B flavor, on CUDA when there is one
    python benchmarks/generate.py --flavor debugmodel --device cpu   # small enough for a CPU
        [--batch-sizes 1 16] [--prompt-len 128] [--new-tokens 128] [--dtype bfloat16] [--repeats 3]

Random weights and random prompt ids of one length (no padding), greedy, no stop token: every
row makes --new-tokens tokens through titan.models.llama3.generation.generate (KV cache, eager).
Each batch size runs once untimed (allocations, kernel choice), then --repeats times; the best
run is reported. Prefill tokens/s: rows x prompt_len / prefill time. Decode tokens/s: rows x
(new_tokens - 1) / decode time (each decode step makes one token per row; sampling included).
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from titan.models.llama3 import FLAVORS, Transformer  # noqa: E402
from titan.models.llama3.generation import Generation, Sampling, generate  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(flavor: str, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> Transformer:
    # a RoPE table as long as the runs need, not the flavor's 128K positions
    args = dataclasses.replace(FLAVORS[flavor], max_seq_len=max_seq_len)
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    return model.eval()


def best_run(model: Transformer, batch: int, args: argparse.Namespace) -> Generation:
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.args.vocab_size, (batch, args.prompt_len), generator=gen)
    runs = []
    for _ in range(1 + args.repeats):  # the first is the warm-up
        runs.append(generate(model, prompts.tolist(), args.new_tokens, Sampling(0), pad_id=0))
    return min(runs[1:], key=lambda r: r.prefill_s + r.decode_s)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--flavor", choices=list(FLAVORS), default="1B")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on cuda, else fp32")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    model = build(args.flavor, args.prompt_len + args.new_tokens, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())  # a tied matrix counts once
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{args.flavor} ({n_params:,} parameters), {name}, {str(dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} torch threads, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, best of {args.repeats}"
    )
    print("| batch | prefill tokens/s | decode tokens/s | decode ms/step |")
    print("|---|---|---|---|")
    for batch in args.batch_sizes:
        run = best_run(model, batch, args)
        steps = args.new_tokens - 1
        print(
            f"| {batch} | {run.prefill_tokens / run.prefill_s:,.0f} | "
            f"{run.decode_tokens / run.decode_s:,.0f} | {1000 * run.decode_s / steps:.2f} |"
        )


if __name__ == "__main__":
    main()
