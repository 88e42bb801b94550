"""The end-to-end error of a conversion: ||y' - y|| / ||y|| of the model's first output tensor
on the example inputs, the converted model against the original (docs/report.md).

``convert`` takes the original's output before it builds anything (so ``inplace=True`` is
measured too) and the converted model's after, both in eval mode without gradients, and
stores the error in ``report.end_to_end_error``; the CLI prints and writes that number.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from flurka_rewrite.kernels.reference import rel_error
from flurka_rewrite.passes.install import kept_modes


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor of a model output (tensor, tuple, dict or Hugging Face ModelOutput)."""
    leaves = torch.utils._pytree.tree_leaves(out)
    return next((t for t in leaves if isinstance(t, torch.Tensor)), None)


def first_output(model: nn.Module, inputs: Any) -> torch.Tensor | None:
    """The model's first output tensor on ``inputs`` (eval mode, no gradients, the modes put
    back afterwards); None without inputs or when the model fails on them (``convert`` then
    raises its own error, which names the problem)."""
    if inputs is None:
        return None
    try:
        with kept_modes(model), torch.no_grad():
            out = first_tensor(_call(model, inputs))
    except Exception:  # noqa: BLE001 - reported by convert's own check of the inputs
        return None
    return None if out is None else out.detach()


def measured_error(converted: nn.Module, inputs: Any, before: torch.Tensor | None
                   ) -> float | None:
    """||y' - y|| / ||y|| of ``converted``'s first output on ``inputs`` against ``before``
    (the original's, from ``first_output``); None when either is missing or the shapes
    differ."""
    if before is None or inputs is None:
        return None
    after = first_output(converted, inputs)
    if after is None or after.shape != before.shape:
        return None
    return rel_error(after, before)


def end_to_end_error(original: nn.Module, converted: nn.Module, inputs: Any) -> float | None:
    """||y' - y|| / ||y|| of the two models' first output tensor on ``inputs``."""
    return measured_error(converted, inputs, first_output(original, inputs))
