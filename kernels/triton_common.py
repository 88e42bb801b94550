"""Shared @triton.jit helpers of the FLuRKA kernels: feature-map codes, row tiles, the
pre-activation u (looped over the head dim in chunks of BLOCK_K), phi and its derivative.

Head dim chunks (``BLOCK_K``, a constexpr set by the launcher, ``triton_launch.block_k``):
  dh <= BLOCK_K  one chunk: the kernels load the (rows, BLOCK_K) row tile once and keep it in
                 registers for every feature block (the computation of the dh <= 128 kernels
                 before the K-loop, unchanged);
  dh >  BLOCK_K  no tile is wider than BLOCK_K in dh: ``_feature_pre`` accumulates
                 u = sqrt(s) x W^T over d-chunks (x and W chunks re-read per feature block,
                 from cache), ``_rows_prep`` accumulates |x|^2 the same way, and the row tile
                 handed around is a (rows, BLOCK_K) zero placeholder.
Elementwise maps (relu, rnn, identity: m = dh, u = x[:, f]) never hold a head-dim tile: their
features are the columns of x, read per feature block.
Masks of tl.load / tl.store: block comparisons combined with ``&`` only (triton_kernels).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .feature_maps import EluFeatures, PerformerFeatures, ReluFeatures
from .registry import TRITON_IDENTITY

# FMAP codes from the registry, as constexpr globals (the only globals a jit function may read)
FMAP_IDENTITY = tl.constexpr(TRITON_IDENTITY)
FMAP_RELU = tl.constexpr(ReluFeatures.triton_code)
FMAP_ELU = tl.constexpr(EluFeatures.triton_code)
FMAP_PERFORMER = tl.constexpr(PerformerFeatures.triton_code)


@triton.jit
def _load_rows(x_ptr, row, valid, d0, dh, BLOCK_D: tl.constexpr):
    """Row tile x[row, d0:d0 + BLOCK_D] -> (BLOCK_R, BLOCK_D) in the input dtype, zero outside."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    return tl.load(x_ptr + row[:, None] * dh + offs_d[None, :],
                   mask=valid[:, None] & (offs_d[None, :] < dh), other=0.0)


@triton.jit
def _rows_prep(x_ptr, row, valid, dh: tl.constexpr, sqrt_scale, FMAP: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """(x, hn) of a row block: hn = s |x|^2 / 2 (performer; zeros otherwise), fp32, summed over
    d-chunks; x the (BLOCK_R, BLOCK_K) row tile when dh <= BLOCK_K (performer), else zeros."""
    if FMAP == FMAP_PERFORMER:
        x = _load_rows(x_ptr, row, valid, 0, dh, BLOCK_K)
        xf = x.to(tl.float32)
        sq = tl.sum(xf * xf, 1)
        if dh > BLOCK_K:
            x = tl.zeros(x.shape, dtype=x.dtype)  # placeholder: chunks are re-read
            for d0 in range(BLOCK_K, dh, BLOCK_K):
                xf = _load_rows(x_ptr, row, valid, d0, dh, BLOCK_K).to(tl.float32)
                sq += tl.sum(xf * xf, 1)
        hn = 0.5 * sqrt_scale * sqrt_scale * sq
    else:
        x = tl.zeros([row.shape[0], BLOCK_K], dtype=x_ptr.dtype.element_ty)
        hn = tl.zeros([row.shape[0]], dtype=tl.float32)
    return x, hn


@triton.jit
def _xw_chunk(x, x_ptr, row, valid, w_ptr, offs_f, fmask, d0, dh: tl.constexpr,
              BLOCK_K: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr):
    """x[:, d0:d0+BLOCK_K] W[f, d0:d0+BLOCK_K]^T: (BLOCK_R, BLOCK_F) fp32; x the kept row
    tile when dh <= BLOCK_K, else the chunk is loaded here."""
    offs_d = d0 + tl.arange(0, BLOCK_K)
    if dh > BLOCK_K:
        x = _load_rows(x_ptr, row, valid, d0, dh, BLOCK_K)
    w = tl.load(w_ptr + offs_f[:, None] * dh + offs_d[None, :],
                mask=fmask[:, None] & (offs_d[None, :] < dh), other=0.0)
    return tl.dot(x.to(DT), tl.trans(w.to(DT)), input_precision=PREC)


@triton.jit
def _feature_pre(x, hn, x_ptr, row, valid, w_ptr, f0, dh: tl.constexpr, m, sqrt_scale,
                 FMAP: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
                 PREC: tl.constexpr, DT: tl.constexpr):
    """Pre-activation u of features [f0, f0 + BLOCK_F) for a row tile: (BLOCK_R, BLOCK_F) fp32.
    Performer: u = sqrt(s) x W^T - hn (hn = s |x|^2 / 2), the product summed over d-chunks of
    BLOCK_K (one when dh <= BLOCK_K: the kept tile x); elementwise maps: u = x[:, f]."""
    offs_f = f0 + tl.arange(0, BLOCK_F)
    fmask = offs_f < m
    if FMAP == FMAP_PERFORMER:
        acc = _xw_chunk(x, x_ptr, row, valid, w_ptr, offs_f, fmask, 0, dh, BLOCK_K, PREC, DT)
        if dh > BLOCK_K:  # static: one chunk (the kept tile x) at dh <= BLOCK_K
            for d0 in range(BLOCK_K, dh, BLOCK_K):
                acc += _xw_chunk(x, x_ptr, row, valid, w_ptr, offs_f, fmask, d0, dh, BLOCK_K,
                                 PREC, DT)
        u = acc * sqrt_scale - hn[:, None]
    else:
        u = tl.load(x_ptr + row[:, None] * dh + offs_f[None, :],
                    mask=valid[:, None] & fmask[None, :], other=0.0).to(tl.float32)
    return u


@triton.jit
def _phi(u, c, FMAP: tl.constexpr):
    """phi from the pre-activation; the performer's m^-1/2 is applied by the caller."""
    if FMAP == FMAP_IDENTITY:
        p = u
    elif FMAP == FMAP_RELU:
        p = tl.maximum(u, 0.0) + 1e-3
    elif FMAP == FMAP_ELU:
        p = tl.where(u > 0, u + 1.0, tl.exp(u))
    else:  # FMAP_PERFORMER
        p = tl.exp(u - c[:, None])
    return p


@triton.jit
def _dphi(u, p, FMAP: tl.constexpr):
    """d phi / d u given u and p = phi(u) (for the performer: the full phi, mfac included)."""
    if FMAP == FMAP_IDENTITY:
        d = tl.full(u.shape, 1.0, tl.float32)
    elif FMAP == FMAP_RELU:
        d = tl.where(u > 0, 1.0, 0.0)
    elif FMAP == FMAP_ELU:
        d = tl.where(u > 0, 1.0, p)
    else:  # FMAP_PERFORMER
        d = p
    return d


@triton.jit
def _store_wide_du(du_ptr, p_ptr, row, valid, offs_f, fmask, du, p, m, QUERY: tl.constexpr):
    """Wide head dims (dh > BLOCK_K): write dU (and, for queries, P) of one feature block to
    the (BH, R, m) buffers that ``flurka_dx_kernel`` contracts with W chunk by chunk."""
    keep = valid[:, None] & fmask[None, :]
    tl.store(du_ptr + row[:, None] * m + offs_f[None, :], du.to(du_ptr.dtype.element_ty),
             mask=keep)
    if QUERY:
        tl.store(p_ptr + row[:, None] * m + offs_f[None, :], p.to(p_ptr.dtype.element_ty),
                 mask=keep)


@triton.jit
def _dx_step(dxs, pw, du, p, keep, w_ptr, offs_f, fmask, dh: tl.constexpr,
             BLOCK_K: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr, QUERY: tl.constexpr):
    """One feature block of the one-chunk (dh <= BLOCK_K) performer dx: dxs += dU W and, for
    queries, pw += P W (the softmax Jacobian's term); both (rows, BLOCK_K) fp32."""
    offs_d = tl.arange(0, BLOCK_K)
    w = tl.load(w_ptr + offs_f[:, None] * dh + offs_d[None, :],
                mask=fmask[:, None] & (offs_d[None, :] < dh), other=0.0)
    dxs += tl.dot(du.to(DT), w.to(DT), input_precision=PREC)
    if QUERY:
        pw += tl.dot(tl.where(keep, p, 0.0).to(DT), w.to(DT), input_precision=PREC)
    return dxs, pw


@triton.jit
def _dx_finish(dx_ptr, rs_ptr, row, valid, dxs, pw, rs, x, dh: tl.constexpr, sqrt_scale,
               BLOCK_K: tl.constexpr, QUERY: tl.constexpr):
    """End of the performer dx of a row block, rs = sum_f dU_f. One chunk (dh <= BLOCK_K):
    u = sqrt(s) x.w - s |x|^2 / 2 => du/dx = sqrt(s) w - s x, so dx = sqrt(s) dxs - s rs x
    (keys), dx = sqrt(s) (dxs - rs pw) (queries: phi = softmax(sqrt(s) W x), dx =
    sqrt(s) W^T (p dP - p (p . dP))); written to dx. Wide: rs is written to rs_ptr for
    ``flurka_dx_kernel``, which does the same chunk by chunk."""
    if dh > BLOCK_K:
        tl.store(rs_ptr + row, rs, mask=valid)
    else:
        offs_d = tl.arange(0, BLOCK_K)
        if QUERY:
            dx = sqrt_scale * (dxs - rs[:, None] * pw)
        else:
            dx = sqrt_scale * dxs - (sqrt_scale * sqrt_scale) * rs[:, None] * x.to(tl.float32)
        tl.store(dx_ptr + row[:, None] * dh + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_d[None, :] < dh))
