"""Shared plumbing of the up-training examples: command line, JSON figures, loss-curve plots.

Each example exposes ``run(cfg) -> dict`` (its figures) so the test suite can call it at tiny
sizes; ``main()`` parses ``--quick`` / ``--json PATH`` / ``--plot PATH`` and prints the figures.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch


def parser(description: str, default_plot: str) -> argparse.ArgumentParser:
    """The options every example takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few steps: a few minutes on a 2-core CPU")
    p.add_argument("--json", metavar="PATH", help="write the figures to PATH as JSON")
    p.add_argument("--plot", metavar="PATH", default=default_plot,
                   help=f"PNG of the loss curves (default: {default_plot}); 'none' to skip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    return p


def setup(args: argparse.Namespace) -> None:
    """Seed and thread count from the parsed options."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)


def write_json(path: str | os.PathLike, figures: dict[str, Any]) -> None:
    """Write ``figures`` to ``path`` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


def plot_curves(path: str | os.PathLike, panels: dict[str, dict[str, Sequence[float]]],
                title: str) -> None:
    """One subplot per panel (e.g. "distillation", "fine-tuning"), one line per curve, saved as a
    PNG. matplotlib is imported here so ``run`` works without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is in the [examples] extra
        raise SystemExit("plotting needs matplotlib: pip install 'flurka-rewrite[examples]', "
                         "or pass --plot none") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (name, curves) in zip(axes[0], panels.items()):
        for label, ys in curves.items():
            ax.plot(range(1, len(ys) + 1), list(ys), label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(args: argparse.Namespace, figures: dict[str, Any],
           panels: dict[str, dict[str, Sequence[float]]], title: str) -> None:
    """Print the figures, write the JSON and the plot as asked."""
    print(json.dumps({k: v for k, v in figures.items() if not isinstance(v, (list, dict))},
                     indent=2, sort_keys=True))
    if args.json:
        write_json(args.json, figures)
        print(f"figures written to {args.json}")
    if args.plot and args.plot != "none":
        plot_curves(args.plot, panels, title)
        print(f"plot written to {args.plot}")
