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
from flurka_rewrite.hf_record import record_conversion, tokenizer_example
from flurka_rewrite.end_to_end import first_output, measured_error


class AlreadyConvertedWarning(UserWarning):
    """``convert`` was given a model that an earlier ``convert`` already rewrote."""


class AllSitesSkippedWarning(UserWarning):
    """``convert`` found attention but rewrote none of it: the model it returns computes the
    original attention. The report's ``reason`` column says why for each site."""


class DkNotBelowLengthWarning(UserWarning):
    """A rewritten site got a ``dk`` that is not below its key sequence length on the example
    inputs: the low-rank projection then saves nothing and costs more FLOPs than without it."""


def _run(model: nn.Module, cfg: RewriteConfig, example_inputs: Any, build: bool
         ) -> tuple[nn.Module, RewriteReport]:
    """The pipeline: analyse -> decide -> (build, verify, install) -> report."""
    ex = _inputs(model, example_inputs)
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
        warn_dk_not_below_length(sites)
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
        record_conversion(target, report, ex)  # config.flurka, for save_pretrained
    return target, report


def _inputs(model: nn.Module, example_inputs: Any) -> Any:
    """The user's inputs, else a Hugging Face model's ``dummy_inputs``, else (a
    sentence-transformers model) two sentences from its own tokenizer, else None."""
    ex = example_or_dummy(model, example_inputs)
    return tokenizer_example(model) if ex is None else ex


def warn_dk_not_below_length(sites: list, stacklevel: int = 4) -> None:
    """``DkNotBelowLengthWarning`` when rewritten sites have an int ``dk >= M`` (their key
    length on the example inputs), one warning per (dk, M); reads ``site.ok``, ``site.dk``,
    ``site.kv_seq_len`` (else ``site.seq_len``) and ``site.path`` only."""
    groups: dict[tuple[int, int], list[str]] = {}
    for s in sites:
        n = s.kv_seq_len if s.kv_seq_len is not None else s.seq_len
        if s.ok and isinstance(s.dk, int) and n is not None and s.dk >= n:
            groups.setdefault((s.dk, n), []).append(s.path)
    for (dk, n), paths in groups.items():
        where = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        warnings.warn(
            f"dk={dk} is not below the sequence length {n} of the example inputs at "
            f"{len(paths)} site{'s' if len(paths) != 1 else ''} ({where}): the low-rank "
            f"projection saves nothing there and adds FLOPs; pass dk < {n}, dk='auto' or "
            "dk=None (CLI: --dk), or longer example inputs (CLI: --example-shape B,N)",
            DkNotBelowLengthWarning, stacklevel=stacklevel)


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
    Extra options: ``e_init`` ("pool" | "gaussian"), ``max_seq_len``, ``hoist``,
    ``keep_exact``, ``max_rel_error`` (see ``RewriteConfig``). With example inputs (or a
    model's ``dummy_inputs``) the report's ``end_to_end_error`` is the whole model's error on
    them; an int ``dk`` not below a site's sequence length warns
    ``DkNotBelowLengthWarning``."""
    cfg = RewriteConfig(kernel=kernel, dk=dk, num_features=num_features, backend=backend,
                        seed=seed, filter_fn=filter_fn, inplace=inplace, **options)
    before = first_output(model, _inputs(model, example_inputs))  # before an inplace rewrite
    new, report = _run(model, cfg, example_inputs, build=True)
    if report.rewritten:
        report.end_to_end_error = measured_error(new, getattr(new, "flurka_example_inputs", None),
                                                   before)
    if report.sites and not report.rewritten:
        hint = (" (most often: pass example_inputs)"
                if _inputs(model, example_inputs) is None else "")
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
    """Dry run of ``convert``: the same decisions, returned as a report; model untouched.
    ``keep_exact`` / ``max_rel_error`` pick sites by errors that only ``convert`` measures:
    the plan shows every site as rewritable and says so in its notes."""
    cfg = RewriteConfig(kernel=kernel, dk=dk, num_features=num_features, backend=backend,
                        seed=seed, filter_fn=filter_fn, inplace=inplace, **options)
    _, report = _run(model, cfg, example_inputs, build=False)
    if cfg.keep_exact is not None or cfg.max_rel_error is not None:
        for row in report.rewritten:
            note = ("keep_exact / max_rel_error: convert may keep this site exact, from the "
                    "error it measures (a plan measures none)")
            row.reason = note if not row.reason else f"{row.reason}; {note}"
    return report
