"""Generate text from a titan DCP checkpoint or a Hugging Face folder, with a KV cache.

    titan-generate outputs/debug_model/checkpoint/step-10 --flavor debugmodel \
        --prompt "The Python interpreter" --max-new-tokens 64
    titan-generate /path/to/Llama-3.1-8B-Instruct --chat --device cuda \
        --prompt "Name three rivers." --prompt "What is RoPE?" --temperature 0.7 --top-p 0.9
    torchrun --nproc-per-node 2 -m titan.cli.generate /path/to/Llama-3.1-8B \
        --prompts-file prompts.txt --temperature 0 --json-out out.json   # TP 2, greedy

CHECKPOINT: a titan DCP folder (a training checkpoint `<dump_folder>/checkpoint/step-N` or a
model-only one), whose architecture --flavor or --config-json gives, a transformers folder
(config.json + safetensors), or a Hugging Face hub id (org/name[@revision], e.g.
meta-llama/Llama-3.2-1B-Instruct) whose safetensors, config and tokenizer are fetched into the
hub cache (titan.hub). The prompts (each --prompt, then each non-empty line of
--prompts-file) run as one left-padded batch: BOS + prompt, or with --chat Llama 3's instruct
template. A row stops at <|end_of_text|> or <|eot_id|>. Sampling: --temperature 0 is greedy;
--top-k 0 and --top-p 1 turn those filters off; --seed makes samples reproducible. Launched by
torchrun with WORLD_SIZE > 1, the model is tensor parallel over all processes (gloo on CPU, nccl
on CUDA). Rank 0 prints each completion to stdout and the tokens/s of prefill and decode to
stderr; --json-out FILE also writes prompts, token ids, completions and rates. Tokenizer:
--tokenizer, else an HF folder's original/tokenizer.model, tokenizer.model or tokenizer.json,
else titan's shipped one (a warning says when its size is not the model's vocab_size).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from titan.data.chat import chat_prompt
from titan.data.tokenizer import SHIPPED_TOKENIZER, Tokenizer, build_tokenizer, tokenizer_file
from titan.errors import CheckpointError
from titan.hub import resolve_model_path
from titan.logger import init_logger, logger
from titan.models.llama3 import FLAVORS, ModelArgs
from titan.models.llama3.generation import Generation, Sampling, check_length, generate
from titan.models.llama3.load import checkpoint_args, checkpoint_kind, load_model
from titan.models.llama3.parallelize import check_tp_degree
from titan.parallelisms.distributed import init_distributed
from titan.trainer.runtime import pick_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="DCP folder, transformers folder or hub id")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", type=Path, help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.6, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=0.9, help="1: off")
    p.add_argument("--tokenizer", help="tiktoken tokenizer.model (default: see above)")
    p.add_argument("--flavor", choices=list(FLAVORS), help="architecture (DCP needs it or json)")
    p.add_argument("--config-json", type=Path, help="architecture from a transformers config")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the instruct template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on cuda, else fp32")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--json-out", type=Path, help="also write the results here (rank 0)")
    return p.parse_args(argv)


def tokenizer_path(args: argparse.Namespace) -> str:
    if args.tokenizer is not None:
        return args.tokenizer
    if checkpoint_kind(args.checkpoint) == "hf":
        found = tokenizer_file(args.checkpoint)
        if found is not None:
            return str(found)
    return SHIPPED_TOKENIZER


def encode_prompt(tokenizer: Tokenizer, text: str, chat: bool) -> list[int]:
    """BOS + text, or a user message in the instruct template, rendered as finetuning renders
    it (titan.data.chat), then the assistant's header. Only the template's special
    tokens are special: text that spells one stays plain text."""
    if not chat:
        return tokenizer.encode(text, bos=True, eos=False)
    return chat_prompt([{"role": "user", "content": text}], tokenizer)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        lines = args.prompts_file.read_text().splitlines()
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT or --prompts-file FILE")
    return prompts


def prepare(args: argparse.Namespace) -> tuple[ModelArgs, Tokenizer, list[str], list[list[int]]]:
    """Check everything that needs no weights and no process group: sampling values, the
    architecture, the TP degree, the prompts' ids and length."""
    Sampling(args.temperature, args.top_k, args.top_p).check()
    model_args = checkpoint_args(args.checkpoint, args.flavor, args.config_json)
    tp = int(os.environ.get("WORLD_SIZE", 1))
    if tp > 1:
        try:
            check_tp_degree(model_args, tp)
        except ValueError as e:
            raise ValueError(f"cannot run tensor parallel over {tp} processes: {e}") from None
    tokenizer = build_tokenizer(tokenizer_path(args))
    if tokenizer.n_words != model_args.vocab_size:  # e.g. a DCP of Llama 3 with the shipped one
        logger.warning(
            f"tokenizer {tokenizer.path} has {tokenizer.n_words} ids, the model "
            f"{model_args.vocab_size}: is it the model's tokenizer? (--tokenizer)"
        )
    prompts = read_prompts(args)
    ids = [encode_prompt(tokenizer, text, args.chat) for text in prompts]
    for i, row in enumerate(ids):
        if max(row) >= model_args.vocab_size:
            raise ValueError(
                f"prompt {i} has token id {max(row)}, beyond the model's vocab_size "
                f"{model_args.vocab_size} (tokenizer {tokenizer.path} has {tokenizer.n_words} "
                "ids): give the model's own tokenizer with --tokenizer"
            )
    check_length(max(map(len, ids)), args.max_new_tokens, model_args.max_seq_len)
    return model_args, tokenizer, prompts, ids


def run(args: argparse.Namespace, model_args: ModelArgs, tokenizer: Tokenizer, ids) -> Generation:
    """Load the model (tensor parallel under torchrun) and generate."""
    tp = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    mesh = None
    if tp > 1:
        init_distributed(device, tp)
        mesh = init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",))
    model = load_model(args.checkpoint, model_args, device, dtype, mesh)
    logger.info(f"loaded {args.checkpoint} on {device} ({dtype}, tensor parallel {tp})")
    # padding is never attended: any id of the model's vocabulary would do
    pad_id = tokenizer.pad_id if tokenizer.pad_id < model_args.vocab_size else 0
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    stops = (tokenizer.eos_id, tokenizer.eot_id)
    return generate(
        model, ids, args.max_new_tokens, sampling, pad_id=pad_id, stop_ids=stops,
        generator=generator, tp_mesh=mesh,
    )  # fmt: skip


def report(args: argparse.Namespace, tokenizer: Tokenizer, prompts, ids, gen: Generation) -> None:
    """Print the completions, log the rates, write --json-out (rank 0 only)."""
    completions = [gen.completion(row) for row in range(len(prompts))]
    texts = [tokenizer.decode(c) for c in completions]
    prefill_rate = gen.prefill_tokens / max(gen.prefill_s, 1e-9)
    decode_rate = gen.decode_tokens / max(gen.decode_s, 1e-9)
    logger.info(
        f"prefill: {gen.prefill_tokens} prompt tokens in {gen.prefill_s:.3f} s "
        f"({prefill_rate:,.0f} tokens/s); decode: {gen.decode_tokens} tokens in "
        f"{gen.decode_s:.3f} s ({decode_rate:,.0f} tokens/s)"
    )
    if int(os.environ.get("RANK", 0)) != 0:
        return
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        print(f"=== [{i}] {prompt}\n{text}", flush=True)
    if args.json_out is not None:
        result = {
            "prompts": prompts, "prompt_ids": ids, "completion_ids": completions,
            "completions": texts, "stopped": gen.stopped,
            "tensor_parallel": int(os.environ.get("WORLD_SIZE", 1)),
            "prefill_tokens_per_s": prefill_rate, "decode_tokens_per_s": decode_rate,
        }  # fmt: skip
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    init_logger()
    try:
        args.checkpoint = resolve_model_path(str(args.checkpoint), "weights", "CHECKPOINT")
        model_args, tokenizer, prompts, ids = prepare(args)
        gen = run(args, model_args, tokenizer, ids)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    report(args, tokenizer, prompts, ids, gen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
