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
from torch.fx import Graph, Node


def to_digraph(graph: Graph) -> nx.DiGraph:
    """The graph as a DiGraph over node names (edge: producer -> user)."""
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n.name, op=n.op, target=str(n.target))
        for inp in n.all_input_nodes:
            g.add_edge(inp.name, n.name)
    return g


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
