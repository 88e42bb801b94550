"""Triton kernels for the non-causal FLuRKA core (feature map fused, phi(Q) never stored).

Rows of one (batch, kv-head) lie in one contiguous slab: queries as (B*Hkv, G*N, dh) (the G
query heads of a kv-head one after another), keys (B*Hkv, M, dh), values (B*Hkv, M, dv).
Feature maps, selected by the constexpr ``FMAP``, the ``triton_code`` the registry's map class
declares (``registry.triton_codes()``), named here by module-level constexprs:
  FMAP_IDENTITY (maps without a code, e.g. ffk: phi computed by PyTorch beforehand),
  FMAP_RELU relu(x) + 1e-3, FMAP_ELU elu(x) + 1 (rnn),
  FMAP_PERFORMER: phi(x) = mfac * exp(u - c), u = sqrt(s) W x - s |x|^2 / 2, mfac = m^-1/2.
All sums are fp32. Dot operands are cast to ``DT``, the input dtype (bf16/fp16: tensor cores,
fp32 accumulation; fp32 inputs: ``PREC`` = "ieee", exact fp32 products); under the CPU
interpreter bf16 dots are computed in fp32 (its bf16 dot is wrong, Triton 3.6 + numpy).
Masks of tl.load / tl.store are block comparisons combined with ``&`` only, never with a
scalar condition such as ``pid == 0`` (branch on that with ``if`` instead): Triton 3.9's
interpreter gives ``block_bool & (scalar == 0)`` int32 data and refuses it as a mask
("mask has unsupported dtype"); 3.6 kept it bool.

Kernels:
  flurka_state_kernel   S = sum_r phi(x_r)^T (a_r y_r), z = sum_r b_r phi(x_r), per chunk of rows
  flurka_rows_fwd_kernel  per row block, loop over features: out = phi(x) S / (phi(x) z + eps)
                          with an online row max for the performer (MODE 0), a * phi(x) S with a
                          given stabilizer (MODE 1, dV), or only the row max of u (MODE 2)
  flurka_rows_bwd_kernel  dx of sum_f phi(x)_f * (a (g . T_f) + beta t_f): dQ and dK
Head dims: looped in chunks of the constexpr BLOCK_K (``triton_common``): one chunk, the row
tile kept in registers, when dh <= BLOCK_K (dh <= 128: the launcher sets BLOCK_K to dh's
next power of two); above that no tile is wider than BLOCK_K in dh (dh = 325: 6 chunks of 64).
Value columns stay a grid axis (BLOCK_DV, autotuned): an accumulator for all dv columns of a
row block is (BLOCK_R, next_pow2(dv)) fp32 and Triton has no list of tiles to split it into
chunks, so phi(x) is computed once per row block only when a config's BLOCK_DV covers dv
(the wide configs of ``triton_tuning``: BLOCK_DV up to 512 with 32 rows, a 64 KiB
accumulator); narrower configs trade recomputing phi(x) for occupancy, and the autotuner picks.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (  # noqa: F401 - the FMAP_* names are re-exported
    FMAP_ELU,
    FMAP_IDENTITY,
    FMAP_PERFORMER,
    FMAP_RELU,
    _dphi,
    _dx_finish,
    _dx_step,
    _feature_pre,
    _phi,
    _rows_prep,
    _store_wide_du,
)
from .triton_tuning import PRUNE, rows_bwd_configs, rows_fwd_configs, state_configs


@triton.autotune(configs=state_configs(), key=["dh", "dv", "m", "CHUNK", "BLOCK_K"],
                 prune_configs_by=PRUNE)
@triton.jit
def flurka_state_kernel(
    x_ptr, y_ptr, a_ptr, b_ptr, c_ptr, w_ptr, s_ptr, z_ptr,  # pointers
    L, CHUNK, NCHUNK, sqrt_scale, mfac,  # sizes / scalars
    dh: tl.constexpr, dv: tl.constexpr, m: tl.constexpr,
    FMAP: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """State of one chunk of rows: S[f, d] = sum_r a_r phi(x_r)_f y_r[d], z[f] = sum_r b_r phi_f.

    x (BH, L, dh), y (BH, L, dv), a/b/c (BH, L) fp32 (c: performer stabilizer per row),
    S (BH, NCHUNK, m, dv) fp32, z (BH, NCHUNK, m) fp32. Chunk ch holds rows
    [ch*CHUNK, (ch+1)*CHUNK).
    Grid: (BH * NCHUNK, cdiv(m, BLOCK_F), cdiv(dv, BLOCK_DV)).
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_f = tl.program_id(1)
    pid_v = tl.program_id(2)
    bh = pid // NCHUNK
    ch = pid % NCHUNK
    x_ptr += bh * L * dh
    y_ptr += bh * L * dv
    a_ptr += bh * L
    b_ptr += bh * L
    c_ptr += bh * L
    dt = DT
    f0 = pid_f * BLOCK_F
    offs_f = f0 + tl.arange(0, BLOCK_F)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK_F, BLOCK_DV], dtype=tl.float32)
    zacc = tl.zeros([BLOCK_F], dtype=tl.float32)
    r0 = 0
    while r0 < CHUNK:  # a while loop: runtime bounds (range() breaks the interpreter, numpy>=2.4)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        pos = ch * CHUNK + offs_r
        valid = (pos < L) & (offs_r < CHUNK)
        row = pos
        x, hn = _rows_prep(x_ptr, row, valid, dh, sqrt_scale, FMAP, BLOCK_K)
        c = tl.load(c_ptr + row, mask=valid, other=0.0)
        u = _feature_pre(x, hn, x_ptr, row, valid, w_ptr, f0, dh, m, sqrt_scale,
                         FMAP, BLOCK_F, BLOCK_K, PREC, DT)
        p = _phi(u, c, FMAP) * mfac
        p = tl.where(valid[:, None] & (offs_f[None, :] < m), p, 0.0)
        a = tl.load(a_ptr + row, mask=valid, other=0.0)
        b = tl.load(b_ptr + row, mask=valid, other=0.0)
        y = tl.load(y_ptr + row[:, None] * dv + offs_v[None, :],
                    mask=valid[:, None] & (offs_v[None, :] < dv), other=0.0)
        pa = (p * a[:, None]).to(dt)
        acc += tl.dot(tl.trans(pa), y.to(dt), input_precision=PREC)
        zacc += tl.sum(p * b[:, None], 0)
        r0 += BLOCK_R
    base = pid * m  # (bh, ch) slab
    fmask = offs_f < m
    tl.store(s_ptr + (base + offs_f[:, None]) * dv + offs_v[None, :], acc,
             mask=fmask[:, None] & (offs_v[None, :] < dv))
    if pid_v == 0:
        tl.store(z_ptr + base + offs_f, zacc, mask=fmask)


@triton.autotune(configs=rows_fwd_configs(), key=["dh", "dv", "m", "MODE", "BLOCK_K", "FSCALE"],
                 prune_configs_by=PRUNE)
@triton.jit
def flurka_rows_fwd_kernel(
    x_ptr, s_ptr, z_ptr, w_ptr, a_ptr, c_ptr, out_ptr, den_ptr, cf_ptr,  # pointers
    R, sqrt_scale, mfac, eps,  # sizes / scalars
    dh: tl.constexpr, dv: tl.constexpr, m: tl.constexpr,
    FMAP: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
    FSCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Per row block, phi(x) computed on the fly and contracted with the state S (m, dv):

    MODE 0: out = phi(x) S / (phi(x) z + eps) for queries; the performer's phi(q) is the
            softmax over features of u (online max and sum); c = log-sum-exp of u and
            den = phi(x) z + eps are written for the backward.
    MODE 1: out = a * phi(x) S with the stabilizer read from c_ptr (dV = mask * phi(K) dS).
    MODE 2: only c = row max of u (performer), written to c_ptr.
    FSCALE (MODE 0): feature f of S, z is at its own log scale cf[f] (BH, m) fp32 (the fused
    low-rank state, ``triton_lowrank``); each is read as S_f exp(cf_f - c*), c* = max_f cf_f,
    the common scale of the reference.
    x (BH, R, dh), S (BH, m, dv) fp32, z (BH, m) fp32, a/c/den (BH, R) fp32, out (BH, R, dv).
    Grid: (BH, cdiv(R, BLOCK_R), cdiv(dv, BLOCK_DV)).
    """
    bh = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    pid_v = tl.program_id(2)
    x_ptr += bh * R * dh
    out_ptr += bh * R * dv
    s_ptr += bh * m * dv
    z_ptr += bh * m
    a_ptr += bh * R
    c_ptr += bh * R
    den_ptr += bh * R
    dt = DT
    row = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = row < R
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    vmask = offs_v < dv
    x, hn = _rows_prep(x_ptr, row, valid, dh, sqrt_scale, FMAP, BLOCK_K)
    if MODE == 1:
        c_run = tl.load(c_ptr + row, mask=valid, other=0.0)
    else:
        c_run = tl.full([BLOCK_R], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    den = tl.zeros([BLOCK_R], dtype=tl.float32)
    lse = tl.zeros([BLOCK_R], dtype=tl.float32)  # performer queries: sum_f exp(u_f - c)
    if FSCALE:
        cf_ptr += bh * m
        cmax = tl.full([BLOCK_F], -1e30, tl.float32)
        for f0 in range(0, m, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            cmax = tl.maximum(cmax, tl.load(cf_ptr + offs_f, mask=offs_f < m, other=-1e30))
        cstar = tl.max(cmax, 0)
    for f0 in range(0, m, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        fmask = offs_f < m
        u = _feature_pre(x, hn, x_ptr, row, valid, w_ptr, f0, dh, m, sqrt_scale,
                         FMAP, BLOCK_F, BLOCK_K, PREC, DT)
        if FMAP == FMAP_PERFORMER and MODE != 1:
            u = tl.where(fmask[None, :], u, float("-inf"))
            c_new = tl.maximum(c_run, tl.max(u, 1))
            alpha = tl.exp(c_run - c_new)
            c_run = c_new
        else:
            alpha = tl.full([BLOCK_R], 1.0, tl.float32)
        if MODE != 2:
            p = _phi(u, c_run, FMAP)
            p = tl.where(fmask[None, :], p, 0.0)
            s = tl.load(s_ptr + offs_f[:, None] * dv + offs_v[None, :],
                        mask=fmask[:, None] & vmask[None, :], other=0.0)
            if FSCALE:
                fs = tl.exp(tl.load(cf_ptr + offs_f, mask=fmask, other=-1e30) - cstar)
                s = s * fs[:, None]
            acc = acc * alpha[:, None] + tl.dot(p.to(dt), s.to(dt), input_precision=PREC)
            if MODE == 0:
                zf = tl.load(z_ptr + offs_f, mask=fmask, other=0.0)
                if FSCALE:
                    zf = zf * fs
                den = den * alpha + tl.sum(p * zf[None, :], 1)
                lse = lse * alpha + tl.sum(p, 1)
    if MODE == 0:
        if FMAP == FMAP_PERFORMER:
            # phi(q) = softmax_f(u) = exp(u - c) / l: out = acc / (den + eps l); keep the
            # true denominator and c + log(l) (so that exp(u - c') is phi(q)) for the backward
            out = acc / (den + eps * lse)[:, None]
            den = den / lse + eps
            c_run = c_run + tl.log(lse)
        else:
            den = den + eps
            out = acc / den[:, None]
        tl.store(out_ptr + row[:, None] * dv + offs_v[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & vmask[None, :])
        if pid_v == 0:
            tl.store(den_ptr + row, den, mask=valid)
            if FMAP == FMAP_PERFORMER:
                tl.store(c_ptr + row, c_run, mask=valid)
    elif MODE == 1:
        a = tl.load(a_ptr + row, mask=valid, other=0.0)
        out = acc * (mfac * a)[:, None]
        tl.store(out_ptr + row[:, None] * dv + offs_v[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & vmask[None, :])
    elif pid_v == 0:  # MODE 2; a bool block mask only (module docstring: masks)
        tl.store(c_ptr + row, c_run, mask=valid)


@triton.autotune(configs=rows_bwd_configs(), key=["dh", "dv", "m", "QUERY", "BLOCK_K"],
                 prune_configs_by=PRUNE)
@triton.jit
def flurka_rows_bwd_kernel(
    x_ptr, g_ptr, a_ptr, beta_ptr, c_ptr, t_ptr, tz_ptr, w_ptr, dx_ptr, du_ptr, p_ptr, rs_ptr,
    R, sqrt_scale, mfac,  # sizes / scalars
    dh: tl.constexpr, dv: tl.constexpr, m: tl.constexpr,
    FMAP: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr, QUERY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dx for rows x given dP = a (g T^T) + beta t^T, with P = phi(x) (mfac included):
    queries: g = dO, a = 1/den, beta = -(dO . O)/den, T = S, t = z;
    keys:    g = V,  a = beta = mask, T = dS, t = dz.
    x (BH, R, dh), g (BH, R, dv), a/beta/c (BH, R) fp32, T (BH, m, dv), t (BH, m) fp32,
    dx (BH, R, dh). Grid: (BH, cdiv(R, BLOCK_R)).
    Performer, dh > BLOCK_K: dx = dU W needs every feature, so the kernel writes dU (and, for
    queries, P) (BH, R, m) and rs = sum_f dU_f (BH, R) instead, and ``flurka_dx_kernel`` then
    forms dx chunk by chunk (no tile wider than BLOCK_K in dh; see ``triton_dx``).
    QUERY (performer): phi(q) = softmax_f(sqrt(s) W q) (c = its log-sum-exp, mfac = 1; the
    row constant -s|q|^2/2 cancels), differentiated through the normalisation like the
    reference; keys: phi(k) = mfac exp(u - c) with a detached c.
    """
    bh = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    x_ptr += bh * R * dh
    dx_ptr += bh * R * dh
    g_ptr += bh * R * dv
    t_ptr += bh * m * dv
    tz_ptr += bh * m
    a_ptr += bh * R
    beta_ptr += bh * R
    c_ptr += bh * R
    du_ptr += bh * R * m
    p_ptr += bh * R * m
    rs_ptr += bh * R
    dt = DT
    row = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = row < R
    x, hn = _rows_prep(x_ptr, row, valid, dh, sqrt_scale, FMAP, BLOCK_K)
    c = tl.load(c_ptr + row, mask=valid, other=0.0)
    a = tl.load(a_ptr + row, mask=valid, other=0.0)
    beta = tl.load(beta_ptr + row, mask=valid, other=0.0)
    dxs = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)  # one chunk: dU W
    pw = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)  # one chunk, queries: P W
    rs = tl.zeros([BLOCK_R], dtype=tl.float32)
    for f0 in range(0, m, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        fmask = offs_f < m
        gt = tl.zeros([BLOCK_R, BLOCK_F], dtype=tl.float32)  # g T^T for this feature block
        for v0 in range(0, dv, BLOCK_DV):
            offs_v = v0 + tl.arange(0, BLOCK_DV)
            vmask = offs_v < dv
            g = tl.load(g_ptr + row[:, None] * dv + offs_v[None, :],
                        mask=valid[:, None] & vmask[None, :], other=0.0)
            t = tl.load(t_ptr + offs_f[:, None] * dv + offs_v[None, :],
                        mask=fmask[:, None] & vmask[None, :], other=0.0)
            gt += tl.dot(g.to(dt), tl.trans(t.to(dt)), input_precision=PREC)
        tz = tl.load(tz_ptr + offs_f, mask=fmask, other=0.0)
        dp = gt * a[:, None] + beta[:, None] * tz[None, :]
        u = _feature_pre(x, hn, x_ptr, row, valid, w_ptr, f0, dh, m, sqrt_scale,
                         FMAP, BLOCK_F, BLOCK_K, PREC, DT)
        p = _phi(u, c, FMAP) * mfac
        du = dp * _dphi(u, p, FMAP)
        du = tl.where(valid[:, None] & fmask[None, :], du, 0.0)
        if FMAP == FMAP_PERFORMER:
            rs += tl.sum(du, 1)
            if dh > BLOCK_K:
                _store_wide_du(du_ptr, p_ptr, row, valid, offs_f, fmask, du, p, m, QUERY)
            else:
                dxs, pw = _dx_step(dxs, pw, du, p, valid[:, None] & fmask[None, :], w_ptr,
                                   offs_f, fmask, dh, BLOCK_K, PREC, DT, QUERY)
        else:
            tl.store(dx_ptr + row[:, None] * dh + offs_f[None, :],
                     du.to(dx_ptr.dtype.element_ty), mask=valid[:, None] & fmask[None, :])
    if FMAP == FMAP_PERFORMER:
        _dx_finish(dx_ptr, rs_ptr, row, valid, dxs, pw, rs, x, dh, sqrt_scale, BLOCK_K, QUERY)
