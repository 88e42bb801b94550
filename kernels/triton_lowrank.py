"""Triton kernel of the fused FLuRKA key side: the low-rank projection along the sequence and
the feature map of the down-sampled keys in one pass, K and V read once per program.

Per (batch, kv-head) slab, keys K (M, dh), values V (M, dv), key mask mu (M,) (1 = real):

  K~ = E[:, :M] (mu . K)   (dk, dh)     V~ = F[:, :M] (mu . V)   (dk, dv)
  S  = sum_r rho_r phi(K~_r)^T V~_r     z = sum_r rho_r phi(K~_r)

rho (dk,) marks the down-sampled rows whose support holds a real key (``lowrank_keep``; the
others are empty keys, K~_r = 0). K~ and V~ are rounded to the input dtype before use, as
``reference.lowrank_project`` returns them; the projection products are fp32.

Band: row r of a pool-initialised E is zero outside the columns [lo_r, hi_r) (``cols``, from
the fixed support; a dense E has [0, M_max) for every row), so a block of BLOCK_DK rows loops
over M only from min lo to max hi (clipped to M): about M / dk columns per row block instead of
M. The M loop is a ``while`` (runtime bounds).

Performer stabiliser without a separate pass (an online rescaling per feature): phi(K~_r)_f =
mfac exp(u_rf - c) for any constant c shared by all r and f (it cancels in phi(q) S / phi(q) z;
the reference takes c* = max over real rows and all features of u). Rows arrive a block at a
time, so each feature f keeps its own running max c_f over the real rows seen so far and its
state at that scale, S_f = sum_r mfac exp(u_rf - c_f) V~_r, z_f likewise. A new block with
c_f' = max(c_f, max_r u_rf) updates

  S_f <- S_f exp(c_f - c_f') + sum_r mfac exp(u_rf - c_f') V~_r     (exp(c_f - c_f') <= 1)

(the flash-attention recurrence, per feature instead of per query). The kernel writes S_f, z_f
and c_f; the consumer puts every feature on the common scale c* = max_f c_f by S_f exp(c_f - c*)
(``flurka_rows_fwd_kernel`` with FSCALE, in the output pass; the backward in PyTorch), which is
the reference's state exactly: exp(u - c_f) exp(c_f - c*) = exp(u - c*). Every factor is <= 1.
Features without a real row keep c_f = -1e30 (the reference's clamp) and a zero state.

Grid (BH, cdiv(m, BLOCK_F), cdiv(dv, BLOCK_DV)): a program owns one (BLOCK_F, BLOCK_DV) tile
of S and loops over all dk rows. Recomputed per program: V~ for its value columns (once per
feature block) and, for the performer, the whole K~ (once per feature and value block: u needs
every head-dim column); elementwise maps (m = dh) compute only their feature columns of K~.
With a banded E that is one read of the band of K and V per program; with a dense E it is
dk x M x dh work per program, which is why dispatch sends dense E with many blocks to the
unfused path (``dispatch.lowrank_fusion``). K~ (performer: pid_f == pid_v == 0; elementwise:
pid_v == 0) and V~ (pid_f == 0) are written out for the backward.
Masks of tl.load / tl.store: block comparisons joined with ``&`` only (``triton_kernels``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import FMAP_PERFORMER, _phi
from .triton_tuning import PRUNE, lowrank_configs


@triton.jit
def _project(x_ptr, e_ptr, mask_ptr, offs_r, rmask, c0, c1, E_STRIDE, d0, d: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, PREC_E: tl.constexpr):
    """Columns [d0, d0 + BLOCK_D) of E[rows] (mu . X) over the key columns [c0, c1): a
    (BLOCK_DK, BLOCK_D) fp32 tile, rounded to X's dtype; padded keys read as 0 (even NaN)."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    acc = tl.zeros([offs_r.shape[0], BLOCK_D], dtype=tl.float32)
    j0 = c0
    while j0 < c1:
        offs_j = j0 + tl.arange(0, BLOCK_M)
        jm = offs_j < c1
        mu = tl.load(mask_ptr + offs_j, mask=jm, other=0.0)
        e = tl.load(e_ptr + offs_r[:, None] * E_STRIDE + offs_j[None, :],
                    mask=rmask[:, None] & jm[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs_j[:, None] * d + offs_d[None, :],
                    mask=jm[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        x = tl.where(mu[:, None] > 0, x, 0.0)
        acc += tl.dot(e, x, input_precision=PREC_E)
        j0 += BLOCK_M
    return acc.to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _store_tile(ptr, offs_r, rmask, d0, d: tl.constexpr, tile, BLOCK_D: tl.constexpr):
    """Write a (BLOCK_DK, BLOCK_D) tile of a (dk, d) slab (K~ or V~) in the slab's dtype."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    tl.store(ptr + offs_r[:, None] * d + offs_d[None, :], tile.to(ptr.dtype.element_ty),
             mask=rmask[:, None] & (offs_d[None, :] < d))


@triton.autotune(configs=lowrank_configs(), key=["dk", "dh", "dv", "m", "BLOCK_K"],
                 prune_configs_by=PRUNE)
@triton.jit
def flurka_lowrank_state_kernel(
    k_ptr, v_ptr, e_ptr, f_ptr, mask_ptr, rows_ptr, cols_ptr, w_ptr,  # inputs
    s_ptr, z_ptr, cf_ptr, kt_ptr, vt_ptr,  # outputs
    M, E_STRIDE, HKV, sqrt_scale, mfac,  # sizes / scalars
    dk: tl.constexpr, dh: tl.constexpr, dv: tl.constexpr, m: tl.constexpr,
    FMAP: tl.constexpr, PREC: tl.constexpr, PREC_E: tl.constexpr, DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """S (BH, m, dv), z (BH, m) fp32 (performer: feature f at its scale c_f, cf (BH, m)), K~
    (BH, dk, dh), V~ (BH, dk, dv) in the input dtype, from k (BH, M, dh), v (BH, M, dv), E, F
    (dk, E_STRIDE) with M <= E_STRIDE, mask (B, M) and rows (B, dk) fp32 (batch b = bh // HKV),
    cols (dk, 2) int32 [lo, hi) per row of E. See the module docstring for the math."""
    bh = tl.program_id(0).to(tl.int64)
    pid_f = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = bh // HKV
    k_ptr += bh * M * dh
    v_ptr += bh * M * dv
    kt_ptr += bh * dk * dh
    vt_ptr += bh * dk * dv
    mask_ptr += b * M
    rows_ptr += b * dk
    f0 = pid_f * BLOCK_F
    v0 = pid_v * BLOCK_DV
    offs_f = f0 + tl.arange(0, BLOCK_F)
    fmask = offs_f < m
    acc = tl.zeros([BLOCK_F, BLOCK_DV], dtype=tl.float32)
    zacc = tl.zeros([BLOCK_F], dtype=tl.float32)
    c_run = tl.full([BLOCK_F], -1e30, tl.float32)  # performer: running max per feature
    for r0 in range(0, dk, BLOCK_DK):
        offs_r = r0 + tl.arange(0, BLOCK_DK)
        rmask = offs_r < dk
        lo = tl.load(cols_ptr + offs_r * 2, mask=rmask, other=2147483647)
        hi = tl.load(cols_ptr + offs_r * 2 + 1, mask=rmask, other=0)
        c0 = tl.min(lo, 0)
        c1 = tl.minimum(tl.max(hi, 0), M)
        rho = tl.load(rows_ptr + offs_r, mask=rmask, other=0.0) > 0
        vt = _project(v_ptr, f_ptr, mask_ptr, offs_r, rmask, c0, c1, E_STRIDE, v0, dv,
                      BLOCK_DV, BLOCK_M, PREC_E)
        if pid_f == 0:
            _store_tile(vt_ptr, offs_r, rmask, v0, dv, vt, BLOCK_DV)
        if FMAP == FMAP_PERFORMER:
            xw = tl.zeros([BLOCK_DK, BLOCK_F], dtype=tl.float32)
            sq = tl.zeros([BLOCK_DK], dtype=tl.float32)
            for d0 in range(0, dh, BLOCK_K):  # one chunk at dh <= BLOCK_K
                kt = _project(k_ptr, e_ptr, mask_ptr, offs_r, rmask, c0, c1, E_STRIDE, d0, dh,
                              BLOCK_K, BLOCK_M, PREC_E)
                if pid_f == 0:
                    if pid_v == 0:
                        _store_tile(kt_ptr, offs_r, rmask, d0, dh, kt, BLOCK_K)
                offs_d = d0 + tl.arange(0, BLOCK_K)
                w = tl.load(w_ptr + offs_f[:, None] * dh + offs_d[None, :],
                            mask=fmask[:, None] & (offs_d[None, :] < dh), other=0.0)
                xw += tl.dot(kt.to(DT), tl.trans(w.to(DT)), input_precision=PREC)
                sq += tl.sum(kt * kt, 1)
            u = sqrt_scale * xw - (0.5 * sqrt_scale * sqrt_scale) * sq[:, None]
            u = tl.where(rho[:, None] & fmask[None, :], u, float("-inf"))
            c_new = tl.maximum(c_run, tl.max(u, 0))
            alpha = tl.exp(c_run - c_new)
            p = tl.exp(u - c_new[None, :]) * mfac
            c_run = c_new
        else:  # elementwise: features are the columns [f0, f0 + BLOCK_F) of K~
            kt = _project(k_ptr, e_ptr, mask_ptr, offs_r, rmask, c0, c1, E_STRIDE, f0, dh,
                          BLOCK_F, BLOCK_M, PREC_E)
            if pid_v == 0:
                _store_tile(kt_ptr, offs_r, rmask, f0, dh, kt, BLOCK_F)
            p = _phi(kt, c_run, FMAP)
            p = tl.where(rho[:, None] & fmask[None, :], p, 0.0)
            alpha = tl.full([BLOCK_F], 1.0, tl.float32)
        acc = acc * alpha[:, None] + tl.dot(tl.trans(p.to(DT)), vt.to(DT), input_precision=PREC)
        zacc = zacc * alpha + tl.sum(p, 0)
    offs_v = v0 + tl.arange(0, BLOCK_DV)
    s_ptr += bh * m * dv
    tl.store(s_ptr + offs_f[:, None] * dv + offs_v[None, :], acc,
             mask=fmask[:, None] & (offs_v[None, :] < dv))
    if pid_v == 0:
        tl.store(z_ptr + bh * m + offs_f, zacc, mask=fmask)
        tl.store(cf_ptr + bh * m + offs_f, c_run, mask=fmask)
