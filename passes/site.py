"""``Site``: one attention site found in a captured graph, and what each pass learnt of it.

A site is four records, each written by one pass (``tests/test_site_records.py`` checks the
source for writes from anywhere else):

    found     Found     what the matcher saw in the graph   passes/match.py (graph sites),
                                                           unmatched.py, mha.py (a module)
    shapes    Shapes    sizes, layout, mask kind, K/V       passes/legality.py
                        chains, read from the values
    decision  Decision  kernel, dk, m, hoisting, FLOPs      passes/decide.py
    outcome   Outcome   what was built and verified         passes/apply.py

plus the site's identity in the model (``index``, ``calls``: the planner) and its status
(``ok`` / ``reason``, changed only through ``skip``; notes). Reading ``site.kernel``,
``site.heads``, ``site.q`` ... gives the newest record's value (outcome, then decision, then
shapes, then found): ``filter_fn(path, site)`` and the report read a site that way. Assigning
such a name on the site raises: each value has one writer.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
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
class Found:
    """What the matcher found: the nodes of softmax(scale * q k^T + mask) v, an SDPA call, or
    an ``nn.MultiheadAttention`` module."""

    module_path: str  # innermost module whose forward computes the attention
    node_name: str  # softmax / sdpa node (or "mha" for a module-level site)
    pattern: str  # e.g. "matmul-mul-add-softmax-matmul", "sdpa", "mha"
    q: Node | None = None  # last node of q before the QK product (scale on q stripped)
    k: Node | None = None  # k in (..., M, d) (key transpose stripped when possible)
    k_transposed: bool = False  # k node is (..., d, M): the rewrite inserts a transpose
    v: Node | None = None
    scale: float | None = None  # softmax scale as written (None: not in the graph)
    mask: Node | None = None  # mask node passed as attn_mask (bool keep or additive float)
    mask_invert: bool = False  # mask node is True where masked (masked_fill): invert it
    causal: bool = False  # is_causal=True (SDPA) or a causal mask built in the graph
    dropout_p: float = 0.0  # as in the graph (0.0 in an eval capture)
    weights: list[Node] = field(default_factory=list)  # softmax (+cast/dropout) chain
    output: Node | None = None  # the node whose value is the attention output
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
    # (node, value on the example, name): call arguments read from graph values; the rewrite
    # checks at run time that each still has that value (export_capture._guard)
    arg_guards: list[tuple[Node, Any, str]] = field(default_factory=list)


@dataclass
class Shapes:
    """Read from the example values (or statically, or from a module): sizes, layout, the
    resolved scale, mask kind and causality, GQA, the K/V projection chains."""

    layout: str = "bhnd"  # "bhnd" (4-D, heads in dim 1) or "flat" (3-D, batch*heads)
    scale: float | None = None  # total softmax scale (resolved: dh^-1/2 where not written)
    causal: bool = False  # found causal, or a banded causal mask
    mask_kind: str = "none"  # none | padding | causal | causal+padding | bias | other
    mask_rank: int | None = None  # rank of the mask value on the example inputs
    dropout_p: float = 0.0  # training-time attention dropout
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    v_dim: int | None = None
    batch: int | None = None
    seq_len: int | None = None
    kv_seq_len: int | None = None
    dm: int | None = None
    v_fix: list[tuple] = field(default_factory=list)  # found's, plus the 3-D layout's
    out_fix: list[tuple] = field(default_factory=list)
    k_chain: KVChain | None = None
    v_chain: KVChain | None = None
    k_pre_repeat: Node | None = None  # GQA: k before repeat_kv (kv_heads heads)
    v_pre_repeat: Node | None = None
    learned_bias: bool = False
    escape_output_only: bool = False  # the weights leave the module only through its output


@dataclass
class Decision:
    """The choice for the site (kernel / dk / m, hoisting) and its FLOP counts."""

    kernel: str | None = None
    dk: int | None = None
    num_features: int | None = None
    max_seq_len: int | None = None
    hoisted: bool | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    window: int | None = None  # sliding-window size of the exact part (kernels/window.py)


@dataclass
class Outcome:
    """What was built (m as built, parameters added, hoisting as rewritten) and how the
    translation validation (passes/verify.py) went."""

    num_features: int | None = None
    params_added: int | None = None
    hoisted: bool | None = None
    rel_error: float | None = None
    verified: bool | None = None  # None: not run
    graphs: Any = None  # (before, after) networkx pictures for the report


_RECORDS = {"outcome": Outcome, "decision": Decision, "shapes": Shapes, "found": Found}
_HOLDERS: dict[str, list[str]] = {}  # field name -> the records that declare it, newest first
_DEFAULT: dict[str, Any] = {}  # field name -> its value before any record has it
for _rec, _cls in _RECORDS.items():
    for _f in fields(_cls):
        _HOLDERS.setdefault(_f.name, []).append(_rec)
        _DEFAULT.setdefault(_f.name, None if _f.default is MISSING else _f.default)
_BUILT_OR_DECIDED = {"num_features", "hoisted"}  # None in the outcome: see the decision


@dataclass
class Site:
    """One attention site: its four records (module docstring), identity and status."""

    found: Found
    shapes: Shapes | None = None
    decision: Decision | None = None
    outcome: Outcome | None = None
    index: int = 0  # order among all sites of the model (seeds)
    calls: int = 1
    ok: bool = True
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    notes_for_report: list[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        """A record's field, from the newest record that has it (see the module docstring)."""
        holders = _HOLDERS.get(name)
        if holders is None:
            raise AttributeError(f"Site has no attribute {name!r}")
        for rec in holders:
            r = self.__dict__.get(rec)
            if r is None:
                continue
            value = getattr(r, name)
            if value is None and rec == "outcome" and name in _BUILT_OR_DECIDED:
                continue
            return value
        return _DEFAULT[name]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOLDERS:
            recs = " / ".join(_HOLDERS[name])
            raise AttributeError(f"Site.{name} belongs to the site's {recs} record "
                                 f"(passes/site.py): set it on that record, in the pass that "
                                 "owns it")
        object.__setattr__(self, name, value)

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
    when its K/V chain was recognised in the (B, H, N, d) layout; never with a sliding window
    (its exact part reads K and V at full length, so hoisting would only add work)."""
    return bool(hoist and site.window is None and (site.pattern == "mha"
                           or (site.k_chain is not None and site.layout == "bhnd")))
