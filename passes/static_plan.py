"""Planning without example inputs: ``torch.fx.symbolic_trace`` of the whole model, sites
matched on that graph, sizes read statically.

    heads / head_dim   the constants of the head split ``x.view(b, n, H, dh)`` (or
                       ``view(b, n, H, -1)`` after a Linear: dh = out_features / H), followed
                       through transposes / einsum to the (B, H, N, dh) layout
    scale              the constant in the graph, else dh^-1/2
    nn.MultiheadAttention  num_heads / head_dim / dropout of the module

Sequence lengths, the batch and the mask's values are unknown: ``rel_error`` stays None, the
key length for dk is ``max_seq_len`` (``RewriteConfig.max_seq_len`` or the model config's
``max_position_embeddings``), and a site whose sizes cannot be read is skipped with
``SHAPES_UNKNOWN``. A graph site with a mask is rewritten only in exact mode (the mask is then
passed through as is): whether it is key padding, causal or a bias is a property of its values.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from .canonicalize import canon
from .config import RewriteConfig
from .graph_nx import to_digraph
from .legality import check, fill_static, set_train_dropout
from .match import find_sites
from .mha import mha_site
from .site import Site
from .units import Unit, learned_nodes, train_dropout

SHAPES_UNKNOWN = "shapes unknown without example_inputs: pass example_inputs"
MASK_UNKNOWN = ("mask kind unknown without example_inputs (padding, causal or bias?): only "
                "kernel='softmax', dk=None keeps it; pass example_inputs")
_PASS = {"cast", "dropout"}  # ops that keep a tensor's layout


def trace_model(model: nn.Module) -> GraphModule:
    """``symbolic_trace(model)``; a ValueError that says to pass example_inputs if it fails."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as e:
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise ValueError(
            f"{type(model).__name__} has no example inputs and torch.fx.symbolic_trace could "
            f"not trace it without them ({msg}); pass example_inputs=(tensor, ...) or "
            "example_inputs={'name': tensor}, shaped like a real batch") from e


def _split(node: Node, gm: GraphModule) -> tuple[list[str], int, int] | None:
    """Walk back from ``node`` to a head split view(b, n, H, dh): (dim names of ``node``,
    H, dh), or None when the split is not a static 4-D view."""
    swaps: list[tuple[int, int]] = []
    cur = node
    for _ in range(12):
        if not isinstance(cur, Node):
            return None
        if cur.op == "call_method" and cur.target in ("view", "reshape"):
            shape = cur.args[1:]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = tuple(shape[0])
            if len(shape) != 4 or not isinstance(shape[2], int):
                return None
            h, dh = shape[2], shape[3]
            if dh == -1:
                dh = _linear_width(cur.args[0], gm)
                dh = dh // h if dh and h > 0 and dh % h == 0 else None
            if not isinstance(dh, int) or h <= 0 or dh <= 0:
                return None
            dims = ["b", "n", "h", "d"]
            for a, b in reversed(swaps):
                dims[a], dims[b] = dims[b], dims[a]
            return dims, h, dh
        if cur.op == "call_method" and cur.target == "contiguous":
            cur = cur.args[0]
            continue
        c = canon(cur, gm)
        if c is None:
            return None
        if c.op == "transpose":
            d0, d1 = c.get("dim0"), c.get("dim1")
            if not (isinstance(d0, int) and isinstance(d1, int)):
                return None
            swaps.append((d0 % 4, d1 % 4))
            cur = c.get("x")
        elif c.op in _PASS or (c.op in ("mul", "div") and not isinstance(c.get("b"), Node)):
            cur = c.get("x") if c.get("x") is not None else c.get("a")
        else:
            return None
    return None


def _linear_width(x: Any, gm: GraphModule) -> int | None:
    if isinstance(x, Node) and x.op == "call_module":
        mod = gm.get_submodule(x.target)
        if isinstance(mod, nn.Linear):
            return mod.out_features
    return None


def _bhnd(node: Node, fix: list[tuple], gm: GraphModule) -> tuple[int, int] | None:
    """(H, dh) of ``node`` once ``fix`` is applied, if that is (B, H, N, dh) statically."""
    sp = _split(node, gm)
    if sp is None:
        return None
    dims, h, dh = sp
    for f in fix:
        if f[0] == "transpose":
            a, b = f[1] % 4, f[2] % 4
            dims[a], dims[b] = dims[b], dims[a]
        elif f[0] == "einsum":
            src, dst = f[1].split("->")
            if len(src) != 4 or sorted(src) != sorted(dst):
                return None
            dims = [dims[src.index(ch)] for ch in dst]
    if dims[0] != "b" or dims[1] != "h" or dims[3] != "d":
        return None
    return h, dh


def _fill(s: Site, gm: GraphModule) -> None:
    q = _bhnd(s.q, s.q_fix, gm)
    k = _bhnd(s.k, s.k_fix, gm)
    v = _bhnd(s.v, s.v_fix, gm)
    if q is None or k is None or v is None or q[1] != k[1] or q[0] % k[0] or k[0] != v[0]:
        s.skip(SHAPES_UNKNOWN)
        return
    fill_static(s, heads=q[0], head_dim=q[1], kv_heads=k[0], v_dim=v[1])


def analyse_static(model: nn.Module, cfg: RewriteConfig) -> list[Unit]:
    """Sites of ``model`` found without example inputs (legality decided, nothing built)."""
    gm = trace_model(model)
    mpe = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if cfg.dk is not None and not (cfg.max_seq_len or mpe):
        raise ValueError(
            f"dk={cfg.dk!r} (low-rank) needs the longest key sequence length, unknown without "
            "example inputs: pass max_seq_len=... (or example_inputs=...), or use dk=None")
    exact = cfg.exact
    g, params = to_digraph(gm.graph), learned_nodes(gm)
    sites = find_sites(gm, {}, "")
    for s in sites:
        _fill(s, gm)
        if not s.ok:
            continue
        if s.mask is not None and not exact:
            s.skip(MASK_UNKNOWN)
            continue
        stub = {s.weights[0].name: torch.empty((0,) * 4)} if s.weights else {}  # rank only
        check(s, gm, stub, g, params, exact, lengths_known=False)
        if getattr(model, "config", None) is not None and s.dropout_p == 0.0:
            set_train_dropout(s, train_dropout(model, s.module_path))
    units = [Unit("", model, model, "graph", gm=gm, values={}, sites=sites,
                  how="symbolic_trace (no example inputs)")]
    for path, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            units.append(Unit(path, m, model, "mha", sites=[mha_site(path, m)]))
    for i, s in enumerate(x for u in units for x in u.sites):
        s.index = i
    for s in (x for u in units for x in u.sites):
        if s.ok:
            s.notes_for_report.append("planned without example inputs (symbolic_trace): "
                                      "sequence lengths unknown, no rel_error")
    return units
