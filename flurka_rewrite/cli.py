"""``flurka-rewrite``: convert a model file's softmax attention into FLuRKA attention.

    flurka-rewrite INPUT -o OUTPUT [--kernel K] [--dk N|auto|none] [--num-features M]
        [--example-shape B,N] [--max-seq-len N] [--e-init pool|gaussian] [--no-hoist]
        [--only GLOB] [--skip GLOB] [--report FILE.json|FILE.md] [--dry-run]
        [--onnx FILE.onnx] [--seed S] [--backend B] [--trust-pickle] [--force] [--demo]

Steps (one progress line each on stderr): load, convert, measure, write. The report table goes
to stdout. Every error is one line on stderr and a distinct exit code (``EXIT_CODES``).
"""
from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import time
import warnings
from typing import Any, Iterator, NoReturn

import torch

from flurka_rewrite.passes.config import KERNEL_CHOICES, RewriteConfig
from flurka_rewrite import cli_options
from flurka_rewrite.convert import DkNotBelowLengthWarning  # (not lazy: the tests swap convert)
from flurka_rewrite.end_to_end import first_tensor as _first_tensor
from flurka_rewrite.example_inputs import (
    default_shape, example_inputs_for, seq_len_of, shape_text,
)
from flurka_rewrite.kernels.reference import rel_error
from flurka_rewrite.io import (
    PROG, CliError, ConversionError, LoadedModel, NoAttentionError, UsageError, _one_line,
    load_model,
)
from flurka_rewrite.outputs import (
    FILE_SUFFIXES, check_output, inside, publishing, real_path, split_inputs, write_model,
    write_text,
)
from flurka_rewrite.kernels.dispatch import BACKENDS

EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: rerun with --debug and report the traceback)",
    2: "invalid option (--dk 0, a sequence longer than the model allows, unknown kernel, "
       "...)",
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
    p.add_argument("-o", "--output", metavar="OUTPUT",
                   help="converted model: OUT.pt2, OUT.pt, a directory, or OUT.onnx")
    p.add_argument("--demo", action="store_true",
                   help="use the built-in demo transformer as INPUT (no file, no download)")
    p.add_argument("--kernel", default="auto", metavar="K",
                   help=f"feature map: {', '.join(KERNEL_CHOICES)} (default auto)")
    p.add_argument("--dk", default=None, metavar="N|auto|none",
                   help="rank of the sequence projection; none = no low-rank (default 256, "
                        "or auto when the example is not longer than 256)")
    p.add_argument("--num-features", type=int, metavar="M", help="performer features m")
    p.add_argument("--example-shape", metavar="B,N",
                   help="example input shape: token ids (B, N) for models with an embedding, "
                        "floats (B, N, d) for models that start with a Linear (default for "
                        "a Hugging Face text model: 2, its position limit capped at 512)")
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
    from flurka_rewrite import __version__

    cli_options.add_options(p, __version__)
    return p


def parse_dk(text: str) -> int | str | None:
    """'auto' -> 'auto', 'none' -> None, '64' -> 64."""
    low = text.strip().lower()
    if low in ("auto", "none"):
        return None if low == "none" else "auto"
    try:
        return int(low)
    except ValueError:
        raise UsageError(f"--dk must be a positive integer, 'auto' or 'none'; got {text!r}"
                         ) from None


def parse_shape(text: str) -> tuple[int, int]:
    """'2,256' -> (2, 256)."""
    try:
        B, N = (int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--example-shape must be B,N (two integers), got {text!r}") from None
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


# -- the run ---------------------------------------------------------------------------------
def _call(model: torch.nn.Module, inputs: Any) -> Any:
    args, kwargs = split_inputs(inputs)
    with torch.no_grad():
        return model(*args, **kwargs)


def end_to_end_error(original: torch.nn.Module, converted: torch.nn.Module,
                     inputs: Any) -> float | None:
    """||y' - y|| / ||y|| of the models' first output tensor on ``inputs``: the number
    ``convert`` measured on these inputs (``report.end_to_end_error``), else measured here
    (an error when the converted model fails on them)."""
    report = getattr(converted, "flurka_report", None)
    if getattr(report, "end_to_end_error", None) is not None and \
            getattr(converted, "flurka_example_inputs", None) is inputs:
        return report.end_to_end_error
    ref, out = _first_tensor(_call(original, inputs)), _first_tensor(_call(converted, inputs))
    if ref is None or out is None or ref.shape != out.shape:
        return None
    return rel_error(out, ref)


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
    options = dict(kernel=args.kernel, dk=cli_options.DEFAULT_DK if args.dk is None
                   else parse_dk(args.dk), num_features=args.num_features,
                   backend=args.backend, seed=args.seed, **cli_options.extra_options(args))
    try:
        RewriteConfig(**options)
    except ValueError as e:
        raise UsageError(f"invalid option: {e}") from e
    sources = [] if args.demo else [args.input]
    outputs = [(args.output, (*FILE_SUFFIXES, ".onnx", "dir"))
               if args.output and not args.dry_run
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
            if real_path(other) == real_path(path) or inside(real_path(path), real_path(other)):
                raise UsageError(f"outputs {other!r} and {path!r} are the same path or one "
                                 "lies inside the other; give each output its own path")
        kinds.append(check_output(path, sources, args.force, suffixes))
    if kinds[0] == ".onnx" and args.onnx:
        raise UsageError(f"-o {args.output} already writes ONNX; drop --onnx {args.onnx} (or "
                         "give -o a .pt2, .pt or directory output beside --onnx)")
    return options, kinds[0]


def _compile(loaded: LoadedModel, inputs: Any, options: dict[str, Any], dry_run: bool,
             quiet: bool = False) -> tuple[Any, torch.nn.Module | None]:
    """plan (dry run) or convert; the compiler's failures mapped onto CLI errors, its
    ``DkNotBelowLengthWarning`` printed as a warning line."""
    from flurka_rewrite.convert import convert, plan

    name = type(loaded.module).__name__
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DkNotBelowLengthWarning)
            # the CLI says it itself, as its one error line
            warnings.filterwarnings("ignore", message="convert: all .* were skipped")
            if dry_run:
                report, new_model = plan(loaded.module, example_inputs=inputs, **options), None
            else:
                new_model = convert(loaded.module, example_inputs=inputs, **options)
                report = new_model.flurka_report
    except CliError:
        raise
    except ValueError as e:
        raise UsageError(f"invalid option for this model: {_one_line(e)}") from e
    except Exception as e:
        raise ConversionError(f"conversion of {name} failed: {type(e).__name__}: "
                              f"{_one_line(e)}") from e
    for w in caught:  # the compiler's warnings, after it: dk ones as the CLI's own lines
        if issubclass(w.category, DkNotBelowLengthWarning):
            if not quiet:
                _say(f"{PROG}: warning: {w.message}", sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if not report.sites:
        from flurka_rewrite.kernels.attention import FlurkaAttention
        if any(isinstance(m, FlurkaAttention) for m in loaded.module.modules()):
            raise NoAttentionError(f"{name} is already converted (it holds FlurkaAttention "
                                   "modules) and has no softmax attention left to rewrite; "
                                   "convert the original model instead")
        raise NoAttentionError(f"no attention found in {name}: nothing to rewrite")
    return report, new_model


def run(args: argparse.Namespace) -> int:
    """Validate, load, convert, measure, write. Raises ``CliError`` on every failure."""
    import flurka_rewrite as fr

    options, out_kind = _validate(args)
    shape = parse_shape(args.example_shape) if args.example_shape is not None else None
    progress = _Progress(3 if args.dry_run else 4, args.quiet)
    progress.step(f"loading {'the demo model' if args.demo else repr(args.input)}")
    loaded = _load(args)
    inputs = example_inputs_for(loaded, shape or default_shape(loaded), seed=args.seed)
    options["dk"], note = cli_options.resolve_default_dk(options["dk"], args.dk is not None,
                                                         seq_len_of(inputs))
    shown = f"example {shape_text(inputs)}, " if inputs is not None else ""
    progress.step(f"{'planning' if args.dry_run else 'converting'} "
                  f"{type(loaded.module).__name__} ({shown}kernel={args.kernel}, "
                  f"dk={options['dk'] if options['dk'] is not None else 'none'}"
                  f"{'; ' + note if note else ''})")
    report, new_model = _compile(loaded, inputs, options, args.dry_run, args.quiet)
    if new_model is not None and not report.rewritten:
        _say(str(report))  # the reasons, one per site
        raise ConversionError(
            f"all {len(report.sites)} attention sites were skipped (the reasons are in the "
            "report printed on stdout), so nothing was written"
            + ("; most often the fix is example inputs: pass --example-shape B,N"
               if inputs is None else "")
            + ("; no site's module path matched --only / was left by --skip"
               if (args.only or args.skip) and all(
                   s.reason == "excluded by filter_fn" for s in report.sites) else ""))
    err = None
    if new_model is not None:
        if inputs is not None:
            progress.step("measuring the converted model on the example inputs")
            try:
                err = end_to_end_error(loaded.module, new_model, inputs)
            except Exception as e:
                raise ConversionError(f"the converted model fails on the example inputs: "
                                      f"{type(e).__name__}: {_one_line(e)}") from e
        else:
            progress.step("not measured: no example inputs (pass --example-shape B,N to "
                          "measure the converted model's error)")
    report.end_to_end_error = err if err is not None else report.end_to_end_error
    _say(str(report))  # ends with the end-to-end error and "what next"
    if args.report:
        write_text(args.report, report.to_json() if args.report.lower().endswith(".json")
                   else report.to_markdown(), args.force)
    if new_model is None:
        return 0
    progress.step(f"writing {args.output!r}")
    onnx_path = args.output if out_kind == ".onnx" else args.onnx
    if out_kind != ".onnx":
        write_model(new_model, out_kind, args.output, inputs, args.force)
    if onnx_path:
        if inputs is None:
            raise ConversionError("ONNX export needs example inputs: pass --example-shape B,N")
        try:
            with publishing(onnx_path):
                fr.export_onnx(new_model, inputs, onnx_path)  # writes atomically itself
        except CliError:
            raise
        except Exception as e:
            raise ConversionError(f"ONNX export failed: {_one_line(e)}") from e
    if not args.quiet:
        _say(f"{PROG}: wrote {args.output}" + (f" and {args.onnx}" if args.onnx and
                                                 onnx_path != args.output else ""),
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
    except Exception as e:
        if debug:
            raise
        _say(f"{PROG}: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug "
             "for the traceback)", sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
