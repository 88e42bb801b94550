"""``load``: rebuild the model that ``save`` wrote (saving.py). The recipe is validated
field by field against the stored weights first (recipe_check.py); then the base model is
rebuilt (Hugging Face models from their saved config, on ``meta`` first; other models from
the ``base_model`` the caller passes), its own layers get the saved weights, it is converted
again with the recipe, every site must get the decision the saved model had, and all weights
load with ``strict=True``: the outputs are those of the saved model, bit for bit."""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.save_format import (
    DECISION_FIELDS, FEATURE_SETTABLE, FIXED, FIXED_SINCE, FORMAT, INPUTS_FILE,
    RECIPE_FILE, SETTABLE, WEIGHTS_FILE, RecipeError, base_class, sha256_of,
)

_REQUIRED = ("format", "format_version", "library_version", "base_model", "options", "report",
             "modules", "example_inputs", "weights")


def read_recipe(directory: str | os.PathLike) -> dict[str, Any]:
    """The recipe of a save directory: JSON, format, fields present, format version
    (``RecipeError`` when corrupt). ``load`` then checks every field against the weights
    (``recipe_check.check_recipe``)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory; load() takes a directory "
                                "written by flurka_rewrite.save")
    path = os.path.join(directory, RECIPE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory!r} has no {RECIPE_FILE}: it is not a directory "
                                "written by flurka_rewrite.save (or the save was incomplete)")
    try:
        with open(path) as f:
            recipe = json.load(f)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, nesting, huge ints
        raise RecipeError(f"{path!r} is not valid JSON (corrupt or truncated): {e}") from e
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise RecipeError(f"{path!r} is not a flurka-rewrite recipe (format is not {FORMAT!r})")
    missing = [k for k in _REQUIRED if k not in recipe]
    if missing:
        raise RecipeError(f"{path!r} lacks {', '.join(missing)}: corrupt or hand-edited; save "
                          "the model again")
    from flurka_rewrite.recipe_check import check_format_version

    check_format_version(recipe["format_version"])
    return recipe


def _load_weights(directory: str, recipe: dict[str, Any]) -> dict[str, Tensor]:
    """The tensors stored in the weights file (checksum checked; aliases not applied)."""
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} is missing: the save directory is incomplete")
    want = recipe["weights"].get("sha256") if isinstance(recipe["weights"], dict) else None
    if not isinstance(want, str):
        raise RecipeError(f"{RECIPE_FILE}: weights.sha256 must be the SHA-256 of {WEIGHTS_FILE} "
                          f"(a string); got {want!r}. Save the model again")
    if sha256_of(path) != want:
        raise RecipeError(f"{path!r} does not match the checksum in {RECIPE_FILE}: the weights "
                          "file is corrupt or was replaced; save the model again")
    try:
        tensors = load_file(path)
    except Exception as e:
        raise RecipeError(f"could not read {path!r} (truncated or corrupt?): {e}") from e
    return tensors


def _with_aliases(stored: dict[str, Tensor], recipe: dict[str, Any]) -> dict[str, Tensor]:
    """The stored tensors plus the aliases (checked by ``check_recipe``: new names only)."""
    tensors = dict(stored)
    for alias, name in recipe["weights"].get("aliases", {}).items():
        tensors[alias] = stored[name]
    return tensors


def _rebuild_inputs(directory: str, recipe: dict[str, Any]) -> Any:
    from safetensors.torch import load_file

    path = os.path.join(directory, INPUTS_FILE)
    spec = recipe["example_inputs"]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} is missing: the save directory is incomplete")
    try:
        tensors = load_file(path)
        values = [(i["key"], tensors[i["key"]] if "shape" in i else i["value"])
                  for i in spec["items"]]
    except Exception as e:
        raise RecipeError(f"could not rebuild the example inputs from {path!r}: "
                          f"{type(e).__name__}: {e}") from e
    for item, (_, t) in zip(spec["items"], values):
        if "shape" in item and (list(t.shape) != item["shape"]
                                or str(t.dtype) != "torch." + item["dtype"]):
            raise RecipeError(f"example input {item['key']!r} is {tuple(t.shape)} {t.dtype} in "
                              f"{INPUTS_FILE} but {item['shape']} {item['dtype']} in "
                              f"{RECIPE_FILE}")
    return dict(values) if spec["kind"] == "kwargs" else tuple(v for _, v in values)


def _rebuild_base(recipe: dict[str, Any], weights: dict[str, Tensor]) -> nn.Module:
    base = recipe["base_model"]
    if base.get("kind") != "huggingface":
        raise ValueError(
            f"this model was converted from a {base.get('module')}.{base.get('class')}, which "
            "flurka-rewrite cannot rebuild by itself (only Hugging Face models are rebuilt from "
            f"their config): pass load(directory, base_model={base.get('class')}(...)), a "
            "freshly built, unconverted instance of that model")
    try:
        import transformers
    except ImportError as e:
        raise ImportError("rebuilding this Hugging Face model needs transformers: "
                          "pip install 'flurka-rewrite[hf]'") from e
    model_cls = getattr(transformers, base["class"], None)
    config_cls = getattr(transformers, base["config_class"], None)
    if not (isinstance(model_cls, type) and issubclass(model_cls, transformers.PreTrainedModel)
            and isinstance(config_cls, type) and issubclass(config_cls,
                                                            transformers.PretrainedConfig)):
        if model_cls is not None and config_cls is not None:
            raise RecipeError(
                f"recipe.json names transformers.{base['class']} / "
                f"transformers.{base['config_class']}, which are not a PreTrainedModel and a "
                "PretrainedConfig class; refusing to call them (a tampered recipe?)")
    if model_cls is None or config_cls is None:
        raise RecipeError(
            f"transformers {transformers.__version__} has no {base['class']} / "
            f"{base['config_class']} (saved with transformers {base.get('transformers_version')}); "
            f"install that version, or pass base_model=")
    from flurka_rewrite.recipe_check import check_base_model

    kwargs = {"attn_implementation": base["attn_implementation"]} \
        if base.get("attn_implementation") else {}
    build = getattr(model_cls, "_from_config", None)

    def make(config: Any) -> nn.Module:
        return build(config, **kwargs) if build else model_cls(config)

    try:  # on the meta device first: no memory, shapes to compare with the stored weights
        config = config_cls.from_dict(dict(base["config"]))
        with torch.device("meta"):
            meta = make(copy.deepcopy(config))
    except Exception as e:
        raise RecipeError(f"{RECIPE_FILE}: base_model.config does not build a {base['class']} "
                          f"({type(e).__name__}: {e}). The recipe was edited or corrupted; "
                          "save the model again") from e
    check_base_model(meta, recipe, weights)
    del meta
    return make(config).eval()


def _checkbase_class(base_model: nn.Module, recipe: dict[str, Any]) -> None:
    want = recipe["base_model"].get("class")
    got = base_class(base_model).__qualname__
    if want and got != want:
        raise ValueError(f"base_model is a {got}, but the saved model was converted from a "
                         f"{want}; pass a freshly built {want}")
    if getattr(base_model, "flurka_report", None) is not None:
        raise ValueError("base_model is already converted (it has .flurka_report); pass a "
                         "freshly built, unconverted model")


def _preload(base: nn.Module, weights: dict[str, Tensor]) -> None:
    """Load the saved weights of the base model's own layers (same names, same shapes), so
    the conversion sees the trained model (the strict load later covers every tensor)."""
    own = base.state_dict()
    fit = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    base.load_state_dict(fit, strict=False)


def _reconvert(base: nn.Module, recipe: dict[str, Any], example: Any) -> nn.Module:
    from flurka_rewrite.convert import convert

    filtered = set(recipe.get("filtered_sites", []))
    filter_fn = (lambda path, site: site.path not in filtered) if filtered else None
    return convert(base, example_inputs=example, filter_fn=filter_fn, inplace=True,
                   **recipe["options"])


def _check_decisions(model: nn.Module, recipe: dict[str, Any]) -> None:
    saved = recipe["report"]["sites"]
    now = model.flurka_report.to_dict()["sites"]
    diffs = []
    if [s["path"] for s in saved] != [s["path"] for s in now]:
        diffs.append(f"sites saved: {[s['path'] for s in saved]}; sites now: "
                     f"{[s['path'] for s in now]}")
    else:
        for a, b in zip(saved, now):
            bad = [f"{k} saved {a.get(k)!r}, now {b.get(k)!r}" for k in DECISION_FIELDS
                   if a.get(k) != b.get(k)]
            if bad:
                diffs.append(f"{a['path']}: " + ", ".join(bad))
    modules = {p: m for p, m in model.named_modules() if isinstance(m, FlurkaAttention)}
    if set(modules) != set(recipe["modules"]):
        diffs.append(f"FlurkaAttention modules saved: {sorted(recipe['modules'])}; now: "
                     f"{sorted(modules)}")
    else:
        for path, m in modules.items():
            bad = [f"{k} saved {recipe['modules'][path].get(k)!r}, now {getattr(m, k)!r}"
                   for k in FIXED + FIXED_SINCE
                   if recipe["modules"][path].get(k) != getattr(m, k, None)]
            if bad:
                diffs.append(f"{path}: " + ", ".join(bad))
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; ... ({len(diffs) - 3} more)" if len(diffs) > 3 else "")
        raise RecipeError(
            "the model rebuilt from the recipe does not get the decisions the saved model had "
            f"({shown}). The base model or the library differs from the one that saved it "
            f"(saved with flurka-rewrite {recipe['library_version']}); pass the right "
            "base_model, or use the flurka-rewrite version that saved it")


def _restore_settings(model: nn.Module, recipe: dict[str, Any]) -> None:
    """Set the SETTABLE / FEATURE_SETTABLE values (types and ranges checked by
    ``check_recipe``); a feature-map setting the rebuilt map does not have is refused."""
    for path, saved in recipe["modules"].items():
        m = model.get_submodule(path)
        for k in SETTABLE:
            if k in saved:
                setattr(m, k, saved[k])
        for k, v in (saved.get("feature_map") or {}).items():
            if m.feature_map is None or k not in FEATURE_SETTABLE or not hasattr(m.feature_map, k):
                raise RecipeError(
                    f"{RECIPE_FILE}: modules[{path!r}].feature_map.{k} is not a setting of its "
                    f"{type(m.feature_map).__name__}. The recipe was edited or corrupted; save "
                    "the model again")
            setattr(m.feature_map, k, v)


def _match_dtypes(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """Give each parameter / buffer the dtype it was saved in (a model cast to bf16 after
    conversion loads as bf16), keeping tied parameters tied."""
    named = {**dict(model.named_parameters(remove_duplicate=False)),
             **dict(model.named_buffers(remove_duplicate=False))}
    for name, t in named.items():
        w = weights.get(name)
        if w is not None and w.dtype != t.dtype:
            t.data = t.data.to(w.dtype)


def load(directory: str | os.PathLike, *, base_model: nn.Module | None = None,
         device: str | torch.device | None = None) -> nn.Module:
    """Rebuild the model that ``save`` wrote to ``directory``: same weights, same outputs.

    base_model: a freshly built, unconverted instance of the original model (its weights do
    not matter; it is not modified). Needed when the model is not a Hugging Face model:
    there is no general way to rebuild an arbitrary architecture. Hugging Face models are
    rebuilt from the saved config (no download) when it is None. device: where to put the
    model (default: CPU). Returns the converted model in eval mode, with ``.flurka_report``."""
    from flurka_rewrite.recipe_check import check_recipe

    directory = os.fspath(directory)
    if os.path.isdir(directory) and not os.path.exists(os.path.join(directory, RECIPE_FILE)):
        from flurka_rewrite.hf_record import load_pretrained, read_config

        config = read_config(directory)  # a save_pretrained directory (docs/save_load.md)
        if config is not None:
            if base_model is not None:
                raise ValueError("base_model= is for fr.save directories; a Hugging Face "
                                 "save_pretrained directory is rebuilt from its config.json")
            return load_pretrained(directory, config, device=device)
    recipe = read_recipe(directory)
    stored = _load_weights(directory, recipe)
    check_recipe(recipe, stored, rebuild_base=base_model is None)  # before anything is built
    weights = _with_aliases(stored, recipe)
    example = _rebuild_inputs(directory, recipe)
    with torch.random.fork_rng(devices=[]):  # building and converting leave the RNG alone
        if base_model is None:
            base = _rebuild_base(recipe, stored)
        else:
            _checkbase_class(base_model, recipe)
            base = copy.deepcopy(base_model)
        _preload(base, weights)
        model = _reconvert(base, recipe, example)
    _check_decisions(model, recipe)
    _restore_settings(model, recipe)
    _match_dtypes(model, weights)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise RecipeError(f"the saved weights do not fit the rebuilt model: {e}") from e
    model.eval()
    if device is not None:
        model.to(device)
    return model
