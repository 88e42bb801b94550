"""Hugging Face round trips, the loading half (docs/save_load.md, "Hugging Face round trips").

Importing ``flurka_rewrite`` wraps ``PreTrainedModel.from_pretrained`` (now when transformers
is imported, else as soon as it is, by a meta-path finder; transformers itself is never
imported here): a model whose config has the ``flurka`` section that ``convert`` records
(hf_record.py) and that holds no FlurkaAttention is converted again as recorded. The section
is validated first (recipe_check.py, field by field, and its SHA-256), every site must get
the recorded decision, and the FLuRKA tensors are read from the checkpoint's safetensors files
(never a pickle), so ``AutoModel.from_pretrained(d)``, ``SentenceTransformer(d)`` and Trainer
checkpoints give the converted model bit for bit, or raise ``RecipeError``: never the softmax
model silently. No code from the directory is run.
"""
from __future__ import annotations

import functools
import importlib.abc
import json
import math
import os
import sys
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from flurka_rewrite.hf_record import (CONFIG_FILE, HF_FORMAT, HF_FORMAT_VERSION,
                                      MAX_RECORDED_ELEMENTS, SAFE_INDEX, SAFE_WEIGHTS, SECTION)
from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.save_format import RECIPE_FILE, RecipeError, base_class

_MODELING = "transformers.modeling_utils"


# -- the from_pretrained hook --------------------------------------------------------------
def _patch(modeling_utils: Any) -> None:
    cls = modeling_utils.PreTrainedModel
    func = getattr(cls.__dict__.get("from_pretrained"), "__func__", None)
    if func is None or getattr(func, "_flurka_hook", False):
        return

    @functools.wraps(func)
    def from_pretrained(klass: type, *args: Any, **kwargs: Any) -> Any:
        out = func(klass, *args, **kwargs)
        model = out[0] if isinstance(out, tuple) else out
        if isinstance(model, nn.Module):
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            restore_conversion(model, source, kwargs)
        return out

    from_pretrained._flurka_hook = True  # type: ignore[attr-defined]
    cls.from_pretrained = classmethod(from_pretrained)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _patch(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Wraps ``from_pretrained`` as soon as transformers.modeling_utils is imported."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _MODELING:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") \
                else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def install_from_pretrained_hook() -> None:
    """Make ``PreTrainedModel.from_pretrained`` restore recorded conversions (now if
    transformers is imported, else when it is; idempotent; never imports transformers)."""
    mu = sys.modules.get(_MODELING)
    if mu is not None and hasattr(mu, "PreTrainedModel"):
        _patch(mu)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def restore_conversion(model: nn.Module, source: Any, kwargs: dict[str, Any]) -> None:
    """Convert ``model`` (just loaded by ``from_pretrained`` from ``source``) again when its
    config records a conversion and it holds no FlurkaAttention; RecipeError when it cannot."""
    section = getattr(getattr(model, "config", None), SECTION, None)
    if section is None or any(isinstance(m, FlurkaAttention) for m in model.modules()):
        return
    restore(model, section, source, kwargs)


# -- restoring a conversion ----------------------------------------------------------------
_FIELDS = ("format", "format_version", "library_version", "model_class", "options",
           "filtered_sites", "sites", "modules", "example_inputs", "example_data",
           "example_missing", "recipe_sha256")


def _relabel(e: RecipeError) -> RecipeError:
    """A recipe_check error, named for the config.json section it came from."""
    text = str(e).replace(f"{RECIPE_FILE}: ", f"{CONFIG_FILE}: {SECTION}.").replace(
        f"save the model again with flurka_rewrite.save (do not edit {RECIPE_FILE})",
        f"save the model again (do not edit the {SECTION!r} section of {CONFIG_FILE})")
    return RecipeError(text)


def _bad(field: str, problem: str) -> RecipeError:
    return RecipeError(f"{CONFIG_FILE}: {SECTION}.{field} {problem}. The section was edited or "
                       f"corrupted; save the converted model again")


def check_section(section: Any, tensors: dict[str, Tensor]) -> None:
    """Validate a ``flurka`` section against the checkpoint's FLuRKA tensors."""
    from flurka_rewrite import recipe_check as rc

    if not isinstance(section, dict) or section.get("format") != HF_FORMAT:
        raise _bad("format", f"must be {HF_FORMAT!r}")
    version = section.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > HF_FORMAT_VERSION:
        raise RecipeError(f"{CONFIG_FILE}: the {SECTION!r} section has format version {version}, "
                          f"newer than this flurka-rewrite reads; upgrade flurka-rewrite")
    if version != HF_FORMAT_VERSION:
        raise _bad("format_version", f"must be {HF_FORMAT_VERSION}; got {version!r}")
    for k in section:
        if k not in _FIELDS:
            raise _bad(k, "is not a field flurka-rewrite writes")
    if section.get(rc.CHECKSUM_FIELD) != rc.recipe_checksum(section):
        raise _bad(rc.CHECKSUM_FIELD, "does not match the section (it was edited after saving)")
    try:
        if not isinstance(section.get("modules"), dict) or not section["modules"]:
            raise rc.fail("modules", "must be a non-empty object")
        for path, settings in section["modules"].items():
            rc._check_module(path, settings, tensors)
        dims = [] if section.get("example_inputs") is None else \
            rc._check_inputs(section["example_inputs"])
        rc._check_options(section.get("options"), section["modules"], max(dims, default=0))
        rc._check_report({"sites": section.get("sites")}, section.get("filtered_sites", []))
    except RecipeError as e:
        raise _relabel(e) from e


def example_of(section: dict[str, Any], device: torch.device) -> Any:
    """The recorded example inputs (tensors rebuilt from their JSON data), or None when the
    conversion had none; RecipeError when they could not be recorded."""
    spec, data = section.get("example_inputs"), section.get("example_data")
    if spec is None:
        missing = section.get("example_missing")
        if missing is not None:
            raise RecipeError(f"{CONFIG_FILE}: the conversion could not be recorded in full "
                              f"({missing}); save the model with flurka_rewrite.save and "
                              "reload it with flurka_rewrite.load")
        return None
    if not isinstance(data, dict):
        raise _bad("example_data", "must be an object")
    values, total = [], 0
    for item in spec["items"]:
        key = item["key"]
        if "shape" not in item:
            values.append((key, item["value"]))
            continue
        flat, n = data.get(key), math.prod(item["shape"])
        total += n
        if not isinstance(flat, list) or len(flat) != n or total > MAX_RECORDED_ELEMENTS or \
                not all(isinstance(x, (int, float)) for x in flat):
            raise _bad(f"example_data[{key!r}]", f"must be a list of {n} numbers")
        dtype = getattr(torch, item["dtype"])
        values.append((key, torch.tensor(flat, dtype=dtype).reshape(item["shape"]).to(device)))
    return dict(values) if spec["kind"] == "kwargs" else tuple(v for _, v in values)


def checkpoint_files(source: Any, kwargs: dict[str, Any]) -> list[str]:
    """The safetensors files ``from_pretrained`` read (a local directory or the hub cache)."""
    if source is None:
        raise RecipeError("the model's config records a FLuRKA conversion, but from_pretrained "
                          "got no checkpoint path to read its FLuRKA weights from")
    src, sub = os.fspath(source), kwargs.get("subfolder") or ""
    variant = kwargs.get("variant")

    def get(name: str) -> str | None:
        if variant:
            stem, ext = name.split(".", 1)
            name = f"{stem}.{variant}.{ext}"
        if os.path.isdir(src):
            path = os.path.join(src, sub, name)
            return path if os.path.isfile(path) else None
        from transformers.utils import cached_file

        return cached_file(src, name, subfolder=sub, revision=kwargs.get("revision"),
                           cache_dir=kwargs.get("cache_dir"), token=kwargs.get("token"),
                           local_files_only=kwargs.get("local_files_only", False),
                           _raise_exceptions_for_missing_entries=False)

    single = get(SAFE_WEIGHTS)
    if single:
        return [single]
    index = get(SAFE_INDEX)
    if index:
        with open(index) as f:
            shards = sorted(set((json.load(f).get("weight_map") or {}).values()))
        bad = [s for s in shards if not isinstance(s, str) or os.path.basename(s) != s
               or not s.endswith(".safetensors")]
        files = [] if bad else [get(s) for s in shards]
        if bad or not all(files):
            raise RecipeError(f"{index!r} names shards that are missing or not plain "
                              f"safetensors file names: {(bad or shards)[:3]}")
        return files  # type: ignore[return-value]
    raise RecipeError(f"{src!r} holds no {SAFE_WEIGHTS} (or {SAFE_INDEX}): the FLuRKA weights "
                      "of a converted model are read from safetensors only (flurka-rewrite "
                      "unpickles nothing); save it with save_pretrained(safe_serialization=True)")


def flurka_tensors(files: list[str], modules: Any) -> dict[str, Tensor]:
    """The tensors of the checkpoint under the recorded FlurkaAttention module paths."""
    from safetensors import safe_open

    prefixes = tuple(p + "." for p in modules) if isinstance(modules, dict) else ()
    out: dict[str, Tensor] = {}
    for path in files:
        try:
            with safe_open(path, "pt") as f:
                for k in f.keys():
                    if k.startswith(prefixes):
                        out[k] = f.get_tensor(k)
        except Exception as e:
            raise RecipeError(f"could not read {path!r} (truncated or corrupt?): {e}") from e
    return out


def _reconvert(model: nn.Module, section: dict[str, Any], example: Any) -> None:
    from flurka_rewrite.convert import convert

    filtered = set(section.get("filtered_sites") or [])
    filter_fn = (lambda path, site: site.path not in filtered) if filtered else None
    try:
        with torch.random.fork_rng(devices=[]):
            convert(model, example_inputs=example, filter_fn=filter_fn, inplace=True,
                    **section["options"])
    except Exception as e:
        raise RecipeError(f"{type(model).__name__} loaded by from_pretrained could not be "
                          f"converted again with the recipe in {CONFIG_FILE} ({type(e).__name__}: "
                          f"{e}); load it on the CPU without device_map, or use fr.save / "
                          "fr.load") from e


def restore(model: nn.Module, section: Any, source: Any, kwargs: dict[str, Any]) -> None:
    """Convert ``model`` again as its config's ``flurka`` section records and load its FLuRKA
    tensors from the checkpoint, bit for bit; RecipeError naming the problem otherwise."""
    from flurka_rewrite.loading import _check_decisions, _match_dtypes, _restore_settings

    got = base_class(model).__name__
    want = section.get("model_class") if isinstance(section, dict) else None
    if want != got:
        raise RecipeError(
            f"{CONFIG_FILE} records a FLuRKA conversion of a {want}, but it is being loaded as a "
            f"{got}: the converted sites would not match. Load it with {want}.from_pretrained "
            f"(or the Auto class that gives a {want}), or convert a {got} yourself")
    state = kwargs.get("state_dict")
    if isinstance(state, dict):
        prefixes = tuple(p + "." for p in section.get("modules") or {})
        tensors = {k: v for k, v in state.items() if k.startswith(prefixes)}
    else:
        tensors = flurka_tensors(checkpoint_files(source, kwargs), section.get("modules"))
    check_section(section, tensors)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = example_of(section, device)
    before = set(model.state_dict())
    _reconvert(model, section, example)
    pseudo = {"report": {"sites": section["sites"]}, "modules": section["modules"],
              "library_version": section["library_version"]}
    _check_decisions(model, pseudo)
    _restore_settings(model, pseudo)
    added = set(model.state_dict()) - before
    missing = sorted(added - set(tensors))
    extra = sorted(set(tensors) - set(model.state_dict()))
    if missing or extra:
        raise RecipeError(
            f"the checkpoint's FLuRKA tensors do not fit the model rebuilt from {CONFIG_FILE} "
            f"(missing: {missing[:3]}, unexpected: {extra[:3]}); save the converted model again")
    _match_dtypes(model, tensors)
    model.load_state_dict(tensors, strict=False)
    model.eval()
