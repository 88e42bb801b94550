"""The decision per legal site: ``filter_fn``, then kernel / dk / num_features from the
user's options or, for ``"auto"``, the cost model (passes/cost_model.py), and whether the
low-rank down-sampling is hoisted (``site.can_hoist``).

A site traced on example inputs is priced at its own sizes; a site planned without them
(passes/static_plan.py) at N = M = ``max_seq_len`` with batch 1, and gets no FLOPs-after.
"""
from __future__ import annotations

import torch.nn as nn

from flurka_rewrite.kernels.registry import AUTO, SOFTMAX, auto_candidates

from . import cost_model
from .choose import choose
from .config import RewriteConfig
from .site import Decision, Site, can_hoist

CAUSAL_NOTE = "causal: kernel-only attention (prefix sums), dk not applied"
WINDOW_CROSS_NOTE = ("window not applied: a sliding window needs self-attention (as many keys as "
                     "queries)")
WINDOW_EXACT_NOTE = "window not applied: the site stays exact softmax attention"
WINDOW_HOIST_NOTE = ("window: K and V are needed at full length for the exact part, so the "
                     "down-sampling is not hoisted")


def decide(model: nn.Module, sites: list[Site], cfg: RewriteConfig, repeated: int = 1) -> None:
    """``site.decision`` per site: FLOPs before; then, for legal sites, filter_fn, kernel /
    dk / num_features / hoisted and FLOPs after. ``repeated``: the capture ran the user's
    batch this many times over (convert runs a batch of one as two); FLOPs are the user's."""
    mpe = int(getattr(getattr(model, "config", None), "max_position_embeddings", None) or 0)
    for s in sites:
        d = s.decision = Decision()
        B = s.batch // repeated if s.batch else s.batch
        if s.seq_len is not None:
            d.flops_before = _flops_before(s, B)
        if not s.ok:
            continue
        if cfg.filter_fn is not None and not cfg.filter_fn(s.module_path, s):
            s.skip("excluded by filter_fn")
            continue
        dk = cfg.dk
        if s.causal and dk is not None:
            s.notes_for_report.append(CAUSAL_NOTE)
            dk = None
        traced = s.kv_seq_len is not None
        d.max_seq_len = cfg.max_seq_len or (max(s.kv_seq_len, mpe) if traced else mpe or None)
        if isinstance(dk, int) and d.max_seq_len is not None and dk > d.max_seq_len:
            s.skip(f"dk={dk} is larger than the longest key sequence {d.max_seq_len} "
                   "(max_seq_len); use a smaller dk or dk=None")
            continue
        if traced:
            M = s.kv_seq_len if not isinstance(dk, int) else max(s.kv_seq_len, dk)
            N, at = (s.seq_len if s.seq_len != s.kv_seq_len else M), ""
        else:
            N = M = d.max_seq_len
            B, at = 1, f" (at N = M = max_seq_len = {N})"
        window = cfg.window
        if window is not None and traced and s.seq_len != s.kv_seq_len:
            s.notes_for_report.append(WINDOW_CROSS_NOTE)
            window = None
        structure = can_hoist(s, cfg.hoist) and window is None
        hoistable = traced and structure  # priced hoisted (static sites get no FLOPs)
        try:
            if N is None:
                raise ValueError("sequence length unknown without example inputs or max_seq_len")
            ch = choose(
                kernel=cfg.kernel, dk=dk, num_features=cfg.num_features, B=B, N=N, M=M,
                H=s.heads, Hkv=s.kv_heads, dh=s.head_dim, dm=s.dm, causal=s.causal,
                hoistable=hoistable, padding_mask="padding" in s.mask_kind, e_init=cfg.e_init,
                max_seq_len=d.max_seq_len, window=window)
            d.kernel, d.dk, d.num_features = ch.kernel, ch.dk, ch.num_features
            d.flops_after = ch.flops if traced else None
            if cfg.kernel == AUTO or dk == AUTO:
                s.notes_for_report.append(ch.reason + at)
            if traced and M != s.kv_seq_len:
                s.notes_for_report.append(f"FLOPs at key length {M} (dk > example length)")
        except (ValueError, TypeError) as e:
            d.kernel = auto_candidates(pretrained=True)[0] if cfg.kernel == AUTO else cfg.kernel
            d.dk = dk if isinstance(dk, int) else None
            d.num_features = cfg.num_features
            s.notes_for_report.append(f"no FLOP estimate: {e}")
        if window is not None and d.kernel == SOFTMAX and d.dk is None:
            s.notes_for_report.append(WINDOW_EXACT_NOTE)
            window = None
        elif window is not None and d.dk is not None and can_hoist(s, cfg.hoist):
            s.notes_for_report.append(WINDOW_HOIST_NOTE)
        d.window = window
        d.hoisted = d.dk is not None and structure
        _dropout_note(s)


def _dropout_note(s: Site) -> None:
    """FlurkaAttention applies dropout only in exact mode (softmax, no dk)."""
    if s.dropout_p > 0 and not (s.kernel == SOFTMAX and s.dk is None):
        s.notes_for_report.append(
            f"attention dropout p={s.dropout_p:g} not applied: kernel / low-rank attention has "
            "no attention weights (exact mode only)")


def _flops_before(s: Site, B: int | None) -> int | None:
    try:
        return cost_model.site_flops(
            kernel=SOFTMAX, dk=None, B=B, N=s.seq_len, M=s.kv_seq_len, H=s.heads,
            Hkv=s.kv_heads, dh=s.head_dim, dm=s.dm, causal=s.causal,
            padding_mask="padding" in s.mask_kind)
    except (ValueError, TypeError):
        return None
