"""Planning: capture every attention-holding module, match and check its sites, and resolve
kernel / dk per site with the cost model. Nothing is rewritten here (``plan()`` stops after
this file; ``convert()`` goes on to ``rewrite``).

Capture units: the innermost modules that call softmax / SDPA, minus those inside another
unit. When a site's attention weights leave the unit only through its output (Hugging Face
eager attention returns them and the parent layer drops them), the unit moves up to the
parent and is matched again, so each site is single-exit in the smallest module where it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule

from flurka_rewrite.config import RewriteConfig

from . import cost_model
from .capture import Discovery, capture_module, discover, values_of
from .graph_nx import to_digraph
from .legality import check, classify_mask, fill
from .match import find_sites
from .site import Site

CAUSAL_NOTE = "causal: kernel-only attention (prefix sums), dk not applied"
MAX_CLIMB = 4  # attention module -> attention -> layer -> encoder


@dataclass
class Unit:
    """One captured module and its sites."""

    path: str
    module: nn.Module
    root: nn.Module
    kind: str  # "graph" | "mha"
    gm: GraphModule | None = None
    values: dict[str, Any] = field(default_factory=dict)
    sites: list[Site] = field(default_factory=list)
    how: str = ""
    call: tuple = ((), {})
    checks: list = field(default_factory=list)  # calls to verify on: the example's, the probe's
    leaves: set = field(default_factory=set)  # ids of inner units' modules (kept as calls)
    given: "Unit | None" = None  # the capture with ``when_given`` set (passes/install.py)
    when_given: tuple = ()

    def mha_rel_error(self, new: nn.Module) -> float | None:
        """|new - original| / |original| of an MHA replacement on the recorded call."""
        try:
            args, kwargs = self.call
            kwargs = {**kwargs, "need_weights": False}
            with torch.no_grad():
                ref = self.module(*args, **kwargs)[0]
                new.eval()
                out = new(*args, **kwargs)[0]
            return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
        except Exception:  # noqa: BLE001 - informative only
            return None


def _learned(gm: GraphModule) -> set[str]:
    names = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            try:
                t = gm.get_parameter(n.target)
                if t.requires_grad:
                    names.add(n.name)
            except AttributeError:
                pass
        elif n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, nn.Embedding):
                names.add(n.name)
    return names


def _capture_at(model: nn.Module, path: str, call: tuple[tuple, dict], exact: bool,
                leaves: set[int], cache: dict) -> Unit:
    """Capture, match and check the module at ``path`` for one recorded call."""
    module = model.get_submodule(path) if path else model
    args, kwargs = call
    unit = Unit(path, module, model, "graph", call=(args, kwargs), leaves=leaves)
    try:
        cap = capture_module(path, module, args, kwargs, leaves, cache)
        values = values_of(cap)
    except Exception as e:  # noqa: BLE001 - report the site as found but not captured
        s = Site(module_path=path, node_name="?", pattern="unknown")
        s.skip(f"could not capture this module ({type(e).__name__}: {str(e)[:200]}); "
               "attention runs here but neither symbolic_trace nor torch.export traced it")
        unit.sites = [s]
        return unit
    unit.gm, unit.values, unit.how = cap.gm, values, cap.how
    g = to_digraph(cap.gm.graph)
    params = _learned(cap.gm)
    sites = find_sites(cap.gm, values, path)
    for s in sites:
        fill(s, cap.gm, values)
        check(s, cap.gm, values, g, params, exact)
    if "static" in cap.how:
        for s in sites:
            s.notes_for_report.append(
                "captured with static shapes (torch.export could not keep the sizes dynamic): "
                "the rewritten module accepts only the example input sizes")
    unit.sites = sites
    return unit


def _capture(model: nn.Module, path: str, disc: Discovery, exact: bool, leaves: set[int],
             cache: dict, depth: int = 0) -> Unit:
    """``_capture_at`` on the recorded call; when a site's weights leave the module only
    through its output, the parent module is captured instead (up to MAX_CLIMB levels)."""
    unit = _capture_at(model, path, disc.inputs[path], exact, leaves, cache)
    climb = [s for s in unit.sites if getattr(s, "_escape_output_only", False)]
    failed = unit.gm is None  # could not capture: the parent's call may (e.g. a size tuple)
    parent = _called_ancestor(path, disc)
    if (climb or failed) and depth < MAX_CLIMB and parent is not None:
        up = _capture(model, parent, disc, exact, leaves, cache, depth + 1)
        if not failed or (up.gm is not None and up.sites):
            return up
    return unit


def _called_ancestor(path: str, disc: Discovery) -> str | None:
    """The nearest ancestor module that ran (a ModuleList holding the layers never does)."""
    while path:
        path = path.rpartition(".")[0]
        if path in disc.inputs:
            return path
    return None


def _given_only(module: nn.Module, a: tuple[tuple, dict], b: tuple[tuple, dict]) -> tuple:
    """Names of the arguments that are None in call ``a`` and a tensor in call ``b``."""
    import inspect
    try:
        sig = inspect.signature(module.forward)
        ba, bb = sig.bind(*a[0], **a[1]), sig.bind(*b[0], **b[1])
    except (TypeError, ValueError):
        return ()

    def flat(bound: inspect.BoundArguments) -> dict[str, Any]:
        out = {}
        for name, val in bound.arguments.items():
            p = sig.parameters[name]
            out.update(val if p.kind == p.VAR_KEYWORD else {name: val})
        return out
    fa, fb = flat(ba), flat(bb)
    return tuple(n for n, v in fb.items() if isinstance(v, torch.Tensor) and fa.get(n) is None)


def _add_probe(model: nn.Module, units: list[Unit], probe: Discovery, exact: bool,
               cache: dict) -> None:
    """Verify every unit on the padded probe too; a unit that received None where the probe
    gives a tensor (Hugging Face drops an all-ones mask) is captured a second time on the
    probe's call, and the rewritten module chooses between the two graphs at run time."""
    for u in units:
        cb = probe.inputs.get(u.path)
        if cb is None:
            continue
        key = _given_only(u.module, u.call, cb) if u.kind == "graph" and u.gm is not None else ()
        if not key:
            u.checks.append(cb)
            continue
        alt = _capture_at(model, u.path, cb, exact, u.leaves, cache)
        u.given, u.when_given = alt, key
        if len(alt.sites) != len(u.sites):
            for s in u.sites:
                s.skip(f"this module computes {len(alt.sites)} attention site(s) when "
                       f"{', '.join(key)} is given and {len(u.sites)} when it is not; "
                       "not rewritten")
            continue
        for s, a in zip(u.sites, alt.sites):
            a.index, a.calls = s.index, s.calls
            if not a.ok:
                s.skip(f"with {', '.join(key)} given (padded probe): {a.reason}")
            elif s.mask_kind == "none":
                s.mask_kind = a.mask_kind
                s.causal = s.causal or a.causal


def _mha_unit(model: nn.Module, path: str, disc: Discovery) -> Unit:
    mha = model.get_submodule(path)
    args, kwargs = disc.inputs[path]
    unit = Unit(path, mha, model, "mha", call=(args, kwargs))
    s = Site(module_path=path, node_name="mha", pattern="mha")
    names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal"]
    call = dict(zip(names, args))
    call.update(kwargs)
    q, k = call["query"], call["key"]
    if not mha.batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    s.batch, s.seq_len, s.kv_seq_len = q.shape[0], q.shape[1], k.shape[1]
    s.heads = s.kv_heads = mha.num_heads
    s.head_dim = s.v_dim = mha.head_dim
    s.dm, s.scale = mha.embed_dim, mha.head_dim ** -0.5
    s.dropout_p = mha.dropout
    am = call.get("attn_mask")
    # MHA: a bool mask is True where attention is NOT allowed; a float mask is additive
    # (nn.Transformer.generate_square_subsequent_mask: 0 and -inf)
    s.mask_kind = classify_mask(am, am.dtype == torch.bool, bool(call.get("is_causal"))) \
        if am is not None else ("causal" if call.get("is_causal") else "none")
    if call.get("key_padding_mask") is not None and s.mask_kind in ("none",):
        s.mask_kind = "padding"
    s.causal = s.mask_kind.startswith("causal")
    if mha.bias_k is not None or mha.add_zero_attn:
        s.skip("nn.MultiheadAttention with add_bias_kv / add_zero_attn is not supported")
    elif s.mask_kind in ("bias", "other"):
        s.skip("the attention mask is neither key padding nor causal")
    elif call.get("need_weights", True) and _weights_used(model, path):
        s.skip("attention weights are used elsewhere (the caller reads the MHA's second "
               "output): rewriting would change them")
    unit.sites = [s]
    return unit


def _weights_used(model: nn.Module, path: str) -> bool:
    """Whether the caller of an MHA reads its attention weights (output [1]); True when the
    caller cannot be traced and the weights were requested."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else None
    if parent is None:
        return False  # the MHA is the model itself: its caller is the user's code
    if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return False
    try:
        gm = torch.fx.symbolic_trace(parent)
    except Exception:  # noqa: BLE001
        return True
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == name:
            for u in n.users:
                if not (u.op == "call_function" and len(u.args) > 1 and u.args[1] == 0):
                    if u.users or u.op == "output":
                        return True
    return False


def analyse(model: nn.Module, example_inputs: Any, cfg: RewriteConfig,
            probe_inputs: Any = None) -> list[Unit]:
    """Capture, match and check every site of ``model`` (legality decided, nothing built).
    ``probe_inputs`` (passes/probe.py): a padded variant of the example to verify on too."""
    disc = discover(model, example_inputs)
    exact = cfg.kernel == "softmax" and cfg.dk is None
    units: dict[str, Unit] = {}
    cache: dict = {}  # identical layers share one torch.export

    def inside(p: str, anc: str) -> bool:
        return anc == "" or p.startswith(anc + ".")

    for path in sorted(disc.holders, key=lambda p: -(p.count(".") + bool(p))):
        if any(inside(path, u) and units[u].how.startswith("export") for u in units):
            continue  # already inlined in a captured ancestor
        leaves = {id(units[p].module) for p in units if inside(p, path)}
        u = _capture(model, path, disc, exact, leaves, cache)
        if not u.sites:
            continue  # softmax here is not attention (e.g. a classifier head)
        if u.how.startswith("export") or u.path != path:
            units = {p: v for p, v in units.items() if not inside(p, u.path)}
        units[u.path] = u
    for path in disc.mha:
        if not any(path.startswith(u + ".") and units[u].how.startswith("export") for u in units):
            units[path] = _mha_unit(model, path, disc)
    if getattr(model, "config", None) is not None:  # Hugging Face: p is 0.0 in eval capture
        for u in units.values():
            if u.kind == "graph":
                for s in u.sites:
                    if s.dropout_p == 0.0:
                        s.dropout_p = train_dropout(model, s.module_path)
    order = list(disc.inputs)
    out = sorted(units.values(), key=lambda u: order.index(u.path) if u.path in order else 0)
    i = 0
    mha_paths = set(disc.mha)
    for u in out:
        if u.kind == "graph":  # sites inside an MHA are handled at module level
            u.sites = [s for s in u.sites if not any(
                s.module_path == p or s.module_path.startswith(p + ".") for p in mha_paths)]
        for s in u.sites:
            s.index, s.calls = i, disc.calls.get(s.module_path, 1)
            i += 1
        u.checks = [u.call]
    if probe_inputs is not None:
        _add_probe(model, out, discover(model, probe_inputs), exact, cache)
    return out


_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout", "dropout_prob")
_CONFIG_DROPOUT = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def _prob(x: Any) -> float | None:
    if isinstance(x, nn.Dropout):
        return float(x.p)
    if isinstance(x, float) and 0.0 <= x < 1.0:
        return x
    return None


def train_dropout(model: nn.Module, path: str) -> float:
    """Training-time attention-dropout probability of the Hugging Face attention module at
    ``path``. HF passes ``dropout=0.0`` to its attention function in eval mode (the capture),
    so the graph does not show it: read the module's ``attention_dropout`` / ``attn_dropout`` /
    ``dropout`` attribute (float or ``nn.Dropout``), else the model config's
    ``attention_probs_dropout_prob`` / ``attention_dropout`` / ``attn_pdrop``; 0.0 if none."""
    mod = model.get_submodule(path) if path else model
    for name in _DROPOUT_ATTRS:
        p = _prob(getattr(mod, name, None))
        if p is not None:
            return p
    cfg = getattr(model, "config", None)
    for name in _CONFIG_DROPOUT:
        p = _prob(getattr(cfg, name, None))
        if p is not None:
            return p
    return 0.0


def decide(model: nn.Module, sites: list[Site], cfg: RewriteConfig) -> None:
    """filter_fn, then kernel / dk / num_features per legal site (cost model for "auto")."""
    mpe = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 0
    for s in sites:
        if s.seq_len is not None:
            _flops_before(s)
        if not s.ok:
            continue
        if cfg.filter_fn is not None and not cfg.filter_fn(s.module_path, s):
            s.skip("excluded by filter_fn")
            continue
        dk = cfg.dk
        if s.causal and dk is not None:
            s.notes_for_report.append(CAUSAL_NOTE)
            dk = None
        if s.kv_seq_len is None:  # planned without example inputs (passes/static_plan.py)
            _decide_static(s, cfg, dk, int(mpe))
            continue
        s.max_seq_len = cfg.max_seq_len or max(s.kv_seq_len, int(mpe))
        if isinstance(dk, int) and dk > s.max_seq_len:
            s.skip(f"dk={dk} is larger than the longest key sequence {s.max_seq_len} "
                   "(max_seq_len); use a smaller dk or dk=None")
            continue
        M = s.kv_seq_len if not isinstance(dk, int) else max(s.kv_seq_len, dk)
        N = s.seq_len if s.seq_len != s.kv_seq_len else M
        try:
            ch = cost_model.choose(
                kernel=cfg.kernel, dk=dk, num_features=cfg.num_features, B=s.batch, N=N, M=M,
                H=s.heads, Hkv=s.kv_heads, dh=s.head_dim, dm=s.dm, causal=s.causal,
                hoistable=cfg.hoist and s.k_chain is not None,
                padding_mask="padding" in s.mask_kind)
            s.kernel, s.dk, s.num_features, s.flops_after = ch.kernel, ch.dk, ch.num_features, ch.flops
            s.hoisted = bool(cfg.hoist and s.dk is not None and (
                s.pattern == "mha" or (s.k_chain is not None and s.layout == "bhnd")))
            if cfg.kernel == "auto" or dk == "auto":
                s.notes_for_report.append(ch.reason)
            if M != s.kv_seq_len:
                s.notes_for_report.append(f"FLOPs at key length {M} (dk > example length)")
            _dropout_note(s)
        except ValueError as e:
            s.kernel = "performer" if cfg.kernel == "auto" else cfg.kernel
            s.dk = dk if isinstance(dk, int) else None
            s.num_features = cfg.num_features
            s.notes_for_report.append(f"no FLOP estimate: {e}")
            _dropout_note(s)


def _decide_static(s: Site, cfg: RewriteConfig, dk: int | str | None, mpe: int) -> None:
    """kernel / dk for a site without sequence lengths: the key length is max_seq_len."""
    s.max_seq_len = cfg.max_seq_len or mpe or None
    if dk is not None and s.max_seq_len is None:
        raise ValueError(
            f"dk={dk!r} (low-rank) needs the longest key sequence length, unknown without "
            "example inputs: pass max_seq_len=... (or example_inputs=...), or use dk=None")
    if isinstance(dk, int) and dk > s.max_seq_len:
        s.skip(f"dk={dk} is larger than the longest key sequence {s.max_seq_len} "
               "(max_seq_len); use a smaller dk or dk=None")
        return
    L = s.max_seq_len
    try:
        if L is None:
            raise ValueError("sequence length unknown without example inputs or max_seq_len")
        ch = cost_model.choose(
            kernel=cfg.kernel, dk=dk, num_features=cfg.num_features, B=1, N=L, M=L,
            H=s.heads, Hkv=s.kv_heads, dh=s.head_dim, dm=s.dm, causal=s.causal,
            hoistable=False, padding_mask="padding" in s.mask_kind)
        s.kernel, s.dk, s.num_features, s.flops_after = ch.kernel, ch.dk, ch.num_features, None
        if cfg.kernel == "auto" or dk == "auto":
            s.notes_for_report.append(f"{ch.reason} (at N = M = max_seq_len = {L})")
    except (ValueError, TypeError) as e:
        s.kernel = "performer" if cfg.kernel == "auto" else cfg.kernel
        s.dk = dk if isinstance(dk, int) else None
        s.num_features = cfg.num_features
        s.notes_for_report.append(f"no FLOP estimate: {e}")
    s.hoisted = False
    _dropout_note(s)


def _dropout_note(s: Site) -> None:
    """FlurkaAttention applies dropout only in exact mode (softmax, no dk)."""
    if s.dropout_p > 0 and not (s.kernel == "softmax" and s.dk is None):
        s.notes_for_report.append(
            f"attention dropout p={s.dropout_p:g} not applied: kernel / low-rank attention has "
            "no attention weights (exact mode only)")


def _flops_before(s: Site) -> None:
    try:
        s.flops_before = cost_model.site_flops(
            kernel="softmax", dk=None, B=s.batch, N=s.seq_len, M=s.kv_seq_len, H=s.heads,
            Hkv=s.kv_heads, dh=s.head_dim, dm=s.dm, causal=s.causal,
            padding_mask="padding" in s.mask_kind)
    except (ValueError, TypeError):
        s.flops_before = None
