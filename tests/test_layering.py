"""The package's layers, from the source's own import statements (those inside functions
too): ``kernels/`` imports nothing of ``passes/`` or the top-level package, ``passes/`` only
``kernels/`` and itself, and no module imports itself through a cycle."""
from __future__ import annotations

import ast
import os

import networkx as nx
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
PACKAGES = {"flurka_rewrite.kernels": "kernels", "flurka_rewrite.passes": "passes",
            "flurka_rewrite": "flurka_rewrite"}
ALLOWED = {"flurka_rewrite.kernels": ("flurka_rewrite.kernels",),
           "flurka_rewrite.passes": ("flurka_rewrite.kernels", "flurka_rewrite.passes")}
SHIMS = {"flurka_rewrite.attention"}  # kept for old pickles: a re-export, no layer of its own


def modules() -> dict[str, str]:
    """Dotted module name -> source file, for every module of the three packages."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                mod = pkg if name == "__init__.py" else f"{pkg}.{name[:-3]}"
                out[mod] = os.path.join(ROOT, folder, name)
    return out


def imports_of(mod: str, path: str, known: set[str]) -> set[str]:
    """The package modules ``mod`` imports (a ``from pkg import name`` of a submodule counts
    as that submodule)."""
    tree = ast.parse(open(path).read(), path)
    pkg = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != mod:
                found.add(name)
    return found


def layer(mod: str) -> str:
    return next(p for p in PACKAGES if mod == p or mod.startswith(p + "."))


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    mods = modules()
    g = nx.DiGraph()
    for mod, path in mods.items():
        g.add_node(mod)
        for dep in imports_of(mod, path, set(mods)):
            g.add_edge(mod, dep)
    return g


def test_the_import_graph_is_read(graph: nx.DiGraph) -> None:
    """Guards the test itself: known edges are found."""
    assert graph.has_edge("flurka_rewrite.convert", "flurka_rewrite.passes.apply")
    assert graph.has_edge("flurka_rewrite.passes.apply", "flurka_rewrite.kernels.attention")
    assert graph.has_edge("flurka_rewrite.kernels.attention", "flurka_rewrite.kernels.dispatch")


@pytest.mark.parametrize("lower", sorted(ALLOWED))
def test_lower_layers_import_no_higher_one(graph: nx.DiGraph, lower: str) -> None:
    bad = [f"{a} imports {b}" for a, b in graph.edges
           if layer(a) == lower and a not in SHIMS
           and not any(b == ok or b.startswith(ok + ".") for ok in ALLOWED[lower])]
    assert not bad, "; ".join(bad)


def test_no_import_cycles(graph: nx.DiGraph) -> None:
    """Package ``__init__`` modules re-export their children, so edges into an ``__init__``
    from its own children are the only back edges allowed."""
    g = graph.copy()
    g.remove_edges_from([(a, b) for a, b in graph.edges if b in PACKAGES and a.startswith(b)])
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])
