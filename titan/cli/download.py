"""Fetch a model's tokenizer and/or weights from the Hugging Face hub and print where they are.

    titan-download meta-llama/Llama-3.1-8B --tokenizer-only
    titan-download meta-llama/Llama-3.2-1B                      # safetensors, config, tokenizer
    titan-download meta-llama/Llama-3.2-1B --revision main --local-dir assets/hf/Llama-3.2-1B

Only the files titan reads are fetched (titan.hub.WANT): the tokenizer files, and with the
weights (the default, or --weights) the safetensors shards, their index and config.json. They go
to the hub cache (HF_HUB_CACHE, else HF_HOME/hub), or to --local-dir. HF_TOKEN is read for gated
repos (Meta's need their license accepted on huggingface.co). Run it once before a multi-process
job, then launch with HF_HUB_OFFLINE=1 so that every rank reads the cache without a request.
The last line of stdout is the folder.
"""

import argparse
import sys

from titan.hub import HubError, check_snapshot, download, parse_hub_id


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("repo", help="hub id: org/name, or org/name@revision")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tokenizer-only", action="store_true", help="only the tokenizer files")
    which.add_argument("--weights", action="store_true", help="weights + tokenizer (default)")
    p.add_argument("--revision", help="branch, tag or commit (default: main, or the id's @rev)")
    p.add_argument("--local-dir", help="copy the files into this folder, not the hub cache")
    return p.parse_args(argv)


def fetch(args: argparse.Namespace) -> str:
    """Download; returns the folder holding the files."""
    hub = parse_hub_id(args.repo)
    if hub is None:
        raise HubError(f"{args.repo!r} is not a Hugging Face hub id: give org/name[@revision]")
    repo, revision = hub
    if args.revision is not None and revision is not None and args.revision != revision:
        raise HubError(f"{args.repo!r} names revision {revision!r}, --revision another: give one")
    revision = args.revision or revision
    want = "tokenizer" if args.tokenizer_only else "weights"
    folder = download(repo, revision, want, local_dir=args.local_dir)
    check_snapshot(folder, args.repo, want, "titan-download")
    return str(folder)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(fetch(args))
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
