"""EVA with a sliding window (``kernel="eva", window=w``): the window's exact softmax as EVA's
local set E(i), EVA's control-variate estimates [Eq. 10-12] for every key outside it
(docs/operator.md, "EVA with a window"; kernels/eva.py for the notation).

For query i the window W(i) is the one of kernels/window.py (causal: i - w < j <= i;
non-causal: |i - j| <= w // 2). The remote keys are cut by the chunks of kernels/eva.py (r =
ceil(K / m) keys each) *and* by the window: every chunk wholly outside W(i) is one remote
subset, and the part of a chunk on each side of the window is one more (the chunk holding
key i - reach - 1 leaves a prefix to the left of the window, the one holding i + reach + 1 a
suffix to its right; causal sites have no right part). A subset P enters as in [Eq. 11-12]:

    beta_P = sum_{j in P} softmax_j(w_P.k'_j - |k'_j|^2 / 2) v_j,  w_P = (q-bar_P + k~_P)'
    logit  = s q_i.k~_P + log |P| + theta_h                         (value beta_P)

k~_P the mean real key of P, q-bar_P the mean real query (non-causal) or the mean of the
queries at P's positions (causal: all before query i), theta_h the learnable log weight of
the kernel part per query head (kernels/window.py; 0 at initialisation, since EVA estimates
exp(s q.k)). The window's scores s q_i.k_j and every subset's logit share one softmax. So E(i)
and the subsets partition the keys; with one key per chunk (m >= K) every subset is one key,
its logit s q.k_j and its value v_j, and the whole is exact softmax (theta = 0), as is a window
covering every key.

Low-rank (a non-causal site with dk): the window reads the original keys and every chunk of
the dk down-sampled keys is a whole remote subset (q-bar: the mean of all queries), as the
other kernels' windowed low-rank form runs the kernel over all dk keys.

Cost O(N (w + m) + K r) and memory of the same order: the window in query chunks against key
bands (kernels/window.py), the prefix and suffix summaries of each chunk as (r x r) masked
products, the chunk logits per query. Training draws w_P = mu_P + eps_c (eps_c: row c of the
map's W, c the chunk of P), as kernels/eva.py does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import cdiv, is_exporting
from .registry import MapFlops
from .window import _bands, _group, check_window_args, window_chunk, window_reach


def chunking(K: int, m: int) -> tuple[int, int]:
    """(r, m): kernels/eva.py's chunks of r = ceil(K / m) keys, as m slots (the last
    m - ceil(K / r) empty, masked like padding): m r keys, one ceiling of the length, where
    ceil(K / r), a ceiling of a ceiling, gives torch.export's shape solver guards it cannot
    solve on a dynamic length."""
    if K < 1 or m < 1:
        raise ValueError(f"EVA needs K and num_features >= 1; got {K}, {m}")
    return cdiv(K, m), m


def _summaries(kc: Tensor, vc: Tensor, keep: Tensor, qbar: Tensor | None, qc: Tensor | None,
               s: float, eps: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Summaries of S subsets of each chunk's r keys [Eq. 11]. kc (B, Hkv, 1, Cp, r, dh), vc
    (B, Hkv, 1, Cp, r, dv), keep (B, 1, 1, Cp, S, r) bool: which keys of the chunk are in each
    subset. q-bar: given (B, Hkv, G, 1, 1, dh), or None with qc (B, Hkv, G, Cp, r, dh), the
    queries at the chunk's positions (the mean over the subset's). eps (Cp, dh) or None.
    Returns |P| (B, 1, 1, Cp, S), k~_P (B, Hkv, 1, Cp, S, dh), beta_P (B, Hkv, G, Cp, S, dv)."""
    kf = keep.float()
    count = kf.sum(-1)
    inv = 1.0 / count.clamp_min(1)[..., None]
    kbar = (kf @ kc) * inv  # (B, Hkv, 1, Cp, S, dh)
    if qbar is None:  # causal: the queries at the subset's positions
        qbar = (kf @ qc) * inv
    omega = (qbar + kbar) * s ** 0.5  # mu_P (B, Hkv, G, Cp, S, dh)
    if eps is not None:  # training: w_P ~ N(mu_P, I), the sample of P's chunk
        omega = omega + eps[:, None, :]
    logit = (omega @ kc.transpose(-1, -2)) * s ** 0.5  # (B, Hkv, G, Cp, S, r): w.k'
    logit = logit - ((kc * kc).sum(-1) * (0.5 * s))[..., None, :]  # - |k'|^2 / 2
    logit = logit.masked_fill(~keep, -math.inf)
    wts = torch.softmax(logit.masked_fill(~keep.any(-1, keepdim=True), 0.0), -1)
    return count, kbar, wts @ vc


def _flat(x: Tensor) -> Tensor:
    """(.., Cp, r, d) -> (.., Cp r, d): per-chunk, per-position summaries by key position."""
    return x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], x.shape[-1])


def _at(cnt: Tensor, kbar: Tensor, beta: Tensor, pos: Tensor, Kp: int
        ) -> tuple[Tensor, Tensor, Tensor]:
    """The per-position summaries (|P| (B, 1, 1, Cp, r), k~ (.., Cp, r, dh), beta) at key
    positions ``pos`` (N,): (B, 1, 1, N), (B, Hkv, 1, N, dh), (B, Hkv, G, N, dv); a position
    outside [0, Kp) gives |P| = 0 (no subset)."""
    ok = (pos >= 0) & (pos < Kp)
    idx = pos.clamp(0, Kp - 1)
    c = torch.where(ok, cnt.reshape(*cnt.shape[:3], Kp).index_select(-1, idx), 0.0)
    return c, _flat(kbar).index_select(-2, idx), _flat(beta).index_select(-2, idx)


def eva_window_attention(
    q: Tensor, k: Tensor, v: Tensor, *, window: int, num_features: int, log_weight: Tensor,
    scale: float, causal: bool = False, key_padding_mask: Tensor | None = None,
    kernel_k: Tensor | None = None, kernel_v: Tensor | None = None,
    kernel_keep: Tensor | None = None, noise: Tensor | None = None,
) -> Tensor:
    """EVA with a sliding window (module docstring). q (B, H, N, dh); k (B, Hkv, N, dh), v
    (B, Hkv, N, dv): the original keys; log_weight (H,) theta; key_padding_mask (B or 1, N)
    bool, True = real. kernel_k / kernel_v (B, Hkv, dk, d), kernel_keep (B, dk): the
    down-sampled keys of a low-rank site (every chunk of them remote). noise (>= C, dh): the
    training samples eps_c. Returns (B, H, N, dv) in q's dtype; computed in fp32."""
    B, H, N, dh = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    check_window_args(N, k.shape[2], window, None, k)  # (EVA is the kernel part: never None)
    G, reach, s, dev = H // hkv, window_reach(window, causal), float(scale), q.device
    real = (torch.ones(B, N, dtype=torch.bool, device=dev) if key_padding_mask is None
            else key_padding_mask.to(dev).bool().expand(B, N))
    qf, kf, vf = q.float(), k.float(), v.float()
    qg = qf.reshape(B, hkv, G, N, dh)
    theta = log_weight.float().reshape(1, hkv, G, 1, 1)

    # -- the window: exact scores of each query chunk against its key bands (kernels/window.py)
    C = window_chunk(window, causal, None if is_exporting() else N)
    P, nc = (1 if causal else 2), cdiv(N, C)
    pad = nc * C - N
    front, back = C, pad + (0 if causal else C)
    kb = _bands(F.pad(kf, (0, 0, front, back)), B, hkv, nc, C, P)  # (B, Hkv, nc, Kn, dh)
    vb = _bands(F.pad(vf, (0, 0, front, back)), B, hkv, nc, C, P)
    rb = _bands(F.pad(real.float(), (front, back))[:, None, :, None], B, 1, nc, C, P)[..., 0] > 0
    sw = _group(qf * s, B, hkv, G, nc, C, pad) @ kb[:, :, None].transpose(-1, -2)
    a = torch.arange(C, device=dev)
    d = torch.arange((P + 1) * C, device=dev)[None, :] - C - a[:, None]  # j - i: (C, Kn)
    in_win = (d > -window) & (d <= 0) if causal else d.abs() <= reach
    sw = sw.masked_fill(~(in_win & rb[:, :, None, :, None, :]), -math.inf)

    # -- remote subsets: logits (B, Hkv, G, N, T) and values (.., N, T, dv) or (.., T, dv) ------
    low = kernel_k is not None
    kx, vx = (kernel_k.float(), kernel_v.float()) if low else (kf, vf)
    keepx = (real if not low else torch.ones(B, kx.shape[2], dtype=torch.bool, device=dev)
             if kernel_keep is None else kernel_keep.to(dev).bool().expand(B, kx.shape[2]))
    K = kx.shape[2]
    r, Cp = chunking(K, num_features)
    Kp = Cp * r
    keepp = F.pad(keepx, (0, Kp - K)).reshape(B, 1, 1, Cp, 1, r)
    kc = torch.where(keepp[..., 0, :, None], F.pad(kx, (0, 0, 0, Kp - K)).reshape(
        B, hkv, 1, Cp, r, dh), 0.0)
    vc = torch.where(keepp[..., 0, :, None], F.pad(vx, (0, 0, 0, Kp - K)).reshape(
        B, hkv, 1, Cp, r, dv), 0.0)
    eps = None if noise is None else F.pad(noise.float()[:Cp].to(dev),
                                           (0, 0, 0, max(0, Cp - noise.shape[0])))
    qbar = qc = None
    if low:  # no positions: the mean of all queries
        qbar = qg.mean(-2)[:, :, :, None, None]
    elif causal:
        qc = F.pad(qg, (0, 0, 0, Kp - N)).reshape(B, hkv, G, Cp, r, dh)
    else:  # the mean of the real queries
        qk = real[:, None, None, :, None].float()
        qbar = ((qg * qk).sum(-2) / qk.sum(-2).clamp_min(1))[:, :, :, None, None]
    if low:  # whole chunks only
        cnt, kbar, beta = _summaries(kc, vc, keepp, qbar, qc, s, eps)
        cnt, kbar, beta = cnt[..., 0], kbar[..., 0, :], beta[..., 0, :]
        fmask = (cnt > 0)[..., None, :]  # (B, 1, 1, 1, Cp)
        logits = [qg @ kbar.transpose(-1, -2) * s + cnt.clamp_min(1).log()[..., None, :]]
        masks, parts = [fmask.expand(B, 1, 1, N, Cp)], []
    else:
        tri = torch.arange(r, device=dev)
        pre = keepp & (tri[None, :] <= tri[:, None])  # (B, 1, 1, Cp, r, r): keys <= row's
        cpre, kpre, bpre = _summaries(kc, vc, pre, qbar, qc, s, eps)
        cnt, kbar, beta = cpre[..., -1], kpre[..., -1, :], bpre[..., -1, :]  # whole chunks
        i = torch.arange(N, device=dev)[:, None]
        cidx = torch.arange(Cp, device=dev)[None, :]
        left = torch.div(i - reach - 1, r, rounding_mode="floor")  # chunk of key i - reach - 1
        fsel = cidx < left  # (N, Cp): chunks wholly left of the window
        # the prefix of the left boundary's chunk, at key p = i - reach - 1 (shifted gathers)
        # (gathers, not pad-and-slice: a slice to N of a length-Kp tensor needs the guard
        # N <= Kp, which torch.export's solver cannot print for Kp = r ceil(N / r))
        c_l, k_l, b_l = _at(cpre, kpre, bpre, torch.arange(N, device=dev) - (reach + 1), Kp)
        logits = [qg @ kbar.transpose(-1, -2) * s + cnt.clamp_min(1).log()[..., None, :],
                  ((qg * k_l).sum(-1) * s + c_l.clamp_min(1).log())[..., None]]
        masks = [None, (c_l > 0)[..., None]]
        parts = [b_l]
        if not causal:  # the suffix of the right boundary's chunk, at key i + reach + 1
            fsel = fsel | (cidx > torch.div(i + reach + 1, r, rounding_mode="floor"))
            suf = keepp & (tri[None, :] >= tri[:, None])
            csuf, ksuf, bsuf = _summaries(kc, vc, suf, qbar, qc, s, eps)
            c_r, k_r, b_r = _at(csuf, ksuf, bsuf, torch.arange(N, device=dev) + reach + 1, Kp)
            logits.append(((qg * k_r).sum(-1) * s + c_r.clamp_min(1).log())[..., None])
            masks.append((c_r > 0)[..., None])
            parts.append(b_r)
        masks[0] = fsel & (cnt > 0)[..., None, :]  # (B, 1, 1, N, Cp)
    rl = torch.cat(logits, -1) + theta  # (B, Hkv, G, N, T): T = Cp (+ 1 or 2)
    rmask = torch.cat([m.expand(B, 1, 1, N, m.shape[-1]) for m in masks], -1)
    rl = rl.masked_fill(~rmask, -math.inf)

    # -- one normaliser over the window and the subsets [Eq. 12] -------------------------------
    rl = F.pad(rl, (0, 0, 0, pad), value=-math.inf).reshape(B, hkv, G, nc, C, rl.shape[-1])
    c = torch.maximum(sw.detach().amax(-1), rl.detach().amax(-1))
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))[..., None]
    pw = torch.exp(sw - c)  # 0 outside the window and on padding
    pr = torch.exp(rl - c).reshape(B, hkv, G, nc * C, rl.shape[-1])[..., :N, :]
    num = (pw @ vb[:, :, None]).reshape(B, hkv, G, nc * C, dv)[..., :N, :]
    num = num + pr[..., :Cp] @ beta
    for t, b_t in enumerate(parts):
        num = num + pr[..., Cp + t, None] * b_t
    den = pw.sum(-1).reshape(B, hkv, G, nc * C)[..., :N] + pr.sum(-1)
    out = num / den.clamp_min(1e-30)[..., None]  # a row with nothing to attend: 0
    return out.reshape(B, H, N, dv).to(q.dtype)


def eva_window_flops(*, B: int, N: int, H: int, Hkv: int, dh: int, m: int, causal: bool,
                     window: int, dk: int | None, dv: int | None = None) -> MapFlops:
    """FLOPs of ``eva_window_attention`` as it runs eagerly, in ``cost_model.site_flops``'
    conventions (products as FlopCounterMode counts them; elementwise 1 per output element,
    reductions 1 per input element, softmax 5; selections, padding and gathers free)."""
    dv = dv or dh
    C = window_chunk(window, causal, N)
    nc = cdiv(N, C)
    Np, Kn = nc * C, (2 if causal else 3) * C
    K = N if dk is None else dk
    r, Cp = chunking(K, m)
    Kp = Cp * r
    bh, bk = B * H, B * Hkv
    # the window: scores, p v; q * s, their max, exp(s - c), row sums
    gemm = 2 * bh * Np * Kn * (dh + dv)
    elem = bh * N * dh + bh * Np * Kn + 2 * bh * Np * Kn + bh * Np * Kn
    exp = bh * Np * Kn
    # subset summaries [Eq. 11]: S subsets per chunk (prefixes, suffixes; 1: whole chunks)
    sets = [(1, False)] if dk is not None else [(r, causal)] + ([] if causal else [(r, False)])
    for S, qpos in sets:
        rows = Cp * S
        gemm += 2 * bk * rows * r * dh + 2 * bh * rows * r * (dh + dv)  # k~, w.k, softmax v
        if qpos:  # q-bar at the subset's positions
            gemm += 2 * bh * rows * r * dh
            elem += bh * rows * dh
        elem += B * rows * r + B * rows + bk * rows * dh  # |P|, 1 / |P|, k~
        elem += 2 * bh * rows * dh + 2 * bh * rows * r  # mu (+ scale), w.k' scale, subtract
        elem += 2 * bk * Kp * dh + bk * Kp + 5 * bh * rows * r  # |k'|^2 / 2; softmax
        exp += bh * rows * r
    if dk is None:  # q-bar over the queries (non-causal): mask, sum, divide
        elem += 0 if causal else 2 * bh * N * dh + bh * dh
    else:
        elem += bh * N * dh + bh * dh
    parts = 0 if dk is not None else (1 if causal else 2)  # boundary subsets per query
    T = Cp + parts
    gemm += 2 * bh * N * Cp * dh + 2 * bh * N * Cp * dv  # q k~_c, P beta
    elem += 2 * bh * N * Cp + B * Cp  # scale, + log |P_c|; log
    elem += parts * (2 * bh * N * dh + 2 * bh * N + B * N)  # q.k~ (mult, sum), scale, + log
    elem += bh * N * T + bh * Np * T + bh * Np  # + theta; max; max of both
    elem += 2 * bh * Np * T  # exp(logit - c)
    exp += bh * Np * T
    elem += bh * N * dv * (1 + 2 * parts)  # num: + P beta, + p_t beta_t
    elem += bh * N * T + bh * N + bh * N + bh * N * dv  # den; + window; clamp; divide
    return MapFlops(gemm, elem, exp)
