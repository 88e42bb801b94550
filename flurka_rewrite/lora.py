"""LoRA on a converted model: PEFT adapters that take effect, next to trainable FLuRKA
parameters.

    student = fr.convert(model, kernel="performer", dk=128, example_inputs=batch)
    fr.distill(student, model, data, steps=500)              # stage 1: attention transfer
    peft_model = fr.add_lora(student, LoraConfig(r=8, target_modules=["query", "value"]))
    ...train peft_model on the task loss...                   # stage 2: LoRA fine-tuning
    merged = peft_model.merge_and_unload()                    # a converted model again

Rewritten code calls the projection modules (``self.query(x)``; for hoisted K/V projections
``self.key(E x)`` with the bias term corrected, docs/design.md §3.3), so the ``lora.Linear``
that PEFT swaps in is what runs (``passes/module_calls.py``). ``peft.get_peft_model`` freezes
every parameter but the adapters; ``add_lora`` makes the FLuRKA parameters (``E``, ``F``, a
trainable kernel's weights) trainable again unless ``train_flurka=False``. PEFT's own
``save_pretrained`` then writes the adapters only, so it warns
(``FlurkaParametersNotSavedWarning``): save the merged model.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch.nn as nn

from flurka_rewrite.kernels.attention import FlurkaAttention


class FlurkaParametersNotSavedWarning(UserWarning):
    """PEFT's ``save_pretrained`` of an ``add_lora`` model writes the adapters only: the
    trained FLuRKA parameters are not in it."""


def flurka_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's ``FlurkaAttention`` modules (each once)."""
    seen: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        if isinstance(mod, FlurkaAttention):
            for p in mod.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def add_lora(model: nn.Module, config: Any, *, train_flurka: bool = True) -> nn.Module:
    """``peft.get_peft_model(model, config)`` on a converted model, with the FLuRKA parameters
    trainable beside the adapters (``train_flurka``). Returns the ``PeftModel``."""
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is a dev dependency
        raise ImportError("add_lora needs peft: pip install peft") from e
    flurka = flurka_parameters(model)
    if not flurka and not any(isinstance(m, FlurkaAttention) for m in model.modules()):
        raise ValueError("add_lora: the model has no FlurkaAttention modules; pass the model "
                         "returned by flurka_rewrite.convert")
    wrapped = peft.get_peft_model(model, config)
    if train_flurka:
        for p in flurka:
            p.requires_grad_(True)
        _warn_on_adapter_save(wrapped, sum(p.numel() for p in flurka))
    return wrapped


def _warn_on_adapter_save(wrapped: nn.Module, n: int) -> None:
    """PEFT saves the adapters only: say so on every ``save_pretrained`` (a Trainer calls it
    at each checkpoint, so it warns rather than stopping the training)."""
    save = wrapped.save_pretrained

    def save_pretrained(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(f"save_pretrained of a PEFT model writes the LoRA adapters only: the "
                      f"{n} trained FLuRKA parameters are not saved. Save the whole model: "
                      "merged = model.merge_and_unload(); fr.save(merged, DIR) (or "
                      "merged.save_pretrained(DIR))", FlurkaParametersNotSavedWarning,
                      stacklevel=2)
        return save(*args, **kwargs)

    wrapped.save_pretrained = save_pretrained
