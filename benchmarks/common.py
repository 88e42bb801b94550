"""Timing helpers shared by the benchmark scripts.

Every measurement runs the candidates *interleaved* (A B C A B C ...) rather than one after
the other, so a slow drift of the machine (turbo, another process, thermal) hits all of them
alike, and reports the median of the repetitions, which ignores the odd outlier.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch


def set_threads(num_threads: int | None = None) -> int:
    """Use ``num_threads`` intra-op threads (default: every core the process may run on)."""
    if num_threads is None:
        try:
            num_threads = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS / Windows
            num_threads = os.cpu_count() or 1
    torch.set_num_threads(num_threads)
    return num_threads


def time_once(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``fn`` (CUDA work is synchronised before and after)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved_median(
    fns: dict[str, Callable[[], object]], *, reps: int = 5, warmup: int = 1,
    budget_s: float | None = None,
) -> dict[str, dict[str, float]]:
    """Time every callable of ``fns`` ``reps`` times, interleaved, after ``warmup`` untimed
    rounds. ``budget_s``: stop adding rounds (never below 3) once this many seconds were spent.

    Returns {name: {"median_ms", "min_ms", "max_ms", "reps"}}.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(reps):
        for name, fn in fns.items():
            times[name].append(time_once(fn))
        if budget_s is not None and r + 1 >= 3 and time.perf_counter() - start > budget_s:
            break
    return {
        name: {
            "median_ms": 1e3 * statistics.median(ts),
            "min_ms": 1e3 * min(ts),
            "max_ms": 1e3 * max(ts),
            "reps": len(ts),
        }
        for name, ts in times.items()
    }


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo or lscpu), or platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(num_threads: int) -> dict[str, object]:
    """What a result file needs to be compared with another: date, CPU, cores, versions."""
    return {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "threads": num_threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON, creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (it also reads well in a terminal)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])
