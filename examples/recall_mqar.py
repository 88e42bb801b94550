"""Multi-query associative recall (MQAR): how much of a softmax model's recall each variant keeps.

    python examples/recall_mqar.py              # full run: every variant, ~11 min on 1 thread
    python examples/recall_mqar.py --quick      # test-sized, under 30 s
    python examples/recall_mqar.py --variants performer,performer@16,eva
    python examples/recall_mqar.py --kernel rnn relu --window 8
    python examples/recall_mqar.py --variants performer --finetune-steps 1000

``--finetune-steps N`` / ``--finetune-lr LR`` change the fine-tuning budget of every variant
(default 200 steps at 1e-3, ``--quick`` 30); ``--distill-steps N`` the distillation budget
(default 150, ``--quick`` 20). The softmax model's training is the same whatever they are.

The task (Zoology's MQAR, Arora et al. 2023, generated here, offline and seeded): a sequence of
``pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys drawn from the first half of the
vocabulary, values from the second half), then ``queries`` of those keys, each followed by its
value: ``q1 a1 q2 a2 ...``. At each query position the target is the value paired with that key
earlier in the sequence; every other position is ignored. Recall accuracy is the fraction of
query positions whose arg-max prediction is that value (chance: 1 / number of values).

The steps:

1. **Softmax model.** A small causal transformer (``MQARModel``: token + position embeddings,
   pre-LN blocks, ``F.scaled_dot_product_attention(is_causal=True)``) trained from scratch on
   fresh random sequences to near-perfect recall on held-out sequences.
2. **Convert** it for every variant: ``fr.convert(model, kernel=K, dk=None, window=W)`` (causal
   sites are kernel-only). ``K@W`` in ``--variants`` is kernel K with a sliding window of W
   exact-softmax keys beside the kernel part; ``softmax`` is the exact conversion (an oracle:
   the accuracy must not move).
3. **Up-train**, the same budget for every variant: ``fr.distill`` (attention transfer:
   only the FLuRKA parameters train against the softmax model's attention modules; skipped
   where a variant has none: performer / relu / rnn / eva without a window), then fine-tuning
   of every parameter on the recall loss. Recall accuracy before, after distillation, after.

Recall is what the linear-attention literature shows that kernels lose: a kernel state of m
features cannot store ``pairs`` arbitrary associations as sharply as softmax attention. The
figures are in docs/quality.md.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script
import _common

import flurka_rewrite as fr

KERNELS = ("performer", "relu", "rnn", "ffk", "eva")
IGNORE = -100  # target of the positions that are not queries


@dataclass(frozen=True)
class Config:
    """Task size, model, schedules. The defaults are the full run; ``QUICK`` is ``--quick``."""

    # task
    vocab: int = 64          # keys: [0, vocab/2), values: [vocab/2, vocab)
    pairs: int = 16          # key-value pairs per sequence
    queries: int = 16        # queried keys (distinct, <= pairs); length 2 (pairs + queries)
    # model
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    # softmax training
    train_steps: int = 1500
    train_lr: float = 3e-3
    batch: int = 64
    # conversion and up-training (the same for every variant)
    window: int = 16         # sliding window of the K@W variants given by --kernel
    num_features: int | None = None  # features per head (eva: chunks); None: each map's default
    distill_steps: int = 150
    distill_lr: float = 1e-2
    finetune_steps: int = 200
    finetune_lr: float = 1e-3
    # evaluation
    test_sequences: int = 1024   # held-out sequences (drawn from another seed)
    seed: int = 0

    @property
    def seq_len(self) -> int:
        """Tokens per sequence."""
        return 2 * (self.pairs + self.queries)


QUICK = Config(vocab=32, pairs=4, queries=4, d_model=32, heads=2, train_steps=250,
               batch=32, window=4, distill_steps=20, finetune_steps=30, test_sequences=256)


# -- data -------------------------------------------------------------------------------------
def make_batch(cfg: Config, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """n MQAR sequences: inputs x (n, seq_len) and targets y (n, seq_len), ``IGNORE`` except at
    the query positions, where y is the value paired with the queried key."""
    half = cfg.vocab // 2
    if not 0 < cfg.queries <= cfg.pairs <= half:
        raise ValueError(f"need 0 < queries <= pairs <= vocab/2, got {cfg.queries}, "
                         f"{cfg.pairs}, {half}")
    keys = torch.rand(n, half, generator=g).argsort(dim=1)[:, :cfg.pairs]   # distinct keys
    vals = half + torch.randint(half, (n, cfg.pairs), generator=g)
    order = torch.rand(n, cfg.pairs, generator=g).argsort(dim=1)[:, :cfg.queries]
    qk, qv = keys.gather(1, order), vals.gather(1, order)
    kv = torch.stack([keys, vals], dim=2).reshape(n, 2 * cfg.pairs)
    qa = torch.stack([qk, qv], dim=2).reshape(n, 2 * cfg.queries)
    x = torch.cat([kv, qa], dim=1)
    y = torch.full_like(x, IGNORE)
    y[:, 2 * cfg.pairs::2] = qv  # at each query key: its value
    return x, y


# -- model ------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; the SDPA call is the site the compiler rewrites."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (t.view(B, N, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class MQARModel(nn.Module):
    """ids (B, N) -> logits (B, N, vocab)."""

    def __init__(self, vocab: int, seq_len: int, d_model: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.Sequential(*[Block(d_model, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


# -- training and evaluation -------------------------------------------------------------------
def recall_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy at the query positions."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                           ignore_index=IGNORE)


@torch.no_grad()
def accuracy(model: nn.Module, test: tuple[Tensor, Tensor], batch: int = 256) -> float:
    """Recall accuracy on the held-out sequences, in eval mode."""
    was = model.training
    model.eval()
    x, y = test
    hit = total = 0
    for i in range(0, len(x), batch):
        pred = model(x[i:i + batch]).argmax(-1)
        t = y[i:i + batch]
        m = t != IGNORE
        hit += int((pred[m] == t[m]).sum())
        total += int(m.sum())
    model.train(was)
    return hit / total


def train(model: nn.Module, cfg: Config, *, steps: int, lr: float, seed: int,
          label: str, log_every: int = 250) -> list[float]:
    """AdamW, linear warm-up then cosine decay, gradients clipped at 1, on fresh sequences from
    a generator seeded with ``seed``; every parameter trains. Returns the loss per step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps)
                                                                        / steps)))
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        loss = recall_loss(model, *make_batch(cfg, cfg.batch, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % log_every == 0 or step == steps:
            print(f"  {label} step {step:>5}/{steps}  loss {losses[-1]:.4f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return losses


# -- variants ---------------------------------------------------------------------------------
def parse_variant(name: str) -> tuple[str, int | None]:
    """``"rnn"`` -> ("rnn", None); ``"rnn@16"`` -> ("rnn", 16)."""
    kernel, _, w = name.partition("@")
    if kernel not in KERNELS + ("softmax",):
        raise ValueError(f"unknown kernel {kernel!r} in variant {name!r}; "
                         f"choose from {', '.join(KERNELS + ('softmax',))}")
    return kernel, (int(w) if w else None)


def default_variants(kernels: tuple[str, ...], window: int) -> list[str]:
    """Every kernel without and with a window: ``["performer", "performer@16", ...]``."""
    return [v for k in kernels for v in (k, f"{k}@{window}")]


def run_variant(model: nn.Module, cfg: Config, name: str, test: tuple[Tensor, Tensor],
                example: Tensor) -> dict[str, Any]:
    """Convert a copy of ``model`` as variant ``name``, measure, up-train, measure."""
    kernel, window = parse_variant(name)
    out: dict[str, Any] = {"kernel": kernel, "window": window}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. dk/length warnings: the report says it
            conv = fr.convert(model, kernel=kernel, dk=None, window=window,
                              num_features=cfg.num_features, example_inputs=(example,),
                              seed=cfg.seed)
    except ValueError as e:  # e.g. softmax with window=: no kernel part beside the window
        print(f"{name}: not converted: {e}")
        return out | {"status": "refused", "reason": str(e)}
    report = conv.flurka_report
    out |= {"status": "converted", "sites_rewritten": len(report.rewritten),
            "end_to_end_error": report.end_to_end_error,
            "acc_before": accuracy(conv, test)}
    flurka = [p for m in conv.modules() if isinstance(m, fr.FlurkaAttention)
              for p in m.parameters()]
    out["flurka_params"] = sum(p.numel() for p in flurka)
    out["acc_distilled"], distill_losses = None, []
    if cfg.distill_steps and flurka:
        g = torch.Generator().manual_seed(cfg.seed + 1)
        batches = [make_batch(cfg, cfg.batch, g)[0] for _ in range(cfg.distill_steps)]
        res = fr.distill(conv, teacher=model, data=batches, steps=cfg.distill_steps,
                         lr=cfg.distill_lr, seed=cfg.seed, progress=False)
        distill_losses = res.losses
        out["acc_distilled"] = accuracy(conv, test)
    ft = train(conv, cfg, steps=cfg.finetune_steps, lr=cfg.finetune_lr, seed=cfg.seed + 2,
               label=f"fine-tune {name}", log_every=max(1, cfg.finetune_steps // 2))
    out |= {"acc_after": accuracy(conv, test), "seconds": time.perf_counter() - t0,
            "curves": {"distill": distill_losses, "finetune": ft}}
    print(f"{name}: recall {out['acc_before']:.4f} before, "
          f"{out['acc_distilled'] if out['acc_distilled'] is not None else '-'} distilled, "
          f"{out['acc_after']:.4f} after ({out['seconds']:.0f} s)", flush=True)
    return out


def run(cfg: Config, variants: list[str]) -> dict[str, Any]:
    """Train the softmax model, then convert and up-train every variant; returns the figures."""
    for v in variants:
        parse_variant(v)  # fail before training
    torch.manual_seed(cfg.seed)
    test = make_batch(cfg, cfg.test_sequences, torch.Generator().manual_seed(cfg.seed + 1000))
    model = MQARModel(cfg.vocab, cfg.seq_len, cfg.d_model, cfg.heads, cfg.layers)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"MQAR: {cfg.pairs} pairs, {cfg.queries} queries, vocabulary {cfg.vocab}, length "
          f"{cfg.seq_len}; softmax model {n_params / 1e3:.0f}k parameters, "
          f"{cfg.train_steps} steps")
    t0 = time.perf_counter()
    train_losses = train(model, cfg, steps=cfg.train_steps, lr=cfg.train_lr, seed=cfg.seed,
                         label="softmax")
    t_train = time.perf_counter() - t0
    acc_softmax = accuracy(model, test)
    print(f"softmax recall accuracy (held out): {acc_softmax:.4f}")
    example = make_batch(cfg, 4, torch.Generator().manual_seed(cfg.seed + 2000))[0]
    results = {v: run_variant(model, cfg, v, test, example) for v in variants}
    return {"config": asdict(cfg), "seq_len": cfg.seq_len, "params": n_params,
            "chance": 1.0 / (cfg.vocab - cfg.vocab // 2), "acc_softmax": acc_softmax,
            "seconds_softmax_training": t_train, "softmax_train_loss": train_losses,
            "variants": results}


def table(figures: dict[str, Any]) -> str:
    """The printed table: recall accuracy per variant, and after up-training as a fraction of
    the softmax model's."""
    sm = figures["acc_softmax"]
    lines = [f"softmax model: recall {sm:.4f} (chance {figures['chance']:.4f})",
             f"{'variant':<16}{'before':>8}{'distilled':>11}{'after':>8}{'/ softmax':>11}"]
    for name, r in figures["variants"].items():
        if r["status"] != "converted":
            lines.append(f"{name:<16}  not converted: {r['reason'][:60]}")
            continue
        d = "-" if r["acc_distilled"] is None else f"{r['acc_distilled']:.4f}"
        lines.append(f"{name:<16}{r['acc_before']:>8.4f}{d:>11}{r['acc_after']:>8.4f}"
                     f"{r['acc_after'] / sm:>11.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--quick``, ``--variants``, ``--kernel``, ``--window``,
    ``--num-features``, ``--finetune-steps``, ``--finetune-lr``, ``--distill-steps``,
    ``--json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="test-sized task and schedules (< 30 s)")
    p.add_argument("--variants", metavar="LIST",
                   help="comma-separated variants, KERNEL or KERNEL@WINDOW (kernels: "
                        f"{', '.join(KERNELS)}, softmax = exact); default: every kernel "
                        "without and with --window")
    p.add_argument("--kernel", nargs="+", choices=KERNELS + ("softmax",), default=None,
                   help="shorthand: these kernels, each without and with --window")
    p.add_argument("--window", type=int, default=None,
                   help=f"window of the shorthand variants (default {Config.window}, "
                        f"--quick {QUICK.window})")
    p.add_argument("--num-features", type=int, default=None, metavar="M",
                   help="features per head of every kernel (eva: the number of chunks; "
                        "default: each map's own, 64 for eva)")
    p.add_argument("--finetune-steps", type=int, default=None, metavar="N",
                   help=f"fine-tuning steps of every variant (default {Config.finetune_steps}, "
                        f"--quick {QUICK.finetune_steps})")
    p.add_argument("--finetune-lr", type=float, default=None, metavar="LR",
                   help=f"peak fine-tuning learning rate (default {Config.finetune_lr})")
    p.add_argument("--distill-steps", type=int, default=None, metavar="N",
                   help=f"distillation steps where a variant has FLuRKA parameters (default "
                        f"{Config.distill_steps}, --quick {QUICK.distill_steps})")
    p.add_argument("--json", metavar="PATH", default="examples/results/recall_mqar.json",
                   help="figures as JSON (default: examples/results/recall_mqar.json; "
                        "'none' to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = p.parse_args(argv)
    _common.setup(args)
    cfg = replace(QUICK if args.quick else Config(), seed=args.seed)
    if args.window is not None:
        cfg = replace(cfg, window=args.window)
    if args.num_features is not None:
        cfg = replace(cfg, num_features=args.num_features)
    if args.finetune_steps is not None:
        cfg = replace(cfg, finetune_steps=args.finetune_steps)
    if args.finetune_lr is not None:
        cfg = replace(cfg, finetune_lr=args.finetune_lr)
    if args.distill_steps is not None:
        cfg = replace(cfg, distill_steps=args.distill_steps)
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    else:
        kernels = tuple(args.kernel) if args.kernel else KERNELS
        variants = default_variants(tuple(k for k in kernels if k != "softmax"), cfg.window)
        if args.kernel and "softmax" in args.kernel:
            variants.insert(0, "softmax")
    figures = run(cfg, variants)
    print(table(figures))
    if args.json and args.json != "none":
        _common.write_json(args.json, figures)
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
