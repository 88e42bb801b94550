"""Decoding a causal sliding-window site (``window=w``) from a fixed-size state.

The whole-sequence form is ``kernels/window.py``: query t attends with exact softmax to the
window W(t) = {j : t - w < j <= t} and, through the kernel, to the far keys j <= t - w, both
parts under one normaliser. Decoding keeps

    S = sum_{j far} phi^(k_j) exp(l_j - b) v_j^T   (B, Hkv, m, dv)   fp32
    z = sum_{j far} phi^(k_j) exp(l_j - b)        (B, Hkv, m)       fp32
    the last w - 1 keys and values, raw           (B, Hkv, w - 1, d), and which are real

so its size is fixed whatever the number of tokens: a key enters the far state when it
leaves the window (the buffer rolls: the oldest key drops out as a new one comes in). Before
w - 1 tokens, the slots not yet filled hold zeros marked as padding (``keep`` False), which
enter neither part; so every shape is static (an ONNX step graph needs no branch).
phi^ and l are the map's per-row features and log scales (``window.row_features``: the
performer's stabilised form; l = 0 for the other maps) and b is the causal key shift of
``window.key_shift``, a bound that depends on no key, so the far state needs no running
maximum. Token t then reads, with s_tj = scale q_t . k_j and lam_t = theta_h + l_q + b,

    c_t = max(max_{j in W(t)} s_tj, lam_t + log(phi^(q_t) . z))
    o_t = (sum_{W(t)} exp(s_tj - c_t) v_j + exp(lam_t - c_t) phi^(q_t) S)
          / (sum_{W(t)} exp(s_tj - c_t) + exp(lam_t - c_t) phi^(q_t) . z)

which is ``window_attention``'s formula, term by term. n new tokens (a prefill or one
step) run in chunks of ``chunk_size``: each chunk's queries see the buffer and the chunk
(masked to their window), and the chunk's keys beyond their own windows through a masked
product, as the whole-sequence form does for its key bands. Padded keys (``key_keep``
False) stay out of both parts but keep their place in the window, as in the whole-sequence
form (the window is by position).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .feature_maps import FeatureMap
from .reference import is_exporting
from .window import key_shift, row_features

_TINY = torch.finfo(torch.float32).tiny


@dataclass
class WindowState:
    """State of one causal windowed site after ``tokens`` tokens: the far keys' S
    (B, Hkv, m, dv) and z (B, Hkv, m) in fp32, and the last w - 1 keys k (B, Hkv, w - 1, dh),
    values v (B, Hkv, w - 1, dv) and keep (B, w - 1) bool (True = a real key; False for
    padding and for the slots before the first token)."""

    S: Tensor
    z: Tensor
    k: Tensor
    v: Tensor
    keep: Tensor
    tokens: int = 0

    def tensors(self) -> list[Tensor]:
        """The tensors the state holds (bounded by the window, not by ``tokens``)."""
        return [self.S, self.z, self.k, self.v, self.keep]

    def map(self, fn: Callable[[Tensor], Tensor]) -> WindowState:
        """The state with ``fn`` applied to each tensor (beam reordering, devices)."""
        return WindowState(S=fn(self.S), z=fn(self.z), k=fn(self.k), v=fn(self.v),
                           keep=fn(self.keep), tokens=self.tokens)


def empty_window_state(k: Tensor, v: Tensor, m: int, window: int) -> WindowState:
    """The state before any token, for keys like k (B, Hkv, ., dh) and values like v: empty
    sums and w - 1 buffer slots marked as padding."""
    B, hkv = k.shape[:2]
    L = window - 1
    return WindowState(S=k.new_zeros(B, hkv, m, v.shape[-1], dtype=torch.float32),
                       z=k.new_zeros(B, hkv, m, dtype=torch.float32),
                       k=k.new_zeros(B, hkv, L, k.shape[-1]), v=v.new_zeros(B, hkv, L, v.shape[-1]),
                       keep=torch.zeros(B, L, dtype=torch.bool, device=k.device))


def _far_features(fm: FeatureMap, k: Tensor, keep: Tensor) -> Tensor:
    """phi^(k) exp(l - b), zero on padded keys: (B, Hkv, L, m) fp32 (keep (B, L))."""
    km = keep[:, None, :, None]
    phk, lsk = row_features(fm, k.float(), is_query=False, key_mask=km)
    if lsk is not None:
        phk = phk * torch.exp(lsk - key_shift(fm, lsk, keep, causal=True))[..., None]
    return torch.where(km, phk, 0.0)


def _roll(fm: FeatureMap, state: WindowState, kb: Tensor, vb: Tensor, kp: Tensor, out: int,
          tokens: int) -> WindowState:
    """The buffer with c new keys appended, kb (B, Hkv, w - 1 + c, dh), vb and kp (B, w - 1 + c):
    its ``out`` = c oldest keys leave it and enter S and z."""
    ph = _far_features(fm, kb[:, :, :out], kp[:, :out])  # (B, Hkv, c, m)
    vv = torch.where(kp[:, None, :out, None], vb[:, :, :out].float(), 0.0)
    return WindowState(S=state.S + ph.transpose(-1, -2) @ vv, z=state.z + ph.sum(-2),
                       k=kb[:, :, out:], v=vb[:, :, out:], keep=kp[:, out:], tokens=tokens)


def window_prefill_state(fm: FeatureMap, k: Tensor, v: Tensor, keep: Tensor | None,
                         window: int) -> WindowState:
    """The state after a prefill of k (B, Hkv, n, dh), v (B, Hkv, n, dv) whose outputs the
    whole-sequence forward computed (keep (B, n) bool or None: the real keys)."""
    B, n = k.shape[0], k.shape[-2]
    keep = torch.ones(B, n, dtype=torch.bool, device=k.device) if keep is None else keep.bool()
    m = _far_features(fm, k[:, :, :1], keep[:, :1]).shape[-1]
    st = empty_window_state(k, v, m, window)
    return _roll(fm, st, torch.cat([st.k, k], -2), torch.cat([st.v, v], -2),
                 torch.cat([st.keep, keep], -1), n, n)


def window_continue(
    q: Tensor, k: Tensor, v: Tensor, state: WindowState | None, *, feature_map: FeatureMap,
    log_weight: Tensor, scale: float, window: int, key_keep: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, WindowState]:
    """Causal windowed attention of n new tokens continuing from ``state`` (None: before the
    first token). q (B, H, n, dh), k (B, Hkv, n, dh), v (B, Hkv, n, dv), log_weight (H,)
    theta, key_keep (B, n) bool or None -> (out (B, H, n, dv) in q's dtype, the new state)."""
    B, H, n, dh = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    G, fm = H // hkv, feature_map
    keep = (torch.ones(B, n, dtype=torch.bool, device=q.device) if key_keep is None
            else key_keep.bool())
    if state is None:
        m = _far_features(fm, k[:, :, :1], keep[:, :1]).shape[-1]
        state = empty_window_state(k, v, m, window)
    theta = log_weight.float().reshape(1, hkv, G, 1)
    b = None  # the causal key shift, a bound no key moves (stabilised maps only)
    outs = []
    for t0 in range(0, n, chunk_size):
        kc, vc, pc = k[:, :, t0:t0 + chunk_size], v[:, :, t0:t0 + chunk_size], \
            keep[:, t0:t0 + chunk_size]
        c, L = kc.shape[-2], state.k.shape[-2]
        qc = q[:, :, t0:t0 + c].float().reshape(B, hkv, G, c, dh)
        kb, vb = torch.cat([state.k, kc], -2), torch.cat([state.v, vc], -2)  # (B, Hkv, T, d)
        kk, vv = kb.float(), vb.float()  # T = L + c
        real = torch.cat([state.keep, pc], -1)  # (B, T)
        d = (torch.arange(L + c, device=q.device)[None, :] - L
             - torch.arange(c, device=q.device)[:, None])  # key - query position: (c, T)
        far_in = d <= -window  # keys of this chunk already beyond the query's window
        allowed = real[:, None, None, None, :]  # (B, 1, 1, 1, T)
        if is_exporting() or c > 1:  # one new token: its window is the whole buffer
            allowed = allowed & (d > -window) & (d <= 0)
        # -- exact part over the window ----------------------------------------------------
        s = (qc * scale) @ kk[:, :, None].transpose(-1, -2)  # (B, Hkv, G, c, T)
        s = s.masked_fill(~allowed, float("-inf"))
        s_max = s.detach().amax(-1)  # (B, Hkv, G, c)
        # -- kernel part: the far state plus this chunk's keys beyond the window ------------
        phq, lsq = row_features(fm, q[:, :, t0:t0 + c].float(), is_query=True)  # (B, H, c, m)
        phq = phq.reshape(B, hkv, G, c, -1)
        lsq = None if lsq is None else lsq.reshape(B, hkv, G, c)
        num_k = phq @ state.S[:, :, None]  # (B, Hkv, G, c, dv)
        den_k = (phq @ state.z[:, :, None, :, None])[..., 0]  # (B, Hkv, G, c)
        nf = L + c - window  # = c - 1 keys that are far for some query of the chunk
        if is_exporting() or nf > 0:  # none for a single step (no branch in a graph)
            phk = _far_features(fm, kk[:, :, :nf], real[:, :nf])  # (B, Hkv, nf, m)
            A = (phq @ phk[:, :, None].transpose(-1, -2)).masked_fill(~far_in[:, :nf], 0.0)
            num_k = num_k + A @ torch.where(real[:, None, :nf, None], vv[:, :, :nf],
                                            0.0)[:, :, None]
            den_k = den_k + A.sum(-1)
        lam = theta.expand(B, hkv, G, c)
        if lsq is not None:
            if b is None:
                b = key_shift(fm, lsq.new_zeros(B, hkv, 1), None, causal=True)  # (B, Hkv, 1)
            lam = lam + lsq + b[:, :, None]
        cm = torch.maximum(s_max, lam.detach() + torch.log(den_k.detach().clamp_min(_TINY)))
        cm = torch.where(torch.isfinite(cm), cm, torch.zeros_like(cm))
        p = torch.exp(s - cm[..., None])  # (B, Hkv, G, c, T)
        f = torch.exp(lam - cm)  # (B, Hkv, G, c)
        num = p @ vv[:, :, None] + f[..., None] * num_k
        den = p.sum(-1) + f * den_k
        outs.append((num / den.clamp_min(_TINY)[..., None]).reshape(B, H, c, dv))
        state = _roll(fm, state, kb, vb, real, c, state.tokens + c)
    return torch.cat(outs, 2).to(q.dtype), state
