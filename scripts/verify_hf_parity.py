"""Check that titan's Transformer and transformers' LlamaForCausalLM agree on the same weights.

    python scripts/verify_hf_parity.py <hf_dir>                       # architecture: config.json
    python scripts/verify_hf_parity.py <dcp_dir> --flavor debugmodel  # or --config-json PATH
    python scripts/verify_hf_parity.py <dcp_dir> --hf-reference <hf_dir>  # the folder converted
        [--tokens 16] [--prompt-len 32] [--batch 2] [--seed 0] [--max-kl 1e-6]
        [--text "Once upon a time" --tokenizer titan/assets/tokenizer/tokenizer.model]

titan loads <path> with its own code. transformers reads the same folder when it is an HF one;
for a DCP folder it is built from titan's loaded weights, which checks the architecture but not
the load. --hf-reference DIR has transformers read DIR with `LlamaForCausalLM.from_pretrained`
instead (e.g. the HF folder the DCP was converted from), independent of titan's loading code, so
a wrong DCP load or name/row mapping shows as a large KL; the architecture then defaults to
DIR's config.json. Both models run in fp32 on CPU in eval mode (transformers with eager
attention) on one batch of random token ids from --seed (or --text encoded with --tokenizer).
Reports the max absolute logit difference and KL(hf || titan) of the next-token distributions
(float64 log_softmax, averaged over positions), then greedy-decodes --tokens tokens with each
model, re-running the whole sequence every step. Exits 0 when the decodes are identical and
KL <= --max-kl, else 1. Meant for small models: it holds two fp32 copies of the weights.
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing titan

from titan.errors import CheckpointError  # noqa: E402
from titan.models.llama3 import FLAVORS, ModelArgs, Transformer  # noqa: E402
from titan.models.llama3.hf_io import read_hf_config  # noqa: E402
from titan.models.llama3.load import checkpoint_args, checkpoint_kind, load_model  # noqa: E402
from titan.models.llama3.state_dict_adapter import hf_config_dict, to_hf  # noqa: E402


def _hf_from_titan(model: Transformer, args: ModelArgs) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(**hf_config_dict(args))
    config._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(config)
    missing, unexpected = hf.load_state_dict(to_hf(model.state_dict(), args), strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if args.tie_word_embeddings else [])
    return hf


def _hf_from_folder(hf_dir: Path) -> torch.nn.Module:
    import transformers

    # bf16 checkpoints upcast exactly, so both models hold the same fp32 values
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    return hf.float()


def load_models(
    path: str | Path,
    flavor: str | None = None,
    config_json: str | Path | None = None,
    hf_reference: str | Path | None = None,
) -> tuple[Transformer, torch.nn.Module]:
    """(titan, transformers) fp32 eval models: titan holds the weights of the DCP or HF folder
    `path`; transformers those of `hf_reference` when given, read by transformers alone."""
    is_dcp = checkpoint_kind(path) == "dcp"
    # read first: a clear error for a reference folder without config.json
    reference_config = read_hf_config(hf_reference) if hf_reference is not None else None
    args = checkpoint_args(path, flavor, config_json, reference_config)
    titan = load_model(path, args)
    if hf_reference is not None:
        hf = _hf_from_folder(hf_reference)
    else:
        hf = _hf_from_titan(titan, args) if is_dcp else _hf_from_folder(path)
    return titan, hf.eval()


@torch.no_grad()
def compare_logits(
    titan: Transformer, hf: torch.nn.Module, tokens: torch.Tensor
) -> tuple[float, float]:
    """(KL(hf || titan) averaged over positions, max |logit difference|) on `tokens`."""
    ours, theirs = titan(tokens).double(), hf(tokens, use_cache=False).logits.double()
    log_q, log_p = F.log_softmax(ours, dim=-1), F.log_softmax(theirs, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()  # (bs, seqlen) -> mean
    return kl, (ours - theirs).abs().max().item()


@torch.no_grad()
def greedy_decode(
    forward: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor, n_tokens: int
) -> torch.Tensor:
    """n_tokens argmax continuations of prompt (bs, seqlen), re-running the full sequence."""
    seq = prompt
    for _ in range(n_tokens):
        next_token = forward(seq)[:, -1].argmax(-1, keepdim=True)  # (bs, 1)
        seq = torch.cat([seq, next_token], dim=1)
    return seq[:, prompt.shape[1] :]


def prompt_tokens(args: argparse.Namespace, vocab_size: int) -> torch.Tensor:
    if args.text is not None:
        from titan.data.tokenizer import build_tokenizer

        ids = build_tokenizer(args.tokenizer).encode(args.text, bos=True, eos=False)
        if max(ids) >= vocab_size:
            raise ValueError(f"--tokenizer ids reach {max(ids)}, beyond vocab_size {vocab_size}")
        return torch.tensor([ids])
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab_size, (args.batch, args.prompt_len), generator=gen)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path", type=Path, help="titan DCP folder or transformers folder")
    p.add_argument("--flavor", choices=list(FLAVORS), help="architecture (DCP needs it or json)")
    p.add_argument("--config-json", type=Path, help="architecture from a transformers config")
    p.add_argument(
        "--hf-reference", type=Path, help="transformers folder to compare with (from_pretrained)"
    )
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens to decode")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt length")
    p.add_argument("--batch", type=int, default=2, help="random prompts per batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    p.add_argument("--text", help="prompt text instead of random ids (needs --tokenizer)")
    p.add_argument("--tokenizer", help="tiktoken tokenizer.model for --text")
    p.add_argument("--max-kl", type=float, default=1e-6, help="pass threshold on the KL")
    args = p.parse_args(argv)
    if (args.text is None) != (args.tokenizer is None):
        p.error("--text and --tokenizer go together")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        titan, hf = load_models(args.path, args.flavor, args.config_json, args.hf_reference)
        tokens = prompt_tokens(args, titan.args.vocab_size)
        if tokens.shape[1] + args.tokens > titan.args.max_seq_len:
            raise ValueError(f"prompt + --tokens exceed max_seq_len {titan.args.max_seq_len}")
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kl, max_diff = compare_logits(titan, hf, tokens)
    ours = greedy_decode(titan, tokens, args.tokens)
    theirs = greedy_decode(lambda t: hf(t, use_cache=False).logits, tokens, args.tokens)
    identical = torch.equal(ours, theirs)
    print(f"prompt: {tuple(tokens.shape)} tokens, greedy: {args.tokens} tokens")
    print(f"titan greedy: {ours.tolist()}")
    print(f"hf greedy:    {theirs.tolist()}")
    print(f"max_abs_logit_diff: {max_diff:.3e}")
    print(f"kl_divergence: {kl:.3e}")
    print(f"greedy_identical: {str(identical).lower()}")
    return 0 if identical and kl <= args.max_kl else 1


if __name__ == "__main__":
    sys.exit(main())
