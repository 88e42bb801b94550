"""Model files for the CLI: load an input model safely (example inputs: example_inputs.py;
outputs: outputs.py).

Inputs are recognised by content, not only by name:

* a ``torch.export`` program (``.pt2``): checked, then loaded with nothing from the file run
  (``pt2_safe``); one that is not plain data is refused unless ``trust_pickle=True``;
* a Hugging Face model directory (``config.json`` + safetensors): loaded offline;
* a full pickled module (``torch.save(model)``, ``.pt``/``.pth``): unpickling can run arbitrary
  code, so it is refused unless ``trust_pickle=True``;
* a state_dict (``.pt`` of tensors, ``.safetensors``): refused, it holds no model code.

Every failure raises a ``CliError`` subclass whose ``exit_code`` the CLI returns.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from flurka_rewrite.passes.export_capture import quiet_loggers


PROG = "flurka-rewrite"


class CliError(Exception):
    """An error the CLI reports as one line and a distinct exit code."""

    exit_code = 1


class UsageError(CliError):
    exit_code = 2  # invalid option or combination of options


class InputFileError(CliError):
    exit_code = 3  # input missing, unreadable, truncated or corrupt


class UnsafePickleError(CliError):
    exit_code = 4  # full pickled module refused without --trust-pickle


class NotAModelError(CliError):
    exit_code = 5  # the file holds weights (a state_dict), not a model


class NoAttentionError(CliError):
    exit_code = 6  # no attention site in the model


class ConversionError(CliError):
    exit_code = 7  # the compiler failed, or the converted model could not be exported


class OutputExistsError(CliError):
    exit_code = 8  # output exists (without --force) or is the input


class FeatureUnavailableError(CliError):
    exit_code = 9  # asked for a feature this build does not have yet


class OutputWriteError(CliError):
    exit_code = 10  # an output could not be written: read-only, no permission, disk full


@dataclass
class LoadedModel:
    """A model read from disk, with what the CLI needs to build example inputs."""

    module: nn.Module
    kind: str  # "pt2" | "hf" | "pickle" | "demo"
    source: str
    hf_config: Any = None
    # example inputs recorded in the file (a .pt2 program's sample inputs): (args, kwargs)
    recorded_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None


def _quiet_torch_export() -> contextlib.AbstractContextManager:
    """torch.export.load logs a full traceback at WARNING before it raises; keep it quiet."""
    return quiet_loggers("torch.export", "torch.export.pt2_archive._package",
                         level=logging.CRITICAL)


def _zip_names(path: str) -> list[str] | None:
    """Names in a zip archive, or None when the file is not a readable zip."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def load_model(path: str, *, trust_pickle: bool = False, quiet: bool = False) -> LoadedModel:
    """Load the model in ``path`` (file or directory) for conversion; see the module docstring.
    ``quiet`` hides the progress bars of Hugging Face loading."""
    if not os.path.exists(path):
        raise InputFileError(f"input {path!r} does not exist")
    if os.path.isdir(path):
        return _load_directory(path, quiet)
    if not os.access(path, os.R_OK):
        raise InputFileError(f"input {path!r} is not readable (check its permissions)")
    if os.path.getsize(path) == 0:
        raise InputFileError(f"input {path!r} is empty")
    if path.endswith(".safetensors"):
        raise NotAModelError(
            f"{path!r} holds only weights (a state_dict in safetensors), not a model; pass the "
            "Hugging Face model directory that holds it and its config.json")
    names = _zip_names(path)
    if names is not None and any(n.endswith("/archive_format") for n in names):
        return _load_program(path, trust_pickle)
    if names is not None and not any(n.endswith("data.pkl") for n in names):
        raise InputFileError(f"{path!r} is a zip archive but neither a torch.export program "
                             "(.pt2) nor a torch.save file")
    if names is None and path.endswith(".pt2"):
        raise InputFileError(f"{path!r} is not a valid torch.export program (.pt2): the archive "
                             "is truncated or corrupt; export the model again")
    if names is None and not _starts_like_pickle(path):
        raise InputFileError(f"{path!r} is not a readable PyTorch file (neither a zip archive "
                             "nor a pickle): truncated or corrupt, or another format")
    return _load_pickle(path, trust_pickle=trust_pickle)


def _starts_like_pickle(path: str) -> bool:
    """Legacy (pre-zip) torch.save files are pickles: protocol 2+ opens with 0x80."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _load_program(path: str, trust: bool) -> LoadedModel:
    """A ``.pt2``: checked and loaded without running anything from the file (``pt2_safe``);
    with ``trust`` (``--trust-pickle``) one that is not plain data is loaded by
    ``torch.export.load`` itself."""
    from flurka_rewrite.pt2_safe import UnsafeProgramError, load_program

    with _quiet_torch_export():
        try:
            ep = load_program(path)
        except UnsafeProgramError as e:
            if not trust:
                raise UnsafePickleError(
                    f"{path!r} is refused: {e}. Loading it could run code from the file; if "
                    "you trust where it came from, rerun with --trust-pickle") from e
            ep = _trusted_program(path)
        except OSError as e:
            raise InputFileError(f"could not read {path!r}: {e.strerror or e}") from e
        except Exception as e:
            raise InputFileError(f"could not load the torch.export program {path!r} "
                                 f"({type(e).__name__}: {_one_line(e)})") from e
        try:
            module = ep.module()
        except Exception as e:
            raise InputFileError(f"could not rebuild the module of the torch.export program "
                                 f"{path!r} ({type(e).__name__}: {_one_line(e)})") from e
    recorded = None
    try:
        ex = ep.example_inputs
        if ex is not None:
            recorded = (tuple(ex[0]), dict(ex[1]))
    except Exception:  # noqa: BLE001 - programs saved without sample inputs
        recorded = None
    return LoadedModel(module=module, kind="pt2", source=path, recorded_inputs=recorded)


def _trusted_program(path: str) -> Any:
    """torch.export.load, once (the user vouched for the file)."""
    try:
        import transformers.modeling_outputs  # noqa: F401 - ModelOutput pytree classes
    except ImportError:
        pass
    try:
        with open(path, "rb") as f:
            return torch.export.load(f)
    except Exception as e:
        raise InputFileError(f"could not load the torch.export program {path!r} "
                             f"({type(e).__name__}: {_one_line(e)})") from e


def _looks_like_state_dict(obj: Any) -> bool:
    if isinstance(obj, dict) and obj:
        return all(isinstance(v, torch.Tensor) or _looks_like_state_dict(v) for v in obj.values())
    return False


def _load_pickle(path: str, *, trust_pickle: bool) -> LoadedModel:
    # First the safe loader: it reads state_dicts and tensors but no classes.
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise InputFileError(f"{path!r} is not a readable PyTorch file: "
                                 f"{_one_line(e)}") from e
        if not trust_pickle:
            raise UnsafePickleError(
                f"{path!r} is a pickled Python object (e.g. torch.save(model)); unpickling it "
                "can execute arbitrary code, so it is refused. If you trust where this file "
                "came from, rerun with --trust-pickle; safer: save the model with "
                "torch.export (.pt2) or as a Hugging Face directory") from e
        obj = _load_trusted(path)
    except Exception as e:
        raise InputFileError(f"{path!r} is not a readable PyTorch file (truncated or corrupt?): "
                             f"{type(e).__name__}: {_one_line(e)}") from e
    if isinstance(obj, nn.Module):
        return LoadedModel(module=obj.eval(), kind="pickle", source=path)
    if _looks_like_state_dict(obj):
        n = sum(1 for _ in _tensors(obj))
        raise NotAModelError(
            f"{path!r} holds a state_dict ({n} tensors), not a model: it has no code to "
            "rewrite. Load it into your model in Python and call flurka_rewrite.convert, or "
            "save the model as a torch.export program (.pt2)")
    raise NotAModelError(f"{path!r} holds a {type(obj).__name__}, not an nn.Module")


def _load_trusted(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as e:
        raise InputFileError(f"could not unpickle {path!r}: {_one_line(e)} (the model's class "
                             "must be importable from the current environment)") from e
    except Exception as e:
        raise InputFileError(f"could not unpickle {path!r}: {_one_line(e)}") from e


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def _load_directory(path: str, quiet: bool) -> LoadedModel:
    if os.path.exists(os.path.join(path, "config.json")):
        return _load_hf(path, quiet)
    if os.path.exists(os.path.join(path, "recipe.json")):  # written by flurka_rewrite.save
        import flurka_rewrite as fr
        from flurka_rewrite.saving import read_recipe

        try:
            base = read_recipe(path).get("base_model")
            if isinstance(base, dict) and base.get("kind") != "huggingface":
                raise InputFileError(
                    f"{path!r} holds a converted {base.get('module')}.{base.get('class')}, which "
                    "the CLI cannot rebuild (only Hugging Face models are rebuilt from a save); "
                    "load it in Python: flurka_rewrite.load(path, base_model=<a new instance "
                    "of that class>)")
            return LoadedModel(module=fr.load(path), kind="flurka", source=path)
        except CliError:
            raise
        except Exception as e:
            raise InputFileError(f"could not load {path!r}: {_one_line(e)}") from e
    raise InputFileError(f"directory {path!r} has no config.json and no recipe.json: it is "
                         "neither a Hugging Face model directory nor one written by "
                         "flurka_rewrite.save")


def _load_hf(path: str, quiet: bool) -> LoadedModel:
    # Never download: local_files_only on every call (HF_HUB_OFFLINE only counts when set
    # before huggingface_hub is first imported).
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError as e:
        raise FeatureUnavailableError("loading a Hugging Face directory needs transformers: "
                                      "pip install 'flurka-rewrite[hf]'") from e
    hf_log = transformers.utils.logging
    verbosity, bars = hf_log.get_verbosity(), hf_log.is_progress_bar_enabled()
    hf_log.set_verbosity_error()  # config notes are not our errors
    if quiet:
        hf_log.disable_progress_bar()
    try:
        return _load_hf_quietly(transformers, path)
    finally:
        hf_log.set_verbosity(verbosity)
        if bars:
            hf_log.enable_progress_bar()


def _load_hf_quietly(transformers: Any, path: str) -> LoadedModel:
    try:
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
    except Exception as e:
        raise InputFileError(f"could not read {os.path.join(path, 'config.json')!r}: "
                             f"{_one_line(e)}") from e
    if isinstance(raw, dict) and raw.get("auto_map"):
        raise InputFileError(
            f"{os.path.join(path, 'config.json')!r} maps the model to custom code in the "
            f"directory (auto_map: {', '.join(sorted(map(str, raw['auto_map'])))}); "
            "flurka-rewrite never runs code from a model directory: load the model yourself "
            "and call flurka_rewrite.convert(model, ...)")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True,
                                                         trust_remote_code=False)
    except Exception as e:
        raise InputFileError(f"could not read {os.path.join(path, 'config.json')!r}: "
                             f"{_one_line(e)}") from e
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    cls = cls or transformers.AutoModel
    try:
        model = cls.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise InputFileError(f"could not load the Hugging Face model in {path!r} with "
                             f"{cls.__name__}: {_one_line(e)}") from e
    return LoadedModel(module=model.eval(), kind="hf", source=path, hf_config=config)


def _one_line(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
