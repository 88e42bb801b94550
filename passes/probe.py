"""The inputs the planner runs the model on: the example as captured, and a padded probe.

``capture_example``: the user's example, with ``use_cache=False`` added for a model whose
forward takes ``use_cache`` (Hugging Face decoders): a KV cache object is filled by the run that
records each module's inputs, so running a module again on that record (verification) would
attend to the cached keys twice; the rewritten attention does not use the cache anyway.

``padded_probe``: the example with the last positions of its last batch row padded (each
mask the model takes set to 0 there: ``attention_mask``, ``decoder_attention_mask``).
Capture and verification also run on it, so a mask that the example did not exercise (an
all-ones mask, which Hugging Face turns into ``attention_mask=None`` before the attention
modules) is still a run-time input of the rewritten model and is checked.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

# mask argument -> the inputs its (batch, length) can be read from when the example lacks it
MASKS = (("attention_mask", ("input_ids", "inputs_embeds")),
         ("decoder_attention_mask", ("decoder_input_ids", "decoder_inputs_embeds")))


def _parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


def capture_example(model: nn.Module, example_inputs: Any) -> Any:
    """``example_inputs`` with ``use_cache=False`` when the model takes ``use_cache`` and
    the example (a dict) does not set it; a batch of one is repeated to two, since
    torch.export fixes every dimension of size 1 and the rewritten modules would then accept
    batches of one only."""
    ex = example_inputs
    if isinstance(ex, dict) and "use_cache" in _parameters(model) and "use_cache" not in ex:
        ex = {**ex, "use_cache": False}
    leaves = [t for t in (ex.values() if isinstance(ex, dict) else ex if isinstance(
        ex, (tuple, list)) else [ex]) if isinstance(t, torch.Tensor)]
    if leaves and all(t.dim() >= 1 and t.shape[0] == 1 for t in leaves):
        two = {id(t): t.expand(2, *t.shape[1:]).clone() for t in leaves}
        if isinstance(ex, dict):
            ex = {k: two.get(id(v), v) for k, v in ex.items()}
        elif isinstance(ex, (tuple, list)):
            ex = type(ex)(two.get(id(v), v) for v in ex)
        else:
            ex = two[id(ex)]
    return ex


def padded_probe(model: nn.Module, example_inputs: Any) -> dict[str, Any] | None:
    """The example (a dict) with each mask the model takes (``attention_mask``,
    ``decoder_attention_mask``) 0 on the last ceil(N/4) positions of the last row (at least
    one real token kept); None when the model takes no such mask or the example gives no
    (batch, length) to build one from."""
    if not isinstance(example_inputs, dict):
        return None
    params = _parameters(model)
    probe = dict(example_inputs)
    for name, length_from in MASKS:
        if name not in params:
            continue
        mask = _padded(example_inputs.get(name),
                       next((example_inputs[k] for k in length_from
                             if isinstance(example_inputs.get(k), torch.Tensor)), None))
        if mask is not None:
            probe[name] = mask
    return probe if any(probe[k] is not example_inputs.get(k) for k in probe) else None


def _padded(mask: Any, ref: torch.Tensor | None) -> torch.Tensor | None:
    if not isinstance(mask, torch.Tensor):
        if ref is None or ref.dim() < 2:
            return None
        mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
    if mask.dim() != 2 or mask.shape[-1] < 2:
        return None
    n = mask.shape[-1]
    probe = mask.clone()
    real = int((probe[-1] != 0).sum())
    pad = min(max(1, (n + 3) // 4), max(real - 1, 0))
    if pad == 0:
        return None
    probe[-1, n - pad:] = 0
    return probe


def example_or_dummy(model: nn.Module, example_inputs: Any) -> Any:
    """The given example inputs, else a Hugging Face model's ``dummy_inputs``, else None (static
    planning on ``symbolic_trace``, passes/static_plan.py)."""
    if example_inputs is not None:
        return example_inputs
    dummy = getattr(model, "dummy_inputs", None)
    if isinstance(dummy, dict) and dummy:
        return dummy
    return None


def batch_of(ex: Any) -> int:
    """The leading size of the first tensor of an example (0 when there is none)."""
    leaves = ex.values() if isinstance(ex, dict) else ex if isinstance(ex, (tuple, list)) \
        else [ex]
    return next((t.shape[0] for t in leaves if isinstance(t, torch.Tensor) and t.dim()), 0)


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


def check_runs(model: nn.Module, ex: Any) -> None:
    """The original model runs on the example inputs; else a ValueError that says so (and
    names the position limit when the sequence is longer), not an error from deep inside."""
    args, kwargs = ((), ex) if isinstance(ex, dict) else (
        (tuple(ex) if isinstance(ex, (tuple, list)) else (ex,)), {})
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:
        leaves = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        n = next((int(t.shape[1]) for t in leaves if t.dim() >= 2), None)
        limit = position_limit(model)
        hint = (f"; its config allows at most {limit[0]} positions ({limit[1]}) and the example "
                f"has {n}" if limit and n and n > limit[0] else "")
        raise ValueError(f"{type(model).__name__} itself fails on the example inputs, before "
                         f"any rewrite ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                         f"{hint}: pass example inputs the model accepts") from e
