"""Tiny hand-written models, one per attention spelling, plus negative cases.

Each builder returns a ``Case``: the model (eval, seeded), example inputs (positional tuple),
how many attention sites the compiler must report and how many it must rewrite. Sizes are
small and not powers of two (d=30, H=3, dh=10, N=11, M=7).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

B, N, M, D, H = 2, 11, 7, 30, 3
DH = D // H


@dataclass
class Case:
    """A model, its example inputs, and what the compiler must find."""

    model: nn.Module
    inputs: tuple
    sites: int  # attention sites reported
    rewritten: int  # of which rewritten (exact mode)
    causal: bool = False
    reason: str | None = None  # substring of the skip reason (negative cases)


def _padding(n: int = N) -> torch.Tensor:
    keep = torch.ones(B, n, dtype=torch.bool)  # True = real token
    keep[1, n - 3:] = False
    return keep


class _QKV(nn.Module):
    """Linear q/k/v/o projections; subclasses write the attention in one spelling."""

    def __init__(self, heads: int = H, kv_heads: int | None = None) -> None:
        super().__init__()
        self.h, self.hkv = heads, kv_heads or heads
        self.q = nn.Linear(D, heads * DH)
        self.k = nn.Linear(D, self.hkv * DH)
        self.v = nn.Linear(D, self.hkv * DH)
        self.o = nn.Linear(heads * DH, D)

    def heads_(self, t: torch.Tensor, h: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, h, DH).transpose(1, 2)  # (B, h, n, dh)

    def merge(self, t: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = t.shape
        return self.o(t.transpose(1, 2).reshape(b, n, -1))


class MatmulDivAdd(_QKV):
    """``@`` + transpose(-2,-1), div by sqrt(dh), additive float padding mask (BERT-style)."""

    def forward(self, x, mask):
        q, k, v = (self.heads_(p(x), self.h) for p in (self.q, self.k, self.v))
        s = q @ k.transpose(-2, -1) / math.sqrt(DH) + mask
        return self.merge(s.softmax(dim=-1) @ v)


class ScaleQMaskedFill(_QKV):
    """Scale on q first, torch.matmul with .mT, masked_fill(-inf) with a bool mask, F.dropout."""

    def forward(self, x, keep):
        q, k, v = (self.heads_(p(x), self.h) for p in (self.q, self.k, self.v))
        q = q * DH ** -0.5
        s = torch.matmul(q, k.mT)
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        w = F.dropout(F.softmax(s, dim=-1), p=0.1, training=self.training)
        return self.merge(torch.matmul(w, v))


class Bmm3D(_QKV):
    """3-D (B*H, N, dh) layout with torch.bmm, no scale, no mask."""

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (self.heads_(p(x), self.h).reshape(b * self.h, n, DH)
                   for p in (self.q, self.k, self.v))
        w = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
        o = torch.bmm(w, v).view(b, self.h, n, DH)
        return self.merge(o)


class EinsumBNHD(_QKV):
    """(B, N, H, dh) layout with einsum on both products, scale by mul on the scores."""

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.h, DH) for p in (self.q, self.k, self.v))
        s = torch.einsum("bnhd,bmhd->bhnm", q, k) * (1.0 / math.sqrt(DH))
        o = torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)
        return self.o(o.reshape(b, n, -1))


class Baddbmm3D(_QKV):
    """torch.baddbmm(mask, q, k^T, alpha=scale) in the 3-D layout (additive mask folded in)."""

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = (self.heads_(p(x), self.h).reshape(b * self.h, n, DH)
                   for p in (self.q, self.k, self.v))
        m = mask.expand(b, self.h, n, n).reshape(b * self.h, n, n)
        s = torch.baddbmm(m, q, k.transpose(1, 2), alpha=DH ** -0.5)
        o = torch.bmm(F.softmax(s, dim=-1), v).view(b, self.h, n, DH)
        return self.merge(o)


class PermuteWhereFp32(_QKV):
    """(B, N, H, dh) transposed inside: q.transpose(1,2) @ k.permute(0,2,3,1); where() bool
    mask; fp32 up-cast around the softmax."""

    def forward(self, x, keep):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.h, DH) for p in (self.q, self.k, self.v))
        s = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * DH ** -0.5
        s = torch.where(keep[:, None, None, :], s, torch.finfo(s.dtype).min)
        w = s.float().softmax(-1).to(x.dtype)
        return self.merge(w @ v.transpose(1, 2))


class CausalTrilBuffer(_QKV):
    """GPT-2 style: registered tril buffer, masked_fill(bias == 0, -inf)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(40, 40)), persistent=False)

    def forward(self, x):
        n = x.shape[1]
        q, k, v = (self.heads_(p(x), self.h) for p in (self.q, self.k, self.v))
        s = (q @ k.transpose(-1, -2)) * DH ** -0.5
        s = s.masked_fill(self.bias[:n, :n] == 0, float("-inf"))
        return self.merge(s.softmax(-1) @ v)


class SdpaPadding(_QKV):
    """F.scaled_dot_product_attention with a bool padding attn_mask."""

    def forward(self, x, keep):
        q, k, v = (self.heads_(p(x), self.h) for p in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.merge(o)


class SdpaCausalGQA(_QKV):
    """SDPA with is_causal=True, an explicit scale and enable_gqa (H=4, Hkv=2)."""

    def __init__(self) -> None:
        super().__init__(heads=4, kv_heads=2)

    def forward(self, x):
        q = self.heads_(self.q(x), self.h)
        k, v = self.heads_(self.k(x), self.hkv), self.heads_(self.v(x), self.hkv)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
        return self.merge(o)


class RepeatKVTriu(_QKV):
    """Llama-style repeat_kv (expand + reshape), causal additive mask from triu(-inf, 1)."""

    def __init__(self) -> None:
        super().__init__(heads=4, kv_heads=2)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.heads_(self.q(x), self.h)
        k, v = self.heads_(self.k(x), self.hkv), self.heads_(self.v(x), self.hkv)
        rep = self.h // self.hkv
        k = k[:, :, None].expand(b, self.hkv, rep, n, DH).reshape(b, self.h, n, DH)
        v = v[:, :, None].expand(b, self.hkv, rep, n, DH).reshape(b, self.h, n, DH)
        mask = torch.triu(torch.full((n, n), float("-inf")), 1)
        s = q @ k.transpose(2, 3) / math.sqrt(DH) + mask
        return self.merge(s.softmax(-1) @ v)


class CrossAttention(_QKV):
    """q from x (N tokens), k and v from memory (M tokens) with a padding mask on memory."""

    def forward(self, x, memory, keep):
        q = self.heads_(self.q(x), self.h)
        k, v = self.heads_(self.k(memory), self.h), self.heads_(self.v(memory), self.h)
        s = q @ k.transpose(-2, -1) * DH ** -0.5
        s = s.masked_fill(~keep[:, None, None, :], -1e9)
        return self.merge(s.softmax(-1) @ v)


# ------------------------------------------------------------------------- negative cases
class SoftmaxWrongAxis(_QKV):
    """softmax over the query axis (dim=-2): not attention over keys; must be left alone."""

    def forward(self, x):
        q, k, v = (self.heads_(p(x), self.h) for p in (self.q, self.k, self.v))
        s = q @ k.transpose(-2, -1) * DH ** -0.5
        return self.merge(s.softmax(dim=-2) @ v)


class WeightsReturned(_QKV):
    """Returns the attention weights: rewriting would change an output, must be skipped."""

    def forward(self, x):
        q, k, v = (self.heads_(p(x), self.h) for p in (self.q, self.k, self.v))
        w = (q @ k.transpose(-2, -1) * DH ** -0.5).softmax(-1)
        return self.merge(w @ v), w


class LearnedBias(_QKV):
    """Learned additive relative bias (H, N, N) on the scores (T5-like): must be skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.rel = nn.Parameter(torch.randn(H, 40, 40) * 0.5)

    def forward(self, x):
        n = x.shape[1]
        q, k, v = (self.heads_(p(x), self.h) for p in (self.q, self.k, self.v))
        s = q @ k.transpose(-2, -1) * DH ** -0.5 + self.rel[:, :n, :n]
        return self.merge(s.softmax(-1) @ v)


class Classifier(nn.Module):
    """An MLP with a softmax head and no attention: no site at all."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, 5)

    def forward(self, x):
        return self.fc(x).softmax(-1)


class Wrap(nn.Module):
    """Model = embedding-free wrapper around one attention module plus a softmax head, so the
    attention is a submodule (the usual case) and the head's softmax is a non-attention one."""

    def __init__(self, attn: nn.Module, head: bool = False) -> None:
        super().__init__()
        self.attn, self.norm = attn, nn.LayerNorm(D)
        self.head = nn.Linear(D, 5) if head else None
        # how many inputs after x the attention takes (explicit, so symbolic_trace works)
        self.n_rest = len(inspect.signature(attn.forward).parameters) - 1

    def forward(self, x, a=None, b=None):
        y = self.attn(x, *(a, b)[: self.n_rest])
        if isinstance(y, tuple):
            return (self.norm(y[0] + x), *y[1:])
        y = self.norm(y + x)
        return self.head(y).softmax(-1) if self.head is not None else y


class MHAModel(nn.Module):
    """nn.MultiheadAttention (batch_first or not) with a key padding mask."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.bf = batch_first
        self.mha = nn.MultiheadAttention(D, H, batch_first=batch_first)

    def forward(self, x, key_padding_mask):
        t = x if self.bf else x.transpose(0, 1)
        out, _ = self.mha(t, t, t, key_padding_mask=key_padding_mask)
        return out if self.bf else out.transpose(0, 1)


def _enc() -> nn.Module:
    layer = nn.TransformerEncoderLayer(D, H, dim_feedforward=40, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


class EncoderModel(nn.Module):
    """nn.TransformerEncoder, 2 layers (an MHA inside each), padding mask."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = _enc()

    def forward(self, x, src_key_padding_mask):
        return self.enc(x, src_key_padding_mask=src_key_padding_mask)


def _x(n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, n, D, generator=torch.Generator().manual_seed(seed))


def _additive(keep: torch.Tensor) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=torch.float32).masked_fill(~keep, -1e4)[:, None, None, :]


CASES: dict[str, Callable[[], Case]] = {
    "matmul_div_add": lambda: Case(Wrap(MatmulDivAdd()), (_x(), _additive(_padding())), 1, 1),
    "scale_q_masked_fill": lambda: Case(Wrap(ScaleQMaskedFill()), (_x(), _padding()), 1, 1),
    "bmm_3d": lambda: Case(Wrap(Bmm3D()), (_x(),), 1, 1),
    "einsum_bnhd": lambda: Case(Wrap(EinsumBNHD()), (_x(),), 1, 1),
    "baddbmm_3d": lambda: Case(Wrap(Baddbmm3D()), (_x(), _additive(_padding())), 1, 1),
    "permute_where_fp32": lambda: Case(Wrap(PermuteWhereFp32()), (_x(), _padding()), 1, 1),
    "causal_tril_buffer": lambda: Case(Wrap(CausalTrilBuffer()), (_x(),), 1, 1, causal=True),
    "sdpa_padding": lambda: Case(Wrap(SdpaPadding()), (_x(), _padding()), 1, 1),
    "sdpa_causal_gqa": lambda: Case(Wrap(SdpaCausalGQA()), (_x(),), 1, 1, causal=True),
    "repeat_kv_triu": lambda: Case(Wrap(RepeatKVTriu()), (_x(),), 1, 1, causal=True),
    "cross_attention": lambda: Case(Wrap(CrossAttention()), (_x(), _x(M, 2), _padding(M)), 1, 1),
    "mha_batch_first": lambda: Case(MHAModel(True), (_x(), ~_padding()), 1, 1),
    "mha_seq_first": lambda: Case(MHAModel(False), (_x(), ~_padding()), 1, 1),
    "transformer_encoder": lambda: Case(EncoderModel(), (_x(), ~_padding()), 2, 2),
    "attention_at_root": lambda: Case(MatmulDivAdd(), (_x(), _additive(_padding())), 1, 1),
    "with_classifier_head": lambda: Case(Wrap(SdpaPadding(), head=True), (_x(), _padding()), 1, 1),
}
NEGATIVE: dict[str, Callable[[], Case]] = {
    "softmax_wrong_axis": lambda: Case(Wrap(SoftmaxWrongAxis()), (_x(),), 1, 0, reason="axis"),
    "weights_returned": lambda: Case(Wrap(WeightsReturned()), (_x(),), 1, 0,
                                     reason="used elsewhere"),
    "learned_bias": lambda: Case(Wrap(LearnedBias()), (_x(),), 1, 0, reason="bias"),
    "classifier_only": lambda: Case(Classifier(), (_x(),), 0, 0),
}


def build(name: str) -> Case:
    """Seeded, eval-mode case ``name`` (from CASES or NEGATIVE)."""
    torch.manual_seed(0)
    case = {**CASES, **NEGATIVE}[name]()
    case.model.eval()
    return case
