"""Sliding-window hybrid attention (``window=w``, LoLCATs-style): exact softmax over the
nearest keys, the kernel over the others, one shared normaliser (docs/operator.md,
"Sliding window"). EVA's windowed form (its control-variate subsets outside the window) is
kernels/eva_window.py, reached through ``dispatch.window_attention_dispatch``.

For query i, the window W(i) is

    causal:      keys j with i - w < j <= i         (the w previous keys, i itself included)
    non-causal:  keys j with |i - j| <= w // 2      (2 (w // 2) + 1 keys: w + 1 for an even w)

and, with scores s_ij = scale q_i . k_j, the true kernel kappa(q, k) = phi(q) . phi(k) (the
map's ``formula``, no stabilizer) and a learnable weight alpha_h = exp(theta_h) per query head:

    A_ij = exp(s_ij)                  j in W(i)      (real keys only)
    A_ij = alpha_h kappa(q_i, k~_j)   j in K(i)
    O_i  = sum_j A_ij v~_j / sum_j A_ij

K(i), the kernel keys: without low-rank, every real key outside W(i) (k~ = k, v~ = v); with
low-rank (non-causal sites with dk), all dk down-sampled keys k~ = E k, v~ = F v (a
down-sampled key mixes many positions, so the window's keys cannot be taken out of it).

Stabilisation. The formula is invariant to a common factor per query, so it is computed at
exp(-c_i) with c_i = max(max_{j in W(i)} s_ij, log(alpha_h sum_{j in K(i)} kappa_ij)):
every window term exp(s_ij - c_i) <= 1 and the kernel part, scaled by the same exp(-c_i), is
<= 1 too: nothing overflows, whatever the scale of the map (the softmax numerator exp(s - c)
and the kernel numerator are added before the one division). The performer's features come
with per-row log scales (``causal_key_features``: phi = phi^ exp(l), phi^ <= 1), kept in the
log domain: a query's kernel part is exp(l_q + b) phi^(q) . S^ with S^ the state of
phi^(k) exp(l_k - b) v^T. The key shift b is the largest real key's log scale of each
(batch, kv-head) on a non-causal site; on a causal site it may depend on no key (a future key
must not change the rounding of the past), so it is the bound max_f |w_f|^2 / 2 that
u_f = w_f.x' - |x'|^2 / 2 can never exceed.

Initial theta (``initial_log_weight``): 0 (alpha = 1) for a kernel that estimates exp(s)
(the performer and EVA, the registry's ``estimates_softmax``, and softmax over down-sampled
keys), so the hybrid starts as an estimate of softmax that is exact on the window;
-log m for the other maps (relu, rnn, ffk), whose kappa is of order m whatever the scores
(elu(x) + 1 is about 1 per feature): a far key then weighs O(1), like exp(s) of a small
score, and on peaked attention the window's exp(s_max) outweighs the far keys, so the hybrid
starts close to softmax there. (Measured on the random tiny Llama of the tests, w = 8:
end-to-end error 0.0095 with -log m against 0.30 with 0 for rnn; the performer 0.0096 with 0.)
LoLCATs' own formulation leaves the kernel terms unscaled by exp(-c_i), which makes the
kernel's share depend on the window's largest score; this one does not.

Memory O(N (w + m dv / C)): queries in chunks of C >= the window's reach (at least
``MIN_CHUNK``) against the 2 (causal) or 3 chunks of keys around them; the kernel keys beyond
those chunks enter through prefix (and, non-causal, suffix) sums of per-chunk states. No
N x N tensor is formed.

Layout as in kernels/reference.py: q (B, H, N, dh), k (B, Hkv, N, dh), v (B, Hkv, N, dv);
query head h reads kv-head h // (H // Hkv). Computed in fp32, returned in q's dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .feature_maps import FeatureMap, PerformerFeatures
from .reference import is_exporting, kernel_state

MIN_CHUNK = 32  # query rows per chunk at least: fewer, larger products for a small window
_TINY = torch.finfo(torch.float32).tiny


def initial_log_weight(fm: FeatureMap | None) -> float:
    """theta at initialisation (module docstring): 0 for softmax (fm None) and maps that
    estimate it (``estimates_softmax``: the performer, EVA), else -log m."""
    if fm is None or fm.estimates_softmax:
        return 0.0
    return -math.log(fm.num_features)


def window_reach(window: int, causal: bool) -> int:
    """How far back (causal) or to each side (non-causal) the window reaches: w - 1 or w // 2."""
    return window - 1 if causal else window // 2


def window_chunk(window: int, causal: bool, n: int | None = None) -> int:
    """C, the query rows per chunk: at least the reach, so that a chunk's window lies within
    the chunk and its neighbours; ``MIN_CHUNK`` or, for a shorter sequence of n queries
    (eager only: under export C must not depend on the length), n."""
    floor = MIN_CHUNK if n is None else min(MIN_CHUNK, n)
    return max(window_reach(window, causal), floor)


def row_features(fm: FeatureMap, x: Tensor, *, is_query: bool,
                 key_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """phi^(x) (B, Hx, L, m) fp32 and a per-row log scale l (B, Hx, L) or None, with the map's
    ``formula`` = phi^ exp(l). Stabilized maps (the performer) give their per-row form
    (``causal_key_features``, a function of the row alone, for queries too); the others'
    ``forward`` is their formula."""
    if fm.causal_stabilized:
        return fm.causal_key_features(x, key_mask)
    return fm(x, is_query=is_query, key_mask=key_mask), None


def key_shift(fm: FeatureMap, ls: Tensor, keep: Tensor | None, causal: bool) -> Tensor:
    """b (B, Hkv, 1): the common log scale of the kernel keys' state (module docstring).
    ls (B, Hkv, L) the keys' log scales, keep (B, L) bool or None."""
    if causal and isinstance(fm, PerformerFeatures):  # a bound no key can move
        bound = (fm.W.detach().float() ** 2).sum(-1).reshape(-1).amax(0) / 2  # ONNX: a dim
        return bound.to(ls.device).expand(ls.shape[0], ls.shape[1], 1)
    # (Non-causal; or a stabilized map without a known bound: its largest key, which lets a
    # future key change past positions by rounding only.)
    lsd = ls.detach()
    if keep is not None:
        lsd = lsd.masked_fill(~keep[:, None, :].bool(), -1e30)
    return lsd.amax(-1, keepdim=True).clamp_min(-1e30)


def _bands(x: Tensor, B: int, hkv: int, nc: int, C: int, P: int) -> Tensor:
    """(B, Hkv, (nc + P) C, d) -> (B, Hkv, nc, (P + 1) C, d): for query chunk t, the key
    chunks t - 1 .. t - 1 + P side by side (x is padded by one chunk in front)."""
    xc = x.reshape(B, hkv, nc + P, C, x.shape[-1])
    return torch.cat([xc[:, :, s:s + nc] for s in range(P + 1)], dim=3)


def _group(x: Tensor, B: int, hkv: int, G: int, nc: int, C: int, pad: int) -> Tensor:
    """Query-side (B, H, N, d) -> (B, Hkv, G, nc, C, d), zero rows appended to nc C."""
    x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(B, hkv, G, nc, C, x.shape[-1])


def check_window_args(N: int, M: int, window: int, feature_map: FeatureMap | None,
                      kernel_k: Tensor | None) -> None:
    """The ValueErrors of ``window_attention`` (shared with the Triton entry point): N != M
    (a window needs self-attention), window < 1, or no kernel part (exact softmax)."""
    if M != N:
        raise ValueError(f"a sliding window needs self-attention (as many keys as queries); "
                         f"got N={N} queries, M={M} keys. Convert without window=")
    if window < 1:
        raise ValueError(f"window must be a positive int; got {window}")
    if feature_map is None and kernel_k is None:
        raise ValueError("window with exact softmax has no kernel part: exact attention "
                         "already attends to every key; use window=None")


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    feature_map: FeatureMap | None,
    log_weight: Tensor,
    scale: float,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    kernel_k: Tensor | None = None,
    kernel_v: Tensor | None = None,
    kernel_keep: Tensor | None = None,
) -> Tensor:
    """The sliding-window hybrid of the module docstring.

    q (B, H, N, dh); k (B, Hkv, N, dh), v (B, Hkv, N, dv): the original keys (the window's);
    log_weight (H,): theta, alpha_h = exp(theta_h); key_padding_mask (B or 1, N) bool, True = real.
    kernel_k (B, Hkv, dk, dh), kernel_v (B, Hkv, dk, dv), kernel_keep (B, dk) or None: the
    down-sampled keys of a low-rank site (then the kernel part runs over all of them);
    None: the kernel part runs over the original keys outside the window. feature_map None:
    softmax over the down-sampled keys (Linformer plus window; needs kernel_k).
    Returns (B, H, N, dv) in q's dtype. Raises ValueError when N != M (a window needs
    self-attention) or when there is no kernel part (exact softmax)."""
    B, H, N, dh = q.shape
    hkv, M, dv = k.shape[1], k.shape[2], v.shape[-1]
    check_window_args(N, M, window, feature_map, kernel_k)
    G, reach = H // hkv, window_reach(window, causal)
    C = window_chunk(window, causal, None if is_exporting() else N)
    P = 1 if causal else 2  # key chunks after t - 1 in a query chunk's neighbourhood
    nc = (N + C - 1) // C
    pad = nc * C - N  # queries and keys padded to nc chunks of C
    front, back = C, pad + (0 if causal else C)  # one chunk before (and after) the keys
    real = (torch.ones(B, N, dtype=torch.bool, device=q.device) if key_padding_mask is None
            else key_padding_mask.bool().expand(B, N))  # (1, N): shared by the batch
    qf, kf, vf = q.float(), k.float(), v.float()

    # -- the window: exact softmax scores of each query chunk against its key bands ----------
    kb = _bands(F.pad(kf, (0, 0, front, back)), B, hkv, nc, C, P)  # (B, Hkv, nc, Kn, dh)
    vb = _bands(F.pad(vf, (0, 0, front, back)), B, hkv, nc, C, P)  # (B, Hkv, nc, Kn, dv)
    realp = F.pad(real.to(qf.dtype), (front, back))[:, None, :, None]  # (B, 1, L, 1)
    rb = _bands(realp, B, 1, nc, C, P)[..., 0] > 0  # (B, 1, nc, Kn): real keys
    qc = _group(qf * scale, B, hkv, G, nc, C, pad)  # (B, Hkv, G, nc, C, dh)
    s = qc @ kb[:, :, None].transpose(-1, -2)  # (B, Hkv, G, nc, C, Kn), Kn = (P + 1) C
    a = torch.arange(C, device=q.device)
    d = torch.arange((P + 1) * C, device=q.device)[None, :] - C - a[:, None]  # j - i: (C, Kn)
    in_win = (d > -window) & (d <= 0) if causal else d.abs() <= reach
    valid = rb[:, :, None, :, None, :]  # (B, 1, 1, nc, 1, Kn): real keys
    s = s.masked_fill(~(in_win & valid), float("-inf"))
    s_max = s.detach().amax(-1)  # (B, Hkv, G, nc, C): -inf where the window has no real key

    # -- the kernel part, at scale exp(lam): o = [num | den] (B, Hkv, G, nc, C, dv + 1) -------
    if kernel_k is not None:
        o, lam = _lowrank_part(qf, kernel_k, kernel_v, kernel_keep, feature_map, scale,
                               B, hkv, G, nc, C, pad)
    else:
        out_win = d <= -window if causal else ~in_win  # (C, Kn): the far side of the band
        o, lam = _far_part(qf, kf, vf, real, feature_map, causal, out_win, B, hkv, G, nc, C, P,
                           pad, front, back)

    # -- one normaliser ----------------------------------------------------------------------
    # c = max(window max, log of the weighted kernel denominator): both parts <= 1 at exp(-c)
    lam = lam + log_weight.float().reshape(1, hkv, G, 1, 1)  # log(alpha_h) + kernel scale
    num_k, den_k = o[..., :-1], o[..., -1]
    c = torch.maximum(s_max, lam.detach() + torch.log(den_k.detach().clamp_min(_TINY)))
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))  # (B, Hkv, G, nc, C)
    p = torch.exp(s - c[..., None])  # exp(s_ij - c_i) on the window, 0 elsewhere
    f = torch.exp(lam - c)  # alpha_h exp(lam_i - c_i): the kernel part's factor
    num = p @ vb[:, :, None] + f[..., None] * num_k  # (B, Hkv, G, nc, C, dv)
    den = p.sum(-1) + f * den_k  # (B, Hkv, G, nc, C)
    out = num / den.clamp_min(_TINY)[..., None]
    return out.reshape(B, H, nc * C, dv)[:, :, :N].to(q.dtype)


def window_kernel_part(
    q: Tensor, k: Tensor, v: Tensor, *, window: int, feature_map: FeatureMap | None,
    log_weight: Tensor, scale: float, causal: bool = False,
    key_padding_mask: Tensor | None = None, kernel_k: Tensor | None = None,
    kernel_v: Tensor | None = None, kernel_keep: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel part of ``window_attention`` per query, as that function computes it
    (same chunks, same states, same shift b): (num (B, H, N, dv), den (B, H, N),
    lam (B, H, N)), fp32, with the part's terms alpha_h kappa_ij = exp(lam_i) (num_i, den_i)
    (lam = theta_h + the map's log scale). The Triton window kernel
    (``triton_window_ops``) adds the exact band to it under the one normaliser. Arguments as
    ``window_attention``'s."""
    B, H, N, dh = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    check_window_args(N, k.shape[2], window, feature_map, kernel_k)
    G, reach = H // hkv, window_reach(window, causal)
    C = window_chunk(window, causal, None if is_exporting() else N)
    P = 1 if causal else 2
    nc = (N + C - 1) // C
    pad = nc * C - N
    front, back = C, pad + (0 if causal else C)
    real = (torch.ones(B, N, dtype=torch.bool, device=q.device) if key_padding_mask is None
            else key_padding_mask.bool().expand(B, N))  # (1, N): shared by the batch
    qf = q.float()
    if kernel_k is not None:
        o, lam = _lowrank_part(qf, kernel_k, kernel_v, kernel_keep, feature_map, scale,
                               B, hkv, G, nc, C, pad)
    else:
        a = torch.arange(C, device=q.device)
        d = torch.arange((P + 1) * C, device=q.device)[None, :] - C - a[:, None]
        out_win = d <= -window if causal else d.abs() > reach
        o, lam = _far_part(qf, k.float(), v.float(), real, feature_map, causal, out_win, B,
                           hkv, G, nc, C, P, pad, front, back)
    lam = lam + log_weight.float().reshape(1, hkv, G, 1, 1)
    o = o.reshape(B, H, nc * C, dv + 1)[:, :, :N]
    return o[..., :-1], o[..., -1], lam.reshape(B, H, nc * C)[:, :, :N]


def _lowrank_part(qf: Tensor, kk: Tensor, vk: Tensor, keep: Tensor | None,
                  fm: FeatureMap | None, scale: float, B: int, hkv: int, G: int, nc: int,
                  C: int, pad: int) -> tuple[Tensor, Tensor]:
    """Kernel part over the dk down-sampled keys: ([num | den] (B, Hkv, G, nc, C, dv + 1),
    its log scale lam (B, Hkv, G, nc, C)). Softmax (fm None): exp(s~ - lam), lam = max s~."""
    kf, vf = kk.float(), vk.float()
    v1 = torch.cat([vf, vf.new_ones(*vf.shape[:-1], 1)], -1)  # (B, Hkv, dk, dv + 1)
    if fm is None:  # Linformer + window: exp(scale q . k~) over the dk keys
        st = _group(qf * scale, B, hkv, G, nc, C, pad) @ kf[:, :, None, None].transpose(-1, -2)
        if keep is not None:  # (B, Hkv, G, nc, C, dk)
            st = st.masked_fill(~keep.bool()[:, None, None, None, None, :], float("-inf"))
        lam = st.detach().amax(-1)
        lam = torch.where(torch.isfinite(lam), lam, torch.zeros_like(lam))
        return torch.exp(st - lam[..., None]) @ v1[:, :, None, None], lam
    kmask = None if keep is None else keep[:, None, :, None].bool()
    phk, lsk = row_features(fm, kk, is_query=False, key_mask=kmask)  # (B, Hkv, dk, m)
    b = None
    if lsk is not None:
        b = key_shift(fm, lsk, keep, causal=False)  # (B, Hkv, 1)
        phk = phk * torch.exp(lsk - b)[..., None]
    state = kernel_state(phk, vf, key_padding_mask=keep)  # (B, Hkv, m, dv + 1)
    phq, lsq = row_features(fm, qf, is_query=True)  # (B, H, N, m)
    o = _group(phq, B, hkv, G, nc, C, pad) @ state[:, :, None, None]
    return o, _query_scale(lsq, b, o, B, hkv, G, nc, C, pad)


def _far_part(qf: Tensor, kf: Tensor, vf: Tensor, real: Tensor, fm: FeatureMap, causal: bool,
              out_win: Tensor, B: int, hkv: int, G: int, nc: int, C: int, P: int, pad: int,
              front: int, back: int) -> tuple[Tensor, Tensor]:
    """Kernel part over the original keys outside each query's window: the key bands around
    the chunk (masked to the complement of the window, ``out_win`` (C, Kn)) plus the states
    of the chunks beyond them (t - 2 and before; non-causal also t + 2 and after)."""
    phk, lsk = row_features(fm, kf, is_query=False, key_mask=real[:, None, :, None])
    b = None
    if lsk is not None:
        b = key_shift(fm, lsk, real, causal)  # (B, Hkv, 1)
        phk = phk * torch.exp(lsk - b)[..., None]
    keep = real[:, None, :, None]  # padded keys (values too) contribute nothing
    phk = torch.where(keep, phk, 0.0)  # (B, Hkv, N, m)
    v1 = torch.where(keep, torch.cat([vf, vf.new_ones(*vf.shape[:-1], 1)], -1), 0.0)
    m, dv1 = phk.shape[-1], v1.shape[-1]
    # per-chunk states [S | z] (B, Hkv, nc, m, dv + 1), then the far ones per query chunk
    kv = (F.pad(phk, (0, 0, 0, pad)).reshape(B, hkv, nc, C, m).transpose(-1, -2)
          @ F.pad(v1, (0, 0, 0, pad)).reshape(B, hkv, nc, C, dv1))
    pre = torch.cumsum(kv, 2)
    far = F.pad(pre, (0, 0, 0, 0, 2, 0))[:, :, :nc]  # chunks <= t - 2
    if not causal:  # + chunks >= t + 2 (a reversed cumsum: no subtraction, no cancellation)
        suf = torch.flip(torch.cumsum(torch.flip(kv, (2,)), 2), (2,))
        far = far + F.pad(suf, (0, 0, 0, 0, 0, 2))[:, :, 2:]
    phq, lsq = row_features(fm, qf, is_query=True)  # (B, H, N, m)
    qc = _group(phq, B, hkv, G, nc, C, pad)  # (B, Hkv, G, nc, C, m)
    kb = _bands(F.pad(phk, (0, 0, front, back)), B, hkv, nc, C, P)  # (B, Hkv, nc, Kn, m)
    vb = _bands(F.pad(v1, (0, 0, front, back)), B, hkv, nc, C, P)  # (B, Hkv, nc, Kn, dv + 1)
    A = (qc @ kb[:, :, None].transpose(-1, -2)).masked_fill(~out_win, 0.0)  # (.., C, Kn)
    o = qc @ far[:, :, None] + A @ vb[:, :, None]  # (B, Hkv, G, nc, C, dv + 1)
    return o, _query_scale(lsq, b, o, B, hkv, G, nc, C, pad)


def _query_scale(lsq: Tensor | None, b: Tensor | None, o: Tensor, B: int, hkv: int, G: int,
                 nc: int, C: int, pad: int) -> Tensor:
    """lam = l_q + b per query (B, Hkv, G, nc, C); zeros for maps without log scales."""
    if lsq is None:
        return o.new_zeros(o.shape[:-1])
    lam = _group(lsq[..., None], B, hkv, G, nc, C, pad)[..., 0]
    return lam + b[:, :, None, None]
