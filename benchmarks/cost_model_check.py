"""Does the cost model rank full / Linformer / kernel / FLuRKA attention as the clock does?

    .venv/bin/python benchmarks/cost_model_check.py            # full grid (~5-8 min, 2 cores)
    .venv/bin/python benchmarks/cost_model_check.py --quick    # 14 points (~1 min)
    .venv/bin/python benchmarks/cost_model_check.py --json out.json --threads 1

For every grid point (N, dm, H, dh, dk) one attention layer *with its projections* (q, k, v, o
nn.Linear, B = 1, fp32, inference mode) is timed for four methods, interleaved (median):

  full     K/V projections on N rows, F.scaled_dot_product_attention
  lowrank  Linformer, hoisted like the compiler does: K, V projected from E X, F X (dk rows),
           softmax over dk keys
  kernel   kernel-only (``--kernel``, default performer), projections on N rows
  flurka   FLuRKA with the same kernel, hoisted (dk rows)

The cost model's prediction for each method is ``passes.cost_model.site_flops`` (the K/V
projections and the attention; the Q and output projections are the same for every method, so
they do not change the ranking). The script reports the fraction of points where the predicted
cheapest method is the measured fastest (target >= 85% on CPU), pairwise ordering accuracy,
Kendall's tau, and for every miss the measured slowdown of the predicted choice against the
true fastest. The same is reported for the decision that ``kernel="auto"`` makes with a fixed
dk (its candidates: full, kernel, flurka; it never picks Linformer).

FLOPs price every operation alike; the clock does not (an exp costs tens of GEMM FLOPs, the
pool E is applied in 32-row bands), and the FLOP ranking's few misses lean one way: it picks
performer FLuRKA over Linformer at the largest dk where Linformer is measured faster. So the same
rankings are also scored with the measured calibration (``passes/calibration.py``: seconds per
GEMM FLOP, per elementwise op, per exp, per SDPA FLOP, fitted on its own small set of layers,
not on this grid, and cached), the model behind ``FLURKA_CALIBRATION=1`` for
``kernel="auto"`` / ``dk="auto"``. ``--calibration``: cache (default; measured first when
missing or taken with another thread count), measure, none, or a JSON path.

Grid shapes (dm, H, dh): BERT-base (768, 12, 64); narrow (256, 4, 64); (512, 8, 64); wide
heads (1024, 8, 128); small heads (512, 16, 32); and the FLuRKA paper's speed setting
(dm = 2600, H = 8, dh = 325, dk = 1500) scaled down by 4 in dm, H and dk so that it runs on a
CPU: dm = 650, H = 2, dh = 325 (kept: it sets the feature-map cost), dk = 375 (Claim 1 holds:
N > dk(H+2) = 1500 > dm > dk > dh).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, interleaved_median, machine_info, set_threads, write_json

from flurka_rewrite.passes import calibration as calib
from flurka_rewrite.passes.calibration import SiteLayer, build_layer
from flurka_rewrite.passes.cost_model import features_used, site_flops

METHODS = ("full", "lowrank", "kernel", "flurka")
AUTO_CANDIDATES = ("full", "kernel", "flurka")  # what kernel="auto" (pretrained) chooses among
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "cost_model_check.json"


@dataclass(frozen=True)
class Shape:
    """Layer geometry: model width dm, heads H, head dim dh."""

    name: str
    dm: int
    H: int
    dh: int


BERT = Shape("bert", 768, 12, 64)
NARROW = Shape("narrow", 256, 4, 64)
MID = Shape("mid", 512, 8, 64)
WIDE_HEADS = Shape("wide-heads", 1024, 8, 128)
SMALL_HEADS = Shape("small-heads", 512, 16, 32)
PAPER_SCALED = Shape("paper/4", 650, 2, 325)  # paper: dm=2600, H=8, dh=325, dk=1500

# (shape, lengths, ranks): every (N, dk) pair with dk < N is a grid point.
FULL_GRID = [
    (BERT, (1024, 2048, 4096, 8192, 16384), (64, 128, 256, 512)),
    (NARROW, (1024, 4096, 16384), (64, 128, 256)),
    (MID, (1024, 4096, 16384), (64, 128, 256, 512)),
    (WIDE_HEADS, (1024, 4096, 16384), (64, 256, 512)),
    (SMALL_HEADS, (1024, 4096, 16384), (64, 256)),
    (PAPER_SCALED, (2048, 4096, 8192), (128, 375)),
]
QUICK_GRID = [
    (BERT, (1024, 2048), (64, 256, 512)),
    (NARROW, (1024, 2048), (64, 256)),
    (SMALL_HEADS, (2048,), (64, 256)),
    (PAPER_SCALED, (2048,), (128, 375)),
]


def method_config(method: str, kernel: str, dk: int) -> tuple[str, int | None]:
    """(kernel, dk) that FlurkaAttention and the cost model use for ``method``."""
    return {"full": ("softmax", None), "lowrank": ("softmax", dk), "kernel": (kernel, None),
            "flurka": (kernel, dk)}[method]


def build_method(method: str, shape: Shape, N: int, dk: int,
                 kernel: str = "performer") -> SiteLayer:
    """The layer of ``method`` at length N (same seed, so the same projection weights)."""
    k, d = method_config(method, kernel, dk)
    return build_layer(k, d, dm=shape.dm, H=shape.H, dh=shape.dh, N=N)


def predicted_flops(method: str, shape: Shape, N: int, dk: int, kernel: str = "performer") -> int:
    """The cost model's FLOPs for ``method`` (K/V projections + attention, hoisted if low-rank)."""
    k, d = method_config(method, kernel, dk)
    return site_flops(kernel=k, dk=d, B=1, N=N, M=N, H=shape.H, Hkv=shape.H, dh=shape.dh,
                      dm=shape.dm, num_features=features_used(k, shape.dh, None),
                      hoisted=d is not None)


def grid_points(grid: list) -> list[tuple[Shape, int, tuple[int, ...]]]:
    """(shape, N, ranks with dk < N) groups: one timing group per (shape, N)."""
    out = []
    for shape, lengths, ranks in grid:
        for N in lengths:
            dks = tuple(dk for dk in ranks if dk < N)
            if dks:
                out.append((shape, N, dks))
    return out


def measure_group(shape: Shape, N: int, dks: tuple[int, ...], *, kernel: str, reps: int,
                  budget_s: float) -> dict[tuple[str, int | None], dict[str, float]]:
    """Time full and kernel once and lowrank/flurka for each dk, interleaved (median).
    Returns {(method, dk or None): interleaved_median stats}."""
    layers: dict[tuple[str, int | None], SiteLayer] = {
        ("full", None): build_method("full", shape, N, dks[0], kernel),
        ("kernel", None): build_method("kernel", shape, N, dks[0], kernel),
    }
    for dk in dks:
        for method in ("lowrank", "flurka"):
            layers[(method, dk)] = build_method(method, shape, N, dk, kernel)
    x = torch.randn(1, N, shape.dm, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        fns = {key: (lambda layer=layer: layer(x)) for key, layer in layers.items()}
        return interleaved_median(fns, reps=reps, warmup=1, budget_s=budget_s)


# -- ranking statistics (pure functions: tested against hand-made tables) ---------------------
def argmin(values: dict[str, float]) -> str:
    """Key of the smallest value (ties: the first in insertion order)."""
    return min(values, key=lambda k: values[k])


def pairwise_agreement(predicted: dict[str, float], measured: dict[str, float]) -> tuple[int, int]:
    """(concordant, discordant) pairs of methods; a pair tied in either ordering counts as
    neither."""
    conc = disc = 0
    for a, b in itertools.combinations(list(measured), 2):
        s = (predicted[a] - predicted[b]) * (measured[a] - measured[b])
        conc += s > 0
        disc += s < 0
    return conc, disc


def kendall_tau(predicted: dict[str, float], measured: dict[str, float]) -> float:
    """Kendall's tau-a between two orderings of the same methods, in [-1, 1]."""
    n = len(measured)
    conc, disc = pairwise_agreement(predicted, measured)
    return (conc - disc) / (n * (n - 1) / 2)


def ranking_accuracy(points: list[dict], methods: tuple[str, ...] = METHODS, *,
                     key: str = "predicted", tie_tolerance: float = 0.05) -> dict:
    """Agreement of predicted and measured rankings over grid points.

    Each point has ``key`` (default "predicted") {method: cost} and "measured"
    {method: seconds} (only ``methods`` are compared). Returns top1 (fraction where the
    predicted cheapest is the measured fastest), pairwise (fraction of method pairs ordered
    alike), kendall_tau (mean), and misses: for each point where top-1 is wrong, the methods
    and the slowdown t(predicted best) / t(measured best) - 1; ``near_ties`` counts misses
    whose slowdown is under ``tie_tolerance`` (within timing noise)."""
    if not points:
        raise ValueError("ranking_accuracy needs at least one point")
    hits, conc_all, disc_all, taus, misses = 0, 0, 0, [], []
    for i, p in enumerate(points):
        pred = {m: float(p[key][m]) for m in methods}
        meas = {m: float(p["measured"][m]) for m in methods}
        pb, mb = argmin(pred), argmin(meas)
        if pb == mb:
            hits += 1
        else:
            misses.append({"index": i, "predicted_best": pb, "measured_best": mb,
                           "slowdown": meas[pb] / meas[mb] - 1.0,
                           **{k: v for k, v in p.items() if not isinstance(v, dict)}})
        conc, disc = pairwise_agreement(pred, meas)
        conc_all, disc_all = conc_all + conc, disc_all + disc
        taus.append(kendall_tau(pred, meas))
    n_pairs = len(points) * len(methods) * (len(methods) - 1) // 2
    slow = sorted(m["slowdown"] for m in misses)
    return {
        "points": len(points), "methods": list(methods), "top1": hits / len(points),
        "pairwise": conc_all / n_pairs, "kendall_tau": sum(taus) / len(taus),
        "misses": misses, "near_ties": sum(s < tie_tolerance for s in slow),
        "miss_slowdown_median": slow[len(slow) // 2] if slow else 0.0,
        "miss_slowdown_max": slow[-1] if slow else 0.0,
    }


def collect(grid: list, *, kernel: str, reps: int, budget_s: float,
            progress: bool = True) -> list[dict]:
    """Measure every grid point; one row per (shape, N, dk) with predicted FLOPs and medians."""
    rows: list[dict] = []
    t0 = time.perf_counter()
    for shape, N, dks in grid_points(grid):
        stats = measure_group(shape, N, dks, kernel=kernel, reps=reps, budget_s=budget_s)
        for dk in dks:
            key = {"full": ("full", None), "kernel": ("kernel", None), "lowrank": ("lowrank", dk),
                   "flurka": ("flurka", dk)}
            rows.append({
                "shape": shape.name, "N": N, "dm": shape.dm, "H": shape.H, "dh": shape.dh,
                "dk": dk, "kernel": kernel,
                "m": features_used(kernel, shape.dh, None),
                "claim1": N > dk * (shape.H + 2) > shape.dm > dk > shape.dh,
                "predicted": {m: predicted_flops(m, shape, N, dk, kernel) for m in METHODS},
                "measured": {m: stats[key[m]]["median_ms"] / 1e3 for m in METHODS},
                "reps": min(stats[key[m]]["reps"] for m in METHODS),
            })
        if progress:
            print(f"[{time.perf_counter() - t0:6.0f}s] {shape.name} N={N} dk={list(dks)} done",
                  file=sys.stderr, flush=True)
    return rows


def add_calibrated(rows: list[dict], cal: calib.Calibration) -> None:
    """Add to each row "calibrated" {method: predicted site seconds} and "layer_pred"
    {method: predicted seconds of the whole timed layer, Q/O projections included}."""
    for r in rows:
        shape = Shape(r["shape"], r["dm"], r["H"], r["dh"])
        r["calibrated"], r["layer_pred"] = {}, {}
        for m in METHODS:
            k, d = method_config(m, r["kernel"], r["dk"])
            r["calibrated"][m] = cal.site_seconds(
                kernel=k, dk=d, B=1, N=r["N"], M=r["N"], H=shape.H, Hkv=shape.H, dh=shape.dh,
                dm=shape.dm, num_features=features_used(k, shape.dh, None), hoisted=d is not None)
            r["layer_pred"][m] = cal.predict(calib.layer_work(k, d, dm=shape.dm, H=shape.H,
                                                              dh=shape.dh, N=r["N"]))


def time_error(rows: list[dict]) -> dict:
    """Median and max of |predicted / measured - 1| of the calibrated layer times."""
    errs = sorted(abs(r["layer_pred"][m] / r["measured"][m] - 1) for r in rows for m in METHODS)
    return {"median": errs[len(errs) // 2], "max": errs[-1]}


def point_table(rows: list[dict]) -> str:
    """Per point: measured ms of each method, predicted (FLOPs; calibrated when present) and
    measured winner."""
    out = []
    cal = all("calibrated" in r for r in rows)

    def hit(r: dict, pb: str, mb: str) -> str:
        slow = r["measured"][pb] / r["measured"][mb] - 1
        return "yes" if pb == mb else f"no (+{100 * slow:.0f}%)"

    for r in rows:
        mb = argmin(r["measured"])
        pb = argmin({m: r["predicted"][m] for m in METHODS})
        row = [r["shape"], r["N"], r["dk"], *(f"{1e3 * r['measured'][m]:.1f}" for m in METHODS),
               mb, pb, hit(r, pb, mb)]
        if cal:
            cb = argmin({m: r["calibrated"][m] for m in METHODS})
            row += [cb, hit(r, cb, mb)]
        out.append(row)
    headers = ["shape", "N", "dk", *(f"{m} ms" for m in METHODS), "fastest", "FLOPs pick", "hit"]
    return format_table(headers + (["calibrated pick", "hit"] if cal else []), out)


def summary_lines(name: str, acc: dict) -> list[str]:
    """Human-readable summary of one ranking_accuracy result."""
    return [f"{name}: top-1 {acc['top1']:.0%} of {acc['points']} points; pairwise "
            f"{acc['pairwise']:.0%}; Kendall tau {acc['kendall_tau']:.2f}; "
            f"{len(acc['misses'])} misses ({acc['near_ties']} within 5%), slowdown of the "
            f"predicted choice median {acc['miss_slowdown_median']:.0%}, max "
            f"{acc['miss_slowdown_max']:.0%}"]


def get_calibration(source: str, threads: int) -> calib.Calibration | None:
    """The calibration named by --calibration (see its help)."""
    if source == "none":
        return None
    cached = calib.default_path()
    stale = source == "cache" and (
        not cached.is_file() or calib.load(cached).meta.get("threads") != threads)
    if source == "measure" or stale:
        t0 = time.perf_counter()
        cal = calib.calibrate(threads=threads)
        print(f"calibration measured in {time.perf_counter() - t0:.0f}s, cached at "
              f"{calib.default_path()}", file=sys.stderr)
        return cal
    return calib.load(None if source == "cache" else source)


def main(argv: list[str] | None = None) -> dict:
    """Run the check, print tables and summary, write JSON; return the payload."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="14 small points (~1 min)")
    ap.add_argument("--kernel", default="performer", choices=("performer", "relu", "rnn"),
                    help="feature map of kernel and flurka (default performer, as kernel='auto')")
    ap.add_argument("--reps", type=int, default=5, help="max interleaved repetitions (median)")
    ap.add_argument("--budget", type=float, default=30.0,
                    help="seconds per (shape, N) group before stopping repetitions (>= 3 kept)")
    ap.add_argument("--json", type=str, default=None,
                    help=f"result file (default {DEFAULT_JSON.name}, _quick.json with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--calibration", default="cache",
                    help="'cache': the cached calibration (measured and cached first if missing); "
                         "'measure': measure afresh and cache; 'none'; or a JSON path")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    info = machine_info(threads)
    grid = QUICK_GRID if args.quick else FULL_GRID
    t0 = time.perf_counter()
    cal = get_calibration(args.calibration, threads)
    rows = collect(grid, kernel=args.kernel, reps=args.reps, budget_s=args.budget)
    results = {"flops": {"4 methods": ranking_accuracy(rows),
                         "auto candidates": ranking_accuracy(rows, AUTO_CANDIDATES)}}
    if cal is not None:
        add_calibrated(rows, cal)
        results["calibrated"] = {
            "4 methods": ranking_accuracy(rows, key="calibrated"),
            "auto candidates": ranking_accuracy(rows, AUTO_CANDIDATES, key="calibrated"),
            "layer_time_error": time_error(rows)}
    table = point_table(rows)
    print(table)
    lines = []
    for model, accs in results.items():
        for which, acc in accs.items():
            if which != "layer_time_error":
                lines += summary_lines(f"{model}, {which}", acc)
    if cal is not None:
        err = results["calibrated"]["layer_time_error"]
        lines.append(f"calibrated layer times vs measured: median error {err['median']:.0%}, "
                     f"max {err['max']:.0%}")
    for model in results:
        top1 = results[model]["4 methods"]["top1"]
        lines.append(f"target top-1 >= 85% ({model}): {'met' if top1 >= 0.85 else 'NOT met'}")
    print("\n".join(lines))
    payload = {
        "benchmark": "cost_model_check",
        "command": " ".join(["benchmarks/cost_model_check.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "config": {"kernel": args.kernel, "batch": 1, "dtype": "float32", "quick": args.quick,
                   "max_reps": args.reps, "budget_s": args.budget,
                   "predicted": "passes.cost_model.site_flops (K/V projections + attention; "
                                "hoisted when low-rank)",
                   "measured": "median seconds of one layer incl. q/k/v/o projections"},
        "machine": info, "loadavg_at_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - t0,
        "calibration": None if cal is None else cal.to_dict(),
        "accuracy": results,
        "points": rows, "table_markdown": table, "summary": lines,
    }
    path = write_json(args.json or (DEFAULT_JSON.with_name("cost_model_check_quick.json")
                                    if args.quick else DEFAULT_JSON), payload)
    print(f"wrote {path}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
