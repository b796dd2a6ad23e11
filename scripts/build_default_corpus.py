"""Regenerate titan's embedded training corpus from the documentation that ships with Python.

    python scripts/build_default_corpus.py [--out titan/assets/default_corpus.jsonl.gz]

Writes one JSON object {"text": ...} per document per line (gzip): the language reference topics
of `pydoc_data`, then one document per standard-library module (its docstring and those of its
public functions, classes and methods). Training reads the committed asset, never this script,
so results do not depend on the local Python version.
"""

import argparse
import gzip
import importlib
import inspect
import io
import json
import os
import pkgutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

# Modules with side effects on import (a browser, a poem, a Tk window) or that are test suites.
SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "turtle",
    "turtledemo",
    "tkinter",
    "lib2to3",
    "ensurepip",
    "distutils",
    "test",
    "pydoc_data",
    "__main__",
}
# Raw-text budget (~1.8 MB is all there is in 3.11): ~0.5 MB gzip, tokenized in seconds.
MAX_CHARS = 2_000_000
MIN_DOC_CHARS = 400  # modules with a one-line docstring add noise, not language


def module_names() -> list[str]:
    """Public standard-library modules and the public submodules of its packages, sorted."""
    names = set()
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        module = _try_import(name)
        if module is None:
            continue
        names.add(name)
        for info in pkgutil.iter_modules(getattr(module, "__path__", []), prefix=name + "."):
            leaf = info.name.rsplit(".", 1)[1]
            if not leaf.startswith("_") and leaf not in SKIP and "test" not in leaf:
                names.add(info.name)
    return sorted(names)


def _try_import(name: str) -> ModuleType | None:
    # Platform-specific modules (winreg, msvcrt) fail to import elsewhere; skip them quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules warn on import and on attribute access
        try:
            return importlib.import_module(name)
        except Exception:
            return None


def _own_doc(obj: object) -> str:
    # obj.__doc__ rather than inspect.getdoc: getdoc copies a base class's text into every override.
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


class _Elided:
    def __repr__(self) -> str:
        return "..."


def _signature(obj: object) -> str:
    """The call signature; defaults that are not short literals print as `...`."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    # An object's repr can hold a memory address or, for cgi.FieldStorage, the whole os.environ
    # of the machine running this script, and an absolute path names this machine's install
    # (platform.architecture's sys.executable): keep only defaults that read the same everywhere.
    params = []
    for p in sig.parameters.values():
        literal = isinstance(p.default, (type(None), bool, int, float, str, bytes))
        local_path = isinstance(p.default, str) and os.path.isabs(p.default)
        if p.default is not p.empty and (
            local_path or not (literal and len(repr(p.default)) <= 40)
        ):
            p = p.replace(default=_Elided())
        params.append(p)
    return str(sig.replace(parameters=params))


def _member_docs(module: ModuleType, seen: set[str]) -> list[str]:
    """One paragraph per public function, class and method defined in `module`."""
    parts = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        kind = "class " if inspect.isclass(obj) else ""
        doc = _own_doc(obj)
        if doc and doc not in seen:
            seen.add(doc)
            parts.append(f"{kind}{module.__name__}.{name}{_signature(obj)}\n\n{doc}")
        if inspect.isclass(obj):
            for meth_name, meth in sorted(vars(obj).items()):
                meth_doc = _own_doc(meth)
                if meth_name.startswith("_") or not meth_doc or meth_doc in seen:
                    continue
                seen.add(meth_doc)
                parts.append(
                    f"{module.__name__}.{name}.{meth_name}{_signature(meth)}\n\n{meth_doc}"
                )
    return parts


def module_document(name: str, seen: set[str]) -> str | None:
    """The text of one module's documentation, or None when it has too little prose."""
    module = _try_import(name)
    if module is None:
        return None
    doc = _own_doc(module)
    head = f"Module {name}\n{'=' * (7 + len(name))}"
    parts = [head] + ([doc] if doc and doc not in seen else []) + _member_docs(module, seen)
    seen.add(doc)
    text = "\n\n".join(parts).strip() + "\n"
    return text if len(text) >= MIN_DOC_CHARS else None


def build_documents() -> list[str]:
    """Language-reference topics first, then module documentation, until MAX_CHARS is reached."""
    from pydoc_data.topics import topics

    # dict.fromkeys drops repeats ("if" and "else" share one text) and keeps the sorted order.
    docs = list(dict.fromkeys(topics[key].strip() + "\n" for key in sorted(topics)))
    total = sum(map(len, docs))
    seen: set[str] = set()
    for name in module_names():
        text = module_document(name, seen)
        if text is None:
            continue
        if total + len(text) > MAX_CHARS:
            break
        docs.append(text)
        total += len(text)
    return docs


def write_corpus(docs: list[str], out: Path) -> int:
    """Write the documents as gzip'd JSON lines (mtime 0, so equal input gives equal bytes)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        for text in docs:
            gz.write((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8"))
    out.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "titan/assets/default_corpus.jsonl.gz"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)  # typing.io and friends warn on access
    docs = build_documents()
    gz_bytes = write_corpus(docs, args.out)
    raw = sum(len(d.encode("utf-8")) for d in docs)
    print(
        f"wrote {args.out}: {len(docs)} documents, {raw:,} bytes of text, {gz_bytes:,} bytes gzip"
    )


if __name__ == "__main__":
    main()
