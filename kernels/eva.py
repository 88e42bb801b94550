"""EVA attention: Zheng, Wang & Kong, "Efficient Attention via Control Variates" (ICLR 2023).

Notation of the paper (its equation numbers in brackets), in this package's layout q (B, H, N,
dh), k (B, Hkv, K, dh), v (B, Hkv, K, dv), scale s, scaled vectors x' = s^(1/2) x:

* softmax attention [Eq. 1] is an expectation over the Performer-style positive random features
  xi(x, w) = exp(w.x' - |x'|^2 / 2), E_{w ~ N(0, I)}[xi(q, w) xi(k, w)] = exp(s q.k) [Eq. 3];
  random-feature attention (RFA) is its self-normalised importance-sampling estimate [Eq. 4-5];
* RFA is a sum of per-key control-variate estimates g~_m = g_m - beta (h_m - E[h_m]) with one
  coefficient beta shared by every key [Prop. 1, Eq. 7-8]; the optimal per-key coefficient
  beta_m = v_m makes a key's estimate exact (its softmax term) [Eq. 9];
* EVA [Eq. 10-12] keeps the optimal coefficient for the keys of a local set E (exact softmax
  terms) and shares one coefficient per remote subset P_c. With the coefficient estimated from
  one sample w_c per subset, the query's factors cancel and it is a chunk-level summary

      beta_c = sum_{j in P_c} softmax_j(w_c.k'_j - |k'_j|^2 / 2) v_j                 [Eq. 11]

  (a softmax-weighted mean of the chunk's values), and the control variate's expectation
  sum_{j in P_c} exp(s q.k_j) is approximated by exp(s q.k~_c) times the chunk's size, k~_c the
  chunk's mean key (docs/operator.md, "EVA": the |P_c| factor and the proposal were chosen by
  measured error). Everything shares one normaliser [Eq. 12]:

      O_i = [sum_{j in E(i)} e^{s q_i.k_j} v_j + sum_c |P_c| e^{s q_i.k~_c} beta_c]
            / [sum_{j in E(i)} e^{s q_i.k_j} + sum_c |P_c| e^{s q_i.k~_c}]

Partition (``eva_layout``): the K keys are cut into C = ceil(K / ceil(K / m)) chunks of r =
ceil(K / m) keys (m = ``num_features``, the number of samples: one per chunk, as in the
paper); g = max(1, w // r) consecutive chunks form a local group of W = g r keys (w =
``eva_chunk``, rounded down to whole chunks). Query i belongs to the group holding its anchor
key floor(i * num / den) (num/den = K/N, or dk/max_seq_len for FLuRKA-EVA over down-sampled
keys); E(i) is its group, every other chunk a remote subset, so E and the P_c partition the
keys as in the paper. Causal: E(i) masked to keys <= i, remote chunks only of earlier groups.
The proposal of chunk c is N(mu_c, I), mu_c = (q-bar + k~_c)' (the mean of the mixture
components N(q' + k'_j, I) of the optimal proposal), q-bar the mean query (causal: the mean
of the queries at chunk c's positions); w_c = mu_c in eval, w_c = mu_c + eps_c in training
(eps_c: row c of the map's W, redrawn on the performer's schedule).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .eva_window import eva_window_attention, eva_window_flops
from .feature_maps import PerformerFeatures
from .reference import cdiv
from .registry import MapFlops, register_feature_map

DEFAULT_EVA_CHUNK = 32  # w: local window, in keys (docs/operator.md "EVA")
DEFAULT_EVA_FEATURES = 64  # m: remote chunks (one sample each)


class EvaLayout(NamedTuple):
    """The partition of K keys: r keys per chunk, C chunks holding keys (Cp >= C after padding
    to whole groups), g chunks per local group of W = g r keys, ng groups."""

    r: int
    C: int
    g: int
    W: int
    ng: int
    Cp: int


def eva_layout(K: int, m: int, w: int) -> EvaLayout:
    """Partition K keys into chunks for m samples and a local window of w keys (see module)."""
    if K < 1 or m < 1 or w < 1:
        raise ValueError(f"EVA needs K, num_features and eva_chunk >= 1; got {K}, {m}, {w}")
    r = cdiv(K, m)
    C = cdiv(K, r)
    g = max(1, w // r)
    ng = cdiv(C, g)
    return EvaLayout(r, C, g, g * r, ng, ng * g)


def query_groups(N: int, lay: EvaLayout, num: int, den: int) -> tuple[Tensor, Tensor, int]:
    """Queries by local group. Query i's anchor key is floor(i num / den), its group
    anchor // W; group t holds the contiguous queries [start_t, start_{t+1}), start_t =
    ceil(t W den / num) (exact integers), at most ceil(W den / num) of them (ceil(a + b) <=
    ceil(a) + ceil(b)) but the last (``eva_query_slots``: a Python int, no data-dependent
    size). Returns ``table`` (ng, Qmax): the query of each slot
    (N for an empty slot), ``slot`` (N,): where query i sits in the flattened table, Qmax."""
    t = torch.arange(lay.ng + 1)
    start = torch.clamp(-(-(t * lay.W * den) // num), max=N)
    start[-1] = N  # queries past the last group's anchors stay in the last group
    qmax = eva_query_slots(N, lay, num, den)
    table = start[:-1, None] + torch.arange(qmax)[None]  # (ng, Qmax)
    table = torch.where(table < start[1:, None], table, N)
    i = torch.arange(N)
    grp = torch.clamp(((i * num) // den) // lay.W, max=lay.ng - 1)
    slot = grp * qmax + (i - start[grp])
    return table, slot, qmax


def eva_attention(
    q: Tensor, k: Tensor, v: Tensor, *, num_features: int, eva_chunk: int = DEFAULT_EVA_CHUNK,
    key_padding_mask: Tensor | None = None, causal: bool = False, scale: float | None = None,
    key_spacing: tuple[int, int] | None = None, noise: Tensor | None = None,
) -> Tensor:
    """EVA attention [Eq. 12] (module docstring). q (B, H, N, dh), k (B, Hkv, K, dh), v (B, Hkv,
    K, dv) -> (B, H, N, dv) in q's dtype, computed in fp32.

    key_padding_mask (B, K) bool, True = real key: padded keys are in no sum. key_spacing
    (num, den): query i's anchor key is floor(i num / den) (default (K, N)). noise (>= C, dh):
    the proposal's samples eps_c (training); None: w_c = mu_c. Causal needs K == N."""
    B, H, N, dh = q.shape
    hkv, K, dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // hkv
    if causal and K != N:
        raise ValueError(f"causal EVA needs as many keys as queries; got N={N}, K={K}")
    s = float(scale) if scale is not None else dh ** -0.5
    lay = eva_layout(K, num_features, eva_chunk)
    r, g, W, ng, Cp = lay.r, lay.g, lay.W, lay.ng, lay.Cp
    Kp, dev = ng * W, q.device
    keep = (torch.ones(B, K, dtype=torch.bool, device=dev) if key_padding_mask is None
            else key_padding_mask.to(dev).bool().expand(B, K))
    keep = torch.nn.functional.pad(keep, (0, Kp - K))  # (B, Kp): padding to whole groups
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, Kp - K))
    vf = torch.nn.functional.pad(v.float(), (0, 0, 0, Kp - K))
    kf = torch.where(keep[:, None, :, None], kf, 0.0)  # padded keys: exact zeros, no NaN leak
    vf = torch.where(keep[:, None, :, None], vf, 0.0)
    qf = q.float().reshape(B, hkv, G, N, dh)

    # -- chunk summaries: k~_c, |P_c| and beta_c [Eq. 11] -------------------------------------
    kc = kf.reshape(B, hkv, 1, Cp, r, dh)
    keep_c = keep.reshape(B, 1, 1, Cp, r)
    count = keep_c.sum(-1)  # (B, 1, 1, Cp): |P_c|
    kbar = kc.sum(-2) / count.clamp_min(1)[..., None]  # (B, Hkv, 1, Cp, dh): k~_c
    aligned = key_spacing is None and K == N  # self-attention: query i sits at key i
    if causal:  # q-bar_c: mean of the queries at chunk c's positions (<= its last key)
        qp = torch.nn.functional.pad(qf, (0, 0, 0, Kp - N)).reshape(B, hkv, G, Cp, r, dh)
        qbar = (qp * keep_c[..., None]).sum(-2) / count.clamp_min(1)[..., None]
    elif aligned:  # q-bar: mean of the real queries (measured better than per chunk)
        qkeep = keep[:, None, None, :N, None]
        qbar = (qf * qkeep).sum(-2, keepdim=True) / qkeep.sum(-2, keepdim=True).clamp_min(1)
    else:  # no positions: the mean of all queries
        qbar = qf.sum(-2, keepdim=True) / N  # (B, Hkv, G, 1, dh)
    omega = (qbar + kbar) * s ** 0.5  # mu_c (B, Hkv, G, Cp, dh)
    if noise is not None:  # training: w_c ~ N(mu_c, I), one sample per chunk
        eps = noise.float()[:Cp].to(dev)
        omega = omega + torch.nn.functional.pad(eps, (0, 0, 0, Cp - eps.shape[0]))
    logit_b = omega[..., None, :] @ kc.transpose(-1, -2) * s ** 0.5  # (.., Cp, 1, r): w.k'
    logit_b = logit_b.squeeze(-2) - (kc * kc).sum(-1) * (0.5 * s)  # - |k'|^2 / 2
    logit_b = logit_b.masked_fill(~keep_c, -math.inf)
    wts = torch.softmax(logit_b.masked_fill(~keep_c.any(-1, keepdim=True), 0.0), -1)
    beta = (wts[..., None, :] @ vf.reshape(B, hkv, 1, Cp, r, dv)).squeeze(-2)  # (.., Cp, dv)

    # -- queries by local group ----------------------------------------------------------------
    num, den = key_spacing if key_spacing is not None else (K, N)
    table, slot, qmax = query_groups(N, lay, num, den)
    qg = torch.nn.functional.pad(qf, (0, 0, 0, 1))[:, :, :, table.to(dev).flatten()]
    qg = qg.reshape(B, hkv, G, ng, qmax, dh)  # (B, Hkv, G, ng, Qmax, dh)

    # -- one normalisation over the local keys and the remote chunks [Eq. 12] -----------------
    kl = kf.reshape(B, hkv, 1, ng, W, dh)
    local = (qg @ kl.transpose(-1, -2)) * s  # (B, Hkv, G, ng, Qmax, W): s q.k_j, j in E(i)
    lmask = keep.reshape(B, 1, 1, ng, 1, W)
    if causal:  # key position t W + j <= query position table[t, slot]
        kpos = torch.arange(Kp, device=dev).reshape(ng, 1, W)
        lmask = lmask & (kpos <= table.to(dev)[..., None])
    remote = (qg @ kbar[:, :, :, None].transpose(-1, -2)) * s  # (.., Qmax, Cp): s q.k~_c
    remote = remote + count.clamp_min(1).log()[:, :, :, None, None, :]  # |P_c| [Eq. 11]
    cgrp = torch.arange(Cp, device=dev) // g  # group of chunk c
    tgrp = torch.arange(ng, device=dev)[:, None]
    rsel = (cgrp < tgrp) if causal else (cgrp != tgrp)  # (ng, Cp): the remote chunks
    rmask = rsel[:, None, :] & (count > 0)[:, :, :, None, None, :]  # (B, 1, 1, ng, 1, Cp)
    logits = torch.cat([local, remote], -1)
    mask = torch.cat([lmask.expand(B, 1, 1, ng, qmax, W),
                      rmask.expand(B, 1, 1, ng, qmax, Cp)], -1)
    mx = logits.masked_fill(~mask, -math.inf).amax(-1, keepdim=True).clamp_min(-1e30).detach()
    p = torch.where(mask, torch.exp(logits - mx), 0.0)
    den_ = p.sum(-1, keepdim=True)
    num_ = p[..., :W] @ vf.reshape(B, hkv, 1, ng, W, dv) + p[..., W:] @ beta[:, :, :, None]
    out = num_ / den_.clamp_min(1e-30)  # fully masked rows: 0 / tiny = 0
    out = out.reshape(B, hkv, G, ng * qmax, dv)[:, :, :, slot.to(dev)]
    return out.reshape(B, H, N, dv).to(q.dtype)


def local_keys(eva_chunk: int, key_spacing: tuple[int, int] | None) -> int:
    """The local window in keys: ``eva_chunk`` positions are eva_chunk * dk / max_seq_len
    down-sampled rows on a low-rank layer (at least 1), eva_chunk keys otherwise."""
    if key_spacing is None:
        return eva_chunk
    num, den = key_spacing
    return max(1, (eva_chunk * num) // den)


def eva_query_slots(N: int, lay: EvaLayout, num: int, den: int) -> int:
    """Qmax of ``query_groups``: query rows per local group after padding (sizes only). The
    last group also takes every query whose anchor lies past the keys (N > max_seq_len)."""
    last = N - cdiv((lay.ng - 1) * lay.W * den, num)
    return max(1, min(N, max(cdiv(lay.W * den, num), last)))


def eva_flops(*, B: int, N: int, K: int, H: int, Hkv: int, dh: int, m: int, causal: bool,
              eva_chunk: int = DEFAULT_EVA_CHUNK, key_spacing: tuple[int, int] | None = None,
              dv: int | None = None) -> MapFlops:
    """FLOPs of ``eva_attention`` as it runs, in ``cost_model.site_flops``' conventions
    (products as FlopCounterMode counts them; elementwise 1 per output element, reductions 1
    per input element, softmax 5; selections, padding, gathers and casts free)."""
    dv = dv or dh
    eva_chunk = local_keys(eva_chunk, key_spacing)
    lay = eva_layout(K, m, eva_chunk)
    Kp, Cp, W = lay.ng * lay.W, lay.Cp, lay.W
    num, den = key_spacing if key_spacing is not None else (K, N)
    R = lay.ng * eva_query_slots(N, lay, num, den)  # query rows, padded
    T = W + Cp  # logits per query row: its local keys and every chunk
    bh, bk = B * H, B * Hkv
    gemm = 2 * bh * Kp * (dh + dv)  # w_c . k_j and beta_c = softmax @ v [Eq. 11]
    gemm += 2 * bh * R * T * (dh + dv)  # q k_j, q k~_c and P [v | beta] [Eq. 12]
    elem = bk * Kp * dh + bk * Cp * dh  # k~_c: sum, divide
    if causal:  # q-bar_c: mask, sum, divide
        elem += 2 * bh * Kp * dh + bh * Cp * dh
    elif key_spacing is None and K == N:  # q-bar over the real queries: mask, sum, divide
        elem += 2 * bh * N * dh + bh * dh
    else:  # q-bar: sum, divide
        elem += bh * N * dh + bh * dh
    elem += 2 * bh * Cp * dh  # mu_c = (q-bar + k~_c) s^(1/2)
    elem += bh * Kp + 2 * bk * Kp * dh + bk * Kp + bh * Kp  # w.k' s^.5, |k'|^2 / 2, subtract
    elem += 5 * bh * Kp  # softmax over each chunk
    elem += bh * R * T + bh * R * Cp  # scale the logits, + log |P_c|
    elem += 3 * bh * R * T + bh * R  # max, subtract, exp; clamp of the max
    elem += bh * R * T + bh * R * dv + bh * R + bh * R * dv  # sum; num add; clamp; divide
    return MapFlops(gemm, elem, bh * Kp + bh * R * T)


@register_feature_map("eva")
class EvaFeatures(PerformerFeatures):
    """EVA (module docstring): exact softmax over a local window of ``eva_chunk`` keys plus one
    control-variate-corrected random-feature estimate per remote chunk, one normaliser.

    num_features m: the number of chunks the keys are cut into (one proposal sample each, as
    in the paper); m >= K makes every chunk one key and EVA exact softmax. Its W (m, dh), drawn
    and redrawn like the performer's, holds the training-mode samples eps_c; ``forward`` (the
    registry's generic feature interface) is the performer's positive random features of W.
    The attention itself is ``attend`` (``custom_attention``): no Triton kernel.
    ``key_spacing``: set by FlurkaAttention on a low-rank layer to (dk, max_seq_len), so that
    query i's local keys are the down-sampled rows around row floor(i dk / max_seq_len).
    """

    takes_num_features = True
    auto_role = None  # not measured good enough to pick without training
    triton_code = None
    custom_attention = True

    @classmethod
    def default_num_features(cls, head_dim: int) -> int:
        return DEFAULT_EVA_FEATURES

    @classmethod
    def attention_flops(cls, *, B: int, N: int, K: int, H: int, Hkv: int, dh: int, m: int,
                        causal: bool, key_spacing: tuple[int, int] | None = None,
                        eva_chunk: int = DEFAULT_EVA_CHUNK) -> MapFlops:
        return eva_flops(B=B, N=N, K=K, H=H, Hkv=Hkv, dh=dh, m=m, causal=causal,
                         eva_chunk=eva_chunk, key_spacing=key_spacing)

    def __init__(self, head_dim: int, num_features: int | None = None,
                 scale: float | None = None, seed: int = 0,
                 redraw_interval: int | None = 1000, eva_chunk: int | None = None,
                 **_: object) -> None:
        super().__init__(head_dim, num_features, scale, seed, redraw_interval)
        chunk = DEFAULT_EVA_CHUNK if eva_chunk is None else eva_chunk
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"eva_chunk must be a positive int or None; got {eva_chunk!r}")
        self.eva_chunk = chunk
        self.key_spacing: tuple[int, int] | None = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
               causal: bool = False, scale: float | None = None, eps: float = 1e-6,
               chunk_size: int = 64) -> Tensor:
        """EVA over the given keys (``eva_attention``); eps and chunk_size are unused (one
        exact normaliser, no prefix sums)."""
        return eva_attention(
            q, k, v, num_features=self.num_features,
            eva_chunk=local_keys(int(self.eva_chunk), self.key_spacing),
            key_padding_mask=key_padding_mask, causal=causal,
            scale=self.scale if scale is None else scale, key_spacing=self.key_spacing,
            noise=self.W if self.training else None)

    def attend_window(self, q: Tensor, k: Tensor, v: Tensor, *, window: int,
                      log_weight: Tensor, scale: float, causal: bool = False,
                      key_padding_mask: Tensor | None = None, kernel_k: Tensor | None = None,
                      kernel_v: Tensor | None = None,
                      kernel_keep: Tensor | None = None) -> Tensor:
        """EVA with a sliding window as its local set (``eva_window.eva_window_attention``;
        ``eva_chunk`` unused: the window replaces the local chunk)."""
        return eva_window_attention(
            q, k, v, window=window, num_features=self.num_features, log_weight=log_weight,
            scale=scale, causal=causal, key_padding_mask=key_padding_mask, kernel_k=kernel_k,
            kernel_v=kernel_v, kernel_keep=kernel_keep,
            noise=self.W if self.training else None)

    @classmethod
    def window_flops(cls, *, B: int, N: int, H: int, Hkv: int, dh: int, m: int, causal: bool,
                     window: int, dk: int | None) -> MapFlops:
        return eva_window_flops(B=B, N=N, H=H, Hkv=Hkv, dh=dh, m=m, causal=causal,
                                window=window, dk=dk)

    def extra_repr(self) -> str:
        return f"m={self.num_features}, eva_chunk={self.eva_chunk}"
