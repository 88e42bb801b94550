"""Recurrent-state causal attention: continue a causal site from a fixed-size state.

Causal kernel attention is a recurrence. With S_t = sum_{j<=t} phi(k_j) v_j^T (m x dv) and
z_t = sum_{j<=t} phi(k_j) (m), token t reads

    o_t = phi(q_t) S_t / (phi(q_t) z_t + eps)

so a token costs the same at position 100 and at position 100,000, and the state does not
grow. ``causal_continue`` runs any number n of new tokens (a prefill, or one decoding step)
from a state and returns the new state; chunks of C new tokens use masked C x C products
inside the chunk, as ``reference.causal_kernel_attention`` does for a whole sequence.

Maps with a per-key log scale l_j (the performer's stabiliser; the true features are
phi(k_j) exp(l_j)) keep the state at the scale exp(c) of the running maximum c = max_{j<=t} l_j,
as ``reference._causal_stabilized`` does: every rescaling factor is exp(smaller - larger) <= 1.
Maps without one run the same code with l = 0.

Padded keys (``key_keep`` False, e.g. the left padding of a batch of prompts) are left out
of the state exactly as the whole-sequence forward leaves them out: zero features and values,
and a log scale of -1e30, so that they never raise the running maximum.

``KVCache`` is the state of an exact softmax causal site: the keys and values so far (and,
once a padded key was seen, which keys are real).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from flurka_rewrite.kernels.reference import is_exporting


@dataclass
class KernelState:
    """State of one causal kernel-attention site after ``tokens`` tokens.

    S (B, Hkv, m, dv) fp32, z (B, Hkv, m) fp32, c (B, Hkv) fp32: the log scale S and z are
    kept at (0 for maps without a stabiliser)."""

    S: Tensor
    z: Tensor
    c: Tensor
    tokens: int = 0

    def tensors(self) -> list[Tensor]:
        """The tensors the state holds (its memory does not grow with ``tokens``)."""
        return [self.S, self.z, self.c]

    def map(self, fn: Callable[[Tensor], Tensor]) -> KernelState:
        """The state with ``fn`` applied to each tensor (reordering the batch for beam
        search, moving it to another device)."""
        return KernelState(S=fn(self.S), z=fn(self.z), c=fn(self.c), tokens=self.tokens)


@dataclass
class KVCache:
    """State of an exact softmax causal site: k (B, Hkv, T, dh), v (B, Hkv, T, dv) and keep
    (B, T) bool, True = a real key (None while every key so far was real)."""

    k: Tensor
    v: Tensor
    keep: Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.k.shape[-2]

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v] + ([] if self.keep is None else [self.keep])

    def map(self, fn: Callable[[Tensor], Tensor]) -> KVCache:
        """The cache with ``fn`` applied to each tensor (see ``KernelState.map``)."""
        return KVCache(k=fn(self.k), v=fn(self.v), keep=None if self.keep is None
                       else fn(self.keep))


def empty_state(B: int, hkv: int, m: int, dv: int, device: torch.device) -> KernelState:
    """The state before any token."""
    return KernelState(S=torch.zeros(B, hkv, m, dv, device=device),
                       z=torch.zeros(B, hkv, m, device=device),
                       c=torch.zeros(B, hkv, device=device))


def _running_max(x: Tensor, tril: Tensor) -> Tensor:
    """cummax of x (..., c) along its last axis; under export a masked max over the c x c
    lower triangle ``tril`` (ONNX has no cummax; c is at most one chunk)."""
    if not is_exporting():
        return torch.cummax(x, -1).values
    return x[..., None, :].masked_fill(~tril, -math.inf).amax(-1)


def causal_continue(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    state: KernelState,
    *,
    key_log_scale: Tensor | None = None,
    key_keep: Tensor | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> tuple[Tensor, KernelState]:
    """Causal kernel attention of n new tokens continuing from ``state``.

    phi_q (B, H, n, m), phi_k (B, Hkv, n, m), v (B, Hkv, n, dv), key_log_scale (B, Hkv, n) or
    None, key_keep (B, n) bool or None (False: a padded key, left out as the whole-sequence
    forward leaves it out) -> (out (B, H, n, dv) fp32, the state after the n tokens)."""
    B, H, n, m = phi_q.shape
    hkv, dv = phi_k.shape[1], v.shape[-1]
    G, C = H // hkv, chunk_size
    q, k, vv = phi_q.float(), phi_k.float(), v.float()
    ls = torch.zeros(B, hkv, n, device=q.device) if key_log_scale is None \
        else key_log_scale.float()
    if key_keep is not None:  # as reference.causal_kernel_attention does for a whole sequence
        keep = key_keep[:, None, :].bool()  # (B, 1, n)
        k = torch.where(keep[..., None], k, 0.0)
        vv = torch.where(keep[..., None], vv, 0.0)
        if key_log_scale is not None:
            ls = torch.where(keep, ls, -1e30)
    S = state.S[:, :, None]  # (B, Hkv, 1, m, dv)
    z = state.z[:, :, None, :, None]  # (B, Hkv, 1, m, 1)
    c_prev = state.c[..., None]  # (B, Hkv, 1)
    if state.tokens == 0:  # an empty state has no scale yet: start from the first key's
        c_prev = ls[..., :1]
    outs = []
    for t0 in range(0, n, C):
        qt = q[:, :, t0:t0 + C].reshape(B, hkv, G, -1, m)  # (B, Hkv, G, c, m)
        kt, vt = k[:, :, None, t0:t0 + C], vv[:, :, None, t0:t0 + C]  # (B, Hkv, 1, c, .)
        lt = ls[:, :, t0:t0 + C]  # (B, Hkv, c)
        c = lt.shape[-1]
        tril = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        ct = torch.maximum(_running_max(lt, tril), c_prev)  # running max at each token
        expo = (lt[..., None, :] - ct[..., :, None]).masked_fill(~tril, -math.inf)
        A = (qt @ kt.transpose(-1, -2)) * expo.exp()[:, :, None]  # (B, Hkv, G, c, c)
        inter = torch.exp(c_prev - ct)[:, :, None, :, None]  # (B, Hkv, 1, c, 1), <= 1
        num = A @ vt + (qt @ S) * inter
        den = A.sum(-1, keepdim=True) + (qt @ z) * inter
        outs.append((num / (den + eps)).reshape(B, H, c, dv))
        c_new = ct[..., -1:]  # (B, Hkv, 1)
        w = torch.exp(lt - c_new)[:, :, None, :, None]  # (B, Hkv, 1, c, 1), <= 1
        decay = torch.exp(c_prev - c_new)[:, :, None, :, None]  # (B, Hkv, 1, 1, 1)
        kw = (kt * w).transpose(-1, -2)  # (B, Hkv, 1, m, c)
        S = S * decay + kw @ vt
        z = z * decay + kw.sum(-1, keepdim=True)
        c_prev = c_new
    new = KernelState(S=S[:, :, 0], z=z[:, :, 0, :, 0], c=c_prev[..., 0],
                      tokens=state.tokens + n)
    return torch.cat(outs, 2), new


def causal_state(phi_k: Tensor, v: Tensor, *, key_log_scale: Tensor | None = None,
                 key_keep: Tensor | None = None) -> KernelState:
    """The state after n tokens, without the outputs: what ``causal_continue`` from an empty
    state ends with (same sums, another order), for a prefill whose outputs the
    whole-sequence forward computed. phi_k (B, Hkv, n, m), v (B, Hkv, n, dv),
    key_log_scale (B, Hkv, n) or None, key_keep (B, n) bool or None."""
    k, vv = phi_k.float(), v.float()
    ls = torch.zeros(k.shape[:-1], device=k.device) if key_log_scale is None \
        else key_log_scale.float()
    if key_keep is not None:
        keep = key_keep[:, None, :].bool()
        k = torch.where(keep[..., None], k, 0.0)
        vv = torch.where(keep[..., None], vv, 0.0)
        if key_log_scale is not None:
            ls = torch.where(keep, ls, -1e30)
    c = ls.amax(-1)  # (B, Hkv): the running maximum after the last token
    kw = k * torch.exp(ls - c[..., None])[..., None]  # (B, Hkv, n, m), factors <= 1
    return KernelState(S=kw.transpose(-1, -2) @ vv, z=kw.sum(-2), c=c, tokens=k.shape[-2])


def softmax_continue(q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None, *,
                     scale: float | None, key_keep: Tensor | None = None
                     ) -> tuple[Tensor, KVCache]:
    """Exact causal softmax attention of n new tokens over the cached keys and their own.

    q (B, H, n, dh), k (B, Hkv, n, dh), v (B, Hkv, n, dv), key_keep (B, n) bool or None ->
    (out (B, H, n, dv), the cache with the n keys appended). New token i (of n) sees every
    cached real key and the real new keys <= i."""
    B, n = q.shape[0], q.shape[-2]
    old_keep = None if cache is None else cache.keep
    if cache is not None:
        k, v = torch.cat([cache.k, k], -2), torch.cat([cache.v, v], -2)
    T = k.shape[-2]
    keep = None
    if key_keep is not None or old_keep is not None:
        ones = torch.ones(B, T, dtype=torch.bool, device=q.device)
        keep = torch.cat([ones[:, :T - n] if old_keep is None else old_keep,
                          ones[:, T - n:] if key_keep is None else key_keep.bool()], -1)
    allowed = torch.ones(n, T, dtype=torch.bool, device=q.device).tril(T - n)
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]  # (B, 1, n, T)
    G = q.shape[1] // k.shape[1]
    kk, vv = (x.repeat_interleave(G, 1) if G > 1 else x for x in (k, v))
    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed, scale=scale)
    return out, KVCache(k=k, v=v, keep=keep)
