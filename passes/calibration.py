"""Measured calibration of the cost model: seconds instead of FLOPs (opt-in).

``site_flops`` counts every FLOP alike, but on a CPU an exp costs far more than a multiply-add
inside a GEMM, SDPA runs at its own rate, and the ``pool`` E is applied band by band (dk/32
fewer FLOPs than the dense count). ``benchmarks/cost_model_check.py`` measured the effect: the
FLOP ranking's misses favour the performer map at large dk (see docs/benchmarks.md). This module
splits a site's work into four categories and prices each with a constant measured on this
machine:

    gemm  matrix-product FLOPs outside SDPA (projections, down-sampling as executed: banded
          for a pool E with dk >= 64, feature-map products, kernel state and readout)
    elem  elementwise FLOPs other than exp-like ones (site_flops' convention: 1 per element)
    exp   exp-like elements of the feature maps, ``MapFlops.exp`` of each map's ``flops``
          (performer: m per row; rnn's elu: dh per row; ffk's sigmoid and softplus: 2m per
          row; relu: none)
    sdpa  the FLOPs site_flops counts for a softmax core (F.scaled_dot_product_attention)

    seconds = sum_c  constant[c] * work[c]

The constants are fitted (non-negative least squares on relative error) to the measured times
of small attention layers (``measure``), and cached as JSON: ``$FLURKA_CALIBRATION_CACHE`` or
``~/.cache/flurka_rewrite/calibration.json``. Measure once with

    python -m flurka_rewrite.passes.calibration            # ~20 s on 2 cores; --out PATH

Opt in for ``kernel="auto"`` / ``dk="auto"`` by setting ``FLURKA_CALIBRATION=1`` (the cached
file) or ``FLURKA_CALIBRATION=/path/to/calibration.json``: ``passes/choose.py`` then ranks the
candidates by predicted seconds (``Choice.flops`` stays the FLOP count). Unset: FLOPs, as before.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from flurka_rewrite.kernels.registry import SOFTMAX, feature_map_class

from . import cost_model
from .atomic import atomic_write, write_bytes

CATEGORIES = ("gemm", "elem", "exp", "sdpa")
ENV_OPT_IN = "FLURKA_CALIBRATION"  # "1" = the cached file, or a path
ENV_CACHE = "FLURKA_CALIBRATION_CACHE"  # where ``calibrate`` writes and "1" reads


def default_path() -> Path:
    """The cache file: $FLURKA_CALIBRATION_CACHE, else ~/.cache/flurka_rewrite/calibration.json."""
    env = os.environ.get(ENV_CACHE)
    return Path(env) if env else Path.home() / ".cache" / "flurka_rewrite" / "calibration.json"


# -- work per category ----------------------------------------------------------------------
def _exp_elements(kernel: str, dh: int, m: int, q_rows: int, k_rows: int, *, groups: int,
                  causal: bool) -> int:
    """Exp-like elements of the feature map over q_rows query and k_rows key rows in
    ``groups`` (batch, kv-head) groups (the map's ``FeatureMap.flops(...).exp``)."""
    cls = feature_map_class(kernel)
    return (cls.flops(q_rows, dh, m, is_query=True).exp
            + cls.flops(k_rows, dh, m, is_query=False, causal=causal, groups=groups).exp)


def work_breakdown(
    *, kernel: str, dk: int | None, B: int, N: int, M: int, H: int, Hkv: int, dh: int,
    dm: int | None = None, num_features: int | None = None, causal: bool = False,
    hoisted: bool = False, projections: bool = True, bias: bool = True,
    padding_mask: bool = False, e_init: str = "pool", max_seq_len: int | None = None,
) -> dict[str, float]:
    """The site's work per category (CATEGORIES), from ``cost_model.site_flops`` (same
    arguments). Exps of the causal performer's chunk scales are left in ``elem``."""
    args = dict(B=B, H=H, Hkv=Hkv, dh=dh, causal=causal, padding_mask=padding_mask)
    site = dict(kernel=kernel, dk=dk, N=N, M=M, dm=dm, num_features=num_features,
                hoisted=hoisted, projections=projections, bias=bias, e_init=e_init,
                max_seq_len=max_seq_len, **args)  # a pool E counted banded, as it runs
    total = cost_model.site_flops(**site)
    gemm = cost_model.site_flops(**site, gemm_only=True)
    K = M if dk is None else dk  # keys the core sees
    core_args = dict(kernel=kernel, dk=None, N=N, M=K, num_features=num_features,
                     projections=False, **{**args, "padding_mask": False})
    core = cost_model.site_flops(**core_args)
    core_gemm = cost_model.site_flops(**core_args, gemm_only=True)
    work = {c: 0.0 for c in CATEGORIES}
    if kernel == SOFTMAX:
        work["sdpa"] = float(core)
        gemm, total = gemm - core_gemm, total - core
    if kernel != SOFTMAX:
        m = cost_model.features_used(kernel, dh, num_features)
        work["exp"] = float(_exp_elements(kernel, dh, m, B * H * N, B * Hkv * K, groups=B * Hkv,
                                          causal=causal))
    work["gemm"] = float(gemm)
    work["elem"] = float(total - gemm - work["exp"])
    return work


# -- the calibration -----------------------------------------------------------------------
@dataclass
class Calibration:
    """Seconds per unit of work for each category, and where they were measured."""

    seconds: dict[str, float]
    meta: dict = field(default_factory=dict)

    def predict(self, work: dict[str, float]) -> float:
        """Predicted seconds of ``work`` (a work_breakdown or any dict over CATEGORIES)."""
        return sum(self.seconds[c] * work.get(c, 0.0) for c in CATEGORIES)

    def site_seconds(self, **site: object) -> float:
        """Predicted seconds of one site (keyword arguments of ``work_breakdown``)."""
        return self.predict(work_breakdown(**site))

    def to_dict(self) -> dict:
        return {"seconds_per_unit": self.seconds, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        sec = d.get("seconds_per_unit")
        if not isinstance(sec, dict) or set(sec) != set(CATEGORIES):
            raise ValueError(f"not a calibration file: 'seconds_per_unit' must have the keys "
                             f"{', '.join(CATEGORIES)}; re-run python -m "
                             "flurka_rewrite.passes.calibration")
        return cls({c: float(sec[c]) for c in CATEGORIES}, dict(d.get("meta", {})))

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the JSON (atomically) to ``path`` or the default cache file."""
        path = Path(path) if path else default_path()
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write(str(path), lambda tmp: write_bytes(tmp, text.encode("utf-8")))
        return path


def load(path: str | os.PathLike | None = None) -> Calibration:
    """Read a calibration JSON (default: the cache file); a missing file says how to make it."""
    path = Path(path) if path else default_path()
    if not path.is_file():
        raise FileNotFoundError(f"no calibration at {path}: measure one with `python -m "
                                "flurka_rewrite.passes.calibration` (or unset FLURKA_CALIBRATION)")
    return Calibration.from_dict(json.loads(path.read_text()))


_ENV_CACHE: dict[tuple[str, float], Calibration] = {}


def from_env() -> Calibration | None:
    """The calibration FLURKA_CALIBRATION opts into: unset/"" /"0" -> None; "1" -> the cache
    file; anything else -> that path. Read once per (path, mtime)."""
    val = os.environ.get(ENV_OPT_IN, "").strip()
    if val in ("", "0"):
        return None
    path = default_path() if val == "1" else Path(val)
    key = (str(path), path.stat().st_mtime if path.is_file() else -1.0)
    if key not in _ENV_CACHE:
        _ENV_CACHE[key] = load(path)
    return _ENV_CACHE[key]


def fit(samples: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Non-negative constants c minimising sum_i (sum_k c_k w_ik / t_i - 1)^2, from
    (work, seconds) samples. Every subset of categories is solved by least squares and the
    best non-negative solution kept (exact NNLS for four unknowns). A category with no work in
    any sample gets 0."""
    if not samples:
        raise ValueError("fit needs at least one (work, seconds) sample")
    if any(t <= 0 for _, t in samples):
        raise ValueError("measured seconds must be positive")
    A = np.array([[w.get(c, 0.0) / t for c in CATEGORIES] for w, t in samples])
    col = np.abs(A).max(axis=0)
    present = [i for i in range(len(CATEGORIES)) if col[i] > 0]
    As = A[:, present] / col[present]  # scaled columns: well conditioned
    ones = np.ones(len(samples))
    best, best_res = np.zeros(len(present)), float(ones @ ones)
    for r in range(1, len(present) + 1):
        for sub in itertools.combinations(range(len(present)), r):
            x, *_ = np.linalg.lstsq(As[:, sub], ones, rcond=None)
            if (x < 0).any():
                continue
            res = float(np.sum((As[:, sub] @ x - ones) ** 2))
            if res < best_res - 1e-15:
                best_res, best = res, np.zeros(len(present))
                best[list(sub)] = x
    out = {c: 0.0 for c in CATEGORIES}
    for j, i in enumerate(present):
        out[CATEGORIES[i]] = float(best[j] / col[i])
    return out


# -- measuring -------------------------------------------------------------------------------
class SiteLayer(nn.Module):
    """One self-attention layer as a rewritten site runs it: q, k, v (dm -> H*dh), o
    (H*dh -> dm) and a core; ``attn`` None = exact SDPA. ``hoist``: K, V from E X, F X."""

    def __init__(self, dm: int, H: int, dh: int, attn: nn.Module | None, hoist: bool) -> None:
        super().__init__()
        self.H, self.dh = H, dh
        self.q, self.k, self.v = (nn.Linear(dm, H * dh) for _ in range(3))
        self.o = nn.Linear(H * dh, dm)
        self.attn, self.hoist = attn, hoist

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        B, L, _ = t.shape
        return t.view(B, L, self.H, self.dh).transpose(1, 2)  # (B, H, L, dh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape  # x (B, N, dm)
        q = self.heads(self.q(x))
        if self.hoist:  # (E X) W^T + (E 1) b^T: K, V projections on dk rows
            k = self.heads(self.attn.project_kv(x, self.k.weight, self.k.bias, "k"))
            v = self.heads(self.attn.project_kv(x, self.v.weight, self.v.bias, "v"))
            out = self.attn(q, k, v, source_len=N)
        else:
            k, v = self.heads(self.k(x)), self.heads(self.v(x))
            out = (F.scaled_dot_product_attention(q, k, v) if self.attn is None
                   else self.attn(q, k, v))
        return self.o(out.transpose(1, 2).reshape(B, N, -1))  # (B, N, dm)


def build_layer(kernel: str, dk: int | None, *, dm: int, H: int, dh: int, N: int,
                seed: int = 0) -> SiteLayer:
    """The layer of (kernel, dk) at length N: full SDPA for softmax without dk, hoisted when
    dk is set (as the compiler does for a linear K/V projection chain)."""
    from flurka_rewrite.kernels.attention import FlurkaAttention  # passes -> attention, lazily

    torch.manual_seed(seed)
    if kernel == SOFTMAX and dk is None:
        return SiteLayer(dm, H, dh, None, hoist=False).eval()
    attn = FlurkaAttention(kernel=kernel, heads=H, head_dim=dh, dk=dk,
                           max_seq_len=N if dk is not None else None, backend="torch")
    return SiteLayer(dm, H, dh, attn, hoist=dk is not None).eval()


def layer_work(kernel: str, dk: int | None, *, dm: int, H: int, dh: int, N: int,
               B: int = 1) -> dict[str, float]:
    """Work of a whole ``SiteLayer``: the site plus its Q and output projections (gemm, with
    their bias adds as elem), which the site's own count leaves out."""
    w = work_breakdown(kernel=kernel, dk=dk, B=B, N=N, M=N, H=H, Hkv=H, dh=dh, dm=dm,
                       hoisted=dk is not None)
    w["gemm"] += 2 * (2 * B * N * dm * H * dh)
    w["elem"] += B * N * H * dh + B * N * dm
    return w


# (dm, H, dh, N) x (kernel, dk) configurations timed by ``measure``
CALIBRATION_SHAPES = ((768, 12, 64, 1024), (768, 12, 64, 2048), (256, 4, 64, 2048),
                      (512, 16, 32, 2048), (512, 8, 64, 4096))
CALIBRATION_CONFIGS = (("softmax", None), ("softmax", 64), ("softmax", 256), ("performer", None),
                       ("performer", 64), ("performer", 256), ("rnn", None), ("rnn", 256))


def measure(shapes=CALIBRATION_SHAPES, configs=CALIBRATION_CONFIGS, *, reps: int = 3,
            ) -> list[tuple[dict[str, float], float]]:
    """Time every config on every shape (interleaved within a shape, median of ``reps``,
    one warm-up) and return (layer work, seconds) samples for ``fit``."""
    samples = []
    for dm, H, dh, N in shapes:
        x = torch.randn(1, N, dm, generator=torch.Generator().manual_seed(1))
        layers = {c: build_layer(*c, dm=dm, H=H, dh=dh, N=N) for c in configs
                  if c[1] is None or c[1] < N}
        times: dict[tuple, list[float]] = {c: [] for c in layers}
        with torch.inference_mode():
            for r in range(reps + 1):
                for c, layer in layers.items():
                    t0 = time.perf_counter()
                    layer(x)
                    if r:  # round 0 is the warm-up
                        times[c].append(time.perf_counter() - t0)
        for c in layers:
            samples.append((layer_work(*c, dm=dm, H=H, dh=dh, N=N), statistics.median(times[c])))
    return samples


def calibrate(path: str | os.PathLike | None = None, *, reps: int = 3,
              threads: int | None = None) -> Calibration:
    """Measure, fit, save to ``path`` (default cache file) and return the calibration."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    samples = measure(reps=reps)
    cal = Calibration(fit(samples), {
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "device": "cpu", "samples": len(samples), "reps": reps,
        "measure_s": round(time.perf_counter() - t0, 1),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "fit_rel_error_max": max(abs(Calibration(fit(samples)).predict(w) / t - 1)
                                 for w, t in samples),
    })
    cal.save(path)
    return cal


def main(argv: list[str] | None = None) -> None:
    """CLI: measure and cache the calibration."""
    ap = argparse.ArgumentParser(description="Measure the cost model's per-op constants.")
    ap.add_argument("--out", default=None, help=f"JSON path (default {default_path()})")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="default: torch's choice")
    args = ap.parse_args(argv)
    cal = calibrate(args.out, reps=args.reps, threads=args.threads)
    print(json.dumps(cal.to_dict(), indent=2))
    print(f"wrote {Path(args.out) if args.out else default_path()}")


if __name__ == "__main__":
    main()
