"""Feature maps phi for kernel (linear) attention, docs/design.md §3.2.

Every map takes x of shape (B, Hx, N, dh) in any float dtype and returns phi(x) of shape
(B, Hx, N, m) in fp32. Queries and keys go through the same map (``is_query`` only changes
the performer's stabilizer, a constant that cancels in the ratio O = phi(q) S / phi(q) z).

Each map is one class registered by name (``kernels/registry.py``) that also declares its
facts: whether it takes ``num_features`` and its default m, its FLOPs, its role for
``kernel="auto"`` and its Triton code. ``build_feature_map("performer", ...)`` builds one and a
failed look-up lists what exists.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .registry import (
    FEATURE_MAPS,
    SOFTMAX_ELEMWISE,
    FeatureMap,
    MapFlops,
    build_feature_map,
    register_feature_map,
    unregister_feature_map,
)

__all__ = ["FEATURE_MAPS", "FeatureMap", "MapFlops", "build_feature_map", "register_feature_map",
           "unregister_feature_map", "PerformerFeatures", "ReluFeatures", "EluFeatures",
           "FeedForwardKernel", "default_performer_features", "orthogonal_gaussian"]

def orthogonal_gaussian(m: int, d: int, generator: torch.Generator) -> Tensor:
    """(m, d) matrix of stacked orthogonal Gaussian blocks (QR) with chi-distributed row norms,
    the FAVOR+ projection (Choromanski et al. 2021). Built in fp64 on the CPU, then fp32.

    Runs with one intra-op thread: these small QRs are ~100x slower multi-threaded on a busy
    CPU (0.65 s vs 3 ms per 267x64 draw, measured on the 2-core CI machine), and this runs at
    every conversion and every training redraw."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _orthogonal_gaussian(m, d, generator)
    finally:
        torch.set_num_threads(threads)


def _orthogonal_gaussian(m: int, d: int, generator: torch.Generator) -> Tensor:
    blocks = []
    for _ in range(math.ceil(m / d)):
        g = torch.randn(d, d, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        # Sign-fix the columns (Q diag(sign R)) so that Q is Haar-distributed: without it,
        # LAPACK's sign convention biases the directions and the estimator.
        q = q * torch.sign(torch.diagonal(r))[None, :]
        blocks.append(q.T)
    w = torch.cat(blocks, 0)[:m]
    # chi(d)-distributed norms, i.e. the norms rows of an unstructured Gaussian would have.
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)
    return (w * norms[:, None]).float()


@register_feature_map("performer")
class PerformerFeatures(FeatureMap):
    """FAVOR+ positive random features approximating exp(s q.k).

    x' = s^(1/2) x;  phi(x) = m^(-1/2) exp(W x' - |x'|^2/2 - c)
    c: per-row log-sum-exp of the exponent for queries (phi(q) is a softmax over features),
    one max over all (real) keys of a (batch, head) for keys. Both cancel in the attention
    ratio, so ``forward`` equals ``formula`` up to a positive constant per query row and per
    (batch, head) of keys. Causal attention uses ``causal_key_features`` instead (a per-key
    stabilizer, undone by a running max).
    W is redrawn every ``redraw_interval`` calls of ``step()`` in training mode (the owning
    FlurkaAttention steps once per training forward); draw i is seeded by seed*1_000_003 + i,
    so the same seed gives the same sequence of W. Eval mode never redraws.
    """

    takes_num_features = True
    auto_role = "pretrained"  # approximates a pretrained softmax without training
    triton_code = 3
    estimates_softmax = True  # E[phi(q).phi(k)] = exp(s q.k)
    causal_stabilized = True
    weight_shapes = {"W": ("num_features", "head_dim")}

    @classmethod
    def default_num_features(cls, head_dim: int) -> int:
        return default_performer_features(head_dim)

    @classmethod
    def flops(cls, rows: int, dh: int, m: int, *, is_query: bool, causal: bool = False,
              groups: int = 1) -> MapFlops:
        gemm = 2 * rows * dh * m  # x @ (s^1/2 W)^T, W (m, dh)
        if is_query:  # softmax over the features
            return MapFlops(gemm, rows * SOFTMAX_ELEMWISE * m, rows * m)
        elem = rows * (2 * dh + 1 + m)  # exponent: x*x, sum, * s/2, u - |x'|^2/2
        if causal:  # causal_key_features: a per-key stabilizer
            elem += rows * (3 * m + 1)  # per-key max, + log(m)/2, u - ls, exp
        else:  # max over keys and features, u - c, exp; per group: clamp_min, c + log(m)/2
            elem += rows * 3 * m + 2 * groups
        return MapFlops(gemm, elem, rows * m)

    def __init__(
        self,
        head_dim: int,
        num_features: int | None = None,
        scale: float | None = None,
        seed: int = 0,
        redraw_interval: int | None = 1000,
        **_: object,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.num_features = int(num_features or self.default_num_features(head_dim))
        self.scale = float(scale if scale is not None else head_dim**-0.5)
        self.seed = int(seed)
        self.redraw_interval = redraw_interval
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("draws", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("W", self._draw(0), persistent=True)

    def _draw(self, i: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return orthogonal_gaussian(self.num_features, self.head_dim, g)

    def redraw(self) -> None:
        """Draw a new W (the next in the seeded sequence). The buffer is replaced, not written
        in place, so a graph built on the old W (gradient accumulation) stays valid."""
        self.draws += 1
        self.W = self._draw(int(self.draws)).to(self.W.device)

    def step(self) -> None:
        """Count one training forward and redraw W when the schedule says so: calls
        0..R-1 use draw 0, calls R..2R-1 draw 1, ... (R = redraw_interval). No-op in eval."""
        if not self.training or not self.redraw_interval:
            return
        if int(self.calls) > 0 and int(self.calls) % int(self.redraw_interval) == 0:
            self.redraw()
        self.calls += 1

    def _projection(self) -> Tensor:
        """(m, dh) fp32: W with the s^(1/2) of x' = s^(1/2) x folded in (W x' = (s^(1/2) W) x)."""
        return self.W.float() * self.scale**0.5

    def exponent(self, x: Tensor) -> Tensor:
        """W x' - |x'|^2 / 2 in fp32: (B, Hx, N, m)."""
        xf = x.float()
        u = xf @ self._projection().t()
        sq = (xf * xf).sum(-1, keepdim=True) * (0.5 * self.scale)  # |x'|^2 / 2
        return u.sub_(sq)

    def forward(self, x: Tensor, *, is_query: bool, key_mask: Tensor | None = None) -> Tensor:
        if is_query:
            # Per-row stabilizer c_i = log sum_f exp(u_if), i.e. a softmax over the features:
            # one fused kernel (max, exp, sum) instead of four passes, features in (0, 1] that
            # sum to 1 (no overflow, no underflow of the row's largest ones). The -|x'|^2/2
            # term and m^(-1/2) are constant along the row, so they cancel and are skipped.
            return torch.softmax(x.float() @ self._projection().t(), dim=-1)  # (B, Hx, N, m)
        u = self.exponent(x)  # (B, Hx, N, m)
        if key_mask is not None:  # padded keys: exp(-inf) = 0 exactly, and a zero gradient (an
            u = u.masked_fill(~key_mask, -math.inf)  # exp that overflowed there gave 0*inf = NaN)
        # One max over all (real) keys and features of a (batch, head): it cancels in the
        # ratio. All keys padded: the max is -inf; clamped, exp(-inf - c) is still 0.
        c = u.detach().amax(dim=(-2, -1), keepdim=True).clamp_min(-1e30)
        # In place: u is not needed by autograd (its matmul saved the inputs, exp its output).
        return u.sub_(c + 0.5 * math.log(self.num_features)).exp_()  # m^(-1/2) folded in

    def causal_key_features(
        self, x: Tensor, key_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        u = self.exponent(x)  # (B, Hx, N, m)
        ls = u.detach().amax(dim=-1)  # (B, Hx, N): depends on key j only
        phi = (u - (ls[..., None] + 0.5 * math.log(self.num_features))).exp()
        return phi, ls

    def formula(self, x: Tensor, *, is_query: bool) -> Tensor:
        return torch.exp(self.exponent(x)) * self.num_features**-0.5


def default_performer_features(head_dim: int) -> int:
    """FAVOR+'s usual choice m = dh * ln(dh), rounded up to a multiple of 16 (at least 32)."""
    m = head_dim * math.log(max(head_dim, 2))
    return max(32, int(math.ceil(m / 16) * 16))


class ElementwiseFeatureMap(FeatureMap):
    """A map applied element by element: no weights, m = dh, ``num_features`` not taken.
    Subclasses declare the other facts (``auto_role``, ``triton_code``, ``flops``) and
    ``forward``."""

    takes_num_features = False

    @classmethod
    def default_num_features(cls, head_dim: int) -> int:
        return head_dim

    def __init__(self, head_dim: int, **_: object) -> None:
        super().__init__()
        self.num_features = self.default_num_features(head_dim)


@register_feature_map("relu")
class ReluFeatures(ElementwiseFeatureMap):
    """phi(x) = relu(x) + 1e-3 (the FLuRKA authors' 'generalized' kernel), m = dh."""

    auto_role = "trainable"
    triton_code = 1

    @classmethod
    def flops(cls, rows: int, dh: int, m: int, *, is_query: bool, causal: bool = False,
              groups: int = 1) -> MapFlops:
        return MapFlops(0, 2 * rows * dh, 0)  # relu(x) + 1e-3

    def forward(self, x: Tensor, *, is_query: bool, key_mask: Tensor | None = None) -> Tensor:
        return F.relu(x.float()) + 1e-3


@register_feature_map("rnn")
class EluFeatures(ElementwiseFeatureMap):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020, 'Transformers are RNNs'), m = dh."""

    auto_role = "trainable"
    triton_code = 2

    @classmethod
    def flops(cls, rows: int, dh: int, m: int, *, is_query: bool, causal: bool = False,
              groups: int = 1) -> MapFlops:
        return MapFlops(0, 2 * rows * dh, rows * dh)  # elu(x) + 1; the elu is exp-like

    def forward(self, x: Tensor, *, is_query: bool, key_mask: Tensor | None = None) -> Tensor:
        return F.elu(x.float()) + 1.0


@register_feature_map("ffk")
class FeedForwardKernel(FeatureMap):
    """Trainable gated feed-forward kernel (Yorsh & Kovalenko), one per kv-head:

    phi(x) = softplus((x W_o + b_o) * sigmoid(x W_g + b_g))
    W_o (Hkv, dh, m) initialised orthogonal, W_g small. ``penalty()`` is the orthogonality
    regulariser sum_h |W_o[h]^T W_o[h] - I|^2 (add it to the loss, scaled, if wanted).
    Queries of head h use the map of kv-head h // (H // Hkv).
    Trainable, so ``kernel="auto"`` never picks it (it needs up-training); its weights need
    autograd, so Triton runs it in PyTorch before the fused core (no ``triton_code``).
    """

    takes_num_features = True
    auto_role = None
    triton_code = None
    weight_shapes = {"W_o": ("kv_heads", "head_dim", "num_features"),
                     "W_g": ("kv_heads", "head_dim", "num_features"),
                     "b_o": ("kv_heads", 1, "num_features"),
                     "b_g": ("kv_heads", 1, "num_features")}

    @classmethod
    def default_num_features(cls, head_dim: int) -> int:
        return head_dim

    @classmethod
    def flops(cls, rows: int, dh: int, m: int, *, is_query: bool, causal: bool = False,
              groups: int = 1) -> MapFlops:
        gemm = 2 * 2 * rows * dh * m  # x W_o and x W_g
        # + b_o, + b_g, sigmoid, product, softplus; sigmoid and softplus are exp-like
        return MapFlops(gemm, 5 * rows * m, 2 * rows * m)

    def __init__(
        self, head_dim: int, kv_heads: int = 1, num_features: int | None = None, seed: int = 0,
        **_: object,
    ) -> None:
        super().__init__()
        m = int(num_features or self.default_num_features(head_dim))
        self.num_features = m
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7)
        w_o = torch.stack([_orthogonal(head_dim, m, g) for _ in range(kv_heads)])
        self.W_o = nn.Parameter(w_o)  # (Hkv, dh, m)
        self.b_o = nn.Parameter(torch.zeros(kv_heads, 1, m))
        self.W_g = nn.Parameter(torch.randn(kv_heads, head_dim, m, generator=g) * 0.02)
        self.b_g = nn.Parameter(torch.full((kv_heads, 1, m), 2.0))  # gates start mostly open

    def forward(self, x: Tensor, *, is_query: bool, key_mask: Tensor | None = None) -> Tensor:
        B, Hx, N, dh = x.shape
        hkv = self.W_o.shape[0]
        if Hx % hkv:
            raise ValueError(f"ffk map built for {hkv} kv-heads got {Hx} heads; the head count "
                             f"must be a multiple of {hkv} (build it with kv_heads=Hkv)")
        xf = x.float().reshape(B, hkv, Hx // hkv * N, dh) if Hx != hkv else x.float()
        w_o, b_o, w_g, b_g = (p.float() for p in (self.W_o, self.b_o, self.W_g, self.b_g))
        out = F.softplus((xf @ w_o + b_o) * torch.sigmoid(xf @ w_g + b_g))
        return out.reshape(B, Hx, N, self.num_features)

    def penalty(self) -> Tensor:
        wtw = self.W_o.transpose(-1, -2) @ self.W_o
        eye = torch.eye(wtw.shape[-1], device=wtw.device, dtype=wtw.dtype)
        return ((wtw - eye) ** 2).sum()


def _orthogonal(d: int, m: int, g: torch.Generator) -> Tensor:
    a = torch.randn(max(d, m), max(d, m), generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(a)
    return q[:d, :m].float().contiguous()
