"""End to end: a BERT-base-sized encoder before and after conversion, forward time and memory.

    .venv/bin/python benchmarks/e2e_cpu.py          # 2 and 12 layers, N = 1k..16k (~18 min)
    .venv/bin/python benchmarks/e2e_cpu.py --quick     # 2 layers, N = 1k, 2k, 4k (~1-2 min)
    .venv/bin/python benchmarks/e2e_cpu.py --layers 2 --lengths 4096,8192 --budget 120

The same script runs on CUDA when a GPU is present (``--device auto``; writes e2e_cuda.json).

Model: ``transformers.BertModel`` from a config (dm = 768, H = 12, FFN 3072, vocab 30522,
random weights, eval mode, ``attn_implementation="sdpa"``, max_position_embeddings = the
longest N), batch 1, token ids only (no padding). Variants, all measured in one process with
interleaved repetitions (median):

  original     the model as built (SDPA attention)
  flurka_perf  fr.convert(kernel="performer", dk=256): FLuRKA, hoisted by the compiler
  flurka_rnn   fr.convert(kernel="rnn", dk=256)
  linformer    fr.convert(kernel="softmax", dk=256): low-rank only
  kernel_perf  fr.convert(kernel="performer", dk=None): kernel only
  kernel_rnn   fr.convert(kernel="rnn", dk=None)
  noattn       lower bound that no attention rewrite can beat: every self-attention replaced
               by its Q, K, V projections with no attention (each token attends only to
               itself: the output is V); output projection, LayerNorms and FFN unchanged
  noattn_qo    the floor for rewrites that also shrink the K/V projections (FLuRKA and
               Linformer run them on dk rows): as noattn, without the K and V projections
               (the output is Q)

Each converted model is made by ``fr.convert(original, ..., example_inputs={"input_ids": ...}
of length min(N, 256), max_seq_len=N)`` (E, F are dk x N), so the real compiler (capture,
matching, hoisting) produces what is timed. Reported per (layers, N, variant): median ms,
repetitions, speed-up = t_original / t_variant, bound = (t_original - t_variant) /
(t_original - t_noattn) (the fraction of the time attention costs above the bound that the
variant removes; 100% = as fast as noattn, above 100% is possible for hoisted variants), and
peak memory. Peak memory on CPU: in a fresh subprocess (one per variant; ``--memory shared``,
the --quick default: one for all, variants one after another); before each forward the heap
is trimmed (malloc_trim), the resident-set high-water mark reset (/proc/self/clear_refs) and
VmRSS read; peak = VmHWM after the forward - that baseline (the model, already built, is in
both). On CUDA: torch.cuda.max_memory_allocated - memory_allocated before the forward.

Repetitions: a (layers, N) point runs as many interleaved rounds as fit in --budget seconds,
estimated from earlier points, between a minimum and --reps. The shallowest model (its 4k/8k
points carry the targets) gets at least 3 rounds after a warm-up round; deeper ones at least 1,
with a warm-up only when a round is estimated at <= budget / 3 (else "cold": the first call
at that N is timed). The reps column says what ran.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, interleaved_median, machine_info, set_threads, write_json

import flurka_rewrite as fr

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("original", "flurka_perf", "flurka_rnn", "linformer", "kernel_perf", "kernel_rnn",
            "noattn", "noattn_qo")
# variant -> (kernel, low-rank?) for fr.convert; dk comes from the config
CONVERTED = {"flurka_perf": ("performer", True), "flurka_rnn": ("rnn", True),
             "linformer": ("softmax", True), "kernel_perf": ("performer", False),
             "kernel_rnn": ("rnn", False)}
# FLuRKA variant -> its kernel-only counterpart (Claim 1 compares the same feature map)
KERNEL_ONLY = {"flurka_perf": "kernel_perf", "flurka_rnn": "kernel_rnn"}
BOUND, FLOOR = "noattn", "noattn_qo"
EXAMPLE_LEN = 256  # length of the example inputs given to fr.convert


@dataclass
class Config:
    """What to run. Defaults: the issue's BERT-base setting."""

    layers: list[int] = field(default_factory=lambda: [2, 12])
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    hidden: int = 768
    heads: int = 12
    ffn: int = 3072
    vocab: int = 30522
    dk: int = 256
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    reps: int = 5  # most interleaved rounds per point
    budget_s: float = 60.0  # seconds of timed rounds per point
    threads: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    memory: str = "fresh"  # "fresh": a subprocess per variant; "shared": one for all; "off"
    memory_layers: list[int] | None = None  # None: the smallest layer count only
    seed: int = 0
    progress: bool = True


# -- models ---------------------------------------------------------------------------------
def build_original(cfg: Config, layers: int) -> nn.Module:
    """A randomly initialised BertModel (eval, SDPA) on cfg.device / cfg.dtype."""
    from transformers import BertConfig, BertModel

    bc = BertConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_attention_heads=cfg.heads,
                    intermediate_size=cfg.ffn, num_hidden_layers=layers,
                    max_position_embeddings=max(cfg.lengths), attn_implementation="sdpa")
    torch.manual_seed(cfg.seed)
    return BertModel(bc).eval().to(cfg.device, getattr(torch, cfg.dtype))


class AttentionFree(nn.Module):
    """Stands in for a ``BertSelfAttention`` without attending: ``keep_kv`` computes the Q, K
    and V projections and returns V (each token attends only to itself), else only Q is
    computed and returned. Returns (output, None) like the module it replaces."""

    def __init__(self, attn: nn.Module, keep_kv: bool) -> None:
        super().__init__()
        self.query = attn.query
        self.keep_kv = keep_kv
        if keep_kv:
            self.key, self.value = attn.key, attn.value

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object
                ) -> tuple[torch.Tensor, None]:
        q = self.query(hidden_states)  # (B, N, dm)
        if not self.keep_kv:
            return q, None
        self.key(hidden_states)  # computed and dropped: the projection work of the original
        return self.value(hidden_states), None


def attention_free(model: nn.Module, keep_kv: bool) -> nn.Module:
    """A copy of a BertModel whose self-attentions are ``AttentionFree``."""
    new = copy.deepcopy(model)
    for layer in new.encoder.layer:
        layer.attention.self = AttentionFree(layer.attention.self, keep_kv)
    return new


def build_variant(name: str, original: nn.Module, cfg: Config, n: int) -> nn.Module:
    """Variant ``name`` of ``original`` for sequences up to ``n`` tokens."""
    if name == "original":
        return original
    if name in (BOUND, FLOOR):
        return attention_free(original, keep_kv=name == BOUND)
    if name not in CONVERTED:
        raise ValueError(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")
    kernel, lowrank = CONVERTED[name]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    ids = torch.randint(0, cfg.vocab, (1, min(n, EXAMPLE_LEN)), generator=gen).to(cfg.device)
    new = fr.convert(original, kernel=kernel, dk=cfg.dk if lowrank else None,
                     example_inputs={"input_ids": ids}, max_seq_len=n if lowrank else None,
                     seed=cfg.seed)
    return new.eval().to(cfg.device, getattr(torch, cfg.dtype))


def depends_on_n(name: str) -> bool:
    """Low-rank variants are rebuilt per N (E, F are dk x N); the others are built once."""
    return name in CONVERTED and CONVERTED[name][1]


# -- timing ---------------------------------------------------------------------------------
def plan_reps(est_round_s: float | None, budget_s: float, max_reps: int, min_reps: int,
              always_warm: bool = False) -> tuple[int, int]:
    """(warmup rounds, timed rounds) for a point whose round is estimated at ``est_round_s``
    (None: unknown, run ``max_reps`` and let interleaved_median's budget stop early): as many
    rounds as fit in ``budget_s``, within [min_reps, max_reps]; a warm-up round when
    ``always_warm`` or when a round takes at most a third of the budget."""
    if est_round_s is None:
        return 1, max_reps
    reps = max(min_reps, min(max_reps, int(budget_s // max(est_round_s, 1e-9))))
    return (1 if always_warm or est_round_s <= budget_s / 3 else 0), reps


def estimate_round(rounds: dict[tuple[int, int], float], layers: int, n: int) -> float | None:
    """A round's seconds at (layers, n) from measured ones: the same N at another depth
    (scaled by depth), else a shorter N at this depth (scaled by (N/N')^2, pessimistic)."""
    same_n = [(L, t) for (L, N), t in rounds.items() if N == n]
    if same_n:
        L, t = max(same_n)
        return t * layers / L
    shorter = [(N, t) for (L, N), t in rounds.items() if L == layers and N < n]
    if shorter:
        N, t = max(shorter)
        return t * (n / N) ** 2
    return None


def time_point(models: dict[str, nn.Module], ids: torch.Tensor, est: float | None, cfg: Config,
               shallowest: bool) -> tuple[dict[str, dict[str, float]], int]:
    """Interleaved medians of one forward per model; returns (stats, warmup rounds). The
    shallowest model (it carries the targets) gets >= 3 rounds and always a warm-up."""
    warmup, reps = plan_reps(est, cfg.budget_s, cfg.reps, 3 if shallowest else 1,
                             always_warm=shallowest)
    fns = {name: (lambda m=m: m(input_ids=ids)) for name, m in models.items()}
    with torch.inference_mode():
        stats = interleaved_median(fns, reps=reps, warmup=warmup,
                                   budget_s=cfg.budget_s if est is None else None)
    return stats, warmup


# -- memory ---------------------------------------------------------------------------------
def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def forward_peak_bytes(fn: Callable[[], object], device: str) -> tuple[int, str]:
    """Peak memory that one call of ``fn`` adds to what is already allocated, and how it was
    measured (see the module docstring)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated"
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - base) * 1024, "VmHWM - VmRSS (clear_refs reset)"
    except (OSError, TypeError):  # not Linux: ru_maxrss is a lifetime peak (KB on Linux)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024
        return (after - before) * scale, "ru_maxrss growth (lower bound)"


def memory_worker(cfg: Config, names: list[str], layers: int
                  ) -> dict[str, dict[int, tuple[int, str]]]:
    """In this process: peak forward memory of each variant of ``names`` at each N, one
    variant after the other (each model freed before the next is built)."""
    original = build_original(cfg, layers)
    out: dict[str, dict[int, tuple[int, str]]] = {}
    for name in names:
        out[name], model = {}, None
        for n in sorted(cfg.lengths):
            if model is None or depends_on_n(name):
                model = None
                gc.collect()
                model = build_variant(name, original, cfg, n)
            ids = torch.randint(0, cfg.vocab, (1, n)).to(cfg.device)
            with torch.inference_mode():
                model(input_ids=ids[:, :min(n, 128)])  # one-time allocations stay out of the peak
                out[name][n] = forward_peak_bytes(lambda m=model, i=ids: m(input_ids=i),
                                                  cfg.device)
        del model
    return out


def memory_subprocess(cfg: Config, names: list[str], layers: int
                      ) -> dict[str, dict[int, tuple[int, str]]]:
    """Run ``memory_worker`` in a fresh interpreter; returns {variant: {N: (bytes, method)}}."""
    sub = {**asdict(cfg), "layers": [layers], "progress": False}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", ",".join(names),
           "--config-json", json.dumps(sub)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory worker for {names} failed:\n{res.stderr[-2000:]}")
    last = res.stdout.strip().splitlines()[-1]
    return {v: {int(n): (int(b), m) for n, (b, m) in d.items()}
            for v, d in json.loads(last).items()}


# -- the run --------------------------------------------------------------------------------
def log(cfg: Config, t0: float, msg: str) -> None:
    if cfg.progress:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def run(cfg: Config) -> dict:
    """Time (and measure memory of) every variant at every (layers, N); return the payload
    (results, targets, table) that ``main`` prints and writes."""
    for v in cfg.variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; expected some of {', '.join(VARIANTS)}")
    if "original" not in cfg.variants:
        raise ValueError("variants must include 'original' (every ratio is against it)")
    t0 = time.perf_counter()
    threads = set_threads(cfg.threads) if cfg.device == "cpu" else torch.get_num_threads()
    info = machine_info(threads)
    if cfg.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(cfg.device)
    rounds: dict[tuple[int, int], float] = {}
    results: list[dict] = []
    smallest = min(cfg.layers)
    for layers in sorted(cfg.layers):
        original = build_original(cfg, layers)
        fixed = {v: build_variant(v, original, cfg, max(cfg.lengths))
                 for v in cfg.variants if not depends_on_n(v)}
        for n in sorted(cfg.lengths):
            if n < cfg.dk and any(depends_on_n(v) for v in cfg.variants):
                raise ValueError(f"N={n} is shorter than dk={cfg.dk}: use longer lengths")
            per_n = {v: build_variant(v, original, cfg, n) for v in cfg.variants if depends_on_n(v)}
            models = {v: fixed[v] if v in fixed else per_n[v] for v in cfg.variants}
            ids = torch.randint(0, cfg.vocab, (1, n), generator=torch.Generator().manual_seed(n))
            ids = ids.to(cfg.device)
            est = estimate_round(rounds, layers, n)
            stats, warmup = time_point(models, ids, est, cfg, layers == smallest)
            rounds[(layers, n)] = sum(s["median_ms"] for s in stats.values()) / 1e3
            for v in cfg.variants:
                results.append({"layers": layers, "N": n, "variant": v, **stats[v],
                                "warmup": warmup})
            del per_n, models
            log(cfg, t0, f"layers={layers} N={n}: round {rounds[(layers, n)]:.1f}s, "
                         f"{stats['original']['reps']} reps")
        del original, fixed
        gc.collect()
    mem_method, mem_error = None, None
    if cfg.memory not in ("fresh", "shared", "off"):
        raise ValueError(f"memory must be fresh, shared or off; got {cfg.memory!r}")
    if cfg.memory != "off":
        groups = [[v] for v in cfg.variants] if cfg.memory == "fresh" else [list(cfg.variants)]
        for layers in cfg.memory_layers or [smallest]:
            for names in groups:
                try:
                    if cfg.device == "cpu":  # a fresh interpreter: nothing of the timing run left
                        peaks = memory_subprocess(cfg, names, layers)
                    else:
                        peaks = memory_worker(cfg, names, layers)
                except (RuntimeError, OSError, ValueError) as e:  # keep the timings
                    mem_error = f"{','.join(names)} at {layers} layers: {e}"
                    log(cfg, t0, f"memory measurement failed: {mem_error}")
                    continue
                for r in results:
                    if r["layers"] == layers and r["variant"] in peaks:
                        r["peak_mem_mb"] = peaks[r["variant"]][r["N"]][0] / 2**20
                        mem_method = peaks[r["variant"]][r["N"]][1]
                log(cfg, t0, f"memory layers={layers} {','.join(names)} done")
        if mem_method and cfg.device == "cpu":
            mem_method = f"{mem_method}; {cfg.memory} subprocess"
    add_ratios(results)
    payload = {
        "benchmark": "e2e", "device": cfg.device, "config": asdict(cfg),
        "definitions": DEFINITIONS, "memory_method": mem_method, "memory_error": mem_error,
        "machine": info,
        "results": results, "targets": targets(results, cfg),
        "wall_s": time.perf_counter() - t0,
    }
    payload["table_markdown"] = table(results)
    payload["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return payload


DEFINITIONS = {
    "speedup": "t_original / t_variant (medians, same run)",
    "bound": "(t_original - t_variant) / (t_original - t_noattn): fraction of the attention "
             "time above the noattn bound that the variant removes (1 = as fast as noattn)",
    "vs_bound": "t_noattn / t_variant",
    "noattn": "self-attention replaced by its Q, K, V projections, output = V (no attention)",
    "noattn_qo": "as noattn without the K and V projections (output = Q): the floor for "
                 "rewrites that project K, V on dk rows",
    "peak_mem_mb": "peak memory added by one forward over the built model (memory_method)",
}


def add_ratios(results: list[dict]) -> None:
    """speedup, bound, vs_bound (and floor) per row, against the same (layers, N)."""
    by = {(r["layers"], r["N"], r["variant"]): r["median_ms"] for r in results}
    for r in results:
        t_o = by[(r["layers"], r["N"], "original")]
        t = r["median_ms"]
        r["speedup"] = t_o / t
        for key, ref in (("bound", BOUND), ("floor", FLOOR)):
            t_b = by.get((r["layers"], r["N"], ref))
            r[key] = (t_o - t) / (t_o - t_b) if t_b is not None and t_o > t_b else None
        t_b = by.get((r["layers"], r["N"], BOUND))
        r["vs_bound"] = t_b / t if t_b is not None else None


def claim1_holds(n: int, cfg: Config) -> bool:
    """Claim 1's conditions N > dk(H+2) > dm > dk > dh for this model."""
    dh = cfg.hidden // cfg.heads
    return n > cfg.dk * (cfg.heads + 2) > cfg.hidden > cfg.dk > dh


def targets(results: list[dict], cfg: Config) -> list[dict]:
    """The issue's targets, on the 2-layer model (else the shallowest): FLuRKA >= 1.6x the
    original at N=4096 and >= 3x at N=8192; FLuRKA faster than Linformer-only and than
    kernel-only (same feature map) wherever Claim 1's conditions hold."""
    layers = 2 if 2 in cfg.layers else min(cfg.layers)
    t = {(r["N"], r["variant"]): r for r in results if r["layers"] == layers}
    out = []
    for v in ("flurka_perf", "flurka_rnn"):
        for n, need in ((4096, 1.6), (8192, 3.0)):
            if (n, v) in t:
                s = t[(n, v)]["speedup"]
                out.append({"target": f"{v} >= {need}x original at N={n} ({layers} layers)",
                            "value": round(s, 2), "met": s >= need})
        for n in sorted({N for N, _ in t}):
            if not claim1_holds(n, cfg) or (n, v) not in t:
                continue
            for other in ("linformer", KERNEL_ONLY[v]):
                if (n, other) in t:
                    a, b = t[(n, v)]["median_ms"], t[(n, other)]["median_ms"]
                    out.append({"target": f"{v} faster than {other} at N={n} (Claim 1 holds)",
                                "value": round(b / a, 2), "met": a < b})
    if (8192, BOUND) in t:
        out.append({"target": "info: noattn bound speed-up at N=8192 (issue: about 3.5x)",
                    "value": round(t[(8192, BOUND)]["speedup"], 2), "met": None})
    return out


def table(results: list[dict]) -> str:
    """Markdown table of every measurement."""
    rows = []
    for r in results:
        pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
        mem = r.get("peak_mem_mb")
        rows.append([r["layers"], r["N"], r["variant"], f"{r['median_ms']:.0f}",
                     f"{r['reps']}{'' if r['warmup'] else ' (cold)'}", f"{r['speedup']:.2f}x",
                     pct(r["bound"]), pct(r["floor"]), "-" if mem is None else f"{mem:.0f}"])
    return format_table(["layers", "N", "variant", "median ms", "reps", "speed-up",
                         "of noattn bound", "of noattn_qo floor", "peak MB"], rows)


def plot(payload: dict, path: str | Path) -> Path:
    """Time against N, log-log, one panel per layer count, one line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = payload["results"]
    layer_counts = sorted({r["layers"] for r in res})
    fig, axes = plt.subplots(1, len(layer_counts), figsize=(6 * len(layer_counts), 4.5),
                             squeeze=False)
    for ax, layers in zip(axes[0], layer_counts):
        for v in payload["config"]["variants"]:
            pts = sorted((r["N"], r["median_ms"] / 1e3) for r in res
                         if r["layers"] == layers and r["variant"] == v)
            style = "--" if v in (BOUND, FLOOR) else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=v)
        ax.set_xscale("log", base=2)
        lengths = sorted({r["N"] for r in res})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("forward time (s)")
        ax.set_title(f"BERT-base-sized encoder, {layers} layers")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = payload["machine"]
    fig.suptitle(f"{payload['device']}: {m.get('gpu', m['cpu'])}, {m['threads']} threads, "
                 f"{payload['config']['dtype']}, batch 1, dk={payload['config']['dk']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    """Command line -> (args, Config)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers, N = 1024, 2048, 4096, 3 reps")
    ap.add_argument("--layers", type=str, default=None, help="comma-separated (default 2,12)")
    ap.add_argument("--lengths", type=str, default=None, help="comma-separated N")
    ap.add_argument("--variants", type=str, default=None,
                    help=f"comma-separated, of {','.join(VARIANTS)}")
    ap.add_argument("--dk", type=int, default=256)
    ap.add_argument("--reps", type=int, default=None,
                    help="most rounds per point (default 5 on CPU, 20 on CUDA)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of timed rounds per point")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda")
    ap.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--memory", default=None, choices=("fresh", "shared", "off"),
                    help="peak memory: a fresh subprocess per variant (default), one shared "
                         "subprocess (default with --quick), or off")
    ap.add_argument("--memory-layers", type=str, default=None,
                    help="layer counts to measure memory at (default: the smallest)")
    ap.add_argument("--json", type=str, default=None,
                    help="default results/e2e_<cpu|cuda>.json (_quick.json with --quick)")
    ap.add_argument("--plot", type=str, default=None,
                    help="PNG path (default: the JSON path with .png); 'none'")
    ap.add_argument("--memory-worker", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config-json", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.config_json:
        return args, Config(**json.loads(args.config_json))
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = Config(dk=args.dk, budget_s=args.budget, threads=args.threads, device=device,
                 dtype=args.dtype or ("float32" if device == "cpu" else "bfloat16"),
                 memory=args.memory or ("shared" if args.quick else "fresh"))
    if args.quick:
        cfg.layers, cfg.lengths, cfg.reps = [2], [1024, 2048, 4096], 3
    if args.layers:
        cfg.layers = ints(args.layers)
    if args.lengths:
        cfg.lengths = ints(args.lengths)
    if args.variants:
        cfg.variants = args.variants.split(",")
    if args.reps:
        cfg.reps = args.reps
    elif device != "cpu" and not args.quick:
        cfg.reps = 20
    if args.memory_layers:
        cfg.memory_layers = ints(args.memory_layers)
    return args, cfg


def main(argv: list[str] | None = None) -> dict | None:
    """Run, print the table and the targets, write JSON and PNG."""
    args, cfg = parse(argv)
    if args.memory_worker:  # child process of memory_subprocess
        if cfg.device == "cpu":
            set_threads(cfg.threads)
        peaks = memory_worker(cfg, args.memory_worker.split(","), cfg.layers[0])
        print(json.dumps({v: {str(n): list(p) for n, p in d.items()} for v, d in peaks.items()}))
        return None
    payload = run(cfg)
    payload["command"] = " ".join(["benchmarks/e2e_cpu.py",
                                   *(argv if argv is not None else sys.argv[1:])])
    print(payload["table_markdown"])
    for t in payload["targets"]:
        flag = "info" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        print(f"[{flag}] {t['target']}: {t['value']}")
    dev = "cpu" if cfg.device == "cpu" else "cuda"
    quick = "_quick" if args.quick else ""  # a quick run never overwrites the full results
    json_path = Path(args.json) if args.json else RESULTS / f"e2e_{dev}{quick}.json"
    path = write_json(json_path, payload)
    print(f"wrote {path} ({payload['wall_s']:.0f}s)", file=sys.stderr)
    if args.plot != "none":
        png = plot(payload, args.plot or json_path.with_suffix(".png"))
        print(f"wrote {png}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
