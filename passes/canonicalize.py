"""Canonicalize: map every spelling of an attention op onto one small vocabulary.

Both torch-level graphs (``torch.fx.symbolic_trace``: ``operator.matmul``, ``call_method
softmax``, ``F.scaled_dot_product_attention``, ``call_module`` Linear/Dropout) and ATen-level
graphs (``torch.export``: ``aten.matmul``, ``aten._softmax``, ``aten.scaled_dot_product_attention``,
``aten._to_copy``, ...) are read through ``canon(node)``, which returns a ``COp``: the vocabulary
word and the op's arguments by name. The graph itself is not changed, so the match and rewrite
passes see the user's nodes and the report can name them.

Vocabulary: matmul (matmul, @, bmm), einsum, baddbmm, softmax, transpose (transpose, .mT, .t),
permute, mul, div, add, masked_fill, where, cast (float/to/type_as/_to_copy), dropout, sdpa,
linear, shape (view/reshape/contiguous/clone/expand/unsqueeze/...), getitem.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

# name of the function / method / aten overload packet -> vocabulary word
_NAMES: dict[str, str] = {
    "matmul": "matmul", "bmm": "matmul", "einsum": "einsum", "baddbmm": "baddbmm",
    "softmax": "softmax", "_softmax": "softmax", "_safe_softmax": "softmax",
    "transpose": "transpose", "mT": "transpose", "t": "transpose", "permute": "permute",
    "mul": "mul", "truediv": "div", "div": "div", "add": "add", "iadd": "add",
    # in-place spellings (torch.export keeps aten.div_ & co.; the node is the updated tensor)
    "mul_": "mul", "div_": "div", "add_": "add", "imul": "mul", "itruediv": "div",
    "masked_fill": "masked_fill", "masked_fill_": "masked_fill", "where": "where",
    "float": "cast", "to": "cast", "_to_copy": "cast", "type_as": "cast", "half": "cast",
    "double": "cast", "bfloat16": "cast", "type": "cast",
    "dropout": "dropout", "native_dropout": "dropout",
    "scaled_dot_product_attention": "sdpa",
    "_scaled_dot_product_flash_attention_for_cpu": "sdpa",
    "_scaled_dot_product_flash_attention": "sdpa",
    "_scaled_dot_product_efficient_attention": "sdpa",
    "_scaled_dot_product_attention_math": "sdpa",
    "linear": "linear",
    "view": "shape", "reshape": "shape", "_unsafe_view": "shape", "contiguous": "shape",
    "clone": "shape", "expand": "shape", "unsqueeze": "shape", "alias": "shape",
    "repeat_interleave": "shape", "slice": "shape", "flatten": "shape",
    "getitem": "getitem",
}
# positional argument names of the torch-level spellings (aten ops use their schema)
_TORCH_ARGS: dict[str, tuple[str, ...]] = {
    "softmax": ("x", "dim"), "transpose": ("x", "dim0", "dim1"), "matmul": ("a", "b"),
    "mul": ("a", "b"), "div": ("a", "b"), "add": ("a", "b"), "masked_fill": ("x", "mask", "value"),
    "where": ("cond", "a", "b"), "dropout": ("x", "p", "training"),
    "linear": ("x", "weight", "bias"),
    "baddbmm": ("input", "a", "b"), "cast": ("x",), "getitem": ("x", "index"),
    "sdpa": ("q", "k", "v", "attn_mask", "dropout_p", "is_causal"),
}
# schema argument names -> ours
_SCHEMA_RENAME = {"self": "x", "input": "x", "other": "b", "mat2": "b", "batch1": "a",
                  "batch2": "b", "condition": "cond", "train": "training", "tensors": "operands"}
_SDPA_RENAME = {"query": "q", "key": "k", "value": "v", "attn_bias": "attn_mask"}


@dataclass
class COp:
    """One node read in the canonical vocabulary: ``op`` and its arguments by name."""

    op: str
    node: Node
    args: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        return self.args.get(name, default)


def _word(node: Node, gm: GraphModule | None) -> tuple[str | None, str]:
    """(vocabulary word, raw name) of a node, or (None, raw name)."""
    if node.op == "call_module" and gm is not None:
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.MultiheadAttention):
            return "mha", "mha"
        if isinstance(mod, nn.Linear):
            return "linear", "linear"
        if isinstance(mod, nn.Dropout):
            return "dropout", "dropout"
        if isinstance(mod, nn.Softmax):
            return "softmax", "softmax"
        if isinstance(mod, nn.Identity):
            return "shape", "identity"
        return None, type(mod).__name__
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        t = node.target
        if t is getattr and len(node.args) > 1 and node.args[1] in ("mT", "T"):
            return "transpose", "mT"
        if isinstance(t, torch._ops.OpOverload):
            name = t.overloadpacket.__name__
        else:
            name = getattr(t, "__name__", str(t))
    else:
        return None, node.op
    return _NAMES.get(name), name


def canon(node: Node, gm: GraphModule | None = None) -> COp | None:
    """Read ``node`` as a canonical op, or None when it is outside the vocabulary."""
    word, raw = _word(node, gm)
    if word is None:
        return None
    args: dict[str, Any] = {}
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema.arguments
        ren = {**_SCHEMA_RENAME, **_SDPA_RENAME} if word == "sdpa" else _SCHEMA_RENAME
        for a, v in zip(schema, node.args):
            args[ren.get(a.name, a.name)] = v
        for k, v in node.kwargs.items():
            args[ren.get(k, k)] = v
        for a in schema:  # defaults
            n = ren.get(a.name, a.name)
            if n not in args and a.has_default_value():
                args[n] = a.default_value
    elif node.op == "call_module":
        mod = gm.get_submodule(node.target)
        args["x"] = node.args[0] if node.args else node.kwargs.get("input")
        if word == "linear":
            args.update(weight=mod.weight, bias=mod.bias, module=node.target)
        elif word == "dropout":
            args.update(p=mod.p, training=None)
        elif word == "softmax":
            args["dim"] = mod.dim
        elif word == "mha":
            args["module"] = node.target
    elif word == "einsum":
        eq = node.args[0] if node.args else node.kwargs.get("equation")
        ops = list(node.args[1:])
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        args.update(equation=eq, operands=ops)
    elif word == "permute":
        rest = node.args[1:] if node.args else ()
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        args.update(x=node.args[0], dims=tuple(dims or node.kwargs.get("dims", ())))
    else:
        names = _TORCH_ARGS.get(word, ("x",))
        for n, v in zip(names, node.args):
            args[n] = v
        args.update({("x" if k == "input" else k): v for k, v in node.kwargs.items()})
        if word == "transpose" and raw in ("mT", "t"):
            args.update(dim0=-2, dim1=-1)
        if word == "where" and "condition" in args:
            args["cond"] = args.pop("condition")
    if word in ("matmul", "mul", "div", "add", "where") and "a" not in args and "x" in args:
        args["a"] = args.pop("x")
    if word == "baddbmm" and "x" in args:
        args["input"] = args.pop("x")
    if word == "softmax" and "dim" not in args and raw == "softmax":
        args["dim"] = None
    if word == "sdpa":
        args.setdefault("attn_mask", None)
        args.setdefault("dropout_p", 0.0)
        args.setdefault("is_causal", False)
        args.setdefault("scale", None)
        args.setdefault("enable_gqa", False)
    if word == "div" and raw == "div" and "b" not in args and len(node.args) > 1:
        args["b"] = node.args[1]
    return COp(word, node, args)


def is_op(node: Any, gm: GraphModule | None, *words: str) -> COp | None:
    """``canon(node)`` when node is a Node whose word is one of ``words``, else None."""
    if not isinstance(node, Node):
        return None
    c = canon(node, gm)
    return c if c is not None and c.op in words else None


def sdpa_returns_tuple(node: Node) -> bool:
    """The ATen flash/efficient SDPA variants return a tuple; element 0 is the output."""
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and t.overloadpacket.__name__ != \
        "scaled_dot_product_attention"


def is_getitem(node: Node, index: int) -> bool:
    """node is ``operator.getitem(x, index)``."""
    return (node.op == "call_function" and node.target is operator.getitem
            and len(node.args) > 1 and node.args[1] == index)
