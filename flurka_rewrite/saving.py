"""``save`` / ``load``: a converted model as safetensors weights plus a JSON recipe.

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

import copy
import hashlib
import json
import os
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from flurka_rewrite.atomic import atomic_dir, write_bytes
from flurka_rewrite.attention import FlurkaAttention

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


# -- save --------------------------------------------------------------------------------
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


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _base_class(model: nn.Module) -> type:
    return getattr(type(model), "_flurka_base", type(model))


def _base_recipe(model: nn.Module) -> dict[str, Any]:
    cls = _base_class(model)
    entry: dict[str, Any] = {"class": cls.__qualname__, "module": cls.__module__}
    config = getattr(model, "config", None)
    if cls.__module__.startswith("transformers.") and hasattr(config, "to_dict"):
        import transformers

        entry.update(kind="huggingface", config_class=type(config).__name__,
                     model_type=getattr(config, "model_type", None), config=config.to_dict(),
                     attn_implementation=getattr(config, "_attn_implementation", None),
                     transformers_version=transformers.__version__)
    else:
        entry["kind"] = "module"
    return entry


def _module_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, FlurkaAttention):
            s = {k: getattr(m, k) for k in FIXED + SETTABLE}
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


SAVE_FILES = (RECIPE_FILE, WEIGHTS_FILE, INPUTS_FILE)


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
        recipe = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "library_version": __version__, "torch_version": torch.__version__,
            "base_model": _base_recipe(model),
            "options": options,
            "filtered_sites": [s["path"] for s in report_dict["sites"] if s["reason"] == FILTERED],
            "report": report_dict,
            "modules": _module_settings(model),
            "example_inputs": inputs_spec,
            "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(os.path.join(tmp, WEIGHTS_FILE)),
                        "aliases": aliases},
        }
        # The checksum covers the recipe as load() will read it (after JSON conversion).
        recipe = json.loads(json.dumps(recipe, default=_json_default))
        recipe[CHECKSUM_FIELD] = recipe_checksum(recipe)
        with open(os.path.join(tmp, RECIPE_FILE), "w") as f:
            json.dump(recipe, f, indent=2)
            f.write("\n")
    return os.path.abspath(os.fspath(directory))


# -- load --------------------------------------------------------------------------------
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
    if _sha256(path) != want:
        raise RecipeError(f"{path!r} does not match the checksum in {RECIPE_FILE}: the weights "
                          "file is corrupt or was replaced; save the model again")
    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
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
    except Exception as e:  # noqa: BLE001 - corrupt file, missing key
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
    except Exception as e:  # noqa: BLE001 - any error of a config transformers refuses
        raise RecipeError(f"{RECIPE_FILE}: base_model.config does not build a {base['class']} "
                          f"({type(e).__name__}: {e}). The recipe was edited or corrupted; "
                          "save the model again") from e
    check_base_model(meta, recipe, weights)
    del meta
    return make(config).eval()


def _check_base_class(base_model: nn.Module, recipe: dict[str, Any]) -> None:
    want = recipe["base_model"].get("class")
    got = _base_class(base_model).__qualname__
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
                   for k in FIXED if recipe["modules"][path].get(k) != getattr(m, k)]
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
    recipe = read_recipe(directory)
    stored = _load_weights(directory, recipe)
    check_recipe(recipe, stored, rebuild_base=base_model is None)  # before anything is built
    weights = _with_aliases(stored, recipe)
    example = _rebuild_inputs(directory, recipe)
    with torch.random.fork_rng(devices=[]):  # building and converting leave the RNG alone
        if base_model is None:
            base = _rebuild_base(recipe, stored)
        else:
            _check_base_class(base_model, recipe)
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
