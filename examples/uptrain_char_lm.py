"""Up-train a causal character-level language model after converting it to kernel attention.

    python examples/uptrain_char_lm.py                  # full run: ~5 minutes on one CPU core
    python examples/uptrain_char_lm.py --quick          # ~2.5 minutes
    python examples/uptrain_char_lm.py --kernel ffk     # trainable kernel: distill, fine-tune

The steps:

1. **Data.** The text of Python's own documentation topics (``pydoc_data.topics``, shipped with
   CPython: no download), about 465k characters of English and code. The last 10% is the
   validation split.
2. **Softmax model.** A small GPT (token + position embeddings, pre-LN blocks, causal attention
   through ``F.scaled_dot_product_attention(is_causal=True)``) trained from scratch.
3. **Convert.** ``fr.convert(model, kernel=..., dk=None, example_inputs=(x,))``: every causal
   attention site becomes kernel attention with prefix sums. The low-rank projection E, F
   (``dk``) would mix future tokens into every key, so causal sites are kernel-only: ``dk=None``
   here, and asked for a ``dk`` the compiler rewrites them kernel-only anyway and says why in
   the report.
4. **Up-train.** With ``kernel="ffk"`` the feature maps are trainable: ``fr.distill`` first
   trains them alone to reproduce each softmax attention module on the teacher's own hidden
   states (attention transfer), then the whole model is fine-tuned on the language-modelling
   loss with the same loop that trained it. Fixed kernels (performer, relu, rnn) add no
   parameters, so for them up-training is the fine-tuning alone.

The figures are validation losses (cross-entropy in nats per character; bits per character =
nats / ln 2) of the softmax model, of the converted model before up-training, and after. The
up-training steps are also more training, so a **control** trains the softmax model for the same
extra steps with the same loop and batches: the gap that the conversion costs is
``after - control``, not ``after - softmax``.

Measured (full run, seed 0, one CPU thread, about 5 minutes; a 3-layer, d=128 model of 0.64M
parameters, 700 softmax steps, then 300 up-training steps for each kernel from the same
softmax model; ffk with 150 attention-transfer steps first):

    validation loss, nats/char     before   after   (softmax 1.417; control 1.302)
    performer (m=112, default)      2.455   1.374
    ffk, distill + fine-tune        2.816   1.408   (2.149 after attention transfer)
    ffk, fine-tune only             2.816   1.430
    relu                            2.713   1.517
    rnn (elu+1)                     2.802   1.534

The Performer starts closest (its random features approximate the softmax kernel) and stays
best, hence the default. For ffk, attention transfer is worth 0.02 nats/char over fine-tuning
alone (``--kernel relu`` etc. reproduce the rows; ffk without distill: ``distill_steps=0``).
At N=128 characters kernel attention costs more FLOPs than softmax attention (the report's FLOPs
column): this example measures how much quality up-training recovers, not speed, which linear
attention gains only at long sequences (docs/benchmarks.md).
"""
from __future__ import annotations

import copy
import math
import sys
import time
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


@dataclass
class Config:
    """Sizes and schedules. The defaults are the full run; ``QUICK`` is ``--quick``."""

    # data
    max_chars: int | None = None   # use only the first max_chars characters of the text
    val_fraction: float = 0.1      # the last 10% is the validation split
    block: int = 128               # context length (characters)
    batch: int = 32
    # model
    d_model: int = 128
    heads: int = 4
    layers: int = 3
    dropout: float = 0.0
    # softmax training
    train_steps: int = 700
    train_lr: float = 3e-3
    # conversion and up-training
    kernel: str = "performer"      # "performer" | "ffk" | "relu" | "rnn" | "eva"
    window: int | None = None      # sliding window of exact softmax beside the kernel (None: off)
    distill_steps: int = 150       # attention transfer (trainable kernels only: ffk)
    distill_lr: float = 1e-2
    finetune_steps: int = 300
    finetune_lr: float = 3e-3
    # evaluation
    eval_windows: int = 256        # validation windows of `block` characters (fixed, evenly spaced)
    eval_every: int = 100          # validation loss on the curves every this many steps
    softmax_control: bool = True   # also train the softmax model for finetune_steps more steps
    seed: int = 0


QUICK = Config(train_steps=400, distill_steps=50, finetune_steps=150, eval_windows=128,
               eval_every=50)


# -- data -------------------------------------------------------------------------------------
def load_text(max_chars: int | None = None) -> str:
    """The offline corpus: every entry of ``pydoc_data.topics.topics``, in key order."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[:max_chars] if max_chars else text


class CharData:
    """Character vocabulary, train/validation split and batches of (input, target) windows."""

    def __init__(self, text: str, val_fraction: float, block: int) -> None:
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        split = int(len(ids) * (1 - val_fraction))
        self.train, self.val = ids[:split], ids[split:]
        self.block = block
        if len(self.val) <= block + 1:
            raise ValueError(f"the validation split has {len(self.val)} characters, fewer than "
                             f"block + 2 = {block + 2}: use more text or a smaller block")

    @property
    def vocab(self) -> int:
        """Number of distinct characters."""
        return len(self.chars)

    def batch(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """n random training windows: x (n, block) and y = x shifted by one (n, block)."""
        start = torch.randint(len(self.train) - self.block - 1, (n,), generator=g)
        x = torch.stack([self.train[s:s + self.block] for s in start.tolist()])
        y = torch.stack([self.train[s + 1:s + 1 + self.block] for s in start.tolist()])
        return x, y

    def val_windows(self, n: int) -> tuple[Tensor, Tensor]:
        """n fixed, evenly spaced validation windows: the same for every model evaluated."""
        last = len(self.val) - self.block - 1
        starts = torch.linspace(0, last, min(n, last + 1)).long().tolist()
        x = torch.stack([self.val[s:s + self.block] for s in starts])
        y = torch.stack([self.val[s + 1:s + 1 + self.block] for s in starts])
        return x, y


# -- model ------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; the softmax site the compiler rewrites is the SDPA call."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        # (B, N, D) -> (B, H, N, dh)
        q, k, v = (t.view(B, N, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A small GPT over characters: ids (B, N) -> next-character logits (B, N, vocab)."""

    def __init__(self, vocab: int, block: int, d_model: int, heads: int, layers: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(block, d_model)
        self.blocks = nn.Sequential(*[Block(d_model, heads, dropout) for _ in range(layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        return self.head(self.ln(self.blocks(x)))


# -- training and evaluation -----------------------------------------------------------------
def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-character cross-entropy, nats per character."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, val: tuple[Tensor, Tensor], batch: int) -> float:
    """Validation loss (nats per character) over the fixed validation windows, in eval mode."""
    was = model.training
    model.eval()
    x, y = val
    total = sum(float(lm_loss(model, x[i:i + batch], y[i:i + batch])) * len(x[i:i + batch])
                for i in range(0, len(x), batch))
    model.train(was)
    return total / len(x)


def train(model: nn.Module, data: CharData, val: tuple[Tensor, Tensor], *, steps: int,
          lr: float, batch: int, eval_every: int, seed: int, label: str
          ) -> tuple[list[float], list[tuple[int, float]]]:
    """The ordinary training loop (AdamW, linear warm-up then cosine decay, gradients clipped
    at 1): all parameters train. Returns the training loss per step and (step, val loss) pairs."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warm = max(1, steps // 20)

    def lr_factor(s: int) -> float:  # s = steps taken so far
        return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    losses: list[float] = []
    val_curve: list[tuple[int, float]] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = data.batch(batch, g)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % eval_every == 0 or step == steps:
            val_curve.append((step, evaluate(model, val, batch)))
            print(f"  {label} step {step:>5}/{steps}  train {losses[-1]:.3f}  "
                  f"val {val_curve[-1][1]:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return losses, val_curve


def check_causal(model: nn.Module, x: Tensor, cut: int, vocab: int) -> float:
    """Largest change of the logits at positions < cut when every character from cut on is
    replaced by another: 0 (to rounding) for a causal model."""
    model.eval()
    y = x.clone()
    y[:, cut:] = (y[:, cut:] + 1) % vocab
    with torch.no_grad():
        return float((model(x)[:, :cut] - model(y)[:, :cut]).abs().max())


# -- the example ------------------------------------------------------------------------------
def run(cfg: Config) -> dict[str, Any]:
    """Train, convert, up-train; returns the figures (losses in nats per character)."""
    torch.manual_seed(cfg.seed)
    data = CharData(load_text(cfg.max_chars), cfg.val_fraction, cfg.block)
    val = data.val_windows(cfg.eval_windows)
    print(f"text: {len(data.train)} training + {len(data.val)} validation characters, "
          f"vocabulary {data.vocab}")

    # 1. the softmax model
    model = CharGPT(data.vocab, cfg.block, cfg.d_model, cfg.heads, cfg.layers, cfg.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"softmax model: {n_params / 1e6:.2f}M parameters; training {cfg.train_steps} steps")
    t0 = time.perf_counter()
    train_losses, train_val = train(model, data, val, steps=cfg.train_steps, lr=cfg.train_lr,
                                    batch=cfg.batch, eval_every=cfg.eval_every, seed=cfg.seed,
                                    label="softmax")
    t_train = time.perf_counter() - t0
    val_softmax = evaluate(model, val, cfg.batch)

    # 2. convert: kernel-only on the causal sites (dk=None)
    example = data.batch(4, torch.Generator().manual_seed(cfg.seed))[0]
    converted = fr.convert(model, kernel=cfg.kernel, dk=None, window=cfg.window,
                           example_inputs=(example,), seed=cfg.seed)
    report = converted.flurka_report
    print(report)
    val_before = evaluate(converted, val, cfg.batch)
    print(f"val loss: softmax {val_softmax:.4f}, converted before up-training {val_before:.4f}")

    # 3. up-train: attention transfer (trainable kernels only), then full fine-tuning
    t0 = time.perf_counter()
    distill_losses: list[float] = []
    val_after_distill = None
    kernel_params = [p for m in converted.modules() if isinstance(m, fr.FlurkaAttention)
                     for p in m.parameters()]  # ffk weights, window mix; else none
    if cfg.distill_steps and kernel_params:
        g = torch.Generator().manual_seed(cfg.seed + 1)
        batches = [data.batch(cfg.batch, g)[0] for _ in range(cfg.distill_steps)]
        res = fr.distill(converted, teacher=model, data=batches, steps=cfg.distill_steps,
                         lr=cfg.distill_lr, seed=cfg.seed, progress=False)
        print(res)
        distill_losses = res.losses
        val_after_distill = evaluate(converted, val, cfg.batch)
        print(f"val loss after attention transfer: {val_after_distill:.4f}")
    ft_losses, ft_val = train(converted, data, val, steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                              batch=cfg.batch, eval_every=cfg.eval_every, seed=cfg.seed + 2,
                              label=f"fine-tune {cfg.kernel}")
    t_uptrain = time.perf_counter() - t0
    val_after = evaluate(converted, val, cfg.batch)

    # 4. control: the softmax model trained for the same extra steps, same loop and batches.
    # Fine-tuning is also more training; this separates that from what the conversion cost.
    val_control, control_losses = None, []
    if cfg.softmax_control:
        control = copy.deepcopy(model)
        control_losses, _ = train(control, data, val, steps=cfg.finetune_steps,
                                  lr=cfg.finetune_lr, batch=cfg.batch,
                                  eval_every=cfg.eval_every, seed=cfg.seed + 2,
                                  label="softmax control")
        val_control = evaluate(control, val, cfg.batch)

    rows = [("softmax", val_softmax),
            (f"softmax, {cfg.finetune_steps} more steps", val_control),
            (f"{cfg.kernel}, before up-training", val_before),
            (f"{cfg.kernel}, after attention transfer", val_after_distill),
            (f"{cfg.kernel}, after up-training", val_after)]
    print(f"\n  {'validation loss':<36}  nats/char  bits/char")
    for name, v in rows:
        if v is not None:
            print(f"  {name:<36}  {v:>9.4f}  {v / math.log(2):>9.3f}")
    return {
        "config": asdict(cfg),
        "vocab": data.vocab,
        "params": n_params,
        "train_chars": len(data.train),
        "val_chars": len(data.val),
        "val_loss_softmax": val_softmax,
        "val_loss_softmax_control": val_control,
        "val_loss_converted_before": val_before,
        "val_loss_converted_after_distill": val_after_distill,
        "val_loss_converted_after": val_after,
        "causal_max_logit_change": check_causal(converted, val[0][:2], cfg.block // 2,
                                                data.vocab),
        "seconds_softmax_training": t_train,
        "seconds_uptraining": t_uptrain,
        "report": report.to_dict(),
        "curves": {"softmax_train": train_losses, "softmax_val": train_val,
                   "distill": distill_losses, "finetune_train": ft_losses, "finetune_val": ft_val,
                   "softmax_control_train": control_losses},
    }


def smooth(ys: list[float], window: int | None = None) -> list[float]:
    """Trailing mean over ``window`` steps (default: 5% of the steps, at most 20): per-step
    training losses are noisy."""
    window = window or max(1, min(20, len(ys) // 20))
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def panels(figures: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """The loss curves to plot: softmax training, attention transfer (if any), fine-tuning
    beside the softmax control. Training losses, smoothed by a trailing mean."""
    c, kernel = figures["curves"], figures["config"]["kernel"]
    out = {"softmax training (nats/char)": {"softmax": smooth(c["softmax_train"])}}
    if c["distill"]:
        out["attention transfer (MSE to softmax attention)"] = {kernel: c["distill"]}
    ft = {f"{kernel}, converted": smooth(c["finetune_train"])}
    if c["softmax_control_train"]:
        ft["softmax, trained on"] = smooth(c["softmax_control_train"])
    out["fine-tuning (nats/char)"] = ft
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--quick``, ``--json PATH``, ``--plot PATH``, ``--kernel K``,
    ``--window W``."""
    p = _common.parser(__doc__.splitlines()[0], "examples/results/uptrain_char_lm.png")
    p.add_argument("--kernel", default=Config.kernel,
                   choices=["ffk", "performer", "relu", "rnn", "eva"])
    p.add_argument("--window", type=int, default=None, metavar="W",
                   help="sliding-window hybrid: exact softmax over the W previous characters "
                        "beside the kernel part (default: none; with eva: its local set)")
    args = p.parse_args(argv)
    _common.setup(args)
    cfg = replace(QUICK if args.quick else Config(), kernel=args.kernel, window=args.window,
                  seed=args.seed)
    figures = run(cfg)
    _common.finish(args, figures, panels(figures),
                   f"char LM: softmax {figures['val_loss_softmax']:.3f}, {cfg.kernel} before "
                   f"{figures['val_loss_converted_before']:.3f}, after "
                   f"{figures['val_loss_converted_after']:.3f} nats/char")


if __name__ == "__main__":
    main()
