"""``save`` (``load`` is loading.py): a converted model as safetensors weights plus a JSON
recipe.

    fr.save(new_model, "out_dir")          # out_dir/model.safetensors, recipe.json, ...
    model = fr.load("out_dir")             # Hugging Face models: rebuilt from the saved config
    model = fr.load("out_dir", base_model=MyNet())   # other models: you build the base

A directory holds:

* ``model.safetensors``: the converted model's ``state_dict`` (tensors that share memory, such
  as tied embeddings, are stored once; the recipe lists the other names as aliases);
* ``example_inputs.safetensors``: the tensors of the example inputs used for the conversion
  (the captured graphs depend on them, e.g. on whether a mask was passed);
* ``recipe.json``: how to rebuild the base model, the conversion options, the report (per-site
  decisions), each ``FlurkaAttention``'s settings, the example inputs' structure, shapes and
  dtypes, the weights' checksum, the library version and (format version 2) a SHA-256 of
  the recipe itself.

``load`` first validates every recipe field against the stored weights
(``flurka_rewrite/recipe_check.py``), then rebuilds the base model, loads the saved weights of
its own layers, converts it again with the recipe (no download, no pickle), checks that every
site gets the decision the saved model had, and loads all weights with ``strict=True``: the
outputs are those of the saved model, bit for bit. ``save`` writes into a temporary directory
that is renamed into place only when complete.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from flurka_rewrite.passes.atomic import atomic_dir, write_bytes
from flurka_rewrite.hf_record import CONFIG_FILE, SECTION, config_json
from flurka_rewrite.loading import load, read_recipe  # noqa: F401 - the API's other half
from flurka_rewrite.save_format import (  # noqa: F401 - re-exported names of the format
    DECISION_FIELDS, FEATURE_SETTABLE, FILTERED, FIXED, FORMAT, FORMAT_VERSION, INPUTS_FILE,
    RECIPE_FILE, SETTABLE, WEIGHTS_FILE, _PRIMITIVES, RecipeError, _describe_inputs,
    _json_default, _module_settings, base_class, sha256_of,
)


# -- save --------------------------------------------------------------------------------
def _dedupe(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors to write (one per memory view) and aliases {name: stored name}: safetensors
    refuses shared memory (tied weights); partly overlapping views are copied."""
    seen: dict[tuple, str] = {}
    out, aliases, ptrs = {}, {}, {}
    for name, t in state.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
               t.dtype, str(t.device))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in ptrs:  # another view of the same memory: store a copy
            t = t.clone()
        ptrs.setdefault(ptr, name)
        out[name] = t.cpu().contiguous()
    return out, aliases


def _base_recipe(model: nn.Module) -> dict[str, Any]:
    cls = base_class(model)
    entry: dict[str, Any] = {"class": cls.__qualname__, "module": cls.__module__}
    config = getattr(model, "config", None)
    if cls.__module__.startswith("transformers.") and hasattr(config, "to_dict"):
        import transformers

        entry.update(kind="huggingface", config_class=type(config).__name__,
                     model_type=getattr(config, "model_type", None),
                     config={k: v for k, v in config.to_dict().items()
                             if k != SECTION},  # the unconverted model's config
                     attn_implementation=getattr(config, "_attn_implementation", None),
                     transformers_version=transformers.__version__)
    else:
        entry["kind"] = "module"
    return entry


SAVE_FILES = (RECIPE_FILE, WEIGHTS_FILE, INPUTS_FILE, CONFIG_FILE)


def foreign_files(directory: str) -> list[str] | None:
    """None when ``directory`` is a save written by ``save`` (a recipe with this format's
    marker and nothing but the save's own files) or empty; else the names that make it
    someone else's (at most 5), which ``save`` must never delete."""
    names = sorted(os.listdir(directory))
    if not names:
        return None
    extra = [n for n in names if n not in SAVE_FILES]
    if extra:
        return extra[:5]
    try:
        with open(os.path.join(directory, RECIPE_FILE)) as f:
            marker = json.load(f).get("format")
    except (OSError, ValueError, AttributeError):
        marker = None
    return None if marker == FORMAT else [RECIPE_FILE + " (not written by flurka-rewrite)"]


def _check_target(directory: str, overwrite: bool) -> None:
    """Refuse to write over anything but an earlier save (and over that without
    ``overwrite``)."""
    if not os.path.lexists(directory):
        return
    if not os.path.isdir(directory) or os.path.islink(directory):
        raise FileExistsError(f"{directory!r} exists and is not a directory; choose another "
                              "path for save()")
    if not os.listdir(directory):
        return
    foreign = foreign_files(directory)
    if foreign is not None:
        raise FileExistsError(f"{directory!r} is not a directory written by flurka_rewrite.save "
                              f"(it holds {', '.join(foreign)}); refusing to replace it, even "
                              "with overwrite=True: choose a new directory")
    if not overwrite:
        raise FileExistsError(f"{directory!r} holds an earlier save; pass overwrite=True to "
                              "replace it, or choose a new directory")


def save(model: nn.Module, directory: str | os.PathLike, *, example_inputs: Any = None,
         overwrite: bool = False) -> str:
    """Save a model returned by ``flurka_rewrite.convert`` (trained or not) to ``directory``.

    example_inputs: the inputs given to ``convert`` (needed unless the model records them as
    ``model.flurka_example_inputs``). overwrite: replace an earlier save directory.
    Returns the directory's absolute path."""
    from safetensors.torch import save as to_bytes

    from flurka_rewrite import __version__
    from flurka_rewrite.recipe_check import CHECKSUM_FIELD, recipe_checksum

    report = getattr(model, "flurka_report", None)
    if report is None:
        raise ValueError(f"{type(model).__name__} has no .flurka_report: save() takes a model "
                         "returned by flurka_rewrite.convert (save any other model with "
                         "torch.save(model.state_dict(), ...) or save_pretrained)")
    if example_inputs is None:
        example_inputs = getattr(model, "flurka_example_inputs", None)
    if example_inputs is None:
        raise ValueError("save() needs the example inputs the model was converted with (load() "
                         "converts the base model again on them): pass save(model, directory, "
                         "example_inputs=...) with the example_inputs given to convert")
    inputs_spec, input_tensors = _describe_inputs(example_inputs)
    weights, aliases = _dedupe(model.state_dict())
    report_dict = report.to_dict()
    options = {k: v for k, v in report_dict["config"].items() if k not in ("filter_fn", "inplace")}
    directory = os.path.abspath(os.fspath(directory))
    _check_target(directory, overwrite)
    with atomic_dir(directory, replace=overwrite) as tmp:
        write_bytes(os.path.join(tmp, WEIGHTS_FILE), to_bytes(weights, metadata={"format": "pt"}))
        write_bytes(os.path.join(tmp, INPUTS_FILE),
                    to_bytes(input_tensors, metadata={"format": "pt"}))
        hf_config = config_json(model)  # a Hugging Face model: from_pretrained opens it too
        if hf_config is not None:
            write_bytes(os.path.join(tmp, CONFIG_FILE), hf_config.encode("utf-8"))
        recipe = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "library_version": __version__, "torch_version": torch.__version__,
            "base_model": _base_recipe(model),
            "options": options,
            "filtered_sites": [s["path"] for s in report_dict["sites"] if s["reason"] == FILTERED],
            "report": report_dict,
            "modules": _module_settings(model),
            "example_inputs": inputs_spec,
            "weights": {"file": WEIGHTS_FILE, "sha256": sha256_of(os.path.join(tmp, WEIGHTS_FILE)),
                        "aliases": aliases},
        }
        # The checksum covers the recipe as load() will read it (after JSON conversion).
        recipe = json.loads(json.dumps(recipe, default=_json_default))
        recipe[CHECKSUM_FIELD] = recipe_checksum(recipe)
        with open(os.path.join(tmp, RECIPE_FILE), "w") as f:
            json.dump(recipe, f, indent=2)
            f.write("\n")
    return os.path.abspath(os.fspath(directory))
