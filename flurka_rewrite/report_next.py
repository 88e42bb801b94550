"""The "what next" lines that end a rewrite report (docs/report.md): sites with a large error,
sites skipped and why, the low-rank length limit, and the up-training call to run next."""
from __future__ import annotations

import re
from typing import Any

# A rewritten site whose output is further than this from the original's (relative error on
# the example inputs) is listed as one to up-train or to leave out.
LARGE_ERROR = 0.1
# Sites named per line before "and N more".
_NAMED = 3
DISTILL_CALL = "fr.distill(new_model, teacher=model, data=batches, steps=500)"


def end_to_end_line(err: float) -> str:
    """The one line that states the whole model's error."""
    return f"end-to-end: relative error of the model output on the example inputs = {err:.3e}"


def _names(paths: list[str]) -> str:
    more = len(paths) - _NAMED
    return ", ".join(paths[:_NAMED]) + (f" and {more} more" if more > 0 else "")


def what_next(report: Any) -> list[str]:
    """Short advice from a ``RewriteReport``: one line per point, most pressing first."""
    steps: list[str] = []
    rewritten = report.rewritten
    large = sorted((s for s in rewritten if s.rel_error is not None
                    and s.rel_error > LARGE_ERROR), key=lambda s: -s.rel_error)
    if large:
        steps.append(f"{len(large)} of {len(rewritten)} rewritten sites have rel_error > "
                     f"{LARGE_ERROR:g} (largest {large[0].rel_error:.2e} at {large[0].path}): "
                     "expected before up-training; up-train, or leave such sites out with "
                     "filter_fn (CLI: --skip GLOB)")
    by_reason: dict[str, list[str]] = {}
    for s in report.skipped:
        by_reason.setdefault(s.reason or "no reason recorded", []).append(s.path)
    for reason, paths in by_reason.items():
        steps.append(f"skipped {len(paths)} site{'s' if len(paths) != 1 else ''} "
                     f"({_names(paths)}): {reason}")
    if report.max_seq_len is not None and rewritten:
        steps.append(f"the low-rank sites accept key sequences up to max_seq_len = "
                     f"{report.max_seq_len}; for longer inputs convert with a larger "
                     "max_seq_len (CLI: --max-seq-len N)")
    if not rewritten:
        return steps
    built = any(s.params_added is not None for s in rewritten)
    if all(s.kernel == "softmax" and s.dk is None for s in rewritten):
        steps.append("every rewritten site computes exact softmax attention (nothing to "
                     "up-train, nothing saved): for a cheaper model choose a kernel (CLI: "
                     "--kernel performer), a dk, or longer example inputs")
    elif not built:
        steps.append("a dry run (plan): nothing was built; convert with the same options, "
                     f"then up-train with {DISTILL_CALL}")
    elif not any(s.params_added for s in rewritten):
        steps.append("the rewritten sites have no trainable FLuRKA parameters, so fr.distill "
                     "has nothing to train: fine-tune the converted model on its task "
                     "(docs/uptraining.md)")
    else:
        err = report.end_to_end_error
        at = "" if err is None else f" (end-to-end error now {err:.2e})"
        steps.append(f"up-train{at}: {DISTILL_CALL} trains the new FLuRKA parameters "
                     "against the original (a CLI save directory: new_model = "
                     "fr.load(OUT_DIR)), then fine-tune on the task (docs/uptraining.md)")
    if built and all(s.rel_error is None for s in rewritten):
        steps.append("errors not measured: pass example_inputs (CLI: --example-shape B,N)")
    return steps


def md_code(text: str) -> str:
    """A what-next line for Markdown: API calls and CLI options in backticks."""
    text = text.replace(DISTILL_CALL, f"`{DISTILL_CALL}`")
    return re.sub(r"(--[a-z][a-z-]*(?: [A-Z,]+\b)?|fr\.load\(OUT_DIR\))", r"`\1`", text)
