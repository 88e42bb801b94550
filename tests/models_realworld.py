"""Attention written the ways real code writes it (timm, torch's own layers, older Hugging Face
and research code): one module per spelling, each a regression case for a bug class that used
to go unmatched, crash or miscompile. Scores are peaked (q and k projections scaled x6), so a
wrong scale or mask shows. ``CASES[name]()`` -> (module, example args, sites, causal).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

B, N, D, H = 2, 9, 24, 3
DH = D // H


def peaked(weight: torch.Tensor, rows: int = 2 * D, factor: float = 6.0) -> None:
    """Scale the q and k rows of a fused (3D, D) projection so attention is peaked."""
    with torch.no_grad():
        weight[:rows] *= factor


class _Fused(nn.Module):
    """One fused qkv Linear; subclasses write the attention in one spelling."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        peaked(self.qkv.weight)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, DH).permute(2, 0, 3, 1, 4)
        return q, k, v  # each (B, H, N, dh)

    @staticmethod
    def merge(o: torch.Tensor) -> torch.Tensor:
        b, h, n, d = o.shape
        return o.transpose(1, 2).reshape(b, n, h * d)


class SoftmaxModule(_Fused):
    """The softmax is an ``nn.Softmax`` submodule (older HF / research code)."""

    def __init__(self) -> None:
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        return self.merge(self.softmax(q @ k.transpose(-2, -1) * DH ** -0.5) @ v)


@torch.fx.wrap
def maybe_add_mask(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A ``torch.fx.wrap`` leaf, as timm's non-fused attention adds its mask."""
    return scores if mask is None else scores + mask


class WrappedMaskAdd(_Fused):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        scores = maybe_add_mask(q @ k.transpose(-2, -1) * DH ** -0.5, mask)
        return self.merge(scores.softmax(-1) @ v)


class InPlaceScale(_Fused):
    """``scores.div_(...)`` in place; ``*x.shape`` keeps symbolic_trace off (torch.export)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        out_shape = (*x.shape[:-1], D)
        scores = q @ k.transpose(-2, -1)
        scores.div_(math.sqrt(DH))
        return self.merge(scores.softmax(-1) @ v).view(out_shape)


class ViewBeforeValues(_Fused):
    """The weights are viewed (B*H, N, M) between the softmax and a bmm with v."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        b, n, _ = x.shape
        w = (q @ k.transpose(-2, -1) * DH ** -0.5).softmax(-1).reshape(b * H, n, n)
        o = torch.bmm(w, v.reshape(b * H, n, DH)).view(b, H, n, DH)
        return self.merge(o)


class BaddbmmBetaZero(_Fused):
    """``baddbmm(torch.empty(...), q, k^T, beta=0)``: the uninitialised input is ignored."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.reshape(b * H, n, DH) for t in self.split(x))
        s = torch.baddbmm(torch.empty(b * H, n, n), q, k.transpose(1, 2), beta=0,
                          alpha=DH ** -0.5)
        return torch.bmm(s.softmax(-1), v).view(b, H, n, DH).transpose(1, 2).reshape(b, n, D)


class FlatScores4DMask(_Fused):
    """Flat (B*H, N, d) products; the (B, 1, N, M) mask is added on a 4-D view of the scores."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.reshape(b * H, n, DH) for t in self.split(x))
        s = torch.bmm(q, k.transpose(1, 2)) * DH ** -0.5
        s = (s.view(b, H, n, n) + mask).view(b * H, n, n)
        return torch.bmm(s.softmax(-1), v).view(b, H, n, DH).transpose(1, 2).reshape(b, n, D)


class FunctionalMHA(nn.Module):
    """``F.multi_head_attention_forward`` called directly with an MHA's weights."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D, H, batch_first=True)
        peaked(self.mha.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = x.transpose(0, 1)  # (N, B, D)
        m = self.mha
        o, _ = F.multi_head_attention_forward(
            xt, xt, xt, D, H, m.in_proj_weight, m.in_proj_bias, None, None, False, 0.0,
            m.out_proj.weight, m.out_proj.bias, training=False, need_weights=False)
        return o.transpose(0, 1)


class EncoderKeyPadding(nn.Module):
    """``nn.TransformerEncoder`` with a key-padding mask (its nested-tensor fast path)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, H, 48, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2)
        for m in self.modules():
            if isinstance(m, nn.MultiheadAttention):
                peaked(m.in_proj_weight)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.enc(x, src_key_padding_mask=key_padding_mask)


class MHAFloatCausal(nn.Module):
    """``nn.MultiheadAttention`` with the float mask ``generate_square_subsequent_mask``."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D, H, batch_first=True)
        peaked(self.mha.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]


def x_input(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, N, D, generator=torch.Generator().manual_seed(seed))


def additive_padding() -> torch.Tensor:
    """(B, 1, N, N) additive mask: row 1's last 3 keys masked."""
    mask = torch.zeros(B, 1, N, N)
    mask[1, ..., -3:] = -1e9
    return mask


def key_padding() -> torch.Tensor:
    """(B, N) bool, True = padded (nn.MultiheadAttention's convention)."""
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[1, -3:] = True
    return kpm


CASES: dict[str, Callable[[], tuple[nn.Module, tuple, int, bool]]] = {
    "softmax_module": lambda: (SoftmaxModule(), (x_input(),), 1, False),
    "fx_wrap_mask": lambda: (WrappedMaskAdd(), (x_input(), additive_padding()), 1, False),
    "inplace_div": lambda: (InPlaceScale(), (x_input(),), 1, False),
    "view_before_values": lambda: (ViewBeforeValues(), (x_input(),), 1, False),
    "baddbmm_beta0": lambda: (BaddbmmBetaZero(), (x_input(),), 1, False),
    "flat_4d_mask": lambda: (FlatScores4DMask(), (x_input(), additive_padding()), 1, False),
    "functional_mha": lambda: (FunctionalMHA(), (x_input(),), 1, False),
    "encoder_key_padding": lambda: (EncoderKeyPadding(), (x_input(), key_padding()), 2, False),
    "mha_float_causal": lambda: (MHAFloatCausal(), (x_input(),), 1, True),
}


# -- attention FLuRKA cannot represent: each must still get a report row with its reason -----
class SoftCapped(_Fused):
    """Logit soft-capping, ``tanh(s / c) * c`` (Gemma 2 style)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        s = torch.tanh(q @ k.transpose(-2, -1) * DH ** -0.5 / 30.0) * 30.0
        return self.merge(s.softmax(-1) @ v)


class EagerAlibi(_Fused):
    """ALiBi computed in eager code from a slopes buffer and the positions."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("slopes", torch.tensor([0.5, 0.25, 0.125]).view(1, H, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        pos = torch.arange(x.shape[1])
        bias = self.slopes * (pos[None, :] - pos[:, None]).float()
        return self.merge((q @ k.transpose(-2, -1) * DH ** -0.5 + bias).softmax(-1) @ v)


class RelativeBias(_Fused):
    """A learned (H, N, N) relative-position bias on the scores."""

    def __init__(self) -> None:
        super().__init__()
        self.rel = nn.Parameter(torch.randn(H, N, N))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        return self.merge((q @ k.transpose(-2, -1) * DH ** -0.5 + self.rel).softmax(-1) @ v)


class StridedSparse(_Fused):
    """Block/strided sparsity by multiplying the scores with a pattern."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        s = q @ k.transpose(-2, -1)
        s = s * (torch.arange(s.shape[-1]) % 2 == 0)
        return self.merge(s.softmax(-1) @ v)


class ClassifierHead(nn.Module):
    """A softmax over class logits: not attention, no row."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(D, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).softmax(-1)


# name -> (module, substring of the skip reason; None: no row at all)
UNREPRESENTABLE: dict[str, Callable[[], tuple[nn.Module, str | None]]] = {
    "soft_capping": lambda: (SoftCapped(), "soft-capping"),
    "eager_alibi": lambda: (EagerAlibi(), "position bias"),
    "relative_bias": lambda: (RelativeBias(), "position bias"),
    "strided_sparse": lambda: (StridedSparse(), "not recognised"),
    "classifier_head": lambda: (ClassifierHead(), None),
}
