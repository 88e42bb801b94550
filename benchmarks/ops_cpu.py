"""CPU benchmark of one attention layer *with its projections* (q, k, v, o Linear).

    .venv/bin/python benchmarks/ops_cpu.py            # N = 1024, 4096, 8192, 16384
    .venv/bin/python benchmarks/ops_cpu.py --quick    # N = 1024, 2048
    .venv/bin/python benchmarks/ops_cpu.py --json out.json

dm=768, H=12, dh=64, B=1, fp32, inference mode, all cores. Variants:
  full            q/k/v projections on N rows, F.scaled_dot_product_attention, o projection
  linformer       hoisted low-rank (dk=256): K, V projected from E X, F X; softmax over dk keys
  performer       kernel-only FAVOR+ (m = 272 for dh=64), projections on N rows
  flurka_perf     FLuRKA performer, hoisted (dk=256)
  flurka_rnn      FLuRKA rnn (elu+1), hoisted (dk=256)
Repetitions are interleaved across variants; the median is reported with its ratio to SDPA.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, interleaved_median, machine_info, set_threads, write_json

from flurka_rewrite.kernels.attention import FlurkaAttention

DM, HEADS, DH, DK = 768, 12, 64, 256
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "ops_cpu.json"


class Layer(nn.Module):
    """One self-attention layer; ``attn`` None = exact SDPA, else a FlurkaAttention."""

    def __init__(self, attn: FlurkaAttention | None, hoist: bool) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DM, DM) for _ in range(4))
        self.attn, self.hoist = attn, hoist

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        B, L, _ = t.shape
        return t.view(B, L, HEADS, DH).transpose(1, 2)  # (B, H, L, dh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.heads(self.q(x))
        if self.hoist:  # (E X) W^T + (E 1) b^T: K, V projections on dk rows
            k = self.heads(self.attn.project_kv(x, self.k.weight, self.k.bias, "k"))
            v = self.heads(self.attn.project_kv(x, self.v.weight, self.v.bias, "v"))
            out = self.attn(q, k, v, source_len=N)
        else:
            k, v = self.heads(self.k(x)), self.heads(self.v(x))
            out = (F.scaled_dot_product_attention(q, k, v) if self.attn is None
                   else self.attn(q, k, v))
        return self.o(out.transpose(1, 2).reshape(B, N, DM))  # (B, N, dm)


def build(name: str, n: int) -> Layer:
    """The layer of variant ``name`` for sequence length ``n`` (same seed for every variant)."""
    torch.manual_seed(0)
    if name == "full":
        return Layer(None, hoist=False).eval()
    if name == "performer":
        return Layer(FlurkaAttention(kernel="performer", heads=HEADS, head_dim=DH), False).eval()
    kernel = {"linformer": "softmax", "flurka_perf": "performer", "flurka_rnn": "rnn"}[name]
    attn = FlurkaAttention(kernel=kernel, heads=HEADS, head_dim=DH, dk=DK, max_seq_len=n)
    return Layer(attn, hoist=True).eval()


VARIANTS = ("full", "linformer", "performer", "flurka_perf", "flurka_rnn")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, write the JSON; return the JSON payload."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 1024, 2048 only")
    ap.add_argument("--lengths", type=str, default=None, help="comma-separated N (overrides)")
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions (median)")
    ap.add_argument("--json", type=str, default=str(DEFAULT_JSON), help="result file")
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    args = ap.parse_args(argv)
    lengths = ([1024, 2048] if args.quick else [1024, 4096, 8192, 16384])
    if args.lengths:
        lengths = [int(s) for s in args.lengths.split(",")]
    threads = set_threads(args.threads)
    info = machine_info(threads)  # load average at the start: other processes skew timings
    results: list[dict] = []
    rows: list[list[object]] = []
    with torch.inference_mode():
        for n in lengths:
            x = torch.randn(1, n, DM)
            layers = {name: build(name, n) for name in VARIANTS}
            fns = {name: (lambda layer=layer, x=x: layer(x)) for name, layer in layers.items()}
            # Long sequences: SDPA takes seconds per call, so bound the repetitions by time.
            stats = interleaved_median(fns, reps=args.reps, warmup=1, budget_s=120.0)
            base = stats["full"]["median_ms"]
            for name in VARIANTS:
                s = stats[name]
                ratio = base / s["median_ms"]
                results.append({"N": n, "variant": name, **s, "speedup_vs_sdpa": ratio})
                rows.append([n, name, f"{s['median_ms']:.1f}", f"{ratio:.2f}x", s["reps"]])
            print(f"N={n} done", file=sys.stderr, flush=True)
    table = format_table(["N", "variant", "median ms", "speed-up vs SDPA", "reps"], rows)
    print(table)
    payload = {
        "benchmark": "ops_cpu",
        "command": " ".join(["benchmarks/ops_cpu.py", *(argv or sys.argv[1:])]),
        "config": {"dm": DM, "heads": HEADS, "head_dim": DH, "dk": DK, "batch": 1,
                   "dtype": "float32", "lengths": lengths},
        "machine": info, "loadavg_at_end": list(os.getloadavg()), "results": results,
        "table_markdown": table,
    }
    path = write_json(args.json, payload)
    print(f"wrote {path}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
