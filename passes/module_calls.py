"""Give a leaf module's call back to the module in an exported graph.

``torch.export`` inlines every submodule: ``self.query(x)`` becomes ``aten.linear(x,
query.weight, query.bias)``. A rewritten graph installed with that code reads the weights
directly, so a module swapped in later has no effect: PEFT's LoRA wraps ``query`` in a
``lora.Linear`` whose ``forward`` adds the adapter, and the graph never calls it (issue 17:
perturbing ``lora_B`` changed the output by exactly 0). ``fold_leaf_calls`` finds, from the
nodes' ``nn_module_stack``, each call of a leaf module that owns parameters (``nn.Linear``,
Hugging Face's ``Conv1D``, ``nn.Embedding``, ``nn.LayerNorm`` ...) and replaces its nodes by one
``call_module`` node, as ``symbolic_trace`` leaves ``nn.Linear`` calls. It folds a call only
when that is exact: the nodes read nothing but one input tensor, the module's own parameters
and that input's sizes, and one node carries the result out.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.fx import Graph, Node

_PREFIX = "mod."  # export_capture's wrapper holds the module as ``mod``


def _leaf_path(node: Node, module: nn.Module) -> str | None:
    """Path (relative to ``module``) of the leaf module with parameters that ``node`` is part
    of, or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    fqn = list(stack.values())[-1][0]
    if not isinstance(fqn, str) or not fqn.startswith(_PREFIX):
        return None
    path = fqn[len(_PREFIX):]
    try:
        sub = module.get_submodule(path)
    except AttributeError:
        return None
    if next(sub.children(), None) is not None or next(sub.parameters(False), None) is None:
        return None
    return path


def _calls(g: Graph, module: nn.Module) -> list[tuple[str, list[Node]]]:
    """Runs of consecutive compute nodes that belong to one leaf module call."""
    runs: list[tuple[str, list[Node]]] = []
    for n in g.nodes:
        if n.op != "call_function":
            continue
        path = _leaf_path(n, module)
        if path is None:
            if not _is_size(n):  # sizes may sit in between
                runs.append(("", []))
            continue
        if runs and runs[-1][0] == path:
            runs[-1][1].append(n)
        else:
            runs.append((path, [n]))
    return [(p, nodes) for p, nodes in runs if p]


def _is_size(n: Node) -> bool:
    """An integer (a size) rather than a tensor: ``sym_size`` or arithmetic on sizes."""
    val = n.meta.get("val")
    return isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool)


def _fold(g: Graph, path: str, nodes: list[Node], own: set[str]) -> bool:
    """Replace one call's ``nodes`` by ``call_module(path, (x,))`` when that is exact.

    Sizes read from outside are fine: inside a leaf module every size is computed from its
    input, and export reuses the first node that produced an equal symbolic size."""
    inside = set(nodes)
    outer: list[Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in outer:
                outer.append(a)
    if any(a.op == "get_attr" and a.target not in own for a in outer):
        return False
    tensors = [a for a in outer if a.op != "get_attr" and not _is_size(a)]
    if len(tensors) != 1:
        return False
    x = tensors[0]
    escaping = [n for n in nodes if not _is_size(n) and any(u not in inside for u in n.users)]
    if len(escaping) != 1:
        return False
    result = escaping[0]
    with g.inserting_after(result):
        call = g.call_module(path, (x,))
    call.meta = dict(result.meta)
    result.replace_all_uses_with(call)
    for n in reversed(nodes):
        if not n.users:
            g.erase_node(n)
    return True


def fold_leaf_calls(g: Graph, module: nn.Module) -> int:
    """Fold each exact leaf-module call in ``g`` (exported from ``module``) into a
    ``call_module`` node; returns how many were folded."""
    folded = 0
    for path, nodes in _calls(g, module):
        sub = module.get_submodule(path)
        own = {f"{path}.{name}" for name, _ in [*sub.named_parameters(), *sub.named_buffers()]}
        folded += _fold(g, path, nodes, own)
    for n in list(g.nodes):  # parameter reads left without a user
        if n.op == "get_attr" and not n.users:
            g.erase_node(n)
    return folded
