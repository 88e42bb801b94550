"""The embedded demo model: a small byte-level transformer encoder that ships with the package.

No download and no ``transformers``: a 2-layer pre-norm encoder classifier written in plain
PyTorch (byte embedding + learned positions, hand-written multi-head attention with separate
q/k/v Linear layers, key-padding mask, mean-pooled classifier head). Its weights are drawn from
a fixed seed, so every run and every machine builds the same model.

``make demo`` uses it through the real CLI:

    python -m flurka_rewrite.demo --write out/demo_model.pt2        # torch.export program
    flurka-rewrite out/demo_model.pt2 -o out/demo_flurka.pt2 ...     # the conversion
    python -m flurka_rewrite.demo --check out/demo_flurka.pt2
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from flurka_rewrite.kernels.reference import rel_error


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo model (dm = heads * head_dim)."""

    vocab_size: int = 256  # bytes
    max_len: int = 512
    dim: int = 128
    heads: int = 4
    layers: int = 2
    ffn: int = 256
    num_classes: int = 4
    seed: int = 0


# Score of a padded key: the fp32 minimum, a constant (``torch.finfo(scores.dtype)`` would stop
# ``torch.fx.symbolic_trace``, which cannot read the dtype of a proxy).
_MASKED = torch.finfo(torch.float32).min


class DemoSelfAttention(nn.Module):
    """Multi-head self-attention written out by hand (the spelling of many research repos)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """x (B, N, dim); attention_mask (B, N), 1 = real token, 0 = padding."""
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, dh)
        k = self.k_proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, dh)
        v = self.v_proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, dh)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, N, N)
        if attention_mask is not None:
            pad = attention_mask[:, None, None, :] == 0  # (B, 1, 1, N)
            scores = scores.masked_fill(pad, _MASKED)
        attn = F.softmax(scores, dim=-1)
        out = attn @ v  # (B, H, N, dh)
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)  # (B, N, dim)
        return self.out_proj(out)


class DemoBlock(nn.Module):
    """Pre-norm encoder block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = DemoSelfAttention(cfg.dim, cfg.heads)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn), nn.GELU(),
                                 nn.Linear(cfg.ffn, cfg.dim))

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), attention_mask)
        return x + self.ffn(self.ln2(x))


class DemoTransformer(nn.Module):
    """Byte-level encoder classifier: input_ids (B, N) int64 in [0, 256) -> logits (B, classes)."""

    def __init__(self, cfg: DemoConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or DemoConfig()
        self.config = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.blocks = nn.ModuleList(DemoBlock(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, N) with N <= max_len; attention_mask (B, N) of 0/1 or None."""
        N = input_ids.shape[1]
        pos = torch.arange(N, device=input_ids.device)
        x = self.tok(input_ids) + self.pos(pos)[None]  # (B, N, dim)
        for block in self.blocks:
            x = block(x, attention_mask)
        x = self.ln_f(x)
        if attention_mask is None:
            pooled = x.mean(dim=1)  # (B, dim)
        else:
            w = attention_mask.to(x.dtype)[..., None]  # (B, N, 1)
            pooled = (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
        return self.head(pooled)  # (B, classes)


def build_demo_model(cfg: DemoConfig | None = None) -> DemoTransformer:
    """The demo model with deterministic weights (seeded; the global RNG is left untouched)."""
    cfg = cfg or DemoConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DemoTransformer(cfg)
        # Embeddings at std 1 and queries/keys a little larger than the default init, so the
        # attention patterns are peaked rather than uniform (a harder, more honest test).
        for block in model.blocks:
            for lin in (block.attn.q_proj, block.attn.k_proj):
                nn.init.normal_(lin.weight, std=2.0 / math.sqrt(cfg.dim))
    return model.eval()


def demo_inputs(batch: int = 2, seq_len: int = 256, *, seed: int = 1,
                pad_last: int = 0) -> dict[str, Tensor]:
    """Keyword inputs for the demo model: random bytes and an attention mask whose last
    ``pad_last`` positions of the last sequence are padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, DemoConfig.vocab_size, (batch, seq_len), generator=g)  # (B, N)
    mask = torch.ones(batch, seq_len, dtype=torch.long)  # (B, N)
    if pad_last:
        mask[-1, seq_len - pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def export_demo(path: str, batch: int = 2, seq_len: int = 256) -> None:
    """Write the demo model as a ``torch.export`` program with dynamic batch and sequence."""
    model = build_demo_model()
    inputs = demo_inputs(batch, seq_len)
    b = torch.export.Dim("batch", min=1, max=1024)
    n = torch.export.Dim("seq", min=2, max=model.config.max_len)
    dyn = {"input_ids": {0: b, 1: n}, "attention_mask": {0: b, 1: n}}
    ep = torch.export.export(model, (), inputs, dynamic_shapes=dyn)
    _atomic_save_program(ep, path)


def _atomic_save_program(ep: Any, path: str) -> None:
    import io

    from flurka_rewrite.passes.atomic import atomic_write, write_bytes

    buf = io.BytesIO()
    torch.export.save(ep, buf)
    atomic_write(path, lambda tmp: write_bytes(tmp, buf.getvalue()))


def load_converted(path: str) -> nn.Module:
    """A converted model written by the CLI: a .pt2 program, or a .pt module (pickle: only
    for files you wrote yourself)."""
    if path.endswith(".pt2"):
        from flurka_rewrite.pt2_safe import load_program

        return load_program(path).module()
    return torch.load(path, map_location="cpu", weights_only=False)


def check_converted(converted: str, batch: int = 2, seq_len: int = 256) -> float:
    """Load the converted demo model, run it and the original demo model on fresh inputs
    (seed 7, the last sequence padded) and return the relative error of the converted logits;
    raise if they are not finite."""
    ref_model = build_demo_model()
    new_model = load_converted(converted)
    inputs = demo_inputs(batch, seq_len, seed=7, pad_last=seq_len // 4)
    with torch.no_grad():
        ref = ref_model(**inputs)
        out = new_model(**inputs)
    if out.shape != ref.shape:
        raise RuntimeError(f"converted model returns shape {tuple(out.shape)}, "
                           f"original {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        raise RuntimeError("converted model returned non-finite values")
    return rel_error(out, ref)


def main(argv: list[str] | None = None) -> int:
    """``python -m flurka_rewrite.demo --write FILE.pt2`` or ``--check CONVERTED``."""
    p = argparse.ArgumentParser(prog="python -m flurka_rewrite.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", metavar="FILE.pt2", help="export the demo model to FILE.pt2")
    g.add_argument("--check", metavar="CONVERTED.pt2",
                   help="run the converted demo model and the original on new inputs and print "
                        "the converted model's error")
    p.add_argument("--example-shape", default="2,256", help="B,N of the inputs (default 2,256)")
    args = p.parse_args(argv)
    B, N = (int(x) for x in args.example_shape.split(","))
    if args.write:
        export_demo(args.write, B, N)
        n_params = sum(t.numel() for t in build_demo_model().parameters())
        print(f"wrote {args.write}: demo transformer, {n_params:,} parameters, "
              f"dynamic batch and sequence (<= {DemoConfig.max_len})")
        return 0
    err = check_converted(args.check, batch=B, seq_len=N)
    print(f"check: {args.check} loads and runs on new inputs (B={B}, N={N}, "
          f"{N // 4} padded tokens); logits finite; rel. error vs. original = {err:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
