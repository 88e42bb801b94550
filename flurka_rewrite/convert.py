"""``convert`` and ``plan`` (docs/design.md §5): the compiler's one verb and its dry run.

The pipeline (``_run``), one function of ``passes/`` per step; docs/architecture.md follows a
site through it:

    RewriteConfig(...)                       options, validated once (passes/config.py)
    capture_example / padded_probe           the inputs the model runs on (passes/probe.py)
    analyse(model, inputs, cfg, probe)       capture, match, legality (passes/planner.py)
    decide(model, sites, cfg)                kernel / dk / hoisting per site (passes/decide.py)
    apply_all(units, cfg, verify)            build, verify against the exact twin, install
                                             on the user's modules (passes/apply.py)
    report_of(sites, name, cfg)              the rewrite report (flurka_rewrite/report.py)

Every step records its decisions on the ``Site`` objects (passes/site.py); ``plan`` stops
before ``apply_all``.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import torch.nn as nn

from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.passes.config import RewriteConfig
from flurka_rewrite.passes.apply import NOT_VERIFIED, apply_all
from flurka_rewrite.passes.decide import decide
from flurka_rewrite.passes.planner import analyse
from flurka_rewrite.passes.install import kept_modes, refuse_output_attentions
from flurka_rewrite.passes.probe import (
    batch_of, capture_example, check_runs, example_or_dummy, padded_probe,
)
from flurka_rewrite.report import RewriteReport, report_of


class AlreadyConvertedWarning(UserWarning):
    """``convert`` was given a model that an earlier ``convert`` already rewrote."""


class AllSitesSkippedWarning(UserWarning):
    """``convert`` found attention but rewrote none of it: the model it returns computes the
    original attention. The report's ``reason`` column says why for each site."""


_OPTION_NAMES = ("kernel", "dk", "num_features", "backend", "seed", "filter_fn", "inplace",
                 "e_init", "max_seq_len", "hoist")


def _run(model: nn.Module, cfg: RewriteConfig, example_inputs: Any, build: bool
         ) -> tuple[nn.Module, RewriteReport]:
    """The pipeline: analyse -> decide -> (build, verify, install) -> report."""
    ex = example_or_dummy(model, example_inputs)
    if any(isinstance(m, FlurkaAttention) for m in model.modules()):
        warnings.warn(f"{type(model).__name__} already holds FlurkaAttention modules (it was "
                      "converted before); its rewritten sites are not attention sites any more "
                      "and are left as they are", AlreadyConvertedWarning, stacklevel=3)
    target = model if (build and cfg.inplace) else copy.deepcopy(model)
    with kept_modes(target):  # eval while planning; each module's own mode afterwards
        cap = None if ex is None else capture_example(target, ex)
        if cap is not None:
            check_runs(target, cap)
        units = analyse(target, cap, cfg, None if cap is None else padded_probe(target, cap))
        sites = [s for u in units for s in u.sites]
        # a batch of one is captured as two: decide counts the FLOPs of one
        repeated = 2 if cap is not None and batch_of(cap) == 2 * batch_of(ex) else 1
        decide(target, sites, cfg, repeated)
        if build:
            apply_all(units, cfg, verify=cap is not None)  # build, verify, install
        if cap is None:
            for s in (x for x in sites if x.ok):
                s.notes_for_report.append(NOT_VERIFIED)
    report = report_of(sites, type(model).__name__, cfg)
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
                if example_or_dummy(model, example_inputs) is None else "")
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
