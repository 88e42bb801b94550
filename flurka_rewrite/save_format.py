"""The format of a save directory (``flurka_rewrite.save``): its file names, the recipe's
fields and ``RecipeError``; shared by the writer (saving.py) and the checker
(recipe_check.py)."""
from __future__ import annotations

import hashlib

import torch.nn as nn

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"
INPUTS_FILE = "example_inputs.safetensors"
FORMAT = "flurka-rewrite-save"
FORMAT_VERSION = 2  # 2: recipe.json carries its own SHA-256 (recipe_sha256)
FILTERED = "excluded by filter_fn"
# Report fields that make up a site's decision (rel_error, FLOPs and notes may differ).
DECISION_FIELDS = ("path", "pattern", "status", "kernel", "dk", "num_features", "hoisted",
                   "causal", "heads", "kv_heads", "head_dim", "seq_len", "kv_seq_len", "mask")
# FlurkaAttention settings: fixed by the conversion (checked on load) / plain attributes a
# user may have changed after converting (restored on load).
FIXED = ("kernel", "heads", "kv_heads", "head_dim", "dk", "max_seq_len", "num_features",
         "causal", "scale", "e_init")
SETTABLE = ("backend", "eps", "chunk_size", "dropout", "seed")
FEATURE_SETTABLE = ("seed", "redraw_interval")
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
