"""Decoding on the CPU: a Llama-style decoder with its KV cache against its converted forms.

    .venv/bin/python benchmarks/decode_cpu.py                 # contexts 512..16k, batch 1 and 8
    .venv/bin/python benchmarks/decode_cpu.py --quick         # contexts 128, 512, batch 1, 2 layers
    .venv/bin/python benchmarks/decode_cpu.py --contexts 512,2048,8192 --batches 1 --threads 1

Model: ``transformers.LlamaForCausalLM`` from a config (no download, random weights, eval,
SDPA): 6 layers, width 512, 8 heads (head size 64), 4 key/value heads (grouped-query), FFN
1376, vocab 1000, fp32. Variants, all in one process:

  original          the model with its ``DynamicCache`` (keys and values of every token)
  rnn, performer    ``fr.convert(kernel=..., dk=None)``: causal kernel attention, generating
                    with a fixed-size recurrent state (``FlurkaStateLayer``, hf_generate.py)
  *_window          the same with ``window=64``: exact softmax over the last 64 keys beside
                    the kernel; the state adds the last 63 keys and values (a rolling buffer,
                    kernels/window_decode.py), so it is bounded too. A variant whose decoding
                    is refused gets rows saying "not supported" with the refusal, untimed

At each (context N, batch B): every variant prefills N random tokens (``model(ids,
use_cache=True, logits_to_keep=1)``: the time is "prefill"; 3 interleaved repetitions when
B*N <= 2048, else 1), then decodes greedily from its own cache, one token per call,
interleaved across variants (A B C A B C ...): ``--warmup`` untimed tokens, then the median
of ``--tokens`` timed ones is "per-token decode". Cache memory = bytes held by the cache's
tensors after the last token: for the original its layers' keys and values, for a converted
model the states' tensors (S, z, c in fp32; with a window also its buffer of keys and
values). Every model first runs a 64-token prefill and two steps, so one-time costs stay
out. ``--max-batch-tokens`` skips points with B*N above it (the rows say so). Partial
results are written after every point.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, interleaved_median, machine_info, set_threads, write_json

import flurka_rewrite as fr
from flurka_rewrite.hf_generate import FlurkaStateLayer

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("original", "rnn", "performer", "rnn_window", "performer_window")
SMALL_PREFILL = 2048  # B*N at or below this: 3 prefill repetitions
TARGET_LONG, TARGET_SHORT = 16384, 512


@dataclass
class Config:
    """What to run. Defaults: the issue's setting."""

    contexts: list[int] = field(default_factory=lambda: [512, 2048, 8192, 16384])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    layers: int = 6
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 1376
    vocab: int = 1000
    window: int = 64
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    warmup: int = 2  # untimed decode tokens per point
    tokens: int = 8  # timed decode tokens per point
    max_batch_tokens: int | None = None
    threads: int | None = None
    seed: int = 0
    progress: bool = True


# -- models ---------------------------------------------------------------------------------
def build_original(cfg: Config) -> nn.Module:
    """A randomly initialised LlamaForCausalLM (eval, SDPA, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    lc = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                     num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                     intermediate_size=cfg.ffn, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                     max_position_embeddings=max(16640, max(cfg.contexts) + 256),
                     attn_implementation="sdpa")
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(lc).eval()


def convert(original: nn.Module, name: str, cfg: Config) -> nn.Module:
    """Variant ``name`` (rnn / performer, optionally _window) of ``original``."""
    kernel, _, windowed = name.partition("_")
    ids = torch.randint(2, cfg.vocab, (1, 64), generator=torch.Generator().manual_seed(1))
    opts: dict[str, Any] = {"window": cfg.window, "backend": "torch"} if windowed else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = fr.convert(original, kernel=kernel, dk=None, seed=cfg.seed,
                         example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                         **opts)
    if len(new.flurka_report.rewritten) != cfg.layers:
        raise RuntimeError(f"{name}: {len(new.flurka_report.rewritten)} of {cfg.layers} "
                           f"layers rewritten:\n{new.flurka_report}")
    return new.eval()


def forward(model: nn.Module, ids: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
    """(next greedy tokens (B, 1), the cache) of one call with ``cache`` (None: a prefill)."""
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    new_cache = getattr(out, "cache", None) or out.past_key_values
    return out.logits[:, -1:].argmax(-1), new_cache


def decode_refusal(model: nn.Module) -> str | None:
    """None when ``model`` prefills 8 tokens and decodes one from its cache, else why not."""
    ids = torch.randint(2, 100, (1, 8))
    try:
        with torch.inference_mode():
            tok, cache = forward(model, ids)
            forward(model, tok, cache)
    except (RuntimeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def cache_bytes(cache: Any) -> tuple[int, int]:
    """(bytes held by the tensors of ``cache``, tokens it has seen): a ``FlurkaStateLayer``'s
    states, any other layer's ``keys`` and ``values``."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, FlurkaStateLayer):
            tensors = [t for s in layer.states.values() for t in s.tensors()]
        else:
            tensors = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                       if isinstance(t, torch.Tensor)]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total, cache.get_seq_length()


# -- one point ------------------------------------------------------------------------------
def measure_point(models: dict[str, nn.Module], n: int, b: int, cfg: Config) -> list[dict]:
    """Prefill, per-token decode and cache memory of every model at context n, batch b."""
    ids = torch.randint(2, cfg.vocab, (b, n), generator=torch.Generator().manual_seed(n + b))
    last: dict[str, tuple[torch.Tensor, Any]] = {}

    def prefill(name: str) -> Callable[[], None]:
        def fn() -> None:
            last.pop(name, None)  # free the previous repetition's cache first
            last[name] = forward(models[name], ids)
        return fn

    reps = 3 if b * n <= SMALL_PREFILL else 1
    with torch.inference_mode():
        pre = interleaved_median({v: prefill(v) for v in models}, reps=reps, warmup=0)
        steps: dict[str, list[float]] = {v: [] for v in models}
        for i in range(cfg.warmup + cfg.tokens):
            for v, model in models.items():
                tok, cache = last[v]
                t0 = time.perf_counter()
                last[v] = forward(model, tok, cache)
                if i >= cfg.warmup:
                    steps[v].append(time.perf_counter() - t0)
    rows = []
    for v in models:
        nbytes, seen = cache_bytes(last[v][1])
        ms = 1e3 * statistics.median(steps[v])
        rows.append({"context": n, "batch": b, "variant": v, "status": "ok",
                     "prefill_ms": pre[v]["median_ms"], "prefill_reps": pre[v]["reps"],
                     "decode_ms": ms, "decode_min_ms": 1e3 * min(steps[v]),
                     "decode_max_ms": 1e3 * max(steps[v]), "decode_tokens": len(steps[v]),
                     "tokens_per_s": 1e3 * b / ms, "cache_bytes": nbytes, "cache_tokens": seen})
    last.clear()
    return rows


def add_ratios(results: list[dict]) -> None:
    """Per measured row: speed-up (original's per-token time / this one's) and the cache
    memory against the original's at the same (context, batch)."""
    orig = {(r["context"], r["batch"]): r for r in results
            if r["variant"] == "original" and r["status"] == "ok"}
    for r in results:
        o = orig.get((r["context"], r["batch"]))
        ok = r["status"] == "ok" and o is not None
        r["decode_speedup"] = o["decode_ms"] / r["decode_ms"] if ok else None
        r["memory_ratio"] = r["cache_bytes"] / o["cache_bytes"] if ok else None


def targets(results: list[dict]) -> list[dict]:
    """The issue's targets per converted variant and batch: per-token decode at 16k within
    1.2x of 512; at 16k >= 3x the original's tokens/s; cache memory at 16k <= 1/16 of the
    original's. ``met`` None: not measured (``value`` says why)."""
    ok = {(r["variant"], r["context"], r["batch"]): r for r in results if r["status"] == "ok"}
    status = {(r["variant"], r["context"], r["batch"]): r["status"] for r in results
              if r["status"] != "ok"}
    out = []
    converted = [v for v in VARIANTS if v != "original"
                 and any(r["variant"] == v for r in results)]
    for b in sorted({r["batch"] for r in results}):
        for v in converted:
            long, short = ok.get((v, TARGET_LONG, b)), ok.get((v, TARGET_SHORT, b))
            orig = ok.get(("original", TARGET_LONG, b))
            missing = status.get((v, TARGET_LONG, b), status.get((v, TARGET_SHORT, b),
                                                                 "not measured"))
            checks = (
                (f"{v} decode at 16k within 1.2x of 512 (batch {b})", 1.2, "<=",
                 long["decode_ms"] / short["decode_ms"] if long and short else None),
                (f"{v} tokens/s at 16k >= 3x original (batch {b})", 3.0, ">=",
                 orig["decode_ms"] / long["decode_ms"] if long and orig else None),
                (f"{v} cache memory at 16k <= 1/16 of original (batch {b})", 1 / 16, "<=",
                 long["cache_bytes"] / orig["cache_bytes"] if long and orig else None),
            )
            for name, need, op, val in checks:
                met = None if val is None else (val <= need if op == "<=" else val >= need)
                out.append({"target": name, "value": missing if val is None else round(val, 4),
                            "met": met})
            top = max((n for (w, n, bb) in ok if w == v and bb == b), default=None)
            if long is None and top is not None and top > TARGET_SHORT and short:
                at, o = ok[(v, top, b)], ok.get(("original", top, b))
                out.append({"target": f"info: {v} at the longest measured context {top} "
                                      f"(batch {b}): decode vs 512, speed-up, memory ratio",
                            "value": [round(at["decode_ms"] / short["decode_ms"], 4),
                                      round(o["decode_ms"] / at["decode_ms"], 4) if o else None,
                                      round(at["cache_bytes"] / o["cache_bytes"], 4) if o
                                      else None], "met": None})
    return out


def table(results: list[dict]) -> str:
    """Markdown table of every row (not supported / not run rows included)."""
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["context"], r["batch"], r["variant"], *["-"] * 6, r["status"]])
            continue
        mem = r["cache_bytes"] / 2**20
        rows.append([r["context"], r["batch"], r["variant"], f"{r['prefill_ms']:.0f}",
                     f"{r['decode_ms']:.1f}", f"{r['tokens_per_s']:.1f}",
                     f"{r['decode_speedup']:.2f}x", f"{mem:.2f}" if mem < 10 else f"{mem:.0f}",
                     f"{r['memory_ratio']:.4f}", "ok"])
    return format_table(["context", "batch", "variant", "prefill ms", "decode ms/token",
                         "tokens/s", "decode speed-up", "cache MiB", "cache / original",
                         "status"], rows)


def plot(payload: dict, path: str | Path) -> Path:
    """Per-token decode time against the context (log x), one panel per batch size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = [r for r in payload["results"] if r["status"] == "ok"]
    batches = sorted({r["batch"] for r in res}) or [1]
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for v in VARIANTS:
            pts = sorted((r["context"], r["decode_ms"]) for r in res
                         if r["batch"] == b and r["variant"] == v)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
        ctx = sorted({r["context"] for r in res if r["batch"] == b})
        ax.set_xscale("log", base=2)
        if ctx:
            ax.set_xticks(ctx, [str(n) for n in ctx])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("context (tokens in the cache)")
        ax.set_ylabel("per-token decode time (ms, median)")
        ax.set_title(f"batch {b}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m, c = payload["machine"], payload["config"]
    fig.suptitle(f"Llama-style decoder, {c['layers']} layers, width {c['hidden']}: "
                 f"{m['cpu']}, {m['threads']} threads, fp32")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the run --------------------------------------------------------------------------------
def log(cfg: Config, t0: float, msg: str) -> None:
    if cfg.progress:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def run(cfg: Config, on_point: Callable[[dict], None] | None = None) -> dict:
    """Measure every variant at every (context, batch); return the payload. ``on_point`` is
    called with the payload so far after each point (partial results)."""
    bad = [v for v in cfg.variants if v not in VARIANTS]
    if bad or "original" not in cfg.variants:
        raise ValueError(f"variants must include 'original' and be of {', '.join(VARIANTS)}; "
                         f"got {cfg.variants}")
    t0 = time.perf_counter()
    info = machine_info(set_threads(cfg.threads))
    original = build_original(cfg)
    models: dict[str, nn.Module] = {"original": original}
    refused: dict[str, str] = {}
    convert_s: dict[str, float] = {}
    for v in (v for v in cfg.variants if v != "original"):
        t = time.perf_counter()
        model = convert(original, v, cfg)
        convert_s[v] = time.perf_counter() - t
        why = decode_refusal(model)
        if why is None:
            models[v] = model
        else:
            refused[v] = why
        log(cfg, t0, f"converted {v} in {convert_s[v]:.0f}s"
                     + ("" if why is None else f"; decoding refused: {why[:120]}"))
    with torch.inference_mode():  # one-time costs (first calls) stay out of the timings
        for model in models.values():
            tok, cache = forward(model, torch.randint(2, cfg.vocab, (1, 64)))
            forward(model, tok, forward(model, tok, cache)[1])
    results: list[dict] = []
    payload: dict[str, Any] = {"benchmark": "decode", "device": "cpu", "config": asdict(cfg),
                               "definitions": DEFINITIONS, "machine": info,
                               "convert_s": convert_s, "refused": refused, "results": results}
    for b in sorted(cfg.batches):
        for n in sorted(cfg.contexts):
            if cfg.max_batch_tokens is not None and b * n > cfg.max_batch_tokens:
                rows = [{"context": n, "batch": b, "variant": v, "status": "not run",
                         "reason": f"batch x context > --max-batch-tokens "
                                   f"{cfg.max_batch_tokens}"} for v in models]
            else:
                t = time.perf_counter()
                rows = measure_point(models, n, b, cfg)
                gc.collect()
                log(cfg, t0, f"context={n} batch={b}: {time.perf_counter() - t:.0f}s; "
                    + ", ".join(f"{r['variant']} {r['decode_ms']:.1f} ms/token" for r in rows))
            rows += [{"context": n, "batch": b, "variant": v, "status": "not supported",
                      "reason": why} for v, why in refused.items()]
            results.extend(rows)
            add_ratios(results)
            payload["wall_s"] = time.perf_counter() - t0
            if on_point is not None:
                on_point(payload)
    payload["targets"] = targets(results)
    payload["table_markdown"] = table(results)
    payload["wall_s"] = time.perf_counter() - t0
    payload["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return payload


DEFINITIONS = {
    "prefill_ms": "median time of model(ids, use_cache=True, logits_to_keep=1) on B x context "
                  "random tokens with a fresh cache (prefill_reps repetitions, interleaved)",
    "decode_ms": "median time of one call with one new token per sequence and the cache, "
                 "after `warmup` untimed tokens, over decode_tokens calls interleaved across "
                 "variants",
    "tokens_per_s": "batch * 1000 / decode_ms",
    "decode_speedup": "original decode_ms / this decode_ms at the same (context, batch)",
    "cache_bytes": "bytes of the cache's tensors after the last token: DynamicLayer keys and "
                   "values (original), FlurkaStateLayer states: S, z, c (converted), plus "
                   "the window's last w - 1 keys, values and their padding flags (_window)",
    "cache_tokens": "tokens the cache has seen (context + warmup + tokens)",
    "memory_ratio": "cache_bytes / the original's at the same (context, batch)",
}


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    """Command line -> (args, Config)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="contexts 128,512, batch 1, 2 layers")
    ap.add_argument("--contexts", type=str, default=None, help="comma-separated context lengths")
    ap.add_argument("--batches", type=str, default=None, help="comma-separated batch sizes")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 6)")
    ap.add_argument("--variants", type=str, default=None,
                    help=f"comma-separated, of {','.join(VARIANTS)} (original first)")
    ap.add_argument("--tokens", type=int, default=8, help="timed decode tokens per point")
    ap.add_argument("--warmup", type=int, default=2, help="untimed decode tokens per point")
    ap.add_argument("--max-batch-tokens", type=int, default=None,
                    help="skip points with batch x context above this (rows say 'not run')")
    ap.add_argument("--json", type=str, default=None,
                    help="default results/decode_cpu.json (_quick.json with --quick)")
    ap.add_argument("--plot", type=str, default=None,
                    help="PNG path (default: the JSON path with .png); 'none'")
    args = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    cfg = Config(threads=args.threads, tokens=args.tokens, warmup=args.warmup,
                 max_batch_tokens=args.max_batch_tokens)
    if args.quick:
        cfg.contexts, cfg.batches, cfg.layers = [128, 512], [1], 2
    if args.contexts:
        cfg.contexts = ints(args.contexts)
    if args.batches:
        cfg.batches = ints(args.batches)
    if args.layers:
        cfg.layers = args.layers
    if args.variants:
        cfg.variants = args.variants.split(",")
    return args, cfg


def main(argv: list[str] | None = None) -> dict:
    """Run, print the table and the targets, write JSON (after every point) and PNG."""
    args, cfg = parse(argv)
    quick = "_quick" if args.quick else ""  # a quick run never overwrites the full results
    json_path = Path(args.json) if args.json else RESULTS / f"decode_cpu{quick}.json"
    command = " ".join(["benchmarks/decode_cpu.py", *(argv if argv is not None else sys.argv[1:])])

    def save(payload: dict) -> None:
        payload["command"] = command
        write_json(json_path, payload)

    payload = run(cfg, on_point=save)
    save(payload)
    print(payload["table_markdown"])
    for t in payload["targets"]:
        flag = ("MET" if t["met"] else "NOT MET") if t["met"] is not None else (
            "info" if t["target"].startswith("info") else "not measured")
        print(f"[{flag}] {t['target']}: {t['value']}")
    print(f"wrote {json_path} ({payload['wall_s']:.0f}s)", file=sys.stderr)
    if args.plot != "none":
        print(f"wrote {plot(payload, args.plot or json_path.with_suffix('.png'))}",
              file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
