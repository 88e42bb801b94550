"""The format of a save directory (``flurka_rewrite.save``): its file names, the recipe's
fields and ``RecipeError``; shared by the writer (saving.py) and the checker
(recipe_check.py)."""
from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from flurka_rewrite.kernels.attention import FlurkaAttention

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"
INPUTS_FILE = "example_inputs.safetensors"
FORMAT = "flurka-rewrite-save"
FORMAT_VERSION = 2  # 2: recipe.json carries its own SHA-256 (recipe_sha256)
FILTERED = "excluded by filter_fn"
# Report fields that make up a site's decision (rel_error, FLOPs and notes may differ).
DECISION_FIELDS = ("path", "pattern", "status", "kernel", "dk", "num_features", "hoisted",
                   "causal", "heads", "kv_heads", "head_dim", "seq_len", "kv_seq_len", "mask",
                   "window")
# FlurkaAttention settings: fixed by the conversion (checked on load) / plain attributes a
# user may have changed after converting (restored on load).
FIXED = ("kernel", "heads", "kv_heads", "head_dim", "dk", "max_seq_len", "num_features",
         "causal", "scale", "e_init")
# Fixed settings that later versions added: a recipe written before them lacks them (None).
FIXED_SINCE = ("window",)
SETTABLE = ("backend", "eps", "chunk_size", "dropout", "seed")
FEATURE_SETTABLE = ("seed", "redraw_interval", "eva_chunk")  # eva_chunk: EVA only
_PRIMITIVES = (type(None), bool, int, float, str)


class RecipeError(ValueError):
    """A save directory that cannot be loaded: corrupt, incomplete, or a rebuilt model that
    does not match the saved one."""


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_class(model: nn.Module) -> type:
    return getattr(type(model), "_flurka_base", type(model))


# -- shared by saving.py and hf_record.py --------------------------------------------------
def _describe_inputs(example: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """JSON structure of the example inputs and their tensors (keys "0", "1", ... or names)."""
    if isinstance(example, Tensor):
        example = (example,)
    if isinstance(example, dict):
        kind, items = "kwargs", list(example.items())
    elif isinstance(example, (tuple, list)):
        kind, items = "args", [(str(i), v) for i, v in enumerate(example)]
    else:
        raise TypeError(f"example_inputs must be a tensor, a tuple or a dict; got "
                        f"{type(example).__name__}")
    spec, tensors = [], {}
    for key, value in items:
        if isinstance(value, Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            spec.append({"key": key, "shape": list(value.shape),
                         "dtype": str(value.dtype).removeprefix("torch.")})
        elif isinstance(value, _PRIMITIVES):
            spec.append({"key": key, "value": value})
        else:
            raise TypeError(f"example input {key!r} is a {type(value).__name__}; save() can "
                            "record tensors and None/bool/int/float/str values only")
    return {"kind": kind, "items": spec}, tensors


def _module_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, FlurkaAttention):
            s = {k: getattr(m, k) for k in FIXED + FIXED_SINCE + SETTABLE}
            fm = m.feature_map
            s["feature_map"] = None if fm is None else {
                k: getattr(fm, k) for k in FEATURE_SETTABLE if hasattr(fm, k)}
            out[path] = s
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return repr(obj)  # e.g. a callable in a config: informative only
