"""The CLI's outputs: checking an output path before any work (never an input, never
someone else's directory, writable), and writing the converted model (``.pt2``, ``.pt`` or a
save directory) and the report so that no failure leaves a partial file
(passes/atomic.py). Write failures become the CLI's errors (exit 8 or 10)."""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from typing import Any, Callable, Iterator

import torch

from flurka_rewrite.io import (
    PROG, ConversionError, OutputExistsError, OutputWriteError, UsageError, _one_line,
)
from flurka_rewrite.passes.atomic import atomic_write, write_bytes

FILE_SUFFIXES = (".pt2", ".pt", ".pth")


def real_path(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies inside it (real paths: links resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_apart(path: str, sources: list[str]) -> None:
    """No output may be an input, contain one, or lie inside an input directory."""
    out = real_path(path)
    for src in sources:
        real = real_path(src)
        if out == real or (os.path.exists(path) and os.path.exists(src)
                           and os.path.samefile(path, src)):
            raise OutputExistsError(f"output {path!r} is the input {src!r}; {PROG} never "
                                    "overwrites an input: choose another output path")
        if inside(real, out):
            raise OutputExistsError(f"output {path!r} contains the input {src!r}; writing it "
                                    "would delete the input: choose another output path")
        if os.path.isdir(src) and inside(out, real):
            raise OutputExistsError(f"output {path!r} lies inside the input directory {src!r}; "
                                    f"{PROG} never writes into an input: choose a path outside it")


def _check_writable(path: str) -> None:
    """The folder an output goes to (or its nearest existing ancestor) takes a new file."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise OutputWriteError(f"cannot write {path!r}: {folder!r} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".flurka-{os.getpid()}-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputWriteError(f"cannot write {path!r}: {folder!r} is not writable "
                               f"({e.strerror or e}); choose another output path") from e


def check_output(path: str, sources: list[str], force: bool, suffixes: tuple[str, ...]) -> str:
    """Validate an output path before any work; return its suffix (or "dir")."""
    _check_apart(path, sources)
    ext = os.path.splitext(path.rstrip(os.sep))[1].lower()
    is_dir = path.endswith(os.sep) or not ext or (os.path.isdir(path) and ext not in suffixes)
    kind = "dir" if is_dir else ext
    path = path.rstrip(os.sep) or path  # "file/" names the file, for the checks below
    if kind not in suffixes:
        raise UsageError(f"unsupported output {path!r}: expected one of "
                         f"{', '.join(s if s != 'dir' else 'a directory' for s in suffixes)}")
    if os.path.lexists(path):
        if kind != "dir" and os.path.isdir(path):
            raise OutputExistsError(f"output {path!r} exists and is a directory; {PROG} writes "
                                    f"a {kind} file there only in place of a file")
        if kind == "dir" and not os.path.isdir(path):
            raise OutputExistsError(f"output {path!r} exists and is not a directory; choose "
                                    "another path for the save directory")
        if kind == "dir" and not os.listdir(path):
            pass  # an empty directory is filled without --force
        elif not force:
            raise OutputExistsError(f"output {path!r} exists; pass --force to overwrite it")
        elif kind == "dir":
            from flurka_rewrite.saving import foreign_files

            foreign = foreign_files(path)
            if foreign is not None:
                raise OutputExistsError(
                    f"output {path!r} is not a directory written by {PROG} (it holds "
                    f"{', '.join(foreign)}); refusing to replace it even with --force: "
                    "choose a new directory")
    _check_writable(path)
    return kind


@contextlib.contextmanager
def publishing(path: str) -> Iterator[None]:
    """Map write failures onto the CLI's errors; the writers leave no partial file."""
    try:
        yield
    except FileExistsError as e:
        raise OutputExistsError(f"output {path!r} appeared while converting (another run?); "
                                "nothing was written: pass --force to overwrite it") from e
    except OSError as e:
        raise OutputWriteError(f"could not write {path!r}: {e.strerror or e}; nothing was "
                               "written (an earlier file there is unchanged)") from e


def split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if inputs is None:
        return (), {}
    return ((), dict(inputs)) if isinstance(inputs, dict) else (tuple(inputs), {})


def _in_memory(save: Callable[[Any], None]) -> bytes:
    """What ``save(file)`` writes, as bytes (torch's C++ writer aborts the process on a full
    disk; Python's file writes raise instead)."""
    buf = io.BytesIO()
    save(buf)
    return buf.getvalue()


def export_program(model: torch.nn.Module, inputs: Any, path: str, force: bool = True) -> None:
    """torch.export ``model`` on ``inputs`` (batch and sequence dims dynamic where the model
    allows, else static) and save it atomically to ``path``."""
    if inputs is None:
        raise UsageError("writing a .pt2 needs example inputs: pass --example-shape B,N")
    args, kwargs = split_inputs(inputs)
    config = getattr(model, "config", None)
    if kwargs and getattr(config, "use_cache", False) and "use_cache" not in kwargs:
        kwargs["use_cache"] = False  # HF decoders: a KV cache object is no exportable output
    auto = torch.export.Dim.AUTO
    spec = lambda t: {0: auto, 1: auto} if isinstance(t, torch.Tensor) and t.dim() >= 2 else None  # noqa: E731
    dyn = {k: spec(v) for k, v in kwargs.items()} if kwargs else tuple(spec(a) for a in args)
    model = model.eval()
    try:
        try:
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dyn)
        except Exception:  # noqa: BLE001 - fall back to the example shapes
            ep = torch.export.export(model, args, kwargs)
    except Exception as e:
        raise ConversionError(f"could not torch.export the converted model: {_one_line(e)}; "
                              "write a .pt output instead") from e
    data = _in_memory(lambda f: torch.export.save(ep, f))
    with publishing(path):
        atomic_write(path, lambda tmp: write_bytes(tmp, data), replace=force)


def write_text(path: str, text: str, force: bool) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; replace an existing file only with
    ``force``."""
    with publishing(path):
        atomic_write(path, lambda tmp: write_bytes(tmp, text.encode("utf-8")), replace=force)


def write_model(model: torch.nn.Module, kind: str, path: str, inputs: Any,
                force: bool = True) -> None:
    """Write the converted model as ``.pt2``, ``.pt``/``.pth`` or a save directory; replace an
    existing output only with ``force``."""
    if kind == ".pt2":
        export_program(model, inputs, path, force)
    elif kind in (".pt", ".pth"):
        try:
            data = _in_memory(lambda f: torch.save(model, f))
        except Exception as e:
            raise ConversionError(f"could not torch.save the converted model: {type(e).__name__}:"
                                  f" {_one_line(e)}; write a .pt2 instead") from e
        with publishing(path):
            atomic_write(path, lambda tmp: write_bytes(tmp, data), replace=force)
    else:
        import flurka_rewrite as fr

        # fr.save writes atomically and only ever replaces an earlier save directory.
        with publishing(path):
            fr.save(model, path, example_inputs=inputs, overwrite=force)
