"""Translation validation: every rewrite is checked against the original before it is installed.

For one captured unit (a module, its graph, the sites the planner kept):

    ref   = the original module on each check call (the example's recorded call, and the padded
            probe's when the model takes an attention mask)
    twin  = the same rewrite (the same wiring, hoisting and layout fixes) with every
            FlurkaAttention swapped for its *exact twin* (``twin_attention``)
    twin(call) must equal ref(call) on every output, by structure and by value (``compare``);
    real(call), the rewrite as it will be installed, must run and stay finite.

A failure leaves the module exactly as it was (nothing is installed until the unit passes) and
marks its sites skipped with the reason. With several sites in one unit, each is then tried
alone so that one bad site does not take the others with it.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.fx import Graph, GraphModule, Node
from torch.utils import _pytree as pytree

from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.kernels.reference import softmax_attention
from flurka_rewrite.kernels.registry import SOFTMAX

from .site import KVChain, Site

# fp32: the exact twin differs from the original only by float reassociation (SDPA against an
# explicit softmax, (E X) W against E (X W)); measured below 1e-6 of the output's scale on the
# zoo. 1e-4 leaves two orders of margin, while a real change of function (a dropped mask, a
# wrong scale, causal where the original is not) is >= 1e-2 on peaked attention. 16-bit
# outputs carry ~3 significant digits, hence 1e-2 there.
RTOL_FP32 = 1e-4
RTOL_16BIT = 1e-2


class MaskAsKeyPadding(FlurkaAttention):
    """Exact twin of a kernel-only site: softmax attention that sees the mask the way the
    kernel path does (``key_keep``: reduced to key padding, plus causality)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *,
                key_padding_mask: Tensor | None = None, source_len: int | None = None) -> Tensor:
        keep = self.key_keep(attn_mask, k.shape[-2])
        if key_padding_mask is not None:
            keep = key_padding_mask.bool() if keep is None else keep & key_padding_mask.bool()
        return softmax_attention(q, k, v, key_padding_mask=keep, causal=self.causal,
                                 scale=self.scale)


def twin_attention(real: FlurkaAttention, max_len: int) -> FlurkaAttention:
    """The exact twin of ``real``: the same sizes, scale, causality and mask handling, with
    softmax in place of the kernel and, for a low-rank site, identity E and F (dk = max_len)
    so that the hoisted projections and their bias terms are checked too."""
    common = dict(heads=real.heads, head_dim=real.head_dim, kv_heads=real.kv_heads,
                  scale=real.scale, causal=real.causal, backend="torch")
    if real.dk is not None:  # "pool" with dk == max_seq_len is the identity
        return FlurkaAttention(kernel=SOFTMAX, dk=max_len, max_seq_len=max_len,
                               e_init="pool", **common)
    if real.kernel == SOFTMAX:
        return FlurkaAttention(kernel=SOFTMAX, dropout=real.dropout, **common)
    return MaskAsKeyPadding(kernel=SOFTMAX, **common)


# -- comparing outputs -------------------------------------------------------------------
def compare(ref: Any, out: Any) -> str | None:
    """None when ``out`` equals ``ref`` (same structure, tensors within the tolerance above,
    other leaves equal), else what differs."""
    r_leaves, r_spec = pytree.tree_flatten(ref)
    o_leaves, o_spec = pytree.tree_flatten(out)
    if r_spec != o_spec:
        return f"the outputs differ in structure ({_kind(ref)} against {_kind(out)})"
    for i, (a, b) in enumerate(zip(r_leaves, o_leaves)):
        if isinstance(a, Tensor) != isinstance(b, Tensor):
            return f"output {i} is {type(a).__name__} in the original, {type(b).__name__} here"
        if not isinstance(a, Tensor):
            if a is not b and a != b:
                return f"output {i} differs: {b!r} instead of {a!r}"
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return (f"output {i} is {tuple(b.shape)} {b.dtype} instead of {tuple(a.shape)} "
                    f"{a.dtype}")
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"output {i} differs (integer values)"
            continue
        a32, b32 = a.detach().float(), b.detach().float()
        nan_a, nan_b = torch.isnan(a32), torch.isnan(b32)
        if not torch.equal(nan_a, nan_b):
            return f"output {i} has NaN where the original has none (or the reverse)"
        a32, b32 = a32.masked_fill(nan_a, 0), b32.masked_fill(nan_b, 0)
        scale = float(a32.abs().max()) if a32.numel() else 0.0
        err = float((a32 - b32).abs().max()) if a32.numel() else 0.0
        tol = (RTOL_16BIT if a.element_size() <= 2 else RTOL_FP32) * max(scale, 1e-6)
        if err > tol:
            return f"max error {err:.3g} on output {i} (scale {scale:.3g})"
    return None


def _kind(x: Any) -> str:
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__} of {len(x)}"
    return type(x).__name__


def _finite(out: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in pytree.tree_leaves(out)
               if isinstance(t, Tensor) and t.is_floating_point())


def run(fn: Callable[..., Any], call: tuple[tuple, dict]) -> Any:
    """``fn(*args, **kwargs)`` in eval mode (no dropout, no feature redraw), without autograd."""
    args, kwargs = call
    if isinstance(fn, nn.Module):
        fn.eval()
    with torch.no_grad():
        return fn(*args, **kwargs)


# -- building a rewritten copy of a unit's graph -----------------------------------------
def _remap(x: Any, env: dict[Node, Node]) -> Any:
    if isinstance(x, Node):
        return env.get(x, x)
    if isinstance(x, list):
        return [_remap(v, env) for v in x]
    if isinstance(x, tuple):
        return tuple(_remap(v, env) for v in x)
    if isinstance(x, KVChain):
        return KVChain(x=_remap(x.x, env), linear=_remap(x.linear, env),
                       weight=_remap(x.weight, env), bias=_remap(x.bias, env), dm=x.dm)
    return x


def remap_site(site: Site, env: dict[Node, Node]) -> Site:
    """A copy of ``site`` whose node fields point into the copied graph."""
    new = copy.copy(site)
    for name, val in vars(site).items():
        if name in ("found", "shapes") and val is not None:  # the records that hold nodes
            rec = copy.copy(val)
            for field_name, x in vars(val).items():
                setattr(rec, field_name, _remap(x, env))
            val = rec
        setattr(new, name, _remap(val, env))
    return new


def rewritten_copy(gm: GraphModule, sites: Sequence[Site], attns: dict[int, nn.Module],
                   hoist: bool) -> tuple[GraphModule, dict[Node, Node], dict[int, tuple]]:
    """A new GraphModule (sharing ``gm``'s parameters) with each of ``sites`` rewritten to
    call ``attns[site.index]``; also the map from ``gm``'s nodes to the copy's, and per site
    index (hoisted, the nodes its rewrite added)."""
    from .rewrite import rewrite_site
    g = Graph()
    env: dict[Node, Node] = {}
    g.output(g.graph_copy(gm.graph, env))
    new = GraphModule(gm, g, type(gm).__name__)
    info: dict[int, tuple] = {}
    for s in sites:
        before = set(g.nodes)
        hoisted = rewrite_site(new, remap_site(s, env), f"flurka_{s.index}", attns[s.index],
                               hoist)
        info[s.index] = (hoisted, [n for n in g.nodes if n not in before])
    new.recompile()
    return new, env, info


def check(module: nn.Module, build: Callable[[Sequence[Site], dict[int, nn.Module]], Any],
          sites: Sequence[Site], real: dict[int, FlurkaAttention],
          calls: Sequence[tuple[tuple, dict]], exact: bool) -> str | None:
    """None when the rewrite of ``sites`` passes on every call, else the failure.

    ``build(sites, attns)`` returns a callable with those sites rewritten to call ``attns``
    (site index -> module); the original ``module`` gives the reference outputs."""
    max_len = max((s.kv_seq_len or 1) for s in sites)
    twins = {s.index: twin_attention(real[s.index], max_len).eval() for s in sites}
    try:
        twin = build(sites, twins)
    except Exception as e:  # noqa: BLE001
        return f"verification failed: the exact twin could not be built ({_err(e)})"
    refs = []
    for call in calls:
        ref = run(module, call)
        refs.append(ref)
        try:
            out = run(twin, call)
        except Exception as e:  # noqa: BLE001
            return f"verification failed: the exact twin raises ({_err(e)})"
        diff = compare(ref, out)
        if diff is not None:
            return f"verification failed: {diff} (exact twin differs from the original)"
    if exact:
        return None  # the real rewrite is the twin
    try:
        approx = build(sites, {s.index: real[s.index] for s in sites})
        for call, ref in zip(calls, refs):
            out = run(approx, call)
            if _finite(ref) and not _finite(out):
                return ("rolled back: the approximate rewrite gives non-finite outputs on the "
                        "example inputs")
            diff = compare(ref, out)
            if diff is not None and "structure" in diff:
                return f"rolled back: the approximate rewrite returns {diff}"
    except Exception as e:  # noqa: BLE001
        return f"rolled back: the approximate rewrite raises on the example inputs ({_err(e)})"
    return None


def check_sites(module: nn.Module, build: Callable[[Sequence[Site], dict[int, nn.Module]], Any],
                sites: Sequence[Site], real: dict[int, FlurkaAttention],
                calls: Sequence[tuple[tuple, dict]], exact: bool) -> dict[int, str]:
    """Failures by site index (empty: all of ``sites`` pass together). When the whole unit
    fails and holds several sites, each is tried alone, then the passing ones together."""
    why = check(module, build, sites, real, calls, exact)
    if why is None:
        return {}
    if len(sites) == 1:
        return {sites[0].index: why}
    fails = {}
    for s in sites:
        alone = check(module, build, [s], real, calls, exact)
        if alone is not None:
            fails[s.index] = alone
    good = [s for s in sites if s.index not in fails]
    if good and check(module, build, good, real, calls, exact) is not None:
        return {s.index: why for s in sites}  # each passes alone, not together: keep none
    return fails or {s.index: why for s in sites}


def _err(e: Exception) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:200]
