"""The torch and torchao versions titan supports: every private API titan uses is listed in
titan/compat.py and exists on the installed versions, and the version-dependent pieces there
behave as each version needs (scripts/check_torch_versions.sh runs this on 2.11, 2.14.1, 2.15)."""

import ast
import importlib
from pathlib import Path

import pytest
import torch

from titan.compat import PRIVATE_APIS, torch_at_least

TITAN = Path(__file__).resolve().parents[1] / "titan"


def resolve(name: str):
    """The object a dotted path names, importing modules along it."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def _private_names(root: Path) -> dict[str, set[str]]:
    """Each dotted torch / torchao name with a private part (up to that part) that titan's code
    imports or reads, with the files that do; strings and comments are not code."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Attribute):
                parts, inner = [], node
                while isinstance(inner, ast.Attribute):
                    parts.append(inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name):
                    names = [".".join([inner.id, *reversed(parts)])]
            for name in names:
                parts = name.split(".")
                if parts[0] not in ("torch", "torchao") or parts[1:2] == ["ops"]:
                    continue  # not torch's, or an aten op (public operators)
                private = next((i for i, p in enumerate(parts) if p.startswith("_")), None)
                if private is not None and not parts[private].startswith("__"):
                    found.setdefault(".".join(parts[: private + 1]), set()).add(path.name)
    return found


def test_every_private_name_titan_uses_is_listed():
    listed = [api.name for api in PRIVATE_APIS]
    missing = {
        name: sorted(files)
        for name, files in _private_names(TITAN).items()
        if not any(full == name or full.startswith(name + ".") for full in listed)
    }
    assert not missing, f"list these in titan/compat.py PRIVATE_APIS: {missing}"


def test_the_scan_finds_private_names():
    """The scan above sees imports, from-imports and attribute chains (not strings)."""
    found = _private_names(TITAN)
    assert "torch.distributed.tensor.experimental._context_parallel" in found
    assert "torch._foreach_norm" in found and "torch.distributed.pipelining._utils" in found
    assert not any(name.startswith("torch.ops") for name in found)


@pytest.mark.parametrize("api", PRIVATE_APIS, ids=lambda api: api.name)
def test_private_api_exists_on_this_torch(api):
    """Each listed name resolves on the installed torch where titan uses it, and is absent where
    titan does without it (so a `since` or `before` that no longer holds is noticed)."""
    used = (not api.since or torch_at_least(api.since)) and not (
        api.before and torch_at_least(api.before)
    )
    if used:
        resolve(api.name)
    else:
        with pytest.raises((ImportError, AttributeError)):
            resolve(api.name)


def test_torch_at_least_reads_local_builds(monkeypatch):
    for version, newer in [("2.11.0+cu130", False), ("2.12.1", True), ("2.15.0a0+git12ab", True)]:
        monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion(version))
        assert torch_at_least("2.12") is newer, version
