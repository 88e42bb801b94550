"""Validation of a save directory's ``recipe.json`` against its stored weights (``fr.load``).

A recipe is data from disk that ``load`` builds modules from: every field is checked for type
and range before anything is built and, where the weights imply a value, against the stored
tensors (E and F are (dk, max_seq_len), the performer's W is (num_features, head_dim), a
Hugging Face base model built on the ``meta`` device has the stored shapes). A bad field
raises ``RecipeError`` naming it, e.g. ``modules['layers.0.attn'].eps``. The recipe's own
SHA-256 (``recipe_sha256``, format version 2) catches edits that stay in range.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping

import torch.nn as nn
from torch import Tensor

from flurka_rewrite.kernels.attention import E_INITS, KERNELS
from flurka_rewrite.kernels.registry import SOFTMAX, feature_map_class, takes_num_features
from flurka_rewrite.passes.config import KERNEL_CHOICES, RewriteConfig
from flurka_rewrite.kernels.dispatch import BACKENDS
from flurka_rewrite.save_format import (DECISION_FIELDS, FEATURE_SETTABLE, FIXED, FIXED_SINCE,
                                        FORMAT_VERSION,
                                        RECIPE_FILE, SETTABLE, WEIGHTS_FILE, RecipeError)

CHECKSUM_FIELD = "recipe_sha256"
TOP_FIELDS = ("format", "format_version", "library_version", "torch_version", "base_model",
              "options", "filtered_sites", "report", "modules", "example_inputs", "weights",
              CHECKSUM_FIELD)
BASE_FIELDS = ("class", "module", "kind", "config_class", "model_type", "config",
               "attn_implementation", "transformers_version")
OPTION_FIELDS = ("kernel", "dk", "num_features", "backend", "seed", "e_init", "max_seq_len",
                 "hoist", "keep_exact", "max_rel_error", "window")
# Upper limits: far above any real model, far below an allocation that hurts.
MAX_DK, MAX_SEQ_LEN, MAX_FEATURES = 1 << 14, 1 << 20, 1 << 14
MAX_HEADS, MAX_HEAD_DIM, MAX_CHUNK_SIZE = 1 << 12, 1 << 12, 1 << 12
MAX_EPS, SEED_LIMIT = 1e-2, 2 ** 63
# dk * max_seq_len of one E not backed by stored weights: 2**28 admits the default dk=256 at a
# 1M-token context (1 GiB in fp32), and refuses the 10**12 positions of a tampered recipe.
MAX_LOWRANK_ELEMENTS = 1 << 28
MAX_INPUTS, MAX_NDIM, MAX_DIM = 256, 8, 1 << 24
INPUT_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                "uint8", "bool")
META_BYTES_FACTOR, META_BYTES_SLACK = 4, 1 << 26  # meta model vs stored weights
COUNT_SUFFIXES = ("layers", "layer", "experts", "blocks")  # config fields that count modules
_PRIMITIVES = (type(None), bool, int, float, str)


def fail(field: str, problem: str) -> RecipeError:
    """The ``RecipeError`` for one bad field (raise it)."""
    return RecipeError(f"{RECIPE_FILE}: {field} {problem}. The recipe was edited or corrupted; "
                       "save the model again with flurka_rewrite.save (do not edit recipe.json)")


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _int(v: Any, field: str, lo: int, hi: int, *, none: bool = False) -> int | None:
    if v is None and none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise fail(field, f"must be an int in [{lo}, {hi}]{' or null' if none else ''}; "
                          f"got {_show(v)}")
    return v


def _choice(v: Any, field: str, choices: tuple) -> Any:
    if not isinstance(v, (str, type(None))) or v not in choices:
        raise fail(field, f"must be one of {', '.join(map(repr, choices))}; got {_show(v)}")
    return v


def _type(v: Any, field: str, types: type | tuple, what: str) -> Any:
    bool_ok = bool in (types if isinstance(types, tuple) else (types,))
    if not isinstance(v, types) or (isinstance(v, bool) and not bool_ok):
        raise fail(field, f"must be {what}; got {_show(v)}")
    return v


def _float(v: Any, field: str, lo: float, hi: float, *, lo_open: bool, hi_open: bool,
           types: tuple = (int, float)) -> float:
    _type(v, field, types, "a float" if types == (float,) else "a number")
    x = float(v) if isinstance(v, float) or abs(v) < 2 ** 1000 else math.inf
    ok = math.isfinite(x) and (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        raise fail(field, f"must be a finite number in {'(' if lo_open else '['}{lo}, {hi}"
                          f"{')' if hi_open else ']'}; got {_show(v)}")
    return x


def recipe_checksum(recipe: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``recipe`` without its ``recipe_sha256`` field."""
    body = {k: v for k, v in recipe.items() if k != CHECKSUM_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_format_version(v: Any) -> int:
    """``format_version`` an int in [1, FORMAT_VERSION] (a newer one asks for an upgrade)."""
    if isinstance(v, int) and not isinstance(v, bool) and v > FORMAT_VERSION:
        raise RecipeError(f"{RECIPE_FILE} has format version {v}, newer than this flurka-rewrite "
                          f"reads ({FORMAT_VERSION}); upgrade flurka-rewrite")
    return _int(v, "format_version", 1, FORMAT_VERSION)


def check_recipe(recipe: dict[str, Any], weights: Mapping[str, Tensor], *,
                 rebuild_base: bool) -> None:
    """Validate every field of ``recipe`` (read by ``read_recipe``) against the stored tensors
    ``weights`` (``model.safetensors``, before aliases), then its checksum. rebuild_base: the
    base model will be rebuilt from the recipe's Hugging Face config."""
    version = check_format_version(recipe.get("format_version"))
    for k in recipe:
        _choice(k, "a top-level field", TOP_FIELDS)
    for k in ("library_version", "torch_version"):
        _type(recipe.get(k, ""), k, str, "a string")
    tensors = _check_weights_entry(recipe["weights"], weights)
    _check_base(recipe["base_model"], len(weights), rebuild_base)
    _type(recipe["modules"], "modules", dict, "an object")
    for path, settings in recipe["modules"].items():
        _check_module(path, settings, tensors)
    dims = _check_inputs(recipe["example_inputs"])
    _check_options(recipe["options"], recipe["modules"], max(dims, default=0))
    _check_report(recipe["report"], recipe.get("filtered_sites", []))
    want = recipe.get(CHECKSUM_FIELD)
    if want is None and version >= 2:
        raise fail(CHECKSUM_FIELD, f"is missing (format version {version} records it)")
    if want is not None and want != recipe_checksum(recipe):
        raise RecipeError(f"{RECIPE_FILE} does not match its checksum ({CHECKSUM_FIELD}): the "
                          "recipe was edited or corrupted after it was saved; save the model "
                          "again with flurka_rewrite.save (do not edit recipe.json)")


def _check_weights_entry(entry: Any, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``weights``: file name, checksum and aliases; returns stored tensors plus aliases."""
    _type(entry, "weights", dict, "an object")
    for k in entry:
        if k not in ("file", "sha256", "aliases"):
            raise fail(f"weights.{k}", "is not a field of the weights entry")
    if entry.get("file", WEIGHTS_FILE) != WEIGHTS_FILE:
        raise fail("weights.file", f"must be {WEIGHTS_FILE!r}; got {_show(entry['file'])}")
    aliases = _type(entry.get("aliases", {}), "weights.aliases", dict, "an object")
    out = dict(weights)
    for alias, name in aliases.items():
        field = f"weights.aliases[{alias!r}]"
        _type(name, field, str, "the name of a stored tensor (a string)")
        if alias in weights:
            raise fail(field, f"names {alias!r}, a tensor {WEIGHTS_FILE} holds: the alias would "
                              "overwrite it")
        if name not in weights:
            raise fail(field, f"is {name!r}, which {WEIGHTS_FILE} does not hold")
        out[alias] = weights[name]
    return out


def _check_base(base: Any, n_tensors: int, rebuild: bool) -> None:
    _type(base, "base_model", dict, "an object")
    for k, v in base.items():
        if k not in BASE_FIELDS:
            raise fail(f"base_model.{k}", "is not a field of the base model entry")
        if k not in ("config", "attn_implementation", "model_type", "transformers_version"):
            _type(v, f"base_model.{k}", str, "a string")
    _choice(base.get("kind"), "base_model.kind", ("huggingface", "module"))
    if base["kind"] != "huggingface":
        return
    for k in ("class", "config_class"):
        if not _type(base.get(k), f"base_model.{k}", str, "a class name").isidentifier():
            raise fail(f"base_model.{k}", f"must be a class name; got {_show(base[k])}")
    for k in ("model_type", "transformers_version"):
        _type(base.get(k), f"base_model.{k}", (str, type(None)), "a string or null")
    impl = _type(base.get("attn_implementation"), "base_model.attn_implementation",
                 (str, type(None)), "a string or null")
    if impl is not None and not impl.replace("_", "a").isalnum():  # no hub kernel repos
        raise fail("base_model.attn_implementation", f"must be a built-in attention "
                                                     f"implementation name; got {_show(impl)}")
    _type(base.get("config"), "base_model.config", dict, "an object")
    if rebuild:  # building on meta is cheap per tensor, but not for 10**9 layers
        for name, v in _config_ints(base["config"]).items():
            if name.lower().endswith(COUNT_SUFFIXES) and v > n_tensors:
                raise fail(f"base_model.config.{name}", f"is {v}, more than the {n_tensors} "
                                                        f"tensors {WEIGHTS_FILE} holds")


def _config_ints(config: Mapping[str, Any], prefix: str = "") -> dict[str, int]:
    """Integer fields of a (nested) config dict: {"hidden_size": 48, "text_config.x": 3}."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_config_ints(v, f"{prefix}{k}."))
        elif isinstance(v, int) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def _check_module(path: Any, s: Any, tensors: Mapping[str, Tensor]) -> None:
    f = f"modules[{path!r}]"
    if not isinstance(path, str) or not all(path.split(".")):
        raise fail(f, "must be named by a module path such as 'layers.0.attn'")
    _type(s, f, dict, "an object")
    for k in s:
        if k not in FIXED + FIXED_SINCE + SETTABLE + ("feature_map",):
            raise fail(f"{f}.{k}", "is not a FlurkaAttention setting flurka-rewrite saves")
    for k in FIXED:
        if k not in s:
            raise fail(f"{f}.{k}", "is missing")
    kernel = _choice(s["kernel"], f"{f}.kernel", KERNELS)
    heads = _int(s["heads"], f"{f}.heads", 1, MAX_HEADS)
    kv_heads = _int(s["kv_heads"], f"{f}.kv_heads", 1, MAX_HEADS)
    if heads % kv_heads:
        raise fail(f"{f}.kv_heads", f"must divide heads ({heads}); got {kv_heads}")
    head_dim = _int(s["head_dim"], f"{f}.head_dim", 1, MAX_HEAD_DIM)
    causal = _type(s["causal"], f"{f}.causal", bool, "true or false")
    dk = _int(s["dk"], f"{f}.dk", 1, MAX_DK, none=True)
    max_len = _int(s["max_seq_len"], f"{f}.max_seq_len", 1, MAX_SEQ_LEN, none=True)
    if dk is not None and (causal or max_len is None):
        raise fail(f"{f}.dk", f"is {dk} on a {'causal' if causal else 'max_seq_len=null'} module")
    fmap = feature_map_class(kernel)  # None for softmax
    if fmap is None:
        m = _choice(s["num_features"], f"{f}.num_features", (None,))
    elif not fmap.takes_num_features:  # m fixed by the head dim (relu, rnn: m = dh)
        fixed = fmap.default_num_features(head_dim)
        m = _int(s["num_features"], f"{f}.num_features", fixed, fixed)
    else:
        m = _int(s["num_features"], f"{f}.num_features", 1, MAX_FEATURES)
    _float(s["scale"], f"{f}.scale", 0.0, 1e6, lo_open=True, hi_open=False)
    _choice(s["e_init"], f"{f}.e_init", E_INITS)
    _check_settings(f, s)
    pre = f"{path}."
    window = _int(s.get("window"), f"{f}.window", 1, MAX_SEQ_LEN, none=True)
    theta = tensors.get(pre + "kernel_log_weight")  # the window's weight per head
    if window is None and theta is not None:
        raise fail(f"{f}.window", f"is null, but {WEIGHTS_FILE} holds {pre}kernel_log_weight")
    if window is not None:
        _shape(theta, pre + "kernel_log_weight", (heads,), (f"{f}.heads",))
    low = {n: tensors.get(pre + n) for n in ("E", "F", "E_support")}
    for n, t in low.items():
        if dk is None and t is not None:
            raise fail(f"{f}.dk", f"is null, but {WEIGHTS_FILE} holds a low-rank {pre}{n}")
        if dk is not None:
            _shape(t, pre + n, (dk, max_len), (f"{f}.dk", f"{f}.max_seq_len"))
    sizes = {"head_dim": head_dim, "kv_heads": kv_heads, "num_features": m}
    for n, dims in (fmap.weight_shapes if fmap is not None else {}).items():  # the map's facts
        _shape(tensors.get(f"{pre}feature_map.{n}"), f"{pre}feature_map.{n}",
               tuple(sizes[d] if isinstance(d, str) else d for d in dims),
               tuple(f"{f}.{d}" if isinstance(d, str) else "" for d in dims))


def _shape(t: Tensor | None, name: str, want: tuple, fields: tuple) -> None:
    """Stored tensor ``name`` has shape ``want``; else the error names the field of the
    first dimension that differs."""
    if t is None:
        raise fail(fields[0], f"implies a tensor {name}, which {WEIGHTS_FILE} does not hold")
    got = tuple(t.shape)
    if len(got) != len(want):
        raise fail(fields[0], f"implies {name} of shape {want}; {WEIGHTS_FILE} holds {got}")
    for field, w, g in zip(fields, want, got):
        if w != g:
            raise fail(field or fields[0], f"is {w}, but {WEIGHTS_FILE} holds {name} of shape "
                                           f"{got} (expected {want})")


def _check_settings(f: str, s: Mapping[str, Any]) -> None:
    """The restorable settings (SETTABLE, FEATURE_SETTABLE) of module entry ``f``."""
    if "backend" in s:
        _choice(s["backend"], f"{f}.backend", BACKENDS)
    if "eps" in s:
        _float(s["eps"], f"{f}.eps", 0.0, MAX_EPS, lo_open=True, hi_open=False, types=(float,))
    if "chunk_size" in s:
        _int(s["chunk_size"], f"{f}.chunk_size", 1, MAX_CHUNK_SIZE)
    if "dropout" in s:
        _float(s["dropout"], f"{f}.dropout", 0.0, 1.0, lo_open=False, hi_open=True)
    if "seed" in s:
        _int(s["seed"], f"{f}.seed", 0, SEED_LIMIT - 1)
    fm = s.get("feature_map")
    if s.get("kernel") == SOFTMAX and fm is not None:
        raise fail(f"{f}.feature_map", f"must be null for kernel 'softmax'; got {_show(fm)}")
    _type(fm, f"{f}.feature_map", (dict, type(None)), "an object or null")
    for k, v in (fm or {}).items():
        if k not in FEATURE_SETTABLE:
            raise fail(f"{f}.feature_map.{k}", "is not a feature-map setting flurka-rewrite "
                                               f"restores ({', '.join(FEATURE_SETTABLE)})")
        if k == "eva_chunk":  # EVA's local window (kernels/eva.py)
            _int(v, f"{f}.feature_map.{k}", 1, MAX_CHUNK_SIZE)
        else:
            _int(v, f"{f}.feature_map.{k}", 0, SEED_LIMIT - 1, none=k == "redraw_interval")


def _check_inputs(spec: Any) -> list[int]:
    """The example inputs' structure; returns every dimension of every tensor."""
    _type(spec, "example_inputs", dict, "an object")
    kind = _choice(spec.get("kind"), "example_inputs.kind", ("args", "kwargs"))
    items = _type(spec.get("items"), "example_inputs.items", list, "a list")
    if set(spec) != {"kind", "items"} or len(items) > MAX_INPUTS:
        raise fail("example_inputs", f"must hold kind and items (at most {MAX_INPUTS})")
    dims, keys = [], set()
    for i, item in enumerate(items):
        f = f"example_inputs.items[{i}]"
        _type(item, f, dict, "an object")
        key = _type(item.get("key"), f"{f}.key", str, "a string")
        if (kind == "args" and key != str(i)) or (kind == "kwargs" and not key.isidentifier()) \
                or key in keys:
            want = f"the position {i!r}" if kind == "args" else "a unique argument name"
            raise fail(f"{f}.key", f"must be {want}; got {_show(key)}")
        keys.add(key)
        if set(item) == {"key", "shape", "dtype"}:
            shape = _type(item["shape"], f"{f}.shape", list, "a list of sizes")
            if len(shape) > MAX_NDIM:
                raise fail(f"{f}.shape", f"has more than {MAX_NDIM} dimensions")
            dims += [_int(d, f"{f}.shape", 0, MAX_DIM) for d in shape]
            _choice(item["dtype"], f"{f}.dtype", INPUT_DTYPES)
        elif set(item) == {"key", "value"}:
            v = _type(item["value"], f"{f}.value", _PRIMITIVES, "null, a bool, a number or "
                                                                 "a string")
            if (isinstance(v, str) and len(v) > 1000) or (isinstance(v, float) and not
                    math.isfinite(v)) or (isinstance(v, int) and abs(v) >= SEED_LIMIT):
                raise fail(f"{f}.value", f"is not a plain value; got {_show(v)}")
        else:
            raise fail(f, "must hold key and either shape and dtype, or value; got keys "
                          f"{sorted(item)}")
    return dims


def _check_options(opts: Any, modules: Mapping[str, dict], longest: int) -> None:
    """The conversion options, bounded and consistent with the saved modules (they decide
    what the conversion builds, before the decisions can be compared)."""
    _type(opts, "options", dict, "an object")
    for k in opts:
        if k not in OPTION_FIELDS:
            raise fail(f"options.{k}", f"is not a conversion option ({', '.join(OPTION_FIELDS)})")
    kernel = _choice(opts.get("kernel", "auto"), "options.kernel", KERNEL_CHOICES)
    dk = opts.get("dk", 256)
    if dk != "auto":
        dk = _int(dk, "options.dk", 1, MAX_DK, none=True)
    m = _int(opts.get("num_features"), "options.num_features", 1, MAX_FEATURES, none=True)
    max_len = _int(opts.get("max_seq_len"), "options.max_seq_len", 1, MAX_SEQ_LEN, none=True)
    _int(opts.get("seed", 0), "options.seed", 0, SEED_LIMIT - 1)
    _choice(opts.get("backend", "auto"), "options.backend", BACKENDS)
    e_init = _choice(opts.get("e_init", "pool"), "options.e_init", E_INITS)
    _type(opts.get("hoist", True), "options.hoist", bool, "true or false")
    _int(opts.get("window"), "options.window", 1, MAX_SEQ_LEN, none=True)
    _int(opts.get("keep_exact"), "options.keep_exact", 0, 1 << 20, none=True)
    if opts.get("max_rel_error") is not None:
        _float(opts["max_rel_error"], "options.max_rel_error", 0.0, float("inf"), lo_open=True,
               hi_open=True)
    low = {p: s for p, s in modules.items() if s["dk"] is not None}
    for p, s in modules.items():
        f = f"modules[{p!r}]"
        if kernel != "auto" and s["kernel"] != kernel:
            raise fail("options.kernel", f"is {kernel!r}, but {f}.kernel is {s['kernel']!r}")
        if s["e_init"] != e_init:
            raise fail("options.e_init", f"is {e_init!r}, but {f}.e_init is {s['e_init']!r}")
        if m is not None and takes_num_features(s["kernel"]) and s["num_features"] != m:
            raise fail("options.num_features", f"is {m}, but {f}.num_features is "
                                               f"{s['num_features']} (its stored weights' size)")
        if p in low and (dk is None or (isinstance(dk, int) and s["dk"] != dk)):
            raise fail("options.dk", f"is {dk}, but {f}.dk is {s['dk']}")
        if max_len is not None and p in low and s["max_seq_len"] != max_len:
            raise fail("options.max_seq_len", f"is {max_len}, but {f}.max_seq_len is "
                                              f"{s['max_seq_len']} (its stored E's size)")
    try:
        RewriteConfig(**opts)
    except (TypeError, ValueError) as e:
        raise fail("options", f"are not valid conversion options ({e})") from e
    if not low and dk is not None and max_len is not None:
        check_lowrank_size(dk, max_len, longest, "options.max_seq_len")


def check_lowrank_size(dk: int | str, max_len: int, longest: int, field: str) -> None:
    """A low-rank E that no stored weight bounds: dk * max_seq_len within limits (dk "auto"
    is at most half the longest example dimension)."""
    rank = dk if isinstance(dk, int) else max(longest // 2, 1)
    if rank * max_len > MAX_LOWRANK_ELEMENTS:
        raise fail(field, f"is {max_len}: with dk={dk} a low-rank layer would hold "
                          f"{rank * max_len} elements, more than {MAX_LOWRANK_ELEMENTS}, and "
                          f"{WEIGHTS_FILE} holds no low-rank layer to bound it (a causal model "
                          "converted with a dk: convert with dk=None or a smaller max_seq_len, "
                          "the same model for causal sites, and save that)")


def _check_report(report: Any, filtered: Any) -> None:
    _type(report, "report", dict, "an object")
    sites = _type(report.get("sites"), "report.sites", list, "a list")
    for i, site in enumerate(sites):
        _type(site, f"report.sites[{i}]", dict, "an object")
        _type(site.get("path"), f"report.sites[{i}].path", str, "a string")
        for k in DECISION_FIELDS:
            _type(site.get(k), f"report.sites[{i}].{k}", _PRIMITIVES, "a plain value")
    for i, p in enumerate(_type(filtered, "filtered_sites", list, "a list")):
        _type(p, f"filtered_sites[{i}]", str, "a site path (a string)")


def check_base_model(meta: nn.Module, recipe: Mapping[str, Any],
                     weights: Mapping[str, Tensor]) -> None:
    """A Hugging Face base model built on the ``meta`` device from the recipe's config: its
    tensors have the stored shapes (else the error names the config field that set the
    size), its size is not far beyond the stored weights', and its max_position_embeddings
    fits the stored low-rank layers."""
    config = recipe["base_model"]["config"]
    ints = _config_ints(config)
    bad: list[tuple[str, tuple, tuple]] = []
    for name, t in meta.state_dict().items():
        w = weights.get(name)
        if w is not None and tuple(w.shape) != tuple(t.shape):
            bad.append((name, tuple(t.shape), tuple(w.shape)))
    if bad:
        score: dict[str, int] = {}
        for _, got, want in bad:
            sizes = {g for i, g in enumerate(got) if i >= len(want) or want[i] != g}
            for field, v in ints.items():
                score[field] = score.get(field, 0) + (v in sizes)
        best = max(score.values(), default=0)
        named = [k for k, n in score.items() if n == best and best]
        name, got, want = bad[0]
        field = " or ".join(f"base_model.config.{k}" for k in named) or "base_model.config"
        value = f"= {ints[named[0]]} " if len(named) == 1 else ""
        more = f" ({len(bad)} tensors differ)" if len(bad) > 1 else ""
        raise fail(field, f"{value}gives {name} the shape {got}, but {WEIGHTS_FILE} holds "
                          f"{want}{more}")
    stored = sum(t.numel() * t.element_size() for t in weights.values())
    tensors = {id(t): t for t in (*meta.parameters(), *meta.buffers())}
    built = sum(t.numel() * t.element_size() for t in tensors.values())
    if built > META_BYTES_FACTOR * stored + META_BYTES_SLACK:
        raise fail("base_model.config", f"builds a model of {built} bytes, far more than the "
                                        f"{stored} bytes {WEIGHTS_FILE} holds")
    opts, modules = recipe["options"], recipe["modules"]
    if opts.get("max_seq_len") is not None or opts.get("dk", 256) is None:
        return
    mpe = getattr(getattr(meta, "config", None), "max_position_embeddings", None)
    if not isinstance(mpe, int) or isinstance(mpe, bool):
        return
    low = [s["max_seq_len"] for s in modules.values() if s["dk"] is not None]
    field = "base_model.config.max_position_embeddings"
    if low and mpe > min(low):
        raise fail(field, f"is {mpe}, but a stored low-rank layer has max_seq_len {min(low)}")
    if not low:
        dims = [d for i in recipe["example_inputs"]["items"] for d in i.get("shape", [])]
        check_lowrank_size(opts.get("dk", 256), mpe, max(dims, default=0), field)
