"""``convert`` and ``plan`` (DESIGN section 5): the compiler's one verb and its dry run.

    capture (passes/capture.py) -> canonicalize/match (passes/match.py) -> legality
    (passes/legality.py) -> cost model (passes/cost_model.py) -> rewrite (passes/rewrite.py,
    passes/mha.py) -> report (flurka_rewrite/report.py)

Each step returns its decisions on the ``Site`` objects; the report is assembled from them.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import asdict
from typing import Any, Callable

import torch
import torch.nn as nn

from flurka_rewrite.attention import FlurkaAttention
from flurka_rewrite.config import RewriteConfig
from flurka_rewrite.passes.apply import NOT_VERIFIED, apply_all
from flurka_rewrite.passes.plan_sites import analyse, decide
from flurka_rewrite.passes.probe import capture_example, padded_probe
from flurka_rewrite.passes.static_plan import analyse_static
from flurka_rewrite.report import RewriteReport, SiteReport


class AlreadyConvertedWarning(UserWarning):
    """``convert`` was given a model that an earlier ``convert`` already rewrote."""


class AllSitesSkippedWarning(UserWarning):
    """``convert`` found attention but rewrote none of it: the model it returns computes the
    original attention. The report's ``reason`` column says why for each site."""


_OPTION_NAMES = ("kernel", "dk", "num_features", "backend", "seed", "filter_fn", "inplace",
                 "e_init", "max_seq_len", "hoist")


def _example_inputs(model: nn.Module, example_inputs: Any) -> Any:
    """The given inputs, else a Hugging Face model's ``dummy_inputs``, else None (static
    planning on ``symbolic_trace``, passes/static_plan.py)."""
    if example_inputs is not None:
        return example_inputs
    dummy = getattr(model, "dummy_inputs", None)
    if isinstance(dummy, dict) and dummy:
        return dummy
    return None


def _config_dict(cfg: RewriteConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["filter_fn"] = None if cfg.filter_fn is None else getattr(cfg.filter_fn, "__name__", "fn")
    return d


def _row(site, choice=None) -> SiteReport:
    r = SiteReport(
        path=site.path, pattern=site.pattern, status="rewritten" if site.ok else "skipped",
        reason=site.reason, seq_len=site.seq_len, kv_seq_len=site.kv_seq_len,
        heads=site.heads, kv_heads=site.kv_heads, head_dim=site.head_dim,
        causal=site.causal if site.seq_len is not None else None,
        mask=site.mask_kind if site.seq_len is not None else None)
    if site.ok:
        r.kernel, r.dk, r.num_features = site.kernel, site.dk, site.num_features
        r.hoisted = site.hoisted
        r.flops_before, r.flops_after = site.flops_before, site.flops_after
        r.params_added, r.rel_error = site.params_added, site.rel_error
        r.reason = "; ".join(site.notes_for_report) or None
    else:
        r.flops_before = site.flops_before
    r.verified = site.verified
    return r


def _batch(ex: Any) -> int:
    """The leading size of the first tensor of an example (0 when there is none)."""
    leaves = ex.values() if isinstance(ex, dict) else ex if isinstance(ex, (tuple, list)) \
        else [ex]
    return next((t.shape[0] for t in leaves if isinstance(t, torch.Tensor) and t.dim()), 0)


def refuse_output_attentions(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a converted Hugging Face model: ``output_attentions=True`` raises,
    since rewritten sites compute no attention weights (Hugging Face records them with hooks
    on attention modules whose forward the rewrite replaced) and would silently be missing."""
    if kwargs.get("output_attentions") or getattr(getattr(module, "config", None),
                                                   "output_attentions", False) is True:
        raise ValueError(
            "output_attentions=True: the attention sites flurka-rewrite rewrote compute no "
            "attention weights, so they cannot be returned; call without output_attentions, "
            "or convert with filter_fn=... excluding the sites whose weights you need")


POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx",
                   "max_len")


def position_limit(model: nn.Module) -> tuple[int, str] | None:
    """(the longest sequence the model's config allows, the config field), if it says."""
    config = getattr(model, "config", None)
    for name in POSITION_LIMITS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, name
    return None


def _check_runs(model: nn.Module, ex: Any) -> None:
    """The original model runs on the example inputs; else a ValueError that says so (and
    names the position limit when the sequence is longer), not an error from deep inside."""
    args, kwargs = ((), ex) if isinstance(ex, dict) else (
        (tuple(ex) if isinstance(ex, (tuple, list)) else (ex,)), {})
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure of the user's model itself
        leaves = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        n = next((int(t.shape[1]) for t in leaves if t.dim() >= 2), None)
        limit = position_limit(model)
        hint = (f"; its config allows at most {limit[0]} positions ({limit[1]}) and the example "
                f"has {n}" if limit and n and n > limit[0] else "")
        raise ValueError(f"{type(model).__name__} itself fails on the example inputs, before "
                         f"any rewrite ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                         f"{hint}: pass example inputs the model accepts") from e


def _run(model: nn.Module, cfg: RewriteConfig, example_inputs: Any, build: bool
         ) -> tuple[nn.Module, RewriteReport]:
    ex = _example_inputs(model, example_inputs)
    if any(isinstance(m, FlurkaAttention) for m in model.modules()):
        warnings.warn(f"{type(model).__name__} already holds FlurkaAttention modules (it was "
                      "converted before); its rewritten sites are not attention sites any more "
                      "and are left as they are", AlreadyConvertedWarning, stacklevel=3)
    target = model if (build and cfg.inplace) else copy.deepcopy(model)
    modes = [(m, m.training) for m in target.modules()]  # each module's own train/eval mode
    target.eval()
    try:
        if ex is not None:
            cap = capture_example(target, ex)
            _check_runs(target, cap)
            units = analyse(target, cap, cfg, padded_probe(target, cap))
            if _batch(cap) == 2 * _batch(ex):  # a batch of one captured as two: FLOPs of one
                for s in (x for u in units for x in u.sites if x.batch):
                    s.batch //= 2
        else:
            units = analyse_static(target, cfg)
        sites = [s for u in units for s in u.sites]
        decide(target, sites, cfg)
        if build:
            apply_all(units, cfg, verify=ex is not None)
        if ex is None:
            for s in sites:
                if s.ok:
                    s.notes_for_report.append(NOT_VERIFIED)
    finally:
        for m, training in modes:
            m.training = training
        known = {id(m) for m, _ in modes}
        for m in list(target.modules()):  # modules the rewrite added take their parent's mode
            for child in m.children():
                if id(child) not in known:
                    child.train(m.training)
                    known.update(id(x) for x in child.modules())
    report = RewriteReport(sites=[_row(s) for s in sorted(sites, key=lambda s: s.index)],
                           model=type(model).__name__, config=_config_dict(cfg))
    for s in sites:
        if s.ok and s.graphs and all(x is not None for x in s.graphs):
            report.graphs[s.path] = s.graphs
    if build and report.rewritten and getattr(target, "config", None) is not None:
        target.register_forward_pre_hook(refuse_output_attentions, with_kwargs=True)
    if build:
        target.flurka_report = report
        if ex is not None:
            target.flurka_example_inputs = ex
    return target, report


def convert(
    model: nn.Module,
    *,
    kernel: str = "auto",
    dk: int | str | None = 256,
    num_features: int | None = None,
    example_inputs: Any = None,
    backend: str = "auto",
    seed: int = 0,
    filter_fn: Callable[[str, Any], bool] | None = None,
    inplace: bool = False,
    **options: Any,
) -> nn.Module:
    """Replace the softmax attention sites of ``model`` by FLuRKA attention.

    Returns the rewritten model (a deep copy unless ``inplace=True``; same class) with
    ``.flurka_report`` (a ``RewriteReport``: one row per site found, rewritten or skipped).
    Extra options: ``e_init`` ("pool" | "gaussian"), ``max_seq_len``, ``hoist`` (see
    ``RewriteConfig``)."""
    cfg = RewriteConfig(kernel=kernel, dk=dk, num_features=num_features, backend=backend,
                        seed=seed, filter_fn=filter_fn, inplace=inplace, **options)
    new, report = _run(model, cfg, example_inputs, build=True)
    if report.sites and not report.rewritten:
        hint = (" (most often: pass example_inputs)"
                if _example_inputs(model, example_inputs) is None else "")
        warnings.warn(f"convert: all {len(report.sites)} attention sites of "
                      f"{report.model} were skipped, so the returned model computes the "
                      f"original attention; print(model.flurka_report) for the reasons{hint}",
                      AllSitesSkippedWarning, stacklevel=2)
    return new


def plan(
    model: nn.Module,
    *,
    kernel: str = "auto",
    dk: int | str | None = 256,
    num_features: int | None = None,
    example_inputs: Any = None,
    backend: str = "auto",
    seed: int = 0,
    filter_fn: Callable[[str, Any], bool] | None = None,
    inplace: bool = False,
    **options: Any,
) -> RewriteReport:
    """Dry run of ``convert``: the same decisions, returned as a report; model untouched."""
    cfg = RewriteConfig(kernel=kernel, dk=dk, num_features=num_features, backend=backend,
                        seed=seed, filter_fn=filter_fn, inplace=inplace, **options)
    _, report = _run(model, cfg, example_inputs, build=False)
    return report
