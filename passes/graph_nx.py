"""networkx views of FX graphs for the questions that are graph algorithms.

* ``to_digraph``: nodes are FX node names, edges go from a value to its users;
* ``site_region``: the nodes computing a site from its inputs (descendants of the inputs that
  are ancestors of the output);
* ``escapes``: region nodes (the attention weights above all) that feed anything outside the
  region, i.e. the site is not single-exit;
* ``depends_on_any``: whether a node's value depends on some set of nodes (placeholders,
  parameters), used to tell a padding mask from a learned bias.
"""
from __future__ import annotations

from typing import Iterable

import networkx as nx
import torch
from torch.fx import Graph, Node


def _target_name(n: Node) -> str:
    t = n.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return str(t)
    return getattr(t, "__name__", str(t))


def digraph_from_fx(nodes: Iterable[Node], *, kinds: dict[str, str] | None = None
                    ) -> nx.DiGraph:
    """A DiGraph of FX nodes (a graph's ``.nodes`` or a subset): one graph node per FX node,
    named ``node.name``, with attributes ``op``, ``target`` and, from ``kinds``, ``kind``;
    edges go from a value to its users inside the set."""
    nodes = list(nodes)
    names = {n.name for n in nodes}
    kinds = kinds or {}
    g = nx.DiGraph()
    for n in nodes:
        kind = kinds.get(n.name)
        g.add_node(n.name, op=n.op, target=_target_name(n), **({"kind": kind} if kind else {}))
    for n in nodes:
        for user in n.users:
            if user.name in names:
                g.add_edge(n.name, user.name)
    return g


def to_digraph(graph: Graph) -> nx.DiGraph:
    """The whole graph as a DiGraph over node names (edge: producer -> user)."""
    return digraph_from_fx(graph.nodes)


def site_region(g: nx.DiGraph, inputs: Iterable[Node], output: Node) -> set[str]:
    """Names of the nodes strictly between the site inputs and its output, plus the output."""
    anc = nx.ancestors(g, output.name)
    desc: set[str] = set()
    names = [n.name for n in inputs if n is not None]
    for name in names:
        desc |= nx.descendants(g, name)
    return (desc & anc) - set(names) | {output.name}


def escapes(g: nx.DiGraph, region: set[str], output: Node) -> list[tuple[str, str]]:
    """(inside, outside) edges leaving the region from any node but the output."""
    out = []
    for name in region:
        if name == output.name:
            continue
        for user in g.successors(name):
            if user not in region and "assert" not in g.nodes[user].get("target", ""):
                out.append((name, user))
    return sorted(out)


def depends_on_any(g: nx.DiGraph, node: Node, sources: Iterable[str]) -> bool:
    """True when ``node`` (or one of its ancestors) is in ``sources``."""
    src = set(sources)
    return node.name in src or bool(nx.ancestors(g, node.name) & src)
