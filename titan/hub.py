"""Model paths that may be Hugging Face hub ids. `resolve_model_path` keeps an existing local path
and turns `org/name[@revision]` into a snapshot folder of the hub cache, fetching only the files a
use needs. Token, cache and offline mode come from the environment (HF_TOKEN, HF_HOME,
HF_HUB_CACHE, HF_HUB_OFFLINE), read at each call. It lives on the lowest floor: the tokenizer,
the checkpointer and every command resolve their paths through it.

Many processes at once (torchrun): one lock per repo in the cache makes the first process on a
machine (or on a shared cache that supports locks) download while the others wait, then find the
files cached and only revalidate them with the hub. Large jobs run `titan-download` once and
launch with HF_HUB_OFFLINE=1, so that no rank sends a request. huggingface_hub is imported only
when an id is resolved: a run from local paths does not pay for its import.
"""

import os
import re
from pathlib import Path

# The files each use reads. Tokenizer: what titan.data.tokenizer picks in a folder, and the
# files transformers reads beside tokenizer.json. Weights: safetensors shards, their index and the
# architecture, plus the tokenizer (generate and evaluate take it from the same folder).
TOKENIZER_FILES = [
    "original/tokenizer.model",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
WEIGHT_FILES = ["*.safetensors", "*.safetensors.index.json", "config.json"]
WANT = {"tokenizer": TOKENIZER_FILES, "weights": WEIGHT_FILES + TOKENIZER_FILES}
# A repo id as the hub spells it: one slash, names of letters, digits, '-', '_' and '.', not
# starting with '.' or '-'; then an optional @branch, @tag or @commit.
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[A-Za-z0-9._/-]+))?")
_TRUE = {"1", "on", "yes", "true"}


class HubError(FileNotFoundError):
    """A model path that is neither a local file or folder nor a hub repo titan can fetch
    (missing, gated, offline and not cached). A FileNotFoundError, so that every command which
    reports a missing path in one line reports this one too. Here and not in titan.errors: a
    module of the lowest floor imports no other."""


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `text` is shaped like a hub id, else None."""
    m = HUB_ID.fullmatch(text.strip())
    if m is None or m["repo"].endswith((".", "-")) or ".." in m["repo"]:
        return None
    return m["repo"], m["revision"]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as the environment says now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE or constants.HF_HUB_OFFLINE


def hub_cache() -> Path:
    """The hub cache: HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def resolve_model_path(path: str, want: str, what: str, cache_only: bool = False) -> Path:
    """The local file or folder `path` names: itself when it exists, else the hub snapshot of the
    repo it names with the files `want` ("tokenizer" or "weights") needs. `what` names the
    setting in error messages; `cache_only` never asks the hub (dry runs)."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    hub = parse_hub_id(path)
    if hub is None:
        raise HubError(
            f"{what} = {path!r}: no such file or folder, and not a Hugging Face hub id "
            "(org/name or org/name@revision)"
        )
    said = f"{what} = {path!r}: no such file or folder, and hub repo {path}"
    folder = download(hub[0], hub[1], want, said=said, cache_only=cache_only)
    check_snapshot(folder, path, want, what)
    return folder


def download(
    repo: str,
    revision: str | None,
    want: str,
    *,
    said: str | None = None,
    local_dir: str | Path | None = None,
    cache_only: bool = False,
) -> Path:
    """snapshot_download of `repo`'s files for `want`, errors turned into one line each, which
    start with `said` (default: "hub repo org/name[@revision]")."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = repo if revision is None else f"{repo}@{revision}"
    fetch = "--tokenizer-only" if want == "tokenizer" else "--weights"
    # titan-download itself (no `said`) is told how to go online, a model path how to fetch ahead
    first = f"run `titan-download {name} {fetch}` first" if said else "unset HF_HUB_OFFLINE"
    said = said or f"hub repo {name}"
    offline = cache_only or hub_offline()
    kwargs = dict(
        repo_id=repo, revision=revision, allow_patterns=WANT[want], cache_dir=hub_cache(),
        local_dir=local_dir, local_files_only=offline,
    )  # fmt: skip
    try:
        if offline:  # reads only: the cache may be read-only
            return Path(snapshot_download(**kwargs))
        return Path(_locked(repo, lambda: snapshot_download(**kwargs)))
    except GatedRepoError:
        raise HubError(
            f"{said} is gated and this token has no access: accept its license on "
            "huggingface.co and set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{said} is not on the hub or not visible to this token: check the id, or set "
            "HF_TOKEN for a private repo"
        ) from None
    except RevisionNotFoundError:
        raise HubError(
            f"{said} does not exist ({repo} has no revision {revision!r}): name a branch, tag "
            "or commit it has"
        ) from None
    except LocalEntryNotFoundError:
        if offline:
            why = "a dry run reads the cache only" if cache_only else "HF_HUB_OFFLINE=1"
            raise HubError(
                f"{said} is not in the hub cache {hub_cache()} and {why}: {first}"
            ) from None
        raise HubError(
            f"{said} is not in the hub cache {hub_cache()} and the hub cannot be "
            f"reached: check the network, or run `titan-download {name} {fetch}` where it can"
        ) from None
    except HfHubHTTPError as e:
        answer = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{said}: the hub answered {answer!r}: retry later") from None


def _locked(repo: str, fn):
    """fn() holding a lock per repo in the cache: one process downloads, the others wait."""
    from filelock import FileLock  # a dependency of huggingface_hub

    locks = hub_cache() / ".locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
    except OSError:  # a cache this process cannot write: snapshot_download will say so
        return fn()
    with FileLock(str(locks / f"titan--{repo.replace('/', '--')}.lock")):
        return fn()


def check_snapshot(folder: Path, path: str, want: str, what: str) -> None:
    """The snapshot holds what `want` reads: a tokenizer file, or config.json and safetensors."""
    missing = []
    if not any((folder / f).is_file() for f in TOKENIZER_FILES[:3]) and want == "tokenizer":
        missing.append("original/tokenizer.model, tokenizer.model or tokenizer.json")
    if want == "weights":
        if not (folder / "config.json").is_file():
            missing.append("config.json")
        if not any(folder.glob("*.safetensors")):
            missing.append("*.safetensors")
    if missing:
        fetch = "--tokenizer-only" if want == "tokenizer" else "--weights"
        raise HubError(
            f"{what} = {path!r}: the hub snapshot {folder} has no {' or '.join(missing)}: is it a "
            f"Llama 3 repo in transformers format? (if only part is cached, run "
            f"`titan-download {path} {fetch}`)"
        )
