"""The CLI's conversion options beyond kernel / dk (docs/cli.md): ``--max-seq-len``,
``--e-init``, ``--no-hoist``, ``--only`` / ``--skip`` (path globs, mapped to ``filter_fn``),
``--window``, ``--version``; and the default ``--dk`` resolved against the example's sequence
length."""
from __future__ import annotations

import argparse
import fnmatch
from typing import Any, Callable

from flurka_rewrite.passes.config import E_INIT_CHOICES

# --dk when not given: this rank where the example is longer; "auto" (the cost model) where it
# is not, since a rank at or above the sequence length saves nothing.
DEFAULT_DK = 256


def add_options(p: argparse.ArgumentParser, version: str) -> None:
    """Add the options of this module to the CLI's parser."""
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="longest key sequence the low-rank layers accept (default: the "
                        "model's position limit, else the example's length)")
    p.add_argument("--e-init", choices=E_INIT_CHOICES, default="pool",
                   help="initialisation of the low-rank projections E, F (default pool)")
    p.add_argument("--no-hoist", action="store_true",
                   help="keep the down-sampling below the K/V projections")
    p.add_argument("--only", action="append", default=[], metavar="GLOB",
                   help="rewrite only the sites whose module path matches GLOB (repeatable)")
    p.add_argument("--skip", action="append", default=[], metavar="GLOB",
                   help="leave the sites whose module path matches GLOB as they are "
                        "(repeatable; wins over --only)")
    p.add_argument("--keep-exact", type=int, metavar="K",
                   help="keep the K sites with the largest measured error as the original "
                        "attention (hybrid by layer)")
    p.add_argument("--max-rel-error", type=float, metavar="X",
                   help="keep as the original attention every site whose measured error "
                        "exceeds X")
    p.add_argument("--window", type=int, metavar="W",
                   help="sliding-window hybrid: exact softmax over the W nearest keys beside "
                        "the kernel part, one shared normaliser (default: none)")
    p.add_argument("--version", action="version", version=f"%(prog)s {version}")


def site_filter(only: list[str], skip: list[str]) -> Callable[[str, Any], bool] | None:
    """``filter_fn`` from ``--only`` / ``--skip`` globs (fnmatch on the module path, e.g.
    ``encoder.layer.0.*``); None when neither is given."""
    if not only and not skip:
        return None

    def keep(module_path: str, site: Any = None) -> bool:
        if any(fnmatch.fnmatchcase(module_path, g) for g in skip):
            return False
        return not only or any(fnmatch.fnmatchcase(module_path, g) for g in only)

    keep.__name__ = " ".join([*(f"only({g})" for g in only), *(f"skip({g})" for g in skip)])
    return keep


def extra_options(args: argparse.Namespace) -> dict[str, Any]:
    """convert's keywords from these options (a bad --max-seq-len is RewriteConfig's error)."""
    return dict(max_seq_len=args.max_seq_len, e_init=args.e_init, hoist=not args.no_hoist,
                filter_fn=site_filter(args.only, args.skip), keep_exact=args.keep_exact,
                max_rel_error=args.max_rel_error, window=args.window)


def resolve_default_dk(dk: int | str | None, given: bool, n: int | None
                       ) -> tuple[int | str | None, str | None]:
    """(dk, a note for the progress line): ``--dk`` as given, or the default: 256 when the
    example is longer than 256 (or its length is unknown), else "auto"."""
    if given or n is None or n > DEFAULT_DK:
        return dk, None
    return "auto", (f"dk=auto: the default --dk {DEFAULT_DK} is not below the example's "
                    f"sequence length {n}")
