"""Hugging Face round trips, the recording half (docs/save_load.md, "Hugging Face round
trips"; the from_pretrained hook that reads it is hf.py).

``convert`` calls ``record_conversion``: the config of every outermost Hugging Face model
it rewrote gets a ``flurka`` section (options, per-site decisions, each ``FlurkaAttention``'s
settings, the example inputs with their values; JSON data only, with its own SHA-256), which
``save_pretrained`` writes into ``config.json``. Also here: the ``config.json`` that ``fr.save``
adds for a Hugging Face model, example inputs for a sentence-transformers model (from its
tokenizer), and ``fr.load`` of a ``save_pretrained`` directory.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.save_format import FILTERED, RecipeError, base_class

SECTION = "flurka"
HF_FORMAT, HF_FORMAT_VERSION = "flurka-rewrite-hf", 1
CONFIG_FILE = "config.json"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
MAX_RECORDED_ELEMENTS = 1 << 18  # example input elements written into config.json
MAX_CONFIG_BYTES = 1 << 26
ST_SENTENCES = ("A short example sentence.", "Another, slightly longer sentence to embed.")
ST_MAX_LENGTH = 128
_MODELING = "transformers.modeling_utils"


# -- recording (called by convert) --------------------------------------------------------
def _pretrained_class() -> type | None:
    mu = sys.modules.get(_MODELING)  # never imports transformers
    return getattr(mu, "PreTrainedModel", None)


def _outermost_hf(model: nn.Module) -> list[tuple[str, nn.Module]]:
    cls = _pretrained_class()
    found: list[tuple[str, nn.Module]] = []
    if cls is None:
        return found
    for path, m in model.named_modules():
        if isinstance(m, cls) and not any(p == "" or path.startswith(p + ".") for p, _ in found):
            found.append((path, m))
    return found


class _Stop(Exception):
    pass


_UNSEEN = object()  # a nested model's inputs that could not be recorded


def _inputs_of(root: nn.Module, sub: nn.Module, example: Any) -> Any:
    """The inputs ``sub`` is called with when ``root`` runs on ``example`` (the run stops
    there), as a tuple of args or a dict of kwargs; None when neither or not called. The spy
    replaces ``sub.forward`` for the run (sentence-transformers calls ``forward`` directly,
    past the module hooks)."""
    from flurka_rewrite.passes.install import kept_modes

    got: list[tuple[tuple, dict]] = []

    def spy(*args: Any, **kwargs: Any) -> None:
        got.append((args, kwargs))
        raise _Stop

    own = sub.__dict__.get("forward")
    sub.forward = spy  # type: ignore[method-assign]
    try:
        with kept_modes(root), torch.no_grad(), torch.random.fork_rng(devices=[]):
            if isinstance(example, dict):
                root(**example)
            else:
                root(*(example if isinstance(example, (tuple, list)) else (example,)))
    except _Stop:
        pass
    finally:
        if own is None:
            del sub.forward
        else:
            sub.forward = own
    if not got:
        return None
    args, kwargs = got[0]
    return dict(kwargs) if not args else (tuple(args) if not kwargs else None)


def _section(m: nn.Module, rd: dict[str, Any], prefix: str, example: Any) -> dict | None:
    from flurka_rewrite import __version__
    from flurka_rewrite.recipe_check import CHECKSUM_FIELD, recipe_checksum
    from flurka_rewrite.save_format import _describe_inputs, _json_default, _module_settings

    sites = [{**s, "path": s["path"][len(prefix):]} for s in rd["sites"]
             if s["path"].startswith(prefix)]
    modules = _module_settings(m)
    if not modules:
        return None
    spec, data, missing = None, None, None
    if example is _UNSEEN:
        missing = "the inputs of this model inside the converted one could not be observed"
    elif example is not None:
        try:
            spec, tensors = _describe_inputs(example)
        except TypeError as e:
            missing = f"the example inputs cannot be recorded ({e})"
        else:
            if sum(t.numel() for t in tensors.values()) > MAX_RECORDED_ELEMENTS:
                spec, missing = None, (f"the example inputs have more than "
                                       f"{MAX_RECORDED_ELEMENTS} elements")
            else:
                data = {k: t.flatten().tolist() for k, t in tensors.items()}
    section = {
        "format": HF_FORMAT, "format_version": HF_FORMAT_VERSION, "library_version": __version__,
        "model_class": base_class(m).__name__,
        "options": {k: v for k, v in rd["config"].items() if k not in ("filter_fn", "inplace")},
        "filtered_sites": [s["path"] for s in sites if s.get("reason") == FILTERED],
        "sites": [{k: s.get(k) for k in _decision_fields()} for s in sites],
        "modules": modules, "example_inputs": spec, "example_data": data,
        "example_missing": missing,
    }
    section = json.loads(json.dumps(section, default=_json_default))
    section[CHECKSUM_FIELD] = recipe_checksum(section)
    return section


def _decision_fields() -> tuple[str, ...]:
    from flurka_rewrite.save_format import DECISION_FIELDS
    return DECISION_FIELDS + ("reason",)


def record_conversion(model: nn.Module, report: Any, example: Any) -> None:
    """Write ``config.flurka`` on each outermost Hugging Face model inside ``model`` (the model
    itself, or e.g. a SentenceTransformer's transformer) that holds rewritten sites."""
    found = _outermost_hf(model)
    if not found:
        return
    rd = report.to_dict()
    for path, m in found:
        ex = example if not path or example is None else _inputs_of(model, m, example)
        if path and example is not None and ex is None:
            ex = _UNSEEN
        section = _section(m, rd, path + "." if path else "", ex)
        if section is not None and getattr(m, "config", None) is not None:
            setattr(m.config, SECTION, section)


def config_json(model: nn.Module) -> str | None:
    """The ``config.json`` text of a converted Hugging Face model (with its ``flurka``
    section and ``architectures``), for ``fr.save``; None for other models."""
    cls = _pretrained_class()
    config = getattr(model, "config", None)
    if cls is None or not isinstance(model, cls) or getattr(config, SECTION, None) is None:
        return None
    import copy

    config = copy.deepcopy(config)
    config.architectures = [base_class(model).__name__]
    return config.to_json_string(use_diff=True)


def tokenizer_example(model: nn.Module) -> Any:
    """Example inputs for a sentence-transformers model without any: two short sentences
    tokenized by its own tokenizer, padded to min(max_seq_length, 128); else None."""
    if not type(model).__module__.startswith("sentence_transformers"):
        return None
    tok = getattr(model, "tokenizer", None)
    if tok is None or not callable(tok):
        return None
    length = min(int(getattr(model, "max_seq_length", None) or ST_MAX_LENGTH), ST_MAX_LENGTH)
    feats = tok(list(ST_SENTENCES), padding="max_length", max_length=length, truncation=True,
                return_tensors="pt")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return ({k: v.to(device) for k, v in feats.items() if isinstance(v, Tensor)},)


# -- fr.load of a save_pretrained directory -----------------------------------------------
def read_config(directory: str) -> dict[str, Any] | None:
    """The parsed ``config.json`` of ``directory`` (None when there is none)."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise RecipeError(f"{path!r} is larger than {MAX_CONFIG_BYTES} bytes; not a config")
    try:
        with open(path) as f:
            config = json.load(f)
    except (ValueError, RecursionError) as e:
        raise RecipeError(f"{path!r} is not valid JSON (corrupt or truncated): {e}") from e
    return config if isinstance(config, dict) else None


def load_pretrained(directory: str, config: dict[str, Any], *,
                    device: str | torch.device | None = None) -> nn.Module:
    """``fr.load`` of a ``save_pretrained`` directory whose config.json has a ``flurka``
    section: ``from_pretrained`` of the recorded class, converted again by the hook."""
    section = config.get(SECTION)
    if os.path.exists(os.path.join(directory, "modules.json")):
        raise ValueError(f"{directory!r} is a sentence-transformers directory: load it with "
                         "SentenceTransformer(directory) after `import flurka_rewrite` (its "
                         "transformer reloads converted); fr.load reads fr.save directories "
                         "and Hugging Face save_pretrained directories")
    if not isinstance(section, dict):
        raise FileNotFoundError(
            f"{directory!r} has no recipe.json, and its config.json has no 'flurka' section: it "
            "is an unconverted Hugging Face model. Load it with from_pretrained and convert "
            "it with flurka_rewrite.convert")
    try:
        import transformers
    except ImportError as e:
        raise ImportError("loading a Hugging Face directory needs transformers: "
                          "pip install 'flurka-rewrite[hf]'") from e
    name = section.get("model_class")
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() \
        else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise RecipeError(f"{CONFIG_FILE}: flurka.model_class is {name!r}, not a transformers "
                          f"model class of transformers {transformers.__version__}; save the "
                          "model again")
    model = cls.from_pretrained(directory)
    if not any(isinstance(m, FlurkaAttention) for m in model.modules()):
        raise RecipeError(f"{directory!r}: {name}.from_pretrained returned a model without "
                          "FlurkaAttention; the 'flurka' section was not applied")
    model.eval()
    return model if device is None else model.to(device)
