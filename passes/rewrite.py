"""Rewrite: replace a legal site's nodes by one call to a ``FlurkaAttention`` submodule.

    q, k, v (layout fixes applied; GQA repeat_kv stripped)  -> flurka_<i>(q, k, v, attn_mask=m)

When the K and V projection chains are linear and position-independent and the site is
low-rank, the down-sampling is hoisted above the projections (docs/design.md §3.3):

    keep = flurka_<i>.key_keep(m, M)
    ex   = flurka_<i>.down_project(x, "k", keep)                     # E x: (B, dk, dm)
    k    = flurka_<i>.fix_bias(self.key(ex), x, self.key.bias, "k", keep)   # + (E 1 - 1) b
    k    = k.view(B, dk, Hkv, dh).transpose(1, 2)
    out  = flurka_<i>(q, k, v, attn_mask=m, source_len=M)

The projection stays a call of its module (``self.key``), so a module swapped in later (PEFT's
LoRA) is what runs; a projection that is no module (``F.linear`` on a parameter) goes through
``flurka_<i>.project_kv(x, W_k, b_k, "k", keep)``, the same product.

The replaced nodes become dead and are removed; ``graph.lint()`` runs after every site.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.kernels.reference import rel_error as relative_error
from flurka_rewrite.kernels.registry import takes_num_features

from .site import KVChain, Site, can_hoist


def build_attention(site: Site, *, kernel: str, dk: int | None, num_features: int | None,
                    max_seq_len: int | None, seed: int, e_init: str, backend: str,
                    window: int | None = None) -> FlurkaAttention:
    """The FlurkaAttention module for one site (kernel/dk/window already resolved)."""
    return FlurkaAttention(
        kernel=kernel, heads=site.heads, head_dim=site.head_dim, kv_heads=site.kv_heads,
        dk=dk, max_seq_len=max_seq_len if dk is not None else None,
        num_features=num_features if takes_num_features(kernel) else None,
        scale=site.scale, causal=site.causal, dropout=site.dropout_p, e_init=e_init,
        seed=seed, backend=backend, window=window)


def _fix(g, x: Node, fix: list[tuple]) -> Node:
    for f in fix:
        if f[0] == "transpose":
            x = g.call_method("transpose", (x, f[1], f[2]))
        elif f[0] == "einsum":
            x = g.call_function(torch.einsum, (f[1], x))
        elif f[0] == "unflatten":
            x = g.call_method("unflatten", (x, 0, (-1, f[1])))
        elif f[0] == "flatten":
            x = g.call_method("flatten", (x, 0, 1))
    return x


def _weight_node(g, gm: GraphModule, chain: KVChain, which: str) -> Any:
    """Node (or None) for the projection's weight/bias."""
    val = chain.weight if which == "weight" else chain.bias
    if isinstance(val, Node) or val is None:
        return val
    # call_module Linear: read its parameter through get_attr
    return g.get_attr(f"{chain.linear.target}.{which}")


def _hoisted_kv(g, gm: GraphModule, fa: Node, chain: KVChain, which: str, keep: Node,
                site: Site, dk: int, dim: int) -> Node:
    if chain.linear.op == "call_module":  # call the module: a swapped one (LoRA) takes effect
        ex = g.call_method("down_project", (fa, chain.x, which, keep))  # (B, dk, dm)
        y = g.call_module(chain.linear.target, (ex,))  # (B, dk, Hkv*d): (E X) W^T + b
        b = _weight_node(g, gm, chain, "bias")
        if b is not None:
            y = g.call_method("fix_bias", (fa, y, chain.x, b, which, keep))  # + (E 1 - 1) b
    else:
        w = _weight_node(g, gm, chain, "weight")
        b = _weight_node(g, gm, chain, "bias")
        y = g.call_method("project_kv", (fa, chain.x, w, b, which, keep))  # (B, dk, Hkv*d)
    b0 = g.call_method("size", (chain.x, 0))
    y = g.call_method("view", (y, b0, dk, site.kv_heads, dim))  # (B, dk, Hkv, d)
    y = g.call_method("transpose", (y, 1, 2))  # (B, Hkv, dk, d)
    return y


# Ops that FX flags impure only because they draw random numbers (dropout, SDPA's dropout_p),
# not because they mutate anything: once a site's output is replaced they are dead work (the
# full-length attention), and dead-code elimination must drop them.
_RANDOM_ONLY = ("scaled_dot_product", "dropout", "bernoulli")


def _keep(node: Node) -> bool:
    """Nodes dead-code elimination must keep: the capture's runtime guards and impure ops
    other than the random-but-pure attention and dropout ops."""
    from .export_capture import _guard
    if node.op == "call_function" and node.target is _guard:
        return True
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", None) or str(node.target)
        if any(s in name for s in _RANDOM_ONLY) and not name.endswith("_"):
            return False
    return node.is_impure()


def _drop_orphan_asserts(g) -> bool:
    """Erase torch.export's ``_assert_tensor_metadata`` checks on tensors that nothing else
    consumes any more (GPT-2's ``.type(dtype)`` on the attention weights): the check is
    impure, so it would otherwise keep the dead full attention alive. Returns whether it
    erased any."""
    erased = False
    for n in list(g.nodes):
        if n.op != "call_function" or "_assert_tensor_metadata" not in str(n.target):
            continue
        t = n.args[0] if n.args else None
        if isinstance(t, Node) and all(
                "_assert_tensor_metadata" in str(u.target) for u in t.users):
            g.erase_node(n)
            erased = True
    return erased


def flat_mask(mask: torch.Tensor, bh: int) -> torch.Tensor:
    """A (B or 1, 1 or H, N, M) mask, added to the scores on their 4-D view, as the
    (B*H, 1, N, M) mask of the flat (B*H, N, d) layout."""
    b = mask.shape[0]
    h = bh // b
    if b * h != bh or mask.shape[1] not in (1, h):
        raise ValueError(f"mask {tuple(mask.shape)} does not fit {bh} (batch x heads) rows")
    return mask.expand(b, h, mask.shape[-2], mask.shape[-1]).reshape(bh, 1, mask.shape[-2],
                                                                     mask.shape[-1])


def rewrite_site(gm: GraphModule, site: Site, name: str, attn: FlurkaAttention,
                 hoist: bool) -> bool:
    """Insert the FlurkaAttention call for ``site`` into ``gm``; returns whether it hoisted."""
    gm.add_submodule(name, attn)
    g = gm.graph
    out = site.output
    hoisted = False
    with g.inserting_before(out):
        from .export_capture import _guard
        for node, value, arg in site.arg_guards:  # read from graph values: still the same?
            g.call_function(_guard, (node, value, arg, site.module_path or "<root>"))
        q = _fix(g, site.q, site.q_fix)
        mask = site.mask
        if mask is not None and site.mask_invert:
            mask = g.call_function(torch.logical_not, (mask,))
        flat = site.layout == "flat"
        kwargs: dict[str, Any] = {"attn_mask": mask}
        if attn.dk is not None and can_hoist(site, hoist):
            fa = g.get_attr(name)
            src_len = g.call_method("size", (site.k_chain.x, 1))
            keep = g.call_method("key_keep", (fa, mask, src_len))
            k = _hoisted_kv(g, gm, fa, site.k_chain, "k", keep, site, attn.dk, site.head_dim)
            v = _hoisted_kv(g, gm, fa, site.v_chain, "v", keep, site, attn.dk, site.v_dim)
            kwargs["source_len"] = src_len
            hoisted = True
        else:
            k = _fix(g, site.k_pre_repeat or site.k, site.k_fix)
            v = _fix(g, site.v_pre_repeat or site.v, site.v_fix)
        if flat:  # (B*H, N, d) -> (B*H, 1, N, d); a (B*H, N, M) mask likewise
            q, k, v = (g.call_method("unsqueeze", (t, 1)) for t in (q, k, v))
            if mask is not None and site.mask_rank == 3:
                kwargs["attn_mask"] = g.call_method("unsqueeze", (mask, 1))
            elif mask is not None and site.mask_rank == 4:  # (B|1, 1|H, N, M) on the 4-D view
                kwargs["attn_mask"] = g.call_function(flat_mask, (mask, g.call_method(
                    "size", (q, 0))))
        res = g.call_module(name, (q, k, v), kwargs)
        if flat:
            res = g.call_method("squeeze", (res, 1))
        res = _fix(g, res, site.out_fix)
    out.replace_all_uses_with(res)
    g.eliminate_dead_code(is_impure_node=_keep)
    while _drop_orphan_asserts(g):  # each pass can orphan the asserts one level up
        g.eliminate_dead_code(is_impure_node=_keep)
    g.lint()
    return hoisted


def site_inputs(site: Site, values: dict[str, Any]) -> tuple:
    """(q, k, v, attn_mask) of the site on the example inputs, in FlurkaAttention layout."""
    from .match import apply_fix
    q = apply_fix(values[site.q.name], site.q_fix)
    k = apply_fix(values[(site.k_pre_repeat or site.k).name], site.k_fix)
    v = apply_fix(values[(site.v_pre_repeat or site.v).name], site.v_fix)
    mask = values.get(site.mask.name) if isinstance(site.mask, Node) else None
    if mask is not None and site.mask_invert:
        mask = ~mask
    if site.layout == "flat":
        q, k, v = q[:, None], k[:, None], v[:, None]
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]
    return q, k, v, mask


def rel_error(site: Site, values: dict[str, Any], attn: FlurkaAttention) -> float | None:
    """|out - ref| / |ref| of the site's FlurkaAttention (unhoisted) against the original."""
    try:
        q, k, v, mask = site_inputs(site, values)
        ref = values[site.output.name]
        if site.output.op == "call_function" and isinstance(ref, tuple):
            ref = ref[0]
        was = attn.training
        attn.eval()
        with torch.no_grad():
            out = attn(q, k, v, attn_mask=mask)
        attn.train(was)
        if site.layout == "flat":
            out = out[:, 0]
        from .match import apply_fix
        out = apply_fix(out, site.out_fix)
        return relative_error(out, ref)
    except Exception:  # noqa: BLE001 - rel_error is informative only
        return None
