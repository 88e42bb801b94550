"""``flurka-rewrite``: convert a model file's softmax attention into FLuRKA attention.

    flurka-rewrite INPUT -o OUTPUT [--kernel K] [--dk N|auto|none] [--num-features M]
        [--example-shape B,N] [--report FILE.json|FILE.md] [--dry-run] [--onnx FILE.onnx]
        [--seed S] [--backend B] [--trust-pickle] [--force] [--demo]

Steps (one progress line each on stderr): load, convert, measure, write. The report table goes
to stdout. Every error is one line on stderr and a distinct exit code (``EXIT_CODES``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import signal
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Iterator, NoReturn

import torch

from flurka_rewrite.atomic import atomic_write, write_bytes
from flurka_rewrite.config import KERNEL_CHOICES, RewriteConfig
from flurka_rewrite.io import (
    CliError, ConversionError, LoadedModel, NoAttentionError,
    OutputExistsError, OutputWriteError, UsageError, _one_line, example_inputs_for, load_model, seq_len_of,
)
from flurka_rewrite.kernels.dispatch import BACKENDS

PROG = "flurka-rewrite"
EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: rerun with --debug and report the traceback)",
    2: "invalid option (--dk 0, --dk larger than the sequence, unknown kernel, ...)",
    3: "input missing, unreadable, truncated or corrupt",
    4: "input refused: loading it could run code from the file (a pickled model, or a "
       ".pt2 that is not plain data; see --trust-pickle)",
    5: "the input holds weights (a state_dict), not a model",
    6: "no attention found in the model",
    7: "conversion failed, every attention site was skipped, or the converted model could "
       "not be exported",
    8: "output exists (use --force), is not a save of this tool (never replaced), or is, "
       "holds or lies inside an input (never written)",
    9: "a needed optional package is missing (e.g. transformers for a Hugging Face directory)",
    10: "an output could not be written (read-only or full disk, no permission); nothing "
        "was written",
    130: "interrupted (Ctrl-C); temporaries removed, nothing written",
    143: "terminated (SIGTERM); temporaries removed, nothing written",
}


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (escape sequences from a model's
    config.json, say) and undecodable bytes of file names are shown escaped, not sent."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _say(text: str, stream: Any = None) -> None:
    print(printable(text), file=stream or sys.stdout, flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; its epilog documents the exit codes."""
    epilog = "exit codes:\n" + "\n".join(f"  {c:>3}  {t}" for c, t in EXIT_CODES.items())
    epilog += (
        "\n\ninputs: a torch.export program (.pt2), a Hugging Face model directory (config.json"
        "\n+ safetensors, loaded offline), or with --trust-pickle a torch.save(model) file."
        "\noutputs: OUT.pt2 (torch.export of the converted model on the example inputs) or"
        "\nOUT.pt (torch.save of the module: loading it back runs pickle, so only load files"
        "\nyou trust, with torch.load(path, weights_only=False)).")
    p = _Parser(prog=PROG, description="Replace the softmax attention of a model by FLuRKA "
                "attention (low-rank + kernel)\nand report every attention site found.",
                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", metavar="INPUT", help="model file or directory")
    p.add_argument("-o", "--output", metavar="OUTPUT", help="converted model: OUT.pt2 or OUT.pt")
    p.add_argument("--demo", action="store_true",
                   help="use the built-in demo transformer as INPUT (no file, no download)")
    p.add_argument("--kernel", default="auto", metavar="K",
                   help=f"feature map: {', '.join(KERNEL_CHOICES)} (default auto)")
    p.add_argument("--dk", default="256", metavar="N|auto|none",
                   help="rank of the sequence projection; none = no low-rank (default 256)")
    p.add_argument("--num-features", type=int, metavar="M", help="performer features m")
    p.add_argument("--example-shape", metavar="B,N",
                   help="example input shape: token ids (B, N) for models with an embedding, "
                        "floats (B, N, d) for models that start with a Linear")
    p.add_argument("--report", metavar="FILE.json|FILE.md", help="also write the report")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be rewritten; write no model (only --report if given)")
    p.add_argument("--onnx", metavar="FILE.onnx", help="also export the converted model to ONNX")
    p.add_argument("--seed", type=int, default=0, help="seed of E, F and random features")
    p.add_argument("--backend", default="auto", help=f"one of {', '.join(BACKENDS)}")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled model (.pt/.pth): this can run arbitrary code")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines or warnings")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def parse_dk(text: str) -> int | str | None:
    """'auto' -> 'auto', 'none' -> None, '64' -> 64."""
    low = text.strip().lower()
    if low in ("auto", "none"):
        return None if low == "none" else "auto"
    try:
        return int(low)
    except ValueError:
        raise UsageError(f"--dk must be a positive integer, 'auto' or 'none'; got {text!r}")


def parse_shape(text: str) -> tuple[int, int]:
    """'2,256' -> (2, 256)."""
    try:
        B, N = (int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--example-shape must be B,N (two integers), got {text!r}")
    if B < 1 or N < 1:
        raise UsageError(f"--example-shape sizes must be positive, got {text!r}")
    return B, N


class _Progress:
    """'[i/n] step ...' lines on stderr."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet, self.i, self.t0 = total, quiet, 0, time.perf_counter()

    def step(self, text: str) -> None:
        self.i += 1
        if not self.quiet:
            dt = time.perf_counter() - self.t0
            _say(f"{PROG}: [{self.i}/{self.total}] {text} (t={dt:.1f}s)", sys.stderr)


# -- outputs ---------------------------------------------------------------------------------
FILE_SUFFIXES = (".pt2", ".pt", ".pth")


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies inside it (real paths: links resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_apart(path: str, sources: list[str]) -> None:
    """No output may be an input, contain one, or lie inside an input directory."""
    out = _real(path)
    for src in sources:
        real = _real(src)
        if out == real or (os.path.exists(path) and os.path.exists(src)
                           and os.path.samefile(path, src)):
            raise OutputExistsError(f"output {path!r} is the input {src!r}; {PROG} never "
                                    "overwrites an input: choose another output path")
        if _inside(real, out):
            raise OutputExistsError(f"output {path!r} contains the input {src!r}; writing it "
                                    "would delete the input: choose another output path")
        if os.path.isdir(src) and _inside(out, real):
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
def _publishing(path: str) -> Iterator[None]:
    """Map write failures onto the CLI's errors; the writers leave no partial file."""
    try:
        yield
    except FileExistsError as e:
        raise OutputExistsError(f"output {path!r} appeared while converting (another run?); "
                                "nothing was written: pass --force to overwrite it") from e
    except OSError as e:
        raise OutputWriteError(f"could not write {path!r}: {e.strerror or e}; nothing was "
                               "written (an earlier file there is unchanged)") from e


def _split(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
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
    args, kwargs = _split(inputs)
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
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"could not torch.export the converted model: {_one_line(e)}; "
                              "write a .pt output instead") from e
    data = _in_memory(lambda f: torch.export.save(ep, f))
    with _publishing(path):
        atomic_write(path, lambda tmp: write_bytes(tmp, data), replace=force)


def write_model(model: torch.nn.Module, kind: str, path: str, inputs: Any,
                force: bool = True) -> None:
    """Write the converted model as ``.pt2``, ``.pt``/``.pth`` or a save directory; replace an
    existing output only with ``force``."""
    if kind == ".pt2":
        export_program(model, inputs, path, force)
    elif kind in (".pt", ".pth"):
        try:
            data = _in_memory(lambda f: torch.save(model, f))
        except Exception as e:  # noqa: BLE001 - e.g. a class pickle cannot find by name
            raise ConversionError(f"could not torch.save the converted model: {type(e).__name__}:"
                                  f" {_one_line(e)}; write a .pt2 instead") from e
        with _publishing(path):
            atomic_write(path, lambda tmp: write_bytes(tmp, data), replace=force)
    else:
        import flurka_rewrite as fr

        # fr.save writes atomically and only ever replaces an earlier save directory.
        with _publishing(path):
            fr.save(model, path, example_inputs=inputs, overwrite=force)


# -- the run ---------------------------------------------------------------------------------
def _call(model: torch.nn.Module, inputs: Any) -> Any:
    args, kwargs = _split(inputs)
    with torch.no_grad():
        return model(*args, **kwargs)


def _first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor of a model output (tensor, tuple, dict or Hugging Face ModelOutput)."""
    leaves = torch.utils._pytree.tree_leaves(out)
    return next((t for t in leaves if isinstance(t, torch.Tensor)), None)


def end_to_end_error(original: torch.nn.Module, converted: torch.nn.Module,
                     inputs: Any) -> float | None:
    """||y' - y|| / ||y|| of the models' first output tensor on ``inputs``."""
    ref, out = _first_tensor(_call(original, inputs)), _first_tensor(_call(converted, inputs))
    if ref is None or out is None or ref.shape != out.shape:
        return None
    ref, out = ref.double(), out.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _load(args: argparse.Namespace) -> LoadedModel:
    if args.demo:
        from flurka_rewrite.demo import build_demo_model

        return LoadedModel(module=build_demo_model(), kind="demo", source="<demo>")
    return load_model(args.input, trust_pickle=args.trust_pickle, quiet=args.quiet)


def _validate(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """Check every option and output path before any work; return the convert options and
    the output kind."""
    if args.demo == bool(args.input):
        raise UsageError("give exactly one of INPUT or --demo")
    if not args.output and not args.dry_run:
        raise UsageError("-o OUTPUT is required (or --dry-run)")
    options = dict(kernel=args.kernel, dk=parse_dk(args.dk), num_features=args.num_features,
                   backend=args.backend, seed=args.seed)
    try:
        RewriteConfig(**options)
    except ValueError as e:
        raise UsageError(f"invalid option: {e}") from e
    sources = [] if args.demo else [args.input]
    outputs = [(args.output, (*FILE_SUFFIXES, "dir")) if args.output and not args.dry_run
               else None, (args.report, (".json", ".md")) if args.report else None,
               (args.onnx, (".onnx",)) if args.onnx and not args.dry_run else None]
    kinds = []
    for i, entry in enumerate(outputs):
        if entry is None:
            kinds.append(None)
            continue
        path, suffixes = entry
        others = [o[0] for o in outputs[:i] if o is not None]
        for other in others:  # two outputs on one path would overwrite each other
            if _real(other) == _real(path) or _inside(_real(path), _real(other)):
                raise UsageError(f"outputs {other!r} and {path!r} are the same path or one "
                                 "lies inside the other; give each output its own path")
        kinds.append(check_output(path, sources, args.force, suffixes))
    return options, kinds[0]


def _compile(loaded: LoadedModel, inputs: Any, options: dict[str, Any], dry_run: bool
             ) -> tuple[Any, torch.nn.Module | None]:
    """plan (dry run) or convert; the compiler's failures mapped onto CLI errors."""
    from flurka_rewrite.convert import convert, plan

    name = type(loaded.module).__name__
    try:
        if dry_run:
            report, new_model = plan(loaded.module, example_inputs=inputs, **options), None
        else:
            with warnings.catch_warnings():  # the CLI says it itself, as its one error line
                warnings.filterwarnings("ignore", message="convert: all .* were skipped")
                new_model = convert(loaded.module, example_inputs=inputs, **options)
            report = new_model.flurka_report
    except CliError:
        raise
    except ValueError as e:
        raise UsageError(f"invalid option for this model: {_one_line(e)}") from e
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"conversion of {name} failed: {type(e).__name__}: "
                              f"{_one_line(e)}") from e
    if not report.sites:
        from flurka_rewrite.attention import FlurkaAttention
        if any(isinstance(m, FlurkaAttention) for m in loaded.module.modules()):
            raise NoAttentionError(f"{name} is already converted (it holds FlurkaAttention "
                                   "modules) and has no softmax attention left to rewrite; "
                                   "convert the original model instead")
        raise NoAttentionError(f"no attention found in {name}: nothing to rewrite")
    return report, new_model


def _write_text(path: str, text: str, force: bool) -> None:
    with _publishing(path):
        atomic_write(path, lambda tmp: write_bytes(tmp, text.encode("utf-8")), replace=force)


def run(args: argparse.Namespace) -> int:
    """Validate, load, convert, measure, write. Raises ``CliError`` on every failure."""
    import flurka_rewrite as fr

    options, out_kind = _validate(args)
    shape = parse_shape(args.example_shape) if args.example_shape is not None else None
    progress = _Progress(3 if args.dry_run else 4, args.quiet)
    progress.step(f"loading {'the demo model' if args.demo else repr(args.input)}")
    loaded = _load(args)
    inputs = example_inputs_for(loaded, shape, seed=args.seed)
    n, dk = seq_len_of(inputs), options["dk"]
    if isinstance(dk, int) and n is not None and dk > n:
        raise UsageError(f"--dk {dk} is larger than the sequence length {n} of the example "
                         f"inputs; choose --dk <= {n} or a longer --example-shape")
    progress.step(f"{'planning' if args.dry_run else 'converting'} "
                  f"{type(loaded.module).__name__} (kernel={args.kernel}, dk={args.dk})")
    report, new_model = _compile(loaded, inputs, options, args.dry_run)
    if new_model is not None and not report.rewritten:
        _say(str(report))  # the reasons, one per site
        raise ConversionError(
            f"all {len(report.sites)} attention sites were skipped (the reasons are in the "
            "report printed on stdout), so nothing was written"
            + ("; most often the fix is example inputs: pass --example-shape B,N"
               if inputs is None else ""))
    err = None
    if new_model is not None:
        if inputs is not None:
            progress.step("measuring the converted model on the example inputs")
            try:
                err = end_to_end_error(loaded.module, new_model, inputs)
            except Exception as e:  # noqa: BLE001
                raise ConversionError(f"the converted model fails on the example inputs: "
                                      f"{type(e).__name__}: {_one_line(e)}") from e
        else:
            progress.step("not measured: no example inputs (pass --example-shape B,N to "
                          "measure the converted model's error)")
    measured = None if err is None else (
        f"end-to-end: relative error of the model output on the example inputs = {err:.3e}")
    _say(str(report) if measured is None else f"{report}\n{measured}")
    if args.report:
        _write_text(args.report, report.to_json() if args.report.lower().endswith(".json")
                    else report.to_markdown() + (f"\n{measured}\n" if measured else ""),
                    args.force)
    if new_model is None:
        return 0
    progress.step(f"writing {args.output!r}")
    write_model(new_model, out_kind, args.output, inputs, args.force)
    if args.onnx:
        try:
            with _publishing(args.onnx):
                fr.export_onnx(new_model, inputs, args.onnx)  # writes atomically itself
        except CliError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"ONNX export failed: {_one_line(e)}") from e
    if not args.quiet:
        _say(f"{PROG}: wrote {args.output}" + (f" and {args.onnx}" if args.onnx else ""),
             sys.stderr)
    return 0


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every ``finally`` removes its
    temporaries."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` while the CLI runs (main thread only)."""
    try:
        old = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code; errors are one line on stderr (``--debug``:
    the traceback)."""
    with _sigterm_raises():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            # Deprecation notes from torch/transformers internals are not the user's business.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            if args.quiet:
                warnings.simplefilter("ignore")
            return run(args)
    except CliError as e:
        if debug:
            raise
        _say(f"{PROG}: error: {e}", sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{PROG}: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    except Exception as e:  # noqa: BLE001 - never a raw traceback
        if debug:
            raise
        _say(f"{PROG}: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug "
             "for the traceback)", sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
