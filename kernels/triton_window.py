"""Triton kernels of the sliding-window hybrid's exact band (kernels/window.py), forward and
backward, FlashAttention-2 style.

The split (docs/operator.md, "Sliding window"): the kernel part's per-query numerator,
denominator and log scale (num_i, den_i, lam_i: alpha_h kappa_ij summed = exp(lam_i) (num_i,
den_i), ``window.window_kernel_part``, PyTorch) come in as inputs; these kernels add the exact
softmax band and divide once:

    O_i = (sum_{j in W(i)} exp(s_ij - c_i) v_j + exp(lam_i - c_i) num_i)
          / (sum_{j in W(i)} exp(s_ij - c_i) + exp(lam_i - c_i) den_i)

with c_i = max(max_{W(i)} s_ij, lam_i + log den_i) (den_i clamped to fp32's tiny), the shift
of ``window_attention``: the online max starts at the kernel term's log weight
lam_i + log den_i (its "value" num_i / den_i enters the accumulator at weight 1) and ends at
c_i after the band's key blocks; the result does not depend on the shift, and every term is
<= 1 along the way. Saved row statistic: lse_i = c_i + log D_i (D_i the denominator at the
shift), so that P_ij = exp(s_ij - lse_i) is the band's normalised weight and
w_i = exp(lam_i - lse_i) the kernel part's.

Layout: q (B*H, N, dh), k (B*Hkv, N, dh), v (B*Hkv, N, dv) contiguous; query head h reads
kv-head h // G. Window W(i): causal i - w < j <= i, non-causal |i - j| <= REACH = w // 2;
padded keys (``HAS_MASK``: kr (B, N) float, 1 = real) never enter. A query block loads only
the key blocks overlapping its band (O(N w) work), a key block only the query blocks whose
band overlaps it. Whole head dims in one tile (BLOCK_D = next_pow2(dh), no dh loop).
Masks of tl.load / tl.store: block comparisons combined with & only (triton_kernels); runtime
loop bounds: ``while`` loops.

Kernels:
  window_fwd_kernel   out, lse per query block (online max/sum over the band's key blocks)
  window_dq_kernel    dq = scale sum_j dS_ij k_j, dS = P (dP - delta), per query block
  window_dkdv_kernel  dk = scale sum_i dS_ij q_i, dv = sum_i P_ij dO_i, per key block, summed
                      over the G query heads of its kv-head (no atomics)
"""
from __future__ import annotations

import triton
import triton.language as tl

TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny


@triton.jit
def _band_mask(offs_m, offs_n, N, W, REACH, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: key j in query i's window, both rows inside the sequence."""
    dd = offs_n[None, :] - offs_m[:, None]  # j - i
    if CAUSAL:
        inw = (dd > -W) & (dd <= 0)
    else:
        inw = (dd >= -REACH) & (dd <= REACH)
    return inw & (offs_m[:, None] < N) & (offs_n[None, :] < N)


@triton.jit
def _key_ok(ok, r_ptr, offs_n, N, HAS_MASK: tl.constexpr):
    """``ok`` restricted to real keys (kr > 0) when there is a key-padding mask."""
    if HAS_MASK:
        kr = tl.load(r_ptr + offs_n, mask=offs_n < N, other=0.0)
        ok = ok & (kr[None, :] > 0)
    return ok


@triton.jit
def _heads(bh, H, G):
    """(b, kv-slab index) of query slab bh = b * H + h: kv-head b * (H // G) + h // G."""
    b = bh // H
    return b, b * (H // G) + (bh % H) // G


@triton.jit
def window_fwd_kernel(
    q_ptr, k_ptr, v_ptr, r_ptr, num_ptr, den_ptr, lam_ptr, o_ptr, lse_ptr,
    N, H, G, W, REACH, scale,
    dh: tl.constexpr, dv: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """out (B*H, N, dv) in q's dtype and lse (B*H, N) fp32 of one query block.
    Grid: (cdiv(N, BLOCK_M), B * H)."""
    i0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, kvh = _heads(bh, H, G)
    q_ptr += bh * N * dh
    k_ptr += kvh * N * dh
    v_ptr += kvh * N * dv
    r_ptr += b * N
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_V)
    mrow = offs_m < N
    qmask = mrow[:, None] & (offs_d[None, :] < dh)
    vmask = mrow[:, None] & (offs_v[None, :] < dv)
    q = tl.load(q_ptr + offs_m[:, None] * dh + offs_d[None, :], mask=qmask, other=0.0)
    num = tl.load(num_ptr + bh * N * dv + offs_m[:, None] * dv + offs_v[None, :], mask=vmask,
                  other=0.0)
    den = tl.load(den_ptr + bh * N + offs_m, mask=mrow, other=0.0)
    lam = tl.load(lam_ptr + bh * N + offs_m, mask=mrow, other=0.0)
    # the kernel term as the first "key": log weight lam + log den, value num / den
    m_i = lam + tl.log(tl.maximum(den, TINY))
    f = tl.exp(lam - m_i)
    l_i = f * den
    acc = num * f[:, None]
    if CAUSAL:
        lo = tl.maximum(i0 - W + 1, 0)
        hi = tl.minimum(i0 + BLOCK_M, N)
    else:
        lo = tl.maximum(i0 - REACH, 0)
        hi = tl.minimum(i0 + BLOCK_M + REACH, N)
    j0 = lo
    while j0 < hi:
        offs_n = j0 + tl.arange(0, BLOCK_N)
        nrow = offs_n < N
        kt = tl.load(k_ptr + offs_n[:, None] * dh + offs_d[None, :],
                     mask=nrow[:, None] & (offs_d[None, :] < dh), other=0.0)
        vt = tl.load(v_ptr + offs_n[:, None] * dv + offs_v[None, :],
                     mask=nrow[:, None] & (offs_v[None, :] < dv), other=0.0)
        s = tl.dot(q.to(DT), tl.trans(kt.to(DT)), input_precision=PREC) * scale
        ok = _key_ok(_band_mask(offs_m, offs_n, N, W, REACH, CAUSAL), r_ptr, offs_n, N,
                     HAS_MASK)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: m_i starts finite
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), vt.to(DT), input_precision=PREC)
        m_i = m_new
        j0 += BLOCK_N
    lsafe = tl.maximum(l_i, TINY)
    out = acc / lsafe[:, None]
    tl.store(o_ptr + bh * N * dv + offs_m[:, None] * dv + offs_v[None, :],
             out.to(o_ptr.dtype.element_ty), mask=vmask)
    tl.store(lse_ptr + bh * N + offs_m, m_i + tl.log(lsafe), mask=mrow)


@triton.jit
def window_dq_kernel(
    q_ptr, k_ptr, v_ptr, r_ptr, do_ptr, lse_ptr, dl_ptr, dq_ptr,
    N, H, G, W, REACH, scale,
    dh: tl.constexpr, dv: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dq (B*H, N, dh) of one query block from the band: P = exp(s - lse),
    dS = P (dO v^T - delta), dq = scale dS k (delta = dO . O, dl_ptr). Grid as the forward."""
    i0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, kvh = _heads(bh, H, G)
    k_ptr += kvh * N * dh
    v_ptr += kvh * N * dv
    r_ptr += b * N
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_V)
    mrow = offs_m < N
    qmask = mrow[:, None] & (offs_d[None, :] < dh)
    q = tl.load(q_ptr + bh * N * dh + offs_m[:, None] * dh + offs_d[None, :], mask=qmask,
                other=0.0)
    do = tl.load(do_ptr + bh * N * dv + offs_m[:, None] * dv + offs_v[None, :],
                 mask=mrow[:, None] & (offs_v[None, :] < dv), other=0.0)
    lse = tl.load(lse_ptr + bh * N + offs_m, mask=mrow, other=0.0)
    delta = tl.load(dl_ptr + bh * N + offs_m, mask=mrow, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        lo = tl.maximum(i0 - W + 1, 0)
        hi = tl.minimum(i0 + BLOCK_M, N)
    else:
        lo = tl.maximum(i0 - REACH, 0)
        hi = tl.minimum(i0 + BLOCK_M + REACH, N)
    j0 = lo
    while j0 < hi:
        offs_n = j0 + tl.arange(0, BLOCK_N)
        nrow = offs_n < N
        kt = tl.load(k_ptr + offs_n[:, None] * dh + offs_d[None, :],
                     mask=nrow[:, None] & (offs_d[None, :] < dh), other=0.0)
        vt = tl.load(v_ptr + offs_n[:, None] * dv + offs_v[None, :],
                     mask=nrow[:, None] & (offs_v[None, :] < dv), other=0.0)
        s = tl.dot(q.to(DT), tl.trans(kt.to(DT)), input_precision=PREC) * scale
        ok = _key_ok(_band_mask(offs_m, offs_n, N, W, REACH, CAUSAL), r_ptr, offs_n, N,
                     HAS_MASK)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do.to(DT), tl.trans(vt.to(DT)), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DT), kt.to(DT), input_precision=PREC)
        j0 += BLOCK_N
    tl.store(dq_ptr + bh * N * dh + offs_m[:, None] * dh + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def window_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, r_ptr, do_ptr, lse_ptr, dl_ptr, dk_ptr, dv_ptr,
    N, H, G, W, REACH, scale,
    dh: tl.constexpr, dv: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dk (B*Hkv, N, dh), dv (B*Hkv, N, dv) of one key block from the band, summed over the
    G query heads of its kv-head and the query blocks whose band overlaps it.
    Grid: (cdiv(N, BLOCK_N), B * Hkv)."""
    j0 = tl.program_id(0) * BLOCK_N
    kvh = tl.program_id(1).to(tl.int64)
    hkv = H // G
    b = kvh // hkv
    r_ptr += b * N
    offs_n = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_V)
    nrow = offs_n < N
    kmask = nrow[:, None] & (offs_d[None, :] < dh)
    vmask = nrow[:, None] & (offs_v[None, :] < dv)
    kt = tl.load(k_ptr + kvh * N * dh + offs_n[:, None] * dh + offs_d[None, :], mask=kmask,
                 other=0.0)
    vt = tl.load(v_ptr + kvh * N * dv + offs_n[:, None] * dv + offs_v[None, :], mask=vmask,
                 other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    if CAUSAL:  # queries i with j <= i < j + w
        lo = j0
        hi = tl.minimum(j0 + BLOCK_N + W - 1, N)
    else:
        lo = tl.maximum(j0 - REACH, 0)
        hi = tl.minimum(j0 + BLOCK_N + REACH, N)
    g = 0
    while g < G:
        bh = b * H + (kvh % hkv) * G + g
        i0 = lo
        while i0 < hi:
            offs_m = i0 + tl.arange(0, BLOCK_M)
            mrow = offs_m < N
            q = tl.load(q_ptr + bh * N * dh + offs_m[:, None] * dh + offs_d[None, :],
                        mask=mrow[:, None] & (offs_d[None, :] < dh), other=0.0)
            do = tl.load(do_ptr + bh * N * dv + offs_m[:, None] * dv + offs_v[None, :],
                         mask=mrow[:, None] & (offs_v[None, :] < dv), other=0.0)
            lse = tl.load(lse_ptr + bh * N + offs_m, mask=mrow, other=0.0)
            delta = tl.load(dl_ptr + bh * N + offs_m, mask=mrow, other=0.0)
            s = tl.dot(q.to(DT), tl.trans(kt.to(DT)), input_precision=PREC) * scale
            ok = _key_ok(_band_mask(offs_m, offs_n, N, W, REACH, CAUSAL), r_ptr, offs_n, N,
                         HAS_MASK)
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
            dvacc += tl.dot(tl.trans(p).to(DT), do.to(DT), input_precision=PREC)
            dp = tl.dot(do.to(DT), tl.trans(vt.to(DT)), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(DT), q.to(DT), input_precision=PREC)
            i0 += BLOCK_M
        g += 1
    tl.store(dk_ptr + kvh * N * dh + offs_n[:, None] * dh + offs_d[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=kmask)
    tl.store(dv_ptr + kvh * N * dv + offs_n[:, None] * dv + offs_v[None, :],
             dvacc.to(dv_ptr.dtype.element_ty), mask=vmask)
