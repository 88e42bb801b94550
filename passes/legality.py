"""Legality: fill a matched site's shapes, mask kind and projection chains from the example
values, then decide rewrite or skip with a reason a user can read.

``check(site, ...)`` never raises: any surprise becomes a skip reason. Skips: attention weights
used elsewhere (returned, stored, summed); softmax not over the key axis; a learned additive
bias (T5 relative bias, ALiBi) or a mask that is neither padding nor causal under a non-exact
kernel; a learned (parameter) softmax scale; unknown shapes.
"""
from __future__ import annotations

from typing import Any

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from flurka_rewrite.kernels.attention import MASKED_BELOW

from .canonicalize import canon
from .graph_nx import depends_on_any, escapes, site_region
from .match import apply_fix
from .site import Found, KVChain, Shapes, Site

BIAS_REASON = ("additive position bias (learned, e.g. T5 relative bias or ALiBi) enters the "
               "scores; FLuRKA cannot represent it")


def classify_mask(mask: torch.Tensor | None, invert: bool, causal_flag: bool) -> str:
    """none | padding | causal | causal+padding | bias | other, from the mask's values."""
    if mask is None:
        return "causal" if causal_flag else "none"
    if not isinstance(mask, torch.Tensor):
        return "other"
    if mask.dtype == torch.bool:
        keep = ~mask if invert else mask
    elif mask.is_floating_point():
        if invert:
            return "other"
        big = mask <= MASKED_BELOW
        if not bool(((mask == 0) | big).all()):
            return "bias"
        keep = ~big
    else:
        keep = (mask == 0) if invert else (mask != 0)
    if keep.dim() < 2:
        return "other"
    n, m = keep.shape[-2], keep.shape[-1]
    last = keep[..., -1:, :]
    if bool((keep == keep[..., :1, :]).all()):
        kind = "padding"
    else:
        tri = torch.ones(n, m, dtype=torch.bool).tril(m - n)
        if bool((keep == (tri & last)).all()):
            kind = "causal+padding" if not bool(last.all()) else "causal"
        else:
            return "other"
    if causal_flag:
        kind = "causal+padding" if kind == "padding" and not bool(keep.all()) else "causal"
    return kind


def _within_causal(mask: torch.Tensor | None, invert: bool) -> bool:
    """The mask allows no key after its query (e.g. a causal sliding window)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2:
        return False
    if mask.dtype == torch.bool:
        keep = ~mask if invert else mask
    elif mask.is_floating_point() and not invert:
        keep = mask > MASKED_BELOW
    else:
        return False
    n, m = keep.shape[-2], keep.shape[-1]
    future = ~torch.ones(n, m, dtype=torch.bool).tril(m - n)
    return not bool((keep & future).any())


def _tensor(values: dict[str, Any], n: Any) -> torch.Tensor | None:
    v = values.get(n.name) if isinstance(n, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def strip_repeat(node: Node, gm: GraphModule, values: dict[str, Any], heads: int) -> Node | None:
    """GQA repeat_kv (expand + reshape): the ancestor of ``node`` with Hkv < H heads whose
    repeat_interleave along dim 1 equals node's value, else None."""
    target = _tensor(values, node)
    cur = node
    for _ in range(6):
        c = canon(cur, gm)
        if c is None or c.op not in ("shape", "getitem"):  # expand/reshape/[:, :, None]
            return None
        nxt = c.get("x")
        if not isinstance(nxt, Node):
            return None
        v = _tensor(values, nxt)
        if v is not None and v.dim() == 4 and v.shape[1] < heads and heads % v.shape[1] == 0 \
                and v.shape[0] == target.shape[0] and v.shape[2:] == target.shape[2:]:
            rep = v.repeat_interleave(heads // v.shape[1], dim=1)
            return nxt if torch.equal(rep, target) else None
        cur = nxt
    return None


def _shape_query(node: Node) -> bool:
    """x.shape / x.size() / aten.sym_size: reads only the shape, not the values."""
    t = node.target
    return (node.op == "call_method" and t in ("size", "dim")) or (
        node.op == "call_function" and (t is getattr or "sym_size" in str(t)))


def kv_chain(node: Node, gm: GraphModule, values: dict[str, Any], layout: str,
             kv_heads: int, head_dim: int) -> KVChain | None:
    """The Linear -> head-split chain ending in ``node``, if it is exactly
    ``linear(x).view(B, M, Hkv, dh).transpose(1, 2)`` (reshaped to (B*Hkv, M, dh) for 3-D)."""
    target = _tensor(values, node)
    cur, path = node, []
    for _ in range(8):
        c = canon(cur, gm)
        if c is None or c.op not in ("shape", "transpose", "permute", "linear"):
            return None
        path.append(cur)
        if c.op == "linear":
            x = c.get("x")
            xv, lv = _tensor(values, x), _tensor(values, cur)
            if xv is None or lv is None or xv.dim() != 3 or lv.shape[-1] != kv_heads * head_dim:
                return None
            B, M = xv.shape[0], xv.shape[1]
            want = lv.view(B, M, kv_heads, head_dim).transpose(1, 2)
            if layout == "flat":
                want = want.reshape(B * kv_heads, M, head_dim)
            if want.shape != target.shape or not torch.equal(want, target):
                return None
            for n in path[1:]:  # intermediate values must not be used elsewhere
                if len([u for u in n.users if not _shape_query(u)]) != 1:
                    return None
            w, b = c.get("weight"), c.get("bias")
            w = gm.get_parameter(w.target) if isinstance(w, Node) and w.op == "get_attr" else w
            b = gm.get_parameter(b.target) if isinstance(b, Node) and b.op == "get_attr" else b
            return KVChain(x=x, linear=cur, weight=c.get("weight"), bias=c.get("bias"),
                           dm=int(xv.shape[-1]))
        nxt = c.get("x")
        if not isinstance(nxt, Node):
            return None
        cur = nxt
    return None


def shapes_of(found: Found) -> Shapes:
    """A ``Shapes`` record that starts from what the matcher found (scale, causality, dropout,
    layout fixes); the functions below fill in the rest."""
    return Shapes(scale=found.scale, causal=found.causal, dropout_p=found.dropout_p,
                  v_fix=list(found.v_fix), out_fix=list(found.out_fix))


def _shapes(site: Site) -> Shapes:
    if site.shapes is None:
        site.shapes = shapes_of(site.found)
    return site.shapes


def fill(site: Site, gm: GraphModule, values: dict[str, Any]) -> None:
    """``site.shapes``: sizes, heads, mask kind, GQA and K/V chains from the example values."""
    sh = site.shapes = shapes_of(site.found)
    try:
        q = apply_fix(_tensor(values, site.q), site.q_fix)
        k = apply_fix(_tensor(values, site.k), site.k_fix)
        v = apply_fix(_tensor(values, site.v), site.v_fix)
    except Exception:  # noqa: BLE001
        q = None
    if q is None or k is None or v is None:
        site.skip("unknown shapes: q, k or v has no value on the example inputs")
        return
    if q.dim() == 4 and v.dim() == 3 and k.dim() == 4 and k.shape[1] == q.shape[1] and \
            v.shape[0] == q.shape[0] * q.shape[1]:  # weights viewed flat before the v product
        sh.v_fix.append(("unflatten", q.shape[1]))
        sh.out_fix.append(("flatten",))
        v = apply_fix(_tensor(values, site.v), [("unflatten", q.shape[1])])
    if q.dim() == 3:
        sh.layout = "flat"
        sh.batch, sh.heads, sh.kv_heads = q.shape[0], 1, 1
    elif q.dim() == 4:
        sh.batch, sh.heads, sh.kv_heads = q.shape[0], q.shape[1], k.shape[1]
    else:
        site.skip(f"unsupported q rank {q.dim()} (expected (B, H, N, d) or (B*H, N, d))")
        return
    sh.seq_len, sh.head_dim = q.shape[-2], q.shape[-1]
    sh.kv_seq_len, sh.v_dim = k.shape[-2], v.shape[-1]
    if sh.scale is None:
        sh.scale = sh.head_dim ** -0.5
    mval = _tensor(values, site.mask)
    sh.mask_rank = mval.dim() if mval is not None else None
    sh.mask_kind = classify_mask(mval, site.mask_invert, site.causal)
    if site.mask is not None and mval is None:
        sh.mask_kind = "other"
    if site.mask_kind.startswith("causal") or (
            site.mask_kind == "other" and _within_causal(mval, site.mask_invert)):
        sh.causal = True  # a banded causal mask (sliding window) is causal too
    if site.layout == "bhnd" and not site.k_fix and site.kv_heads == site.heads:
        kp = strip_repeat(site.k, gm, values, site.heads)
        vp = strip_repeat(site.v, gm, values, site.heads) if not site.v_fix else None
        if kp is not None and vp is not None and kp.meta is not None:
            kvv = _tensor(values, kp)
            sh.k_pre_repeat, sh.v_pre_repeat, sh.kv_heads = kp, vp, kvv.shape[1]
    if not site.k_fix and not site.v_fix:
        kn = site.k_pre_repeat or site.k
        vn = site.v_pre_repeat or site.v
        sh.k_chain = kv_chain(kn, gm, values, site.layout, site.kv_heads, site.head_dim)
        sh.v_chain = kv_chain(vn, gm, values, site.layout, site.kv_heads, site.v_dim)
        if site.k_chain and site.v_chain and site.k_chain.x is site.v_chain.x:
            sh.dm = sh.k_chain.dm
        else:
            sh.k_chain = sh.v_chain = None


def fill_static(site: Site, heads: int, head_dim: int, kv_heads: int, v_dim: int) -> None:
    """``site.shapes`` for a site planned without example inputs (passes/static_plan.py): the
    head sizes read from the graph's views; lengths unknown; a mask is of unknown kind."""
    sh = site.shapes = shapes_of(site.found)
    sh.heads, sh.head_dim, sh.kv_heads, sh.v_dim = heads, head_dim, kv_heads, v_dim
    if sh.scale is None:
        sh.scale = head_dim ** -0.5
    sh.mask_kind = ("causal" if sh.causal else "none") if site.mask is None else "other"


def fill_mha(site: Site, mha: Any, call: dict[str, Any] | None) -> None:
    """``site.shapes`` of an ``nn.MultiheadAttention`` (passes/mha.py): sizes from the module,
    and with the recorded ``call`` (arguments by name) the lengths and the mask kind; without
    a call the key padding mask is read at run time."""
    sh = site.shapes = shapes_of(site.found)
    sh.heads = sh.kv_heads = mha.num_heads
    sh.head_dim = sh.v_dim = mha.head_dim
    sh.dm = mha.embed_dim
    if call is None:
        sh.mask_kind = "padding"  # key_padding_mask is read at run time
        return
    q, k = call["query"], call["key"]
    if not mha.batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    sh.batch, sh.seq_len, sh.kv_seq_len = q.shape[0], q.shape[1], k.shape[1]
    am = call.get("attn_mask")
    # a bool mask is True where attention is NOT allowed; a float mask is additive
    # (nn.Transformer.generate_square_subsequent_mask: 0 and -inf)
    sh.mask_kind = classify_mask(am, am.dtype == torch.bool, bool(call.get("is_causal"))) \
        if am is not None else ("causal" if call.get("is_causal") else "none")
    if call.get("key_padding_mask") is not None and sh.mask_kind == "none":
        sh.mask_kind = "padding"
    sh.causal = sh.mask_kind.startswith("causal")


def set_train_dropout(site: Site, p: float) -> None:
    """The training-time attention dropout, where the eval-mode capture shows 0.0 (Hugging
    Face passes ``dropout=0.0`` in eval; passes/units.py: train_dropout reads the module)."""
    _shapes(site).dropout_p = p


def merge_probe(site: Site, probe: Site) -> None:
    """What the padded probe's capture of the same site adds: a mask kind where the example
    had no mask (Hugging Face drops an all-ones mask), and causality."""
    sh = _shapes(site)
    if sh.mask_kind == "none":
        sh.mask_kind = probe.mask_kind
        sh.causal = sh.causal or probe.causal


def check(site: Site, gm: GraphModule, values: dict[str, Any], g: nx.DiGraph,
          params: set[str], exact: bool, lengths_known: bool = True) -> None:
    """Decide rewrite or skip (sets ``site.ok`` / ``site.reason``); never raises.
    ``lengths_known=False``: planned without example inputs, where the sequence lengths are
    unknown by design (passes/static_plan.py)."""
    try:
        _check(site, gm, values, g, params, exact, lengths_known)
    except Exception as e:  # noqa: BLE001 - a surprise is a skip, not a crash
        site.skip(f"could not analyse this site ({type(e).__name__}: {e})")


def _check(site, gm, values, g, params, exact, lengths_known) -> None:
    masks = site.all_masks
    kinds = [classify_mask(_tensor(values, m), False, False) for m in masks]
    if "bias" in kinds or any(depends_on_any(g, m, params) for m in masks if isinstance(m, Node)):
        _shapes(site).learned_bias = True
        site.skip(BIAS_REASON)
        return
    outs = {n.name for n in gm.graph.nodes if n.op == "output"}
    returned = {p for o in outs for p in g.predecessors(o)}
    for m in masks:
        if isinstance(m, Node) and (nx.ancestors(g, m.name) | {m.name}) & returned:
            _shapes(site).learned_bias = True
            site.skip("an additive position bias that the module also returns for reuse by "
                      "other layers (T5-style) enters the scores; FLuRKA cannot represent it")
            return
    if len(masks) > 1:
        site.skip("more than one mask enters the scores")
        return
    if site.mask_kind == "bias" or (site.mask is not None and depends_on_any(g, site.mask, params)):
        _shapes(site).learned_bias = True
        site.skip(BIAS_REASON)
        return
    dim = site.softmax_dim
    if site.weights:
        wv = _tensor(values, site.weights[0])
        nd = wv.dim() if wv is not None else None
        if dim is None or nd is None or dim % nd != nd - 1:
            site.skip(f"softmax is over axis {dim}, not the key axis (last): not attention")
            return
        # the attention weights must feed only the product with v
        inside = set(n.name for n in site.weights)
        leaks = [(n.name, u.name) for n in site.weights for u in n.users
                 if u.name not in inside and u is not site.output and "assert" not in str(u.target)]
        scores = nx.descendants(g, site.qk.name) | {site.qk.name}
        region = site_region(g, [site.q, site.k, site.v, site.mask], site.output)
        leaks += [e for e in escapes(g, region, site.output) if e[0] in scores]
        if leaks:
            outs = [e for e in leaks if g.nodes[e[1]]["op"] == "output"]
            _shapes(site).escape_output_only = len(outs) == len(leaks)
            what = ", ".join(sorted({f"{a} -> {b}" for a, b in leaks}))
            site.skip(f"attention weights are used elsewhere ({what}): rewriting would change "
                      "them")
            return
    for n in site.scale_nodes:
        if depends_on_any(g, n, params):
            site.skip("the softmax scale is a learned parameter; FLuRKA uses a fixed scale")
            return
    if site.mask_kind == "other" and not exact:
        site.skip("the mask is neither key padding nor causal (e.g. a sliding window); only "
                  "kernel='softmax', dk=None can keep it")
        return
    if site.heads is None or (lengths_known and site.seq_len is None):
        site.skip("unknown shapes")
