"""GPU benchmark of the attention core: Triton FLuRKA vs the PyTorch reference FLuRKA vs
SDPA (FlashAttention where it applies) vs Linformer vs the kernel method (performer), forward
and forward+backward, bf16.

Settings: (i) the FLuRKA paper's speed setting dm=2600, H=8, dh=325, dk=1500, N 7k..55k;
(ii) a BERT-base-like layer dm=768, H=12, dh=64, dk=256, N 1k..64k. B=1. Each method gets
q (B, H, N, dh) and k, v (B, H, N, dh); low-rank methods down-sample k, v along the sequence
with E, F (dk, N) inside the timed region (the unhoisted form: the projections of the layer
are not timed for any method). FLOPs come from ``flurka_rewrite.passes.cost_model.site_flops``
(projections=False); fwd+bwd counts 3x the forward FLOPs (the usual convention). GB/s is the
compulsory traffic (q, k, v read once, o written once, bf16) over the time.

    python benchmarks/kernels_gpu.py [--quick] [--json out.json]
    python benchmarks/kernels_gpu.py --settings paper --json paper.json   # the paper's grid
    python benchmarks/kernels_gpu.py --settings paper --block-k 32,64,128  # dh-chunk sweep
``--block-k`` sets FLURKA_TRITON_BLOCK_K (the kernels' head-dim chunk, default 64 above
dh = 128) for each value in turn; the Triton methods are timed once per value (labelled
``paper@bk64`` etc.), the others once. ``--methods`` picks a subset of METHODS
(``--methods window_triton,window_torch``: the sliding-window hybrid, Triton band vs reference).
Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, write_json

SETTINGS = {
    "paper": dict(dm=2600, H=8, dh=325, dk=1500, Ns=[7000, 14000, 28000, 42000, 55000]),
    "bert": dict(dm=768, H=12, dh=64, dk=256, Ns=[1024, 4096, 8192, 16384, 32768, 65536]),
}
QUICK_NS = {"paper": [7000, 28000, 55000], "bert": [1024, 8192, 32768, 65536]}
# Dense bf16 tensor-core peak (TFLOP/s) and HBM bandwidth (GB/s) by device name.
PEAKS = {"H100": (989.0, 3350.0), "H200": (989.0, 4800.0), "A100": (312.0, 2039.0)}
METHODS = ["flurka_triton", "flurka_torch", "sdpa", "linformer", "performer_torch",
           "performer_triton", "window_triton", "window_torch"]
# window_*: the sliding-window hybrid (kernels/window.py), performer kernel part, non-causal,
# w = WINDOW; _triton runs the exact band in Triton (triton_window_ops), _torch the reference.
WINDOW = 256


def device_peaks(name: str) -> tuple[float | None, float | None]:
    """(TFLOP/s, GB/s) peaks of the device, None when unknown."""
    for key, val in PEAKS.items():
        if key in name:
            return val
    return None, None


def flops(method: str, *, N: int, H: int, dh: int, dk: int, m: int) -> int:
    """Forward FLOPs of one method, from the cost model when it is there."""
    kernel = "softmax" if method in ("sdpa", "linformer") else "performer"
    rank = dk if method in ("flurka_triton", "flurka_torch", "linformer") else None
    window = WINDOW if method.startswith("window") else None
    try:
        from flurka_rewrite.passes.cost_model import site_flops
        return int(site_flops(kernel=kernel, dk=rank, B=1, N=N, M=N, H=H, Hkv=H, dh=dh,
                              num_features=None if kernel == "softmax" else m,
                              projections=False, window=window))
    except ImportError:  # explicit formula: down-sampling, then attention over `keys`
        keys = rank or N
        f = 2 * 2 * H * rank * N * dh if rank else 0
        if kernel == "softmax":
            return f + 4 * H * N * keys * dh
        return f + 2 * H * keys * m * dh * 2 + 2 * H * N * m * (dh + 1) * 2


def build(method: str, *, N: int, H: int, dh: int, dk: int, fm, E, Fm):
    """A closure computing the method's output from (q, k, v)."""
    from flurka_rewrite.kernels.reference import attention_core, lowrank_project
    from flurka_rewrite.kernels.triton_ops import triton_attention_core

    def project(k, v):
        return lowrank_project(k, E), lowrank_project(v, Fm)  # (B, H, dk, dh)

    if method == "flurka_triton":
        return lambda q, k, v: triton_attention_core(q, *project(k, v), feature_map=fm)
    if method == "flurka_torch":
        return lambda q, k, v: attention_core(q, *project(k, v), feature_map=fm)
    if method == "performer_torch":
        return lambda q, k, v: attention_core(q, k, v, feature_map=fm)
    if method == "performer_triton":
        return lambda q, k, v: triton_attention_core(q, k, v, feature_map=fm)
    if method in ("window_triton", "window_torch"):
        from flurka_rewrite.kernels.dispatch import window_attention_dispatch

        theta, backend = q_heads_zeros(fm, H), method.split("_")[1]
        return lambda q, k, v: window_attention_dispatch(
            q, k, v, backend=backend, window=WINDOW, feature_map=fm, log_weight=theta,
            scale=dh**-0.5)
    pad = (-dh) % 8  # SDPA's fused kernels want dh % 8 == 0: zero-pad (exact)

    def sdpa(q, k, v):
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=dh**-0.5)
        return out[..., :dh] if pad else out

    if method == "sdpa":
        return sdpa
    if method == "linformer":
        return lambda q, k, v: sdpa(q, *project(k, v))
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def q_heads_zeros(fm, H: int) -> torch.Tensor:
    """theta = 0 per query head (alpha = 1, the performer's initial weight) on fm's device."""
    return torch.zeros(H, device=fm.W.device)


def measure(fn, q, k, v, bwd: bool) -> float:
    """Median milliseconds of fn (and its backward when bwd) by triton.testing.do_bench."""
    from triton.testing import do_bench

    if not bwd:
        with torch.no_grad():
            return float(do_bench(lambda: fn(q, k, v), warmup=5, rep=40))
    out = fn(q, k, v)
    g = torch.randn_like(out)

    def step():
        torch.autograd.backward(fn(q, k, v), g)

    return float(do_bench(step, warmup=3, rep=40, grad_to_none=[q, k, v]))


def run_setting(name: str, Ns: list[int], methods: list[str], modes: list[str]) -> list[dict]:
    """Time every method for every N of one setting; one dict per (N, method, mode)."""
    from flurka_rewrite.kernels.feature_maps import build_feature_map

    cfg = SETTINGS[name]
    H, dh, dk = cfg["H"], cfg["dh"], cfg["dk"]
    fm = build_feature_map("performer", head_dim=dh).cuda()
    m = fm.num_features
    peak_tf, peak_bw = device_peaks(torch.cuda.get_device_name())
    rows = []
    for N in Ns:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, H, N, dh, device="cuda", dtype=torch.bfloat16, generator=g)
                   .requires_grad_(True) for _ in range(3))
        E = (torch.randn(dk, N, device="cuda", generator=g) / dk**0.5).to(torch.bfloat16)
        Fm = (torch.randn(dk, N, device="cuda", generator=g) / dk**0.5).to(torch.bfloat16)
        nbytes = 2 * 4 * H * N * dh
        for mode in modes:
            for method in methods:
                fn = build(method, N=N, H=H, dh=dh, dk=dk, fm=fm, E=E, Fm=Fm)
                try:
                    ms = measure(fn, q, k, v, bwd=(mode == "fwd+bwd"))
                except torch.OutOfMemoryError:
                    ms = float("nan")
                    torch.cuda.empty_cache()
                f = flops(method, N=N, H=H, dh=dh, dk=dk, m=m) * (3 if mode == "fwd+bwd" else 1)
                tf = f / (ms * 1e-3) / 1e12
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append(dict(setting=name, N=N, mode=mode, method=method, ms=ms,
                                 tflops=tf, gbps=gbs,
                                 pct_peak_flops=None if peak_tf is None else 100 * tf / peak_tf,
                                 pct_peak_bw=None if peak_bw is None else 100 * gbs / peak_bw))
                print(f"{name} N={N} {mode} {method}: {ms:.3f} ms", flush=True)
        del q, k, v, E, Fm
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table: time per method, speed-up of Triton FLuRKA over each (same run)."""
    keys = sorted({(r["setting"], r["N"], r["mode"]) for r in rows},
                  key=lambda t: (t[0], t[2], t[1]))
    headers = ["setting", "N", "mode", *[f"{m} ms" for m in METHODS],
               "x torch", "x sdpa", "x linformer", "x performer", "FLuRKA TFLOP/s (% peak)"]
    out = []
    for s, n, mode in keys:
        by = {r["method"]: r for r in rows if (r["setting"], r["N"], r["mode"]) == (s, n, mode)}
        t = by.get("flurka_triton")
        ratio = (lambda m, by=by, t=t:  # noqa: E731
                 f"{by[m]['ms'] / t['ms']:.1f}" if t and m in by else "-")
        tf = "-" if not t else (f"{t['tflops']:.1f}" + (
            f" ({t['pct_peak_flops']:.0f}%)" if t["pct_peak_flops"] is not None else ""))
        out.append([s, n, mode, *[f"{by[m]['ms']:.2f}" if m in by else "-" for m in METHODS],
                    ratio("flurka_torch"), ratio("sdpa"), ratio("linformer"),
                    ratio("performer_torch"), tf])
    return format_table(headers, out)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller grid of N")
    ap.add_argument("--json", type=Path, default=None, help="write all measurements here")
    ap.add_argument("--settings", default="bert,paper", help="comma list of: paper, bert")
    ap.add_argument("--modes", default="fwd,fwd+bwd", help="comma list of: fwd, fwd+bwd")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of METHODS")
    ap.add_argument("--block-k", default="",
                    help="comma list of head-dim chunks (FLURKA_TRITON_BLOCK_K) to sweep")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; expected some of {', '.join(METHODS)}")
    if not torch.cuda.is_available():
        print("no CUDA GPU is present: nothing to benchmark (run this on a GPU machine)")
        return 0
    rows = []
    dev = torch.cuda.get_device_name()
    for name in args.settings.split(","):
        Ns = QUICK_NS[name] if args.quick else SETTINGS[name]["Ns"]
        base = None
        for bk in args.block_k.split(",") if args.block_k else [""]:
            label = f"{name}@bk{bk}" if bk else name
            os.environ["FLURKA_TRITON_BLOCK_K"] = bk  # "" = the launcher's default
            todo = methods if base is None else [m for m in methods if "triton" in m]
            got = run_setting(name, Ns, todo, args.modes.split(","))
            if base is None:  # the other methods do not depend on BLOCK_K: timed once
                base = [r for r in got if "triton" not in r["method"]]
            else:
                got += [dict(r) for r in base]
            for r in got:
                r.update(setting=label, block_k=bk or "default")
            rows += got
            if args.json:  # after each setting, so a cut-off run keeps what it measured
                write_json(args.json, dict(device=dev,
                                           date=datetime.now(timezone.utc).isoformat(),
                                           torch=torch.__version__, settings=SETTINGS,
                                           rows=rows))
            print(table([r for r in rows if r["setting"] == label]), flush=True)
    print(f"\ndevice: {dev}; date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"torch {torch.__version__}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
