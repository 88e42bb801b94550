"""Softmaxes that look like attention but match no pattern of match.py (a q k^T product of
two activations feeds them): reported as skipped sites saying what was found (logit
soft-capping, an additive bias, weights not multiplied with v), so nothing is silently left
out of the report. A softmax that is not attention-like (a classifier head) gives no site."""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from .canonicalize import COp, canon
from .site import Found, Site

_SOFTCAP = ("tanh",)


def unmatched_site(c: COp, gm: GraphModule, values: dict[str, Any], module_path: str
                   ) -> Site | None:
    """A softmax over scores (..., N, M) computed from a q k^T product that the patterns did
    not match: reported as a skipped site with what was found, so the user sees it. None when
    the softmax is not attention-like (no product of two activations of rank >= 3 within a
    few ops, e.g. a classifier head)."""
    sm = c.node
    v = values.get(sm.name)
    if values and not (isinstance(v, torch.Tensor) and v.dim() >= 3):
        return None
    seen, frontier, ops, product = set(), [c.get("x")], [], None
    for _ in range(16):
        nxt = []
        for x in frontier:
            if not isinstance(x, Node) or x in seen or x.op in ("placeholder", "get_attr"):
                continue
            seen.add(x)
            cx = canon(x, gm)
            ops.append(_word_of(x, gm))
            if cx is not None and cx.op in ("matmul", "einsum", "baddbmm") and _activations(
                    cx, values):
                product = x
                break
            nxt += [a for a in x.all_input_nodes]
        if product is not None or not nxt:
            break
        frontier = nxt
    if product is None:
        return None
    site = Site(Found(module_path=module_path, node_name=sm.name,
                      pattern="softmax (not matched)"))
    found = sorted({o for o in ops if o not in ("matmul", "shape", "cast", "getitem")})
    if any(o in _SOFTCAP for o in ops):
        site.skip("logit soft-capping (tanh on the scores) enters the softmax; FLuRKA "
                  "cannot represent it")
    elif _biased(ops):
        site.skip(BIAS_NOT_MATCHED)
    elif not _reaches_product(sm, gm):
        site.skip("the softmax weights are not multiplied with v (" +
                  ", ".join(sorted({_word_of(u, gm) for u in sm.users})) + ")")
    else:
        site.skip("not recognised as softmax(scale * q k^T + mask) v: the scores pass "
                  f"through {', '.join(found) or 'unknown ops'}")
    return site


BIAS_NOT_MATCHED = ("an additive term on the scores that is not a padding or causal mask "
                    "(e.g. ALiBi or a relative position bias) enters the softmax; FLuRKA "
                    "cannot represent it")


def _word_of(node: Node, gm: GraphModule) -> str:
    """The vocabulary word of a node, else its function / method name (no overload)."""
    cx = canon(node, gm)
    if cx is not None:
        return cx.op
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return str(getattr(t, "__name__", t))


def _biased(ops: list[str]) -> bool:
    """The score path adds something (baddbmm with its input, add) to the q k^T product."""
    return "baddbmm" in ops or "add" in ops


def _reaches_product(sm: Node, gm: GraphModule) -> bool:
    """The softmax weights reach a matmul / einsum through casts, dropout and views."""
    frontier = [sm]
    for _ in range(6):
        nxt = []
        for n in frontier:
            for u in n.users:
                w = _word_of(u, gm)
                if w in ("matmul", "einsum", "baddbmm"):
                    return True
                if w in ("cast", "dropout", "shape", "getitem"):
                    nxt.append(u)
        frontier = nxt
    return False


def _activations(c: COp, values: dict[str, Any]) -> bool:
    """Both operands of a product are activations of rank >= 3 (not a weight matrix)."""
    ops = c.get("operands") if c.op == "einsum" else [c.get("a"), c.get("b")]
    if not ops or len(ops) != 2 or not all(isinstance(o, Node) for o in ops):
        return False
    if any(o.op == "get_attr" for o in ops):
        return False
    if not values:
        return True
    vals = [values.get(o.name) for o in ops]
    return all(isinstance(t, torch.Tensor) and t.dim() >= 3 for t in vals)


def uncaptured_site(module_path: str, error: BaseException) -> Site:
    """The skipped site of a module that computes attention but could not be captured."""
    site = Site(Found(module_path=module_path, node_name="?", pattern="unknown"))
    return site.skip(f"could not capture this module ({type(error).__name__}: "
                     f"{str(error)[:200]}); attention runs here but neither symbolic_trace nor "
                     "torch.export traced it")
