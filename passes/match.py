"""Match: find attention sites in a captured graph (read through ``canonicalize.canon``).

A site is ``softmax(scale * q @ k^T + mask) [cast] [dropout] @ v`` in any spelling
(matmul/@/bmm/einsum/baddbmm; scale by mul or div on the scores, on q, on k, or none; additive,
masked_fill or where masks; fp32 casts), or one SDPA call. Each pattern is plain structure:
walk back from the softmax to the q k^T product, forward to the product with v. Checks that
decide rewrite-or-skip live in ``legality``; here a site only has to look like attention.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .canonicalize import COp, canon, is_getitem, is_op, sdpa_returns_tuple
from .site import Found, Site
from .unmatched import unmatched_site

_FILL_MIN = -1e4  # a masked_fill / where value at or below this counts as "masked out"


def _val(values: dict[str, Any], x: Any) -> Any:
    return values.get(x.name) if isinstance(x, Node) else x


def _scalar(values: dict[str, Any], x: Any) -> float | None:
    v = _val(values, x)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point():
        return float(v)
    return None


def _is_assert(node: Node) -> bool:
    """Export's ``aten._assert_tensor_metadata`` checks: no value, ignored by the match."""
    return "assert" in str(node.target)


def _module_path(cap_path: str, node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    rel = ""
    if stack:
        rel = list(stack.values())[-1][0]
        rel = rel.replace("L['self'].", "").replace("L['self']", "")
        if rel.startswith("self."):
            rel = rel[5:]
        if rel == "mod" or rel.startswith("mod."):  # the export wrapper (capture._KwargsOnly)
            rel = rel[4:]
    parts = [p for p in (cap_path, rel) if p]
    return ".".join(parts)


class _Walk:
    """Backward walk from the softmax input to the q k^T product."""

    def __init__(self, gm: GraphModule, values: dict[str, Any]) -> None:
        self.gm, self.values = gm, values
        self.scale = 1.0
        self.scale_nodes: list[Node] = []
        self.mask: Node | None = None
        self.mask_invert = False
        self.masks = 0
        self.all_masks: list[Node] = []
        self.parts: list[str] = []

    def scores(self, x: Any, depth: int = 0) -> COp | None:
        if not isinstance(x, Node) or depth > 12:
            return None
        c = canon(x, self.gm)
        if c is None:
            return None
        if c.op in ("matmul", "einsum", "baddbmm"):
            if c.op == "baddbmm":
                if c.get("beta", 1) != 0:  # beta=0: input (often torch.empty) is ignored
                    self._set_mask(c.get("input"), False)
                self.scale *= float(c.get("alpha", 1.0))
            self.parts.append(c.op)
            return c
        if c.op == "cast":
            self.parts.append("cast")
            return self.scores(c.get("x"), depth + 1)
        if c.op == "shape" and self._same_view(x, c.get("x")):
            return self.scores(c.get("x"), depth + 1)
        if c.op in ("mul", "div"):
            for s_idx, o_idx in (("a", "b"), ("b", "a")) if c.op == "mul" else (("a", "b"),):
                s, o = c.get(s_idx), c.get(o_idx)
                f = _scalar(self.values, o)
                if isinstance(s, Node) and f is not None and f != 0:
                    saved = self.scale
                    self.scale = self.scale * f if c.op == "mul" else self.scale / f
                    if isinstance(o, Node):
                        self.scale_nodes.append(o)
                    self.parts.append(c.op)
                    got = self.scores(s, depth + 1)
                    if got is not None:
                        return got
                    self.scale = saved
                    self.parts.pop()
            return None
        if c.op == "add":
            for s_idx, o_idx in (("a", "b"), ("b", "a")):
                s, o = c.get(s_idx), c.get(o_idx)
                if isinstance(s, Node) and isinstance(o, Node):
                    self.parts.append("add")
                    n_masks = self.masks
                    got = self.scores(s, depth + 1)
                    if got is not None:
                        self._set_mask(o, False)
                        return got
                    self.parts.pop()
                    self.masks = n_masks
            return None
        if c.op == "masked_fill":
            fill = _scalar(self.values, c.get("value"))
            if fill is None or fill > _FILL_MIN:
                return None
            self.parts.append("masked_fill")
            got = self.scores(c.get("x"), depth + 1)
            if got is not None:
                self._set_mask(c.get("mask"), True)
            return got
        if c.op == "where":
            a, b = c.get("a"), c.get("b")
            fa, fb = _scalar(self.values, a), _scalar(self.values, b)
            self.parts.append("where")
            if fb is not None and fb <= _FILL_MIN:
                got, inv = self.scores(a, depth + 1), False
            elif fa is not None and fa <= _FILL_MIN:
                got, inv = self.scores(b, depth + 1), True
            else:
                return None
            if got is not None:
                self._set_mask(c.get("cond"), inv)
            return got
        return None

    def _same_view(self, out: Node, inp: Any) -> bool:
        """A shape op that keeps every score (same numel, same last two dims)."""
        a, b = self.values.get(out.name), _val(self.values, inp)
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
            a.numel() == b.numel() and a.shape[-2:] == b.shape[-2:]

    def _set_mask(self, node: Any, invert: bool) -> None:
        if node is None:
            return
        self.masks += 1
        self.all_masks.append(node)
        self.mask, self.mask_invert = node, invert


def _strip_transpose(k_t: Node, gm: GraphModule, values: dict[str, Any]) -> tuple[Node, bool]:
    """k^T operand -> (k node in (..., M, d), False), or (k^T node, True) when not a plain swap."""
    c = is_op(k_t, gm, "transpose")
    if c is not None:
        v = values.get(k_t.name)
        nd = v.dim() if isinstance(v, torch.Tensor) else None
        d0, d1 = c.get("dim0"), c.get("dim1")
        if nd is not None and {d0 % nd, d1 % nd} == {nd - 2, nd - 1}:
            return c.get("x"), False
    return k_t, True


def _einsum_parts(eq: str) -> tuple[list[str], str] | None:
    eq = eq.replace(" ", "")
    if "->" not in eq or "..." in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    return (ins, out) if len(ins) == 2 else None


def _match_softmax(c: COp, gm: GraphModule, values: dict[str, Any], cap_path: str) -> Site | None:
    sm = c.node
    w = _Walk(gm, values)
    qk = w.scores(c.get("x"))
    if qk is None:
        return None  # a softmax that is not over q k^T: not attention
    # forward: softmax -> [cast] -> [dropout] -> @ v
    chain, cur, dropout_p = [sm], sm, 0.0
    pv: COp | None = None
    for _ in range(4):
        users = [u for u in cur.users if not _is_assert(u)]
        nxt = None
        for u in users:
            cu = canon(u, gm)
            if cu is None:
                continue
            if cu.op in ("matmul", "einsum") and (cu.get("a") is cur or (
                    cu.op == "einsum" and cu.get("operands") and cu.get("operands")[0] is cur)):
                pv = cu
            elif len(users) == 1 and (cu.op in ("cast", "dropout") or (
                    cu.op == "shape" and w._same_view(u, cur))):  # e.g. (B,H,N,M)->(B*H,N,M)
                nxt = u
                if cu.op == "dropout":
                    p = cu.get("p", 0.0)
                    dropout_p = float(p) if isinstance(p, (int, float)) else 0.0
        if pv is not None or nxt is None:
            break
        chain.append(nxt)
        cur = nxt
    if pv is None:
        return None
    site = Site(Found(module_path=_module_path(cap_path, sm), node_name=sm.name, pattern=""))
    f = site.found
    f.weights, f.output, f.dropout_p = chain, pv.node, dropout_p
    f.scale = w.scale
    f.mask, f.mask_invert = w.mask, w.mask_invert
    f.scale_nodes = w.scale_nodes
    f.softmax_dim = c.get("dim")
    f.qk = qk.node
    f.all_masks = w.all_masks
    if qk.op in ("matmul", "baddbmm"):
        q, k_t = qk.get("a"), qk.get("b")
        f.k, f.k_transposed = _strip_transpose(k_t, gm, values)
        f.q = _strip_scale(q, gm, values, f)
        f.k = _strip_scale(f.k, gm, values, f)
        if f.k_transposed:
            f.k_fix.append(("transpose", -2, -1))
        if pv.op != "matmul":
            return None
        f.v = pv.get("b")
        pat = [qk.op] + w.parts[::-1][1:] + ["softmax"] + \
            [canon(n, gm).op for n in chain[1:]] + ["matmul"]
    else:  # einsum
        qp, pp = _einsum_parts(qk.get("equation")), None
        if pv.op == "einsum":
            pp = _einsum_parts(pv.get("equation"))
        if qp is None or pp is None:
            return None
        (qs, ks), ss = qp
        (ws, vs), os_ = pp
        n_ax, m_ax = ss[-2], ss[-1]
        batch = ss[:-2]
        c_ax = [a for a in qs if a in ks and a not in ss]
        e_ax = [a for a in vs if a not in ws]
        if len(c_ax) != 1 or len(e_ax) != 1 or ws != ss or len(batch) not in (1, 2):
            return None
        c_ax, e_ax = c_ax[0], e_ax[0]
        f.q, f.k, f.v = qk.get("operands")[0], qk.get("operands")[1], pv.get("operands")[1]
        f.q = _strip_scale(f.q, gm, values, f)
        f.q_fix.append(("einsum", f"{qs}->{batch}{n_ax}{c_ax}"))
        f.k_fix.append(("einsum", f"{ks}->{batch}{m_ax}{c_ax}"))
        f.v_fix.append(("einsum", f"{vs}->{batch}{m_ax}{e_ax}"))
        f.out_fix.append(("einsum", f"{batch}{n_ax}{e_ax}->{os_}"))
        pat = ["einsum"] + w.parts[::-1][1:] + ["softmax"] + \
            [canon(n, gm).op for n in chain[1:]] + ["einsum"]
    f.pattern = "-".join(pat)
    return site


def _strip_scale(x: Any, gm: GraphModule, values: dict[str, Any], found: Found) -> Any:
    """q * s (or q / s) with a constant s: fold s into the site scale, return q."""
    c = is_op(x, gm, "mul", "div")
    if c is None:
        return x
    for s_idx, o_idx in (("a", "b"), ("b", "a")) if c.op == "mul" else (("a", "b"),):
        s, o = c.get(s_idx), c.get(o_idx)
        f = _scalar(values, o)
        v = values.get(s.name) if isinstance(s, Node) else None
        if isinstance(s, Node) and f is not None and f != 0 and isinstance(v, torch.Tensor) \
                and v.dim() >= 3:
            found.scale = found.scale * f if c.op == "mul" else found.scale / f
            if isinstance(o, Node):
                found.scale_nodes.append(o)
            return s
    return x


_SDPA_ARGS = ("is_causal", "scale", "dropout_p", "enable_gqa")


def _resolve(site: Site, name: str, x: Any, values: dict[str, Any]) -> Any:
    """A call argument that may be a graph value (a forward argument, a size computed from a
    shape): its value on the example inputs, recorded in ``site.arg_guards`` so the rewrite
    checks at run time that it has not changed. A value unknown here skips the site."""
    if not isinstance(x, Node):
        return x
    v = values.get(x.name, _UNKNOWN)
    if isinstance(v, torch.SymBool):
        v = bool(v)
    elif isinstance(v, (torch.SymInt, torch.SymFloat)):
        v = float(v)
    if v is _UNKNOWN or not isinstance(v, (bool, int, float)) or v is None:
        site.skip(f"the {name} argument of scaled_dot_product_attention is computed at run time "
                  f"({x.name}) and its value is unknown here; pass example_inputs")
        return None
    site.found.arg_guards.append((x, v, name))
    return v


_UNKNOWN = object()


def _match_sdpa(c: COp, gm: GraphModule, values: dict[str, Any], cap_path: str) -> Site | None:
    node = c.node
    out = node
    if sdpa_returns_tuple(node):
        outs = [u for u in node.users if is_getitem(u, 0)]
        if len(outs) != 1:
            return None
        out = outs[0]
    site = Site(Found(module_path=_module_path(cap_path, node), node_name=node.name,
                      pattern="sdpa"))
    f = site.found
    f.q, f.k, f.v = c.get("q"), c.get("k"), c.get("v")
    f.mask = c.get("attn_mask")
    args = {n: _resolve(site, n, c.get(n), values) for n in _SDPA_ARGS}
    f.causal = bool(args["is_causal"])
    s = args["scale"]
    f.scale = float(s) if isinstance(s, (int, float)) else None
    p = args["dropout_p"]
    f.dropout_p = float(p) if isinstance(p, (int, float)) else 0.0
    f.output, f.weights = out, []
    f.scale_nodes, f.softmax_dim, f.qk = [], -1, None
    f.all_masks = [f.mask] if isinstance(f.mask, Node) else []
    if node.target is not None and args["enable_gqa"]:
        site.notes.append("enable_gqa")
    return site


def find_sites(gm: GraphModule, values: dict[str, Any], cap_path: str) -> list[Site]:
    """All attention sites of ``gm`` in graph order (legality not yet decided)."""
    sites: list[Site] = []
    for node in gm.graph.nodes:
        c = canon(node, gm)
        if c is None:
            continue
        site = None
        if c.op == "softmax":
            site = _match_softmax(c, gm, values, cap_path) or unmatched_site(
                c, gm, values, _module_path(cap_path, node))
            for o in site.scale_nodes if site is not None else ():  # a forward-argument scale
                v = values.get(o.name)
                if isinstance(v, (bool, int, float, torch.SymInt, torch.SymFloat)):
                    site.found.arg_guards.append((o, float(v), "scale"))
        elif c.op == "sdpa":
            site = _match_sdpa(c, gm, values, cap_path)
        if site is not None:
            sites.append(site)
    return sites


def apply_fix(x: torch.Tensor, fix: list[tuple]) -> torch.Tensor:
    """Apply a site's layout fixes (transpose / einsum / unflatten / flatten) to a value."""
    for f in fix:
        if f[0] == "transpose":
            x = x.transpose(f[1], f[2])
        elif f[0] == "unflatten":  # (B*H, M, d) -> (B, H, M, d)
            x = x.unflatten(0, (-1, f[1]))
        elif f[0] == "flatten":  # (B, H, N, d) -> (B*H, N, d)
            x = x.flatten(0, 1)
        elif f[0] == "einsum":
            x = torch.einsum(f[1], x)
    return x


def default_scale(head_dim: int) -> float:
    """SDPA's default softmax scale."""
    return 1.0 / math.sqrt(head_dim)
