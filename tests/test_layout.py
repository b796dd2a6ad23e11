"""The import graph of titan's own modules, read from the code: no circle, and no import from a
floor to a higher one or sideways to another package of the same floor. Every import counts,
also one inside a function (deferring an import hides a circle from Python, not from a
reader)."""

import ast
from pathlib import Path

TITAN = Path(__file__).resolve().parents[1] / "titan"

# Floors, lowest first: a module imports from its own package or from lower floors only.
FLOORS = [
    {"titan", "titan.errors", "titan.logger", "titan.compat", "titan.faults", "titan.hub"},
    {"titan.config"},
    {"titan.parallelisms"},
    {"titan.data", "titan.converters"},
    {"titan.checkpoint"},
    {"titan.models"},
    {"titan.trainer"},
    {"titan.planning"},
    {"titan.train", "titan.cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(TITAN.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The titan modules `path` imports (`from titan.x import y` counts y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("titan")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("titan"):
            subs = {f"{node.module}.{a.name}" for a in node.names}
            found |= (subs & modules) or {node.module}
    return found & modules


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in TITAN.rglob("*.py")}
    return {name: imports(path, set(files)) - {name} for name, path in files.items()}


def room(module: str) -> tuple[int, str]:
    """(floor, package) of a module: its longest prefix named in FLOORS."""
    best = None
    for floor, rooms in enumerate(FLOORS):
        for r in rooms:
            if (module == r or module.startswith(r + ".")) and (
                best is None or len(r) > len(best[1])
            ):
                best = (floor, r)
    assert best is not None, f"{module} is on no floor: add its package to FLOORS"
    return best


def test_no_import_runs_up_or_sideways():
    wrong = []
    for module, deps in sorted(graph().items()):
        floor, package = room(module)
        for dep in sorted(deps):
            dep_floor, dep_package = room(dep)
            if dep_package != package and dep_floor >= floor and dep_package != "titan":
                wrong.append(f"{module} (floor {floor}) imports {dep} (floor {dep_floor})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                circles.append(" -> ".join(path[path.index(dep) :] + [node, dep]))
            elif dep not in state:
                visit(dep, path + [node] if dep else path)
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert not circles, "\n".join(circles)


def test_the_check_sees_imports_inside_functions(tmp_path):
    """The reader counts deferred imports and package-relative module names."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from titan.config import checks\n    import titan.errors\n")
    assert imports(src, {"titan.config", "titan.config.checks", "titan.errors"}) == {
        "titan.config.checks",
        "titan.errors",
    }
