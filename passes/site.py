"""``Site``: one attention site found in a captured graph, with everything the later passes need.

The match pass fills the structural fields (which nodes are q, k, v, the mask, the scale, the
softmax and the output); the legality pass fills ``ok`` / ``reason``; the rewrite pass reads
the rest. ``filter_fn(path, site)`` receives this object.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.fx import Node


@dataclass
class KVChain:
    """Projection chain of K or V back to the layer input: Linear -> head split.

    x: the layer-input node; weight/bias: the projection's parameters (tensors); the
    projection reads x (B, M, dm) and the chain is exactly ``linear(x).view(B, M, Hkv, dh)
    .transpose(1, 2)`` (checked numerically on the example inputs)."""

    x: Node
    linear: Node
    weight: Any
    bias: Any
    dm: int


@dataclass
class Site:
    """One attention site: softmax(scale * q k^T + mask) v, an SDPA call, or an MHA module."""

    module_path: str  # innermost module whose forward computes the attention
    node_name: str  # softmax / sdpa node (or "mha" for a module-level site)
    pattern: str  # e.g. "matmul-mul-add-softmax-matmul", "sdpa", "mha"
    q: Node | None = None  # last node of q before the QK product (scale on q stripped)
    k: Node | None = None  # k in (..., M, d) (key transpose stripped when possible)
    k_transposed: bool = False  # k node is (..., d, M): the rewrite inserts a transpose
    v: Node | None = None
    layout: str = "bhnd"  # "bhnd" (4-D, heads in dim 1) or "flat" (3-D, batch*heads)
    scale: float | None = None  # total softmax scale (None: 1.0 for graph sites, dh^-1/2 sdpa)
    mask: Node | None = None  # mask node passed as attn_mask (bool keep or additive float)
    mask_rank: int | None = None  # rank of the mask value on the example inputs
    mask_invert: bool = False  # mask node is True where masked (masked_fill): invert it
    mask_kind: str = "none"  # none | padding | causal | causal+padding | bias | other
    causal: bool = False
    dropout_p: float = 0.0
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    v_dim: int | None = None
    batch: int | None = None
    seq_len: int | None = None
    kv_seq_len: int | None = None
    dm: int | None = None
    weights: list[Node] = field(default_factory=list)  # softmax (+cast/dropout) chain
    output: Node | None = None  # the node whose value is the attention output
    k_chain: KVChain | None = None
    v_chain: KVChain | None = None
    k_pre_repeat: Node | None = None  # GQA: k before repeat_kv (kv_heads heads)
    v_pre_repeat: Node | None = None
    learned_bias: bool = False
    # matcher bookkeeping, read by legality and rewrite
    qk: Node | None = None  # the q k^T product (graph sites)
    scale_nodes: list[Node] = field(default_factory=list)  # the nodes that scale the scores
    softmax_dim: int | None = -1
    all_masks: list[Node] = field(default_factory=list)  # every mask added to the scores
    # layout fixes that bring q / k / v to (B, H, N, d) and the result back to the graph's
    # layout: ("transpose", a, b), ("einsum", "src->dst"), ("unflatten", H), ("flatten",)
    q_fix: list[tuple] = field(default_factory=list)
    k_fix: list[tuple] = field(default_factory=list)
    v_fix: list[tuple] = field(default_factory=list)
    out_fix: list[tuple] = field(default_factory=list)
    escape_output_only: bool = False  # the weights leave the module only through its output
    # (node, value on the example, name): call arguments read from graph values; the rewrite
    # checks at run time that each still has that value (export_capture._guard)
    arg_guards: list[tuple[Node, Any, str]] = field(default_factory=list)
    ok: bool = True
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    index: int = 0  # order among all sites of the model (seeds)
    calls: int = 1
    # decisions (cost model / rewrite)
    kernel: str | None = None
    dk: int | None = None
    num_features: int | None = None
    max_seq_len: int | None = None
    hoisted: bool | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    params_added: int | None = None
    rel_error: float | None = None
    verified: bool | None = None  # translation validation (passes/verify.py); None: not run
    graphs: Any = None  # (before, after) networkx pictures for the report
    notes_for_report: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        """Report path ``module.path:node``."""
        return f"{self.module_path or '<root>'}:{self.node_name}"

    def skip(self, reason: str) -> "Site":
        """Mark the site skipped with a reason (first reason wins)."""
        if self.ok:
            self.ok, self.reason = False, reason
        return self


def can_hoist(site: Site, hoist: bool) -> bool:
    """The one hoisting rule (docs/design.md §3.3), read by the cost model, the planner and both
    rewriters: with ``hoist`` asked, a low-rank site's down-sampling moves above the K/V
    projections when they are known: an ``nn.MultiheadAttention``'s always, a graph site's
    when its K/V chain was recognised in the (B, H, N, d) layout."""
    return bool(hoist and (site.pattern == "mha"
                           or (site.k_chain is not None and site.layout == "bhnd")))
