"""Triton kernel for the forward pass of causal kernel attention by chunked prefix sums
(docs/design.md §3.4); the backward kernels are in ``triton_causal_bwd``.

Performer stabilizers follow ``reference.causal_kernel_attention`` with ``key_log_scale``:
key j has its own stabilizer ls_j (its row max of u) and query i uses the running maximum
c_i = max_{j<=i} ls_j, so no future key can change position i (not even through eps).

The launcher first computes each chunk's key state with ``flurka_state_kernel`` (NCHUNK > 1)
and turns them into exclusive prefix sums S_c = sum_{c' < c} phi(K_c')^T V_c' (fp32, memory
O(N/C * m * dv)). This kernel then handles one chunk of C queries of one query head:

    out_i = (phi(q_i) S_c + sum_{j <= i in chunk} (phi(q_i).phi(k_j)) v_j)
            / (phi(q_i) z_c + sum_{j <= i in chunk} phi(q_i).phi(k_j) + eps)

with phi(q) computed on the fly per feature block (online row max for the performer) and the
C x C intra-chunk scores accumulated over feature blocks: never an N x N tensor. The head dim
is looped in chunks of BLOCK_K (``triton_common``). Value columns are a grid axis, as in
``flurka_rows_fwd_kernel`` (an accumulator for all of them would be C x next_pow2(dv) fp32):
a program recomputes phi(q), phi(k) and the C x C scores per BLOCK_DV block, which the
BLOCK_DV = 256 config limits to two blocks at dv = 325.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import FMAP_PERFORMER, _feature_pre, _phi, _rows_prep
from .triton_tuning import PRUNE, causal_configs

@triton.autotune(configs=causal_configs(), key=["dh", "dv", "m", "CHUNK", "BLOCK_K"],
                 prune_configs_by=PRUNE)
@triton.jit
def flurka_causal_fwd_kernel(
    q_ptr, k_ptr, v_ptr, km_ptr, ck_ptr, ci_ptr, ep_ptr, s_ptr, z_ptr, w_ptr, out_ptr, c_ptr,
    den_ptr,
    N, NC, sqrt_scale, mfac, eps,
    dh: tl.constexpr, dv: tl.constexpr, m: tl.constexpr,
    FMAP: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """q (BH, G*N, dh), k (BH, N, dh), v (BH, N, dv), km/ck (BH, N) fp32 (key mask, key
    stabilizer ls_j), ci (BH, N) running max of ls, ep (BH, NC) the scale (log) of the
    exclusive state of each chunk, S (BH, NC, m, dv) and z (BH, NC, m) exclusive states (fp32),
    out (BH, G*N, dv), c/den (BH, G*N) fp32 (query stabilizer, denominator incl. eps).
    Grid: (BH, G * NC, cdiv(dv, BLOCK_DV)); program (bh, g*NC + ch, .) = chunk ch of head g.
    """
    bh = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    pid_v = tl.program_id(2)
    g = pid // NC
    ch = pid % NC
    G = tl.num_programs(1) // NC
    q_ptr += bh * G * N * dh
    out_ptr += bh * G * N * dv
    c_ptr += bh * G * N
    den_ptr += bh * G * N
    k_ptr += bh * N * dh
    v_ptr += bh * N * dv
    km_ptr += bh * N
    ck_ptr += bh * N
    ci_ptr += bh * N
    s_ptr += (bh * NC + ch) * m * dv
    z_ptr += (bh * NC + ch) * m
    dt = DT
    offs_c = tl.arange(0, CHUNK)
    pos = ch * CHUNK + offs_c
    valid = pos < N
    qrow = g * N + pos
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    vmask = offs_v < dv
    xq, hnq = _rows_prep(q_ptr, qrow, valid, dh, sqrt_scale, FMAP, BLOCK_K)
    xk, hnk = _rows_prep(k_ptr, pos, valid, dh, sqrt_scale, FMAP, BLOCK_K)
    ck = tl.load(ck_ptr + pos, mask=valid, other=0.0)
    km = tl.load(km_ptr + pos, mask=valid, other=0.0)
    c_run = tl.full([CHUNK], float("-inf"), tl.float32)
    scores = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)  # phi(q_i).phi(k_j), this chunk
    acc = tl.zeros([CHUNK, BLOCK_DV], dtype=tl.float32)
    den = tl.zeros([CHUNK], dtype=tl.float32)
    lse = tl.zeros([CHUNK], dtype=tl.float32)  # performer: sum_f exp(u_f - c) (softmax)
    for f0 in range(0, m, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        fmask = offs_f < m
        uq = _feature_pre(xq, hnq, q_ptr, qrow, valid, w_ptr, f0, dh, m, sqrt_scale,
                          FMAP, BLOCK_F, BLOCK_K, PREC, DT)
        uk = _feature_pre(xk, hnk, k_ptr, pos, valid, w_ptr, f0, dh, m, sqrt_scale,
                          FMAP, BLOCK_F, BLOCK_K, PREC, DT)
        if FMAP == FMAP_PERFORMER:
            uq = tl.where(fmask[None, :], uq, float("-inf"))
            c_new = tl.maximum(c_run, tl.max(uq, 1))
            alpha = tl.exp(c_run - c_new)
            c_run = c_new
        else:
            alpha = tl.full([CHUNK], 1.0, tl.float32)
        pq = tl.where(fmask[None, :], _phi(uq, c_run, FMAP), 0.0)
        pk = _phi(uk, ck, FMAP) * (mfac * km)[:, None]
        pk = tl.where(valid[:, None] & fmask[None, :], pk, 0.0)
        scores = scores * alpha[:, None] + tl.dot(pq.to(dt), tl.trans(pk.to(dt)),
                                                  input_precision=PREC)
        s = tl.load(s_ptr + offs_f[:, None] * dv + offs_v[None, :],
                    mask=fmask[:, None] & vmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(pq.to(dt), s.to(dt), input_precision=PREC)
        zf = tl.load(z_ptr + offs_f, mask=fmask, other=0.0)
        den = den * alpha + tl.sum(pq * zf[None, :], 1)
        lse = lse * alpha + tl.sum(pq, 1)
    causal = (offs_c[:, None] >= offs_c[None, :]) & (km[None, :] > 0)
    if FMAP == FMAP_PERFORMER:
        # true phi(k_j) = phi_hat(k_j) exp(ls_j); position i works at scale exp(c_i)
        ci = tl.load(ci_ptr + pos, mask=valid, other=0.0)
        ep = tl.load(ep_ptr + bh * NC + ch)
        scores = scores * tl.exp(tl.where(causal, ck[None, :] - ci[:, None], float("-inf")))
        inter = tl.exp(ep - ci)  # <= 1: the earlier chunks' state is at scale exp(ep)
        acc = acc * inter[:, None]
        den = den * inter
    else:
        scores = tl.where(causal, scores, 0.0)
    vc = tl.load(v_ptr + pos[:, None] * dv + offs_v[None, :],
                 mask=valid[:, None] & vmask[None, :], other=0.0)
    acc += tl.dot(scores.to(dt), vc.to(dt), input_precision=PREC)
    den = den + tl.sum(scores, 1)
    if FMAP == FMAP_PERFORMER:  # phi(q) = exp(u - c) / l (softmax over features)
        out = acc / (den + eps * lse)[:, None]
        den = den / lse + eps
        c_run = c_run + tl.log(lse)
    else:
        den = den + eps
        out = acc / den[:, None]
    tl.store(out_ptr + qrow[:, None] * dv + offs_v[None, :], out.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & vmask[None, :])
    if pid_v == 0:
        tl.store(den_ptr + qrow, den, mask=valid)
        tl.store(c_ptr + qrow, c_run, mask=valid)
