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
"""
from __future__ import annotations

import triton
import triton.language as tl

from .feature_maps import EluFeatures, PerformerFeatures, ReluFeatures
from .registry import TRITON_IDENTITY
from .triton_tuning import PRUNE, rows_bwd_configs, rows_fwd_configs, state_configs

# FMAP codes from the registry, as constexpr globals (the only globals a jit function may read)
FMAP_IDENTITY = tl.constexpr(TRITON_IDENTITY)
FMAP_RELU = tl.constexpr(ReluFeatures.triton_code)
FMAP_ELU = tl.constexpr(EluFeatures.triton_code)
FMAP_PERFORMER = tl.constexpr(PerformerFeatures.triton_code)


@triton.jit
def _load_rows(x_ptr, row, valid, dh, BLOCK_D: tl.constexpr):
    """Row tile x[row, :dh] -> (BLOCK_R, BLOCK_D) in the input dtype, zero outside."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(x_ptr + row[:, None] * dh + offs_d[None, :],
                   mask=valid[:, None] & (offs_d[None, :] < dh), other=0.0)


@triton.jit
def _feature_pre(x, hn, x_ptr, row, valid, w_ptr, f0, dh, m, sqrt_scale,
                 FMAP: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                 PREC: tl.constexpr, DT: tl.constexpr):
    """Pre-activation u of features [f0, f0 + BLOCK_F) for a row tile: (BLOCK_R, BLOCK_F) fp32.
    Performer: u = sqrt(s) x W^T - hn (hn = s |x|^2 / 2); elementwise maps: u = x[:, f]."""
    offs_f = f0 + tl.arange(0, BLOCK_F)
    fmask = offs_f < m
    if FMAP == FMAP_PERFORMER:
        offs_d = tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + offs_f[:, None] * dh + offs_d[None, :],
                    mask=fmask[:, None] & (offs_d[None, :] < dh), other=0.0)
        u = tl.dot(x.to(DT), tl.trans(w.to(DT)), input_precision=PREC) * sqrt_scale - hn[:, None]
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


@triton.autotune(configs=state_configs(), key=["dh", "dv", "m", "CHUNK"],
                 prune_configs_by=PRUNE)
@triton.jit
def flurka_state_kernel(
    x_ptr, y_ptr, a_ptr, b_ptr, c_ptr, w_ptr, s_ptr, z_ptr,  # pointers
    L, CHUNK, NCHUNK, sqrt_scale, mfac,  # sizes / scalars
    dh: tl.constexpr, dv: tl.constexpr, m: tl.constexpr,
    FMAP: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
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
        if FMAP == FMAP_PERFORMER:
            x = _load_rows(x_ptr, row, valid, dh, BLOCK_D)
            xf = x.to(tl.float32)
            hn = 0.5 * sqrt_scale * sqrt_scale * tl.sum(xf * xf, 1)
        else:
            x = tl.zeros([BLOCK_R, BLOCK_D], dtype=dt)
            hn = tl.zeros([BLOCK_R], dtype=tl.float32)
        c = tl.load(c_ptr + row, mask=valid, other=0.0)
        u = _feature_pre(x, hn, x_ptr, row, valid, w_ptr, f0, dh, m, sqrt_scale,
                         FMAP, BLOCK_F, BLOCK_D, PREC, DT)
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


@triton.autotune(configs=rows_fwd_configs(), key=["dh", "dv", "m", "MODE"],
                 prune_configs_by=PRUNE)
@triton.jit
def flurka_rows_fwd_kernel(
    x_ptr, s_ptr, z_ptr, w_ptr, a_ptr, c_ptr, out_ptr, den_ptr,  # pointers
    R, sqrt_scale, mfac, eps,  # sizes / scalars
    dh: tl.constexpr, dv: tl.constexpr, m: tl.constexpr,
    FMAP: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Per row block, phi(x) computed on the fly and contracted with the state S (m, dv):

    MODE 0: out = phi(x) S / (phi(x) z + eps) for queries; the performer's phi(q) is the
            softmax over features of u (online max and sum); c = log-sum-exp of u and
            den = phi(x) z + eps are written for the backward.
    MODE 1: out = a * phi(x) S with the stabilizer read from c_ptr (dV = mask * phi(K) dS).
    MODE 2: only c = row max of u (performer), written to c_ptr.
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
    if FMAP == FMAP_PERFORMER:
        x = _load_rows(x_ptr, row, valid, dh, BLOCK_D)
        xf = x.to(tl.float32)
        hn = 0.5 * sqrt_scale * sqrt_scale * tl.sum(xf * xf, 1)
    else:
        x = tl.zeros([BLOCK_R, BLOCK_D], dtype=dt)
        hn = tl.zeros([BLOCK_R], dtype=tl.float32)
    if MODE == 1:
        c_run = tl.load(c_ptr + row, mask=valid, other=0.0)
    else:
        c_run = tl.full([BLOCK_R], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    den = tl.zeros([BLOCK_R], dtype=tl.float32)
    lse = tl.zeros([BLOCK_R], dtype=tl.float32)  # performer queries: sum_f exp(u_f - c)
    for f0 in range(0, m, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        fmask = offs_f < m
        u = _feature_pre(x, hn, x_ptr, row, valid, w_ptr, f0, dh, m, sqrt_scale,
                         FMAP, BLOCK_F, BLOCK_D, PREC, DT)
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
            acc = acc * alpha[:, None] + tl.dot(p.to(dt), s.to(dt), input_precision=PREC)
            if MODE == 0:
                zf = tl.load(z_ptr + offs_f, mask=fmask, other=0.0)
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


@triton.autotune(configs=rows_bwd_configs(), key=["dh", "dv", "m"],
                 prune_configs_by=PRUNE)
@triton.jit
def flurka_rows_bwd_kernel(
    x_ptr, g_ptr, a_ptr, beta_ptr, c_ptr, t_ptr, tz_ptr, w_ptr, dx_ptr,  # pointers
    R, sqrt_scale, mfac,  # sizes / scalars
    dh: tl.constexpr, dv: tl.constexpr, m: tl.constexpr,
    FMAP: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr, QUERY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dx for rows x given dP = a (g T^T) + beta t^T, with P = phi(x) (mfac included):
    queries: g = dO, a = 1/den, beta = -(dO . O)/den, T = S, t = z;
    keys:    g = V,  a = beta = mask, T = dS, t = dz.
    x (BH, R, dh), g (BH, R, dv), a/beta/c (BH, R) fp32, T (BH, m, dv), t (BH, m) fp32,
    dx (BH, R, dh). Grid: (BH, cdiv(R, BLOCK_R)).
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
    dt = DT
    row = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = row < R
    offs_d = tl.arange(0, BLOCK_D)
    if FMAP == FMAP_PERFORMER:
        x = _load_rows(x_ptr, row, valid, dh, BLOCK_D)
        xf = x.to(tl.float32)
        hn = 0.5 * sqrt_scale * sqrt_scale * tl.sum(xf * xf, 1)
    else:
        x = tl.zeros([BLOCK_R, BLOCK_D], dtype=dt)
        xf = x.to(tl.float32)
        hn = tl.zeros([BLOCK_R], dtype=tl.float32)
    c = tl.load(c_ptr + row, mask=valid, other=0.0)
    a = tl.load(a_ptr + row, mask=valid, other=0.0)
    beta = tl.load(beta_ptr + row, mask=valid, other=0.0)
    dxs = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    pw = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)  # queries: phi W (softmax Jacobian)
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
                         FMAP, BLOCK_F, BLOCK_D, PREC, DT)
        p = _phi(u, c, FMAP) * mfac
        du = dp * _dphi(u, p, FMAP)
        du = tl.where(valid[:, None] & fmask[None, :], du, 0.0)
        if FMAP == FMAP_PERFORMER:
            w = tl.load(w_ptr + offs_f[:, None] * dh + offs_d[None, :],
                        mask=fmask[:, None] & (offs_d[None, :] < dh), other=0.0)
            dxs += tl.dot(du.to(dt), w.to(dt), input_precision=PREC)
            rs += tl.sum(du, 1)
            if QUERY:
                pm = tl.where(valid[:, None] & fmask[None, :], p, 0.0)
                pw += tl.dot(pm.to(dt), w.to(dt), input_precision=PREC)
        else:
            tl.store(dx_ptr + row[:, None] * dh + offs_f[None, :],
                     du.to(dx_ptr.dtype.element_ty), mask=valid[:, None] & fmask[None, :])
    if FMAP == FMAP_PERFORMER:
        # u = sqrt(s) x.w - s |x|^2 / 2  =>  du/dx = sqrt(s) w - s x
        if QUERY:  # phi = softmax(sqrt(s) W x): dx = sqrt(s) W^T (p dP - p (p . dP))
            dx = sqrt_scale * (dxs - rs[:, None] * pw)
        else:
            dx = sqrt_scale * dxs - (sqrt_scale * sqrt_scale) * rs[:, None] * xf
        tl.store(dx_ptr + row[:, None] * dh + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_d[None, :] < dh))
