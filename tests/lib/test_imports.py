"""The library's import graph: no circle, no arrow up the layers of docs/architecture.md, and
every module importable on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lissa_influence

PACKAGE = Path(lissa_influence.__file__).resolve().parent

# docs/architecture.md, "The library": a module imports only modules of the layers below it
# (the modules of one subpackage may import each other; the package's __init__ imports all).
LAYERS = {
    "params": 1,
    "batching": 1,
    "operators": 1,
    "distributed": 1,
    "metrics": 1,
    "confidence": 1,
    "progress": 1,
    "reports": 1,
    "task": 2,
    "solvers": 2,
    "damping": 3,
    "objective": 3,
    "hf": 3,
    "kfac": 4,
    "scoring": 4,
    "sample": 3,
    "head": 4,
    "curvature": 5,
    "estimator": 6,
    "influence": 7,
    "multistage": 7,
    "results": 7,
}


def library_modules() -> dict[str, Path]:
    """Every module of the library (not the experiments, not ``__main__``), by dotted name."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if "experiments" in rel.parts or rel.name == "__main__":
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The library modules that ``name`` imports anywhere in its text (module level, inside
    functions, and under ``TYPE_CHECKING``: each is an arrow of the graph)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            if node.module and target in modules:
                out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    modules = library_modules()
    return {name: imports(name, path, modules) for name, path in modules.items()}


def unit(name: str) -> str:
    """The entry of :data:`LAYERS` a module belongs to (``solvers.cg`` → ``solvers``)."""
    return name.split(".")[1]


def test_the_library_import_graph_has_no_circle():
    edges = graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(node) :], node]))
        if node in done:
            return
        for target in sorted(edges[node]):
            visit(target, [*path, node])
        done.add(node)

    for name in sorted(edges):
        visit(name, [])


def test_no_library_import_runs_up_the_layers():
    edges = graph()
    assert {unit(n) for n in edges if n != "lissa_influence"} == set(LAYERS), "a module without a layer"
    upward = [
        f"{source} -> {target}"
        for source, targets in edges.items()
        if source != "lissa_influence"
        for target in targets
        if target != "lissa_influence"
        and unit(source) != unit(target)  # within one subpackage: its own business
        and LAYERS[unit(target)] >= LAYERS[unit(source)]
    ]
    assert not upward, upward
    assert all("lissa_influence" not in targets for targets in edges.values())  # nothing imports the facade


def test_each_library_module_imports_on_its_own_in_a_fresh_interpreter():
    """Each module imported first, in its own interpreter, with the package's ``__init__`` (which
    imports everything, in an order that could hide a circle) left out."""
    script = textwrap.dedent(
        """
        import importlib, sys, types
        root, name = sys.argv[1], sys.argv[2]
        if name != "lissa_influence":
            stub = types.ModuleType("lissa_influence")
            stub.__path__ = [root]
            sys.modules["lissa_influence"] = stub
        importlib.import_module(name)
        """
    )

    def run(name: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        cmd = [sys.executable, "-c", script, str(PACKAGE), name]
        return name, subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, sorted(library_modules())))
    failed = {name: r.stderr.strip().splitlines()[-1] for name, r in results if r.returncode != 0}
    assert not failed, failed
    assert len(results) >= 30


def test_every_subpackage_is_shipped_by_the_wheel():
    """pyproject.toml lists the packages explicitly: a new subpackage missing there imports
    from a checkout but not from an installed wheel (``No module named lissa_influence.kfac``)."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(root).parts)
        for init in (root / "lissa_influence").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
