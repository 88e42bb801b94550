"""Triton kernel for the performer's dx at wide head dims (dh > BLOCK_K): dx = dU W, chunk by
chunk in dh.

Why a second kernel: dx[:, d] = sum_f dU[:, f] W[f, d] needs every feature f of a row before
any column d is complete, while the row kernels (``flurka_rows_bwd_kernel``, the causal dq and
dk kernels) produce dU one feature block at a time. Holding dx for all of dh in one kernel
needs a (rows, next_pow2(dh)) fp32 accumulator (dh = 325: 512 wide, the tile this design
removes); recomputing dU once per dh chunk would repeat the u = x W^T and dP products (6
times for dh = 325 in chunks of 64). So the row kernels write dU (rows x m) and, for
queries, P = phi(q) (rows x m) and rs = sum_f dU_f, and this kernel computes, per (row block,
dh chunk of BLOCK_K):
    queries: dx = sqrt(s) (dU - rs P) W       (phi(q) = softmax_f(sqrt(s) W q), mfac = 1)
    keys:    dx = sqrt(s) dU W - s rs x       (u = sqrt(s) W x - s |x|^2 / 2)
dU and P are stored in the dot operand precision: fp32 for fp32 inputs (exact), the 16-bit
input dtype for bf16/fp16 (the row kernels round them to that dtype before their own dots
at dh <= BLOCK_K, so no precision is lost against that path); the combination dU - rs P is
formed in fp32 before its one rounding. Extra memory: 2 x rows x m elements per call.
The dh chunk is the fastest grid axis, so the programs reading one row block's dU run side by
side and share it in L2.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_tuning import dx_configs


@triton.autotune(configs=dx_configs(), key=["dh", "m", "QUERY"])
@triton.jit
def flurka_dx_kernel(
    du_ptr, p_ptr, rs_ptr, x_ptr, w_ptr, dx_ptr,  # pointers
    R, sqrt_scale,  # sizes / scalars
    dh: tl.constexpr, m: tl.constexpr, QUERY: tl.constexpr, PREC: tl.constexpr,
    DT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dU/P (BH, R, m), rs (BH, R) fp32, x/dx (BH, R, dh), W (m, dh) fp32.
    Grid: (cdiv(dh, BLOCK_K), cdiv(R, BLOCK_R), BH)."""
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    du_ptr += bh * R * m
    p_ptr += bh * R * m
    rs_ptr += bh * R
    x_ptr += bh * R * dh
    dx_ptr += bh * R * dh
    row = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = row < R
    offs_d = pid_d * BLOCK_K + tl.arange(0, BLOCK_K)
    dmask = offs_d < dh
    rs = tl.load(rs_ptr + row, mask=valid, other=0.0)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for f0 in range(0, m, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        fmask = offs_f < m
        keep = valid[:, None] & fmask[None, :]
        du = tl.load(du_ptr + row[:, None] * m + offs_f[None, :], mask=keep,
                     other=0.0).to(tl.float32)
        if QUERY:
            p = tl.load(p_ptr + row[:, None] * m + offs_f[None, :], mask=keep, other=0.0)
            du = du - rs[:, None] * p.to(tl.float32)
        w = tl.load(w_ptr + offs_f[:, None] * dh + offs_d[None, :],
                    mask=fmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.dot(du.to(DT), w.to(DT), input_precision=PREC)
    if QUERY:
        dx = sqrt_scale * acc
    else:
        x = tl.load(x_ptr + row[:, None] * dh + offs_d[None, :],
                    mask=valid[:, None] & dmask[None, :], other=0.0)
        dx = sqrt_scale * acc - (sqrt_scale * sqrt_scale) * rs[:, None] * x.to(tl.float32)
    tl.store(dx_ptr + row[:, None] * dh + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=valid[:, None] & dmask[None, :])
