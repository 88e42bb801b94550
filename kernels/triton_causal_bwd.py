"""Triton kernels for the backward pass of causal kernel attention by chunked prefix sums
(docs/design.md §3.4); the forward kernel and its stabilizers are in ``triton_causal``.

Per head; g_i = dO_i / den_i, h_i = -(dO_i . O_i) / den_i; the stabilizers are constants, as
in the reference, where they are detached:
    dphi(q_i) = sum_{j<=i} phi(k_j) (v_j . g_i + h_i)            flurka_causal_bwd_q_kernel
    dphi(k_j) = sum_{i>=j} phi(q_i) (g_i . v_j + h_i)            flurka_causal_bwd_k_kernel
    dv_j      = sum_{i>=j} (phi(q_i) . phi(k_j)) g_i             flurka_causal_bwd_v_kernel
Query side: the forward's exclusive prefix states S, z plus the masked C x C matrix
M_ij = v_j . g_i + h_i of the chunk. Key side: exclusive suffix states R = sum phi(q_i) g_i^T,
r = sum phi(q_i) h_i over later chunks (``flurka_state_kernel`` per chunk, then a reverse scan
on the host) plus the chunk's masked C x C products; dphi is then taken through the feature
map as in ``flurka_rows_bwd_kernel``. Performer scales: query i works at exp(c_i) (c_i the
running max of the key stabilizers ls_j); the factor between key j and query i is
exp(ls_j - c_i) <= 1 for j <= i; the suffix state after chunk t is kept at the scale of the
running max at the end of chunk t (e_t), so key j of chunk t reads it with exp(ls_j - e_t) <= 1.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (
    FMAP_PERFORMER,
    _dphi,
    _dx_finish,
    _dx_step,
    _feature_pre,
    _phi,
    _rows_prep,
    _store_wide_du,
)
from .triton_tuning import PRUNE, causal_bwd_configs

@triton.autotune(configs=causal_bwd_configs(), key=["dh", "dv", "m", "CHUNK", "BLOCK_K"],
                 prune_configs_by=PRUNE)
@triton.jit
def flurka_causal_bwd_q_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, km_ptr, ck_ptr, ci_ptr, ep_ptr, cq_ptr, a_ptr, b_ptr,
    s_ptr, z_ptr, w_ptr, dq_ptr, du_ptr, p_ptr, rs_ptr,
    N, NC, sqrt_scale, mfac,
    dh: tl.constexpr, dv: tl.constexpr, m: tl.constexpr,
    FMAP: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dq for one chunk of C queries of one query head:
    dphi(q_i) = exp(ep - c_i) (a_i dO_i S^T + b_i z) + sum_{j<=i in chunk} M_ij phi(k_j),
    M_ij = (a_i dO_i . v_j + b_i) exp(ls_j - c_i) mask_j, a = 1/den, b = -(dO . O)/den.
    q/dq (BH, G*N, dh), k (BH, N, dh), v (BH, N, dv), dO (BH, G*N, dv), km/ck/ci (BH, N) fp32
    (key mask, key stabilizer ls, running max c), ep (BH, NC), cq/a/b (BH, G*N) fp32 (cq: the
    forward's query stabilizer, phi(q) = exp(u - cq)), S (BH, NC, m, dv), z (BH, NC, m): the
    forward's exclusive prefix states. Grid: (BH, G * NC).
    Wide head dims (dh > BLOCK_K): dU, P (BH, G*N, m) and rs (BH, G*N) are written instead of
    dq, which ``flurka_dx_kernel`` then forms chunk by chunk (``triton_dx``).
    """
    bh = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    g = pid // NC
    ch = pid % NC
    G = tl.num_programs(1) // NC
    q_ptr += bh * G * N * dh
    dq_ptr += bh * G * N * dh
    do_ptr += bh * G * N * dv
    cq_ptr += bh * G * N
    a_ptr += bh * G * N
    b_ptr += bh * G * N
    k_ptr += bh * N * dh
    v_ptr += bh * N * dv
    km_ptr += bh * N
    ck_ptr += bh * N
    ci_ptr += bh * N
    s_ptr += (bh * NC + ch) * m * dv
    z_ptr += (bh * NC + ch) * m
    du_ptr += bh * G * N * m
    p_ptr += bh * G * N * m
    rs_ptr += bh * G * N
    dt = DT
    offs_c = tl.arange(0, CHUNK)
    pos = ch * CHUNK + offs_c
    valid = pos < N
    qrow = g * N + pos
    xq, hnq = _rows_prep(q_ptr, qrow, valid, dh, sqrt_scale, FMAP, BLOCK_K)
    xk, hnk = _rows_prep(k_ptr, pos, valid, dh, sqrt_scale, FMAP, BLOCK_K)
    cq = tl.load(cq_ptr + qrow, mask=valid, other=0.0)
    a = tl.load(a_ptr + qrow, mask=valid, other=0.0)
    b = tl.load(b_ptr + qrow, mask=valid, other=0.0)
    ck = tl.load(ck_ptr + pos, mask=valid, other=0.0)
    km = tl.load(km_ptr + pos, mask=valid, other=0.0)
    # M_ij = a_i dO_i . v_j + b_i on the causal, unpadded entries of the chunk: (C, C)
    gv = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
    for v0 in range(0, dv, BLOCK_DV):
        offs_v = v0 + tl.arange(0, BLOCK_DV)
        vmask = offs_v < dv
        d = tl.load(do_ptr + qrow[:, None] * dv + offs_v[None, :],
                    mask=valid[:, None] & vmask[None, :], other=0.0)
        vc = tl.load(v_ptr + pos[:, None] * dv + offs_v[None, :],
                     mask=valid[:, None] & vmask[None, :], other=0.0)
        gv += tl.dot(d.to(dt), tl.trans(vc.to(dt)), input_precision=PREC)
    mij = gv * a[:, None] + b[:, None]
    causal = (offs_c[:, None] >= offs_c[None, :]) & (km[None, :] > 0)
    if FMAP == FMAP_PERFORMER:
        ci = tl.load(ci_ptr + pos, mask=valid, other=0.0)
        ep = tl.load(ep_ptr + bh * NC + ch)
        # exp(ls_j - c_i) <= 1 on the causal entries; exp(-inf) = 0 elsewhere (no inf * 0)
        mij = mij * tl.exp(tl.where(causal, ck[None, :] - ci[:, None], float("-inf")))
        inter = tl.exp(ep - ci)  # <= 1: the exclusive state is at scale exp(ep)
    else:
        mij = tl.where(causal, mij, 0.0)
        inter = tl.full([CHUNK], 1.0, tl.float32)
    dxs = tl.zeros([CHUNK, BLOCK_K], dtype=tl.float32)  # one chunk: dU W
    pw = tl.zeros([CHUNK, BLOCK_K], dtype=tl.float32)  # one chunk: phi(q) W (softmax Jacobian)
    rs = tl.zeros([CHUNK], dtype=tl.float32)
    for f0 in range(0, m, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        fmask = offs_f < m
        keep = valid[:, None] & fmask[None, :]
        uq = _feature_pre(xq, hnq, q_ptr, qrow, valid, w_ptr, f0, dh, m, sqrt_scale,
                          FMAP, BLOCK_F, BLOCK_K, PREC, DT)
        uk = _feature_pre(xk, hnk, k_ptr, pos, valid, w_ptr, f0, dh, m, sqrt_scale,
                          FMAP, BLOCK_F, BLOCK_K, PREC, DT)
        pq = tl.where(keep, _phi(uq, cq, FMAP), 0.0)  # performer: exp(u - cq), the softmax
        pk = tl.where(keep, _phi(uk, ck, FMAP) * mfac, 0.0)
        dp = tl.dot(mij.to(dt), pk.to(dt), input_precision=PREC)  # intra-chunk
        st = tl.zeros([CHUNK, BLOCK_F], dtype=tl.float32)  # dO S^T for this feature block
        for v0 in range(0, dv, BLOCK_DV):
            offs_v = v0 + tl.arange(0, BLOCK_DV)
            vmask = offs_v < dv
            d = tl.load(do_ptr + qrow[:, None] * dv + offs_v[None, :],
                        mask=valid[:, None] & vmask[None, :], other=0.0)
            s = tl.load(s_ptr + offs_f[:, None] * dv + offs_v[None, :],
                        mask=fmask[:, None] & vmask[None, :], other=0.0)
            st += tl.dot(d.to(dt), tl.trans(s.to(dt)), input_precision=PREC)
        zf = tl.load(z_ptr + offs_f, mask=fmask, other=0.0)
        dp += (st * a[:, None] + b[:, None] * zf[None, :]) * inter[:, None]
        du = tl.where(keep, dp * _dphi(uq, pq, FMAP), 0.0)
        if FMAP == FMAP_PERFORMER:
            rs += tl.sum(du, 1)
            if dh > BLOCK_K:
                _store_wide_du(du_ptr, p_ptr, qrow, valid, offs_f, fmask, du, pq, m, True)
            else:
                dxs, pw = _dx_step(dxs, pw, du, pq, keep, w_ptr, offs_f, fmask, dh, BLOCK_K,
                                   PREC, DT, True)
        else:
            tl.store(dq_ptr + qrow[:, None] * dh + offs_f[None, :],
                     du.to(dq_ptr.dtype.element_ty), mask=keep)
    # performer: phi(q) = softmax(sqrt(s) W q): dq = sqrt(s) W^T (p dP - p (p . dP))
    if FMAP == FMAP_PERFORMER:
        _dx_finish(dq_ptr, rs_ptr, qrow, valid, dxs, pw, rs, xq, dh, sqrt_scale, BLOCK_K, True)


@triton.jit
def _query_block(q_ptr, qrow, valid, keep, cq, w_ptr, f0, dh, m, sqrt_scale,
                 FMAP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_F: tl.constexpr,
                 BLOCK_K: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr):
    """phi(q) of features [f0, f0 + BLOCK_F) for the query rows qrow (performer: exp(u - cq),
    the softmax over features), zero outside ``keep``: (C, BLOCK_F) fp32."""
    xq, hnq = _rows_prep(q_ptr, qrow, valid, dh, sqrt_scale, FMAP, BLOCK_K)
    uq = _feature_pre(xq, hnq, q_ptr, qrow, valid, w_ptr, f0, dh, m, sqrt_scale,
                      FMAP, BLOCK_F, BLOCK_K, PREC, DT)
    return tl.where(keep, _phi(uq, cq, FMAP), 0.0)


@triton.autotune(configs=causal_bwd_configs(), key=["dh", "dv", "m", "CHUNK", "BLOCK_K"],
                 prune_configs_by=PRUNE)
@triton.jit
def flurka_causal_bwd_k_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, km_ptr, ck_ptr, ci_ptr, ee_ptr, cq_ptr, a_ptr, b_ptr,
    r_ptr, rz_ptr, w_ptr, dk_ptr, du_ptr, rs_ptr,
    N, NC, G, sqrt_scale, mfac,
    dh: tl.constexpr, dv: tl.constexpr, m: tl.constexpr,
    FMAP: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dk for one chunk of C keys, summed over the G query heads of the kv-head:
    dphi(k_j) = mask_j exp(ls_j - e) (R v_j + r) + sum_g sum_{i>=j in chunk} N_ji phi(q_i),
    N_ji = (a_i dO_i . v_j + b_i) exp(ls_j - c_i) mask_j.
    R (BH, NC, m, dv), r (BH, NC, m): exclusive suffix states (later chunks) at scale exp(e),
    e = ee (BH, NC) the running max of ls at the end of the chunk; other arguments as in
    flurka_causal_bwd_q_kernel; dk (BH, N, dh). Grid: (BH, NC). Wide head dims: dU (BH, N, m)
    and rs (BH, N) instead of dk, as in the dq kernel.
    """
    bh = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    q_ptr += bh * G * N * dh
    do_ptr += bh * G * N * dv
    cq_ptr += bh * G * N
    a_ptr += bh * G * N
    b_ptr += bh * G * N
    k_ptr += bh * N * dh
    dk_ptr += bh * N * dh
    v_ptr += bh * N * dv
    km_ptr += bh * N
    ck_ptr += bh * N
    ci_ptr += bh * N
    r_ptr += (bh * NC + ch) * m * dv
    rz_ptr += (bh * NC + ch) * m
    du_ptr += bh * N * m
    rs_ptr += bh * N
    dt = DT
    offs_c = tl.arange(0, CHUNK)
    pos = ch * CHUNK + offs_c
    valid = pos < N
    xk, hnk = _rows_prep(k_ptr, pos, valid, dh, sqrt_scale, FMAP, BLOCK_K)
    ck = tl.load(ck_ptr + pos, mask=valid, other=0.0)
    km = tl.load(km_ptr + pos, mask=valid, other=0.0)
    real = km > 0
    causal = (offs_c[None, :] >= offs_c[:, None]) & real[:, None]  # (j, i): i >= j
    if FMAP == FMAP_PERFORMER:
        ci = tl.load(ci_ptr + pos, mask=valid, other=0.0)
        ee = tl.load(ee_ptr + bh * NC + ch)
        scl = tl.exp(tl.where(causal, ck[:, None] - ci[None, :], float("-inf")))  # (j, i) <= 1
        inter = tl.exp(tl.where(real, ck - ee, float("-inf")))  # <= 1
    else:
        scl = tl.full([CHUNK, CHUNK], 1.0, tl.float32)
        inter = tl.where(real, 1.0, 0.0)
    dxs = tl.zeros([CHUNK, BLOCK_K], dtype=tl.float32)  # one chunk: dU W
    rs = tl.zeros([CHUNK], dtype=tl.float32)
    for f0 in range(0, m, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        fmask = offs_f < m
        keep = valid[:, None] & fmask[None, :]
        uk = _feature_pre(xk, hnk, k_ptr, pos, valid, w_ptr, f0, dh, m, sqrt_scale,
                          FMAP, BLOCK_F, BLOCK_K, PREC, DT)
        pk = tl.where(keep, _phi(uk, ck, FMAP) * mfac, 0.0)
        vr = tl.zeros([CHUNK, BLOCK_F], dtype=tl.float32)  # V R^T: later chunks
        for v0 in range(0, dv, BLOCK_DV):
            offs_v = v0 + tl.arange(0, BLOCK_DV)
            vmask = offs_v < dv
            vc = tl.load(v_ptr + pos[:, None] * dv + offs_v[None, :],
                         mask=valid[:, None] & vmask[None, :], other=0.0)
            r = tl.load(r_ptr + offs_f[:, None] * dv + offs_v[None, :],
                        mask=fmask[:, None] & vmask[None, :], other=0.0)
            vr += tl.dot(vc.to(dt), tl.trans(r.to(dt)), input_precision=PREC)
        rz = tl.load(rz_ptr + offs_f, mask=fmask, other=0.0)
        dp = (vr + rz[None, :]) * inter[:, None]
        g = 0
        while g < G:  # the query heads of this kv-head (runtime bound: a while loop)
            qrow = g * N + pos
            a = tl.load(a_ptr + qrow, mask=valid, other=0.0)
            b = tl.load(b_ptr + qrow, mask=valid, other=0.0)
            cq = tl.load(cq_ptr + qrow, mask=valid, other=0.0)
            vg = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)  # (j, i): v_j . dO_i
            for v0 in range(0, dv, BLOCK_DV):
                offs_v = v0 + tl.arange(0, BLOCK_DV)
                vmask = offs_v < dv
                vc = tl.load(v_ptr + pos[:, None] * dv + offs_v[None, :],
                             mask=valid[:, None] & vmask[None, :], other=0.0)
                d = tl.load(do_ptr + qrow[:, None] * dv + offs_v[None, :],
                            mask=valid[:, None] & vmask[None, :], other=0.0)
                vg += tl.dot(vc.to(dt), tl.trans(d.to(dt)), input_precision=PREC)
            nji = tl.where(causal, (vg * a[None, :] + b[None, :]) * scl, 0.0)
            pq = _query_block(q_ptr, qrow, valid, keep, cq, w_ptr, f0, dh, m, sqrt_scale,
                              FMAP, CHUNK, BLOCK_F, BLOCK_K, PREC, DT)
            dp += tl.dot(nji.to(dt), pq.to(dt), input_precision=PREC)
            g += 1
        du = tl.where(keep, dp * _dphi(uk, pk, FMAP), 0.0)
        if FMAP == FMAP_PERFORMER:
            rs += tl.sum(du, 1)
            if dh > BLOCK_K:
                _store_wide_du(du_ptr, du_ptr, pos, valid, offs_f, fmask, du, du, m, False)
            else:
                dxs, _unused = _dx_step(dxs, dxs, du, du, keep, w_ptr, offs_f, fmask, dh,
                                        BLOCK_K, PREC, DT, False)
        else:
            tl.store(dk_ptr + pos[:, None] * dh + offs_f[None, :],
                     du.to(dk_ptr.dtype.element_ty), mask=keep)
    if FMAP == FMAP_PERFORMER:  # u = sqrt(s) W k - s |k|^2 / 2  =>  du/dk = sqrt(s) w - s k
        _dx_finish(dk_ptr, rs_ptr, pos, valid, dxs, dxs, rs, xk, dh, sqrt_scale, BLOCK_K, False)


@triton.autotune(configs=causal_bwd_configs(), key=["dh", "dv", "m", "CHUNK", "BLOCK_K"],
                 prune_configs_by=PRUNE)
@triton.jit
def flurka_causal_bwd_v_kernel(
    q_ptr, k_ptr, do_ptr, km_ptr, ck_ptr, ci_ptr, ee_ptr, cq_ptr, a_ptr, r_ptr, w_ptr,
    dv_ptr,
    N, NC, G, sqrt_scale, mfac,
    dh: tl.constexpr, dv: tl.constexpr, m: tl.constexpr,
    FMAP: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dv for one chunk of C keys, summed over the G query heads of the kv-head:
    dv_j = mask_j exp(ls_j - e) R^T phi(k_j) + sum_g sum_{i>=j in chunk} A_ji a_i dO_i,
    A_ji = (phi(q_i) . phi(k_j)) exp(ls_j - c_i) mask_j (the forward's scores, transposed).
    Arguments as in flurka_causal_bwd_k_kernel; dv (BH, N, dv).
    Grid: (BH, NC, cdiv(dv, BLOCK_DV)).
    """
    bh = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    pid_v = tl.program_id(2)
    q_ptr += bh * G * N * dh
    do_ptr += bh * G * N * dv
    cq_ptr += bh * G * N
    a_ptr += bh * G * N
    k_ptr += bh * N * dh
    dv_ptr += bh * N * dv
    km_ptr += bh * N
    ck_ptr += bh * N
    ci_ptr += bh * N
    r_ptr += (bh * NC + ch) * m * dv
    dt = DT
    offs_c = tl.arange(0, CHUNK)
    pos = ch * CHUNK + offs_c
    valid = pos < N
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    vmask = offs_v < dv
    xk, hnk = _rows_prep(k_ptr, pos, valid, dh, sqrt_scale, FMAP, BLOCK_K)
    ck = tl.load(ck_ptr + pos, mask=valid, other=0.0)
    km = tl.load(km_ptr + pos, mask=valid, other=0.0)
    real = km > 0
    causal = (offs_c[None, :] >= offs_c[:, None]) & real[:, None]  # (j, i): i >= j
    if FMAP == FMAP_PERFORMER:
        ci = tl.load(ci_ptr + pos, mask=valid, other=0.0)
        ee = tl.load(ee_ptr + bh * NC + ch)
        scl = tl.exp(tl.where(causal, ck[:, None] - ci[None, :], float("-inf")))  # (j, i) <= 1
        inter = tl.exp(tl.where(real, ck - ee, float("-inf")))  # <= 1
    else:
        scl = tl.full([CHUNK, CHUNK], 1.0, tl.float32)
        inter = tl.where(real, 1.0, 0.0)
    acc = tl.zeros([CHUNK, BLOCK_DV], dtype=tl.float32)
    g = 0
    while g < G:  # intra-chunk, one query head at a time
        qrow = g * N + pos
        cq = tl.load(cq_ptr + qrow, mask=valid, other=0.0)
        scores = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)  # (j, i): phi(k_j) . phi(q_i)
        for f0 in range(0, m, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            keep = valid[:, None] & (offs_f[None, :] < m)
            uk = _feature_pre(xk, hnk, k_ptr, pos, valid, w_ptr, f0, dh, m, sqrt_scale,
                              FMAP, BLOCK_F, BLOCK_K, PREC, DT)
            pk = tl.where(keep, _phi(uk, ck, FMAP) * mfac, 0.0)
            pq = _query_block(q_ptr, qrow, valid, keep, cq, w_ptr, f0, dh, m, sqrt_scale,
                              FMAP, CHUNK, BLOCK_F, BLOCK_K, PREC, DT)
            scores += tl.dot(pk.to(dt), tl.trans(pq.to(dt)), input_precision=PREC)
        a = tl.load(a_ptr + qrow, mask=valid, other=0.0)
        # scores / den_i: attention weights in [0, 1], safe to round to a 16-bit dtype
        scores = tl.where(causal, scores * scl, 0.0) * a[None, :]
        d = tl.load(do_ptr + qrow[:, None] * dv + offs_v[None, :],
                    mask=valid[:, None] & vmask[None, :], other=0.0)
        acc += tl.dot(scores.to(dt), d.to(dt), input_precision=PREC)
        g += 1
    sacc = tl.zeros([CHUNK, BLOCK_DV], dtype=tl.float32)  # phi(K) R: later chunks
    for f0 in range(0, m, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        fmask = offs_f < m
        keep = valid[:, None] & fmask[None, :]
        uk = _feature_pre(xk, hnk, k_ptr, pos, valid, w_ptr, f0, dh, m, sqrt_scale,
                          FMAP, BLOCK_F, BLOCK_K, PREC, DT)
        pk = tl.where(keep, _phi(uk, ck, FMAP) * mfac, 0.0)
        r = tl.load(r_ptr + offs_f[:, None] * dv + offs_v[None, :],
                    mask=fmask[:, None] & vmask[None, :], other=0.0)
        sacc += tl.dot(pk.to(dt), r.to(dt), input_precision=PREC)
    acc += sacc * inter[:, None]
    tl.store(dv_ptr + pos[:, None] * dv + offs_v[None, :], acc.to(dv_ptr.dtype.element_ty),
             mask=valid[:, None] & vmask[None, :])
