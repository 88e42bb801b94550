"""Host launchers for the FLuRKA Triton kernels: layout, allocation, grids, and the forward and
backward passes of the fused core as plain functions of tensors (no autograd here).

Layout: q (B, H, N, dh) is viewed as (B*Hkv, G*N, dh), G = H // Hkv, so the G query heads that
share a kv-head lie in one slab and share one state; k (B*Hkv, M, dh), v (B*Hkv, M, dv).
Head dims run in chunks of BLOCK_K (``block_k``); above it the performer's dx takes a second
kernel (``triton_dx.flurka_dx_kernel``) over dU buffers that the row kernels write
(``_wide_buffers``, ``_launch_dx``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_causal import flurka_causal_fwd_kernel
from .triton_causal_bwd import (
    flurka_causal_bwd_k_kernel,
    flurka_causal_bwd_q_kernel,
    flurka_causal_bwd_v_kernel,
)
from .triton_dx import flurka_dx_kernel
from .triton_kernels import (
    FMAP_PERFORMER,
    flurka_rows_bwd_kernel,
    flurka_rows_fwd_kernel,
    flurka_state_kernel,
)
from .triton_tuning import interpreting

PERFORMER = FMAP_PERFORMER.value  # the performer's triton_code (kernels/registry.py)


def causal_chunk() -> int:
    """Chunk length of the causal prefix sum (the result does not depend on it)."""
    return 16 if interpreting() else 64


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_dtype(dtype: torch.dtype):
    """Dot operand dtype: the input dtype; fp32 for bf16 under the interpreter, whose bf16
    tl.dot returns garbage (Triton 3.6 with numpy 2.x)."""
    if dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    return tl.float16 if dtype == torch.float16 else tl.float32


def block_k(dh: int) -> int:
    """Head-dim chunk BLOCK_K of the kernels: dh's next power of two (at least 16) up to 128,
    one chunk, the row tile kept in registers; 64 for wider heads (dh = 325: 6 chunks).
    FLURKA_TRITON_BLOCK_K (a power of two >= 16) overrides it for every dh (GPU sweeps; tests
    of the chunked path at small dh)."""
    env = os.environ.get("FLURKA_TRITON_BLOCK_K", "")
    if env:
        bk = int(env)
        if bk < 16 or bk & (bk - 1):
            raise ValueError(f"FLURKA_TRITON_BLOCK_K must be a power of two >= 16; got {bk}")
        return bk
    return max(16, triton.next_power_of_2(dh)) if dh <= 128 else 64


def _wide_buffers(x: Tensor, m: int, fmap: int, query: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dU, P, rs) for the performer's dx at dh > BLOCK_K: dU and (queries) P (BH, R, m) in
    the dot operand precision (fp32 for fp32 inputs, else the 16-bit input dtype; see
    ``triton_dx``), rs (BH, R) fp32; empty placeholders otherwise."""
    BH, R, dh = x.shape
    if fmap != PERFORMER or dh <= block_k(dh):
        e = x.new_empty(0, dtype=torch.float32)
        return e, e, e
    dt = torch.float32 if x.dtype == torch.float32 else x.dtype
    du = torch.empty(BH, R, m, device=x.device, dtype=dt)
    p = torch.empty_like(du) if query else du.new_empty(0)
    return du, p, torch.empty(BH, R, device=x.device, dtype=torch.float32)


def _launch_dx(bufs: tuple[Tensor, Tensor, Tensor], x: Tensor, w: Tensor, dx: Tensor, *,
               sqrt_s: float, query: bool) -> None:
    """dx = dU W chunk by chunk (``flurka_dx_kernel``) when the row kernel wrote dU (wide)."""
    du, p, rs = bufs
    if du.numel() == 0:
        return
    BH, R, dh = x.shape
    def grid(meta):
        return (triton.cdiv(dh, meta["BLOCK_K"]), triton.cdiv(R, meta["BLOCK_R"]), BH)

    flurka_dx_kernel[grid](du, p if query else du, rs, x, w, dx, R, sqrt_s, dh, du.shape[-1],
                           QUERY=query, PREC=_prec(x.dtype), DT=_dot_dtype(x.dtype))


def _consts(fmap: int, w: Tensor | None, dh: int, scale: float) -> tuple[int, float, float]:
    """(m, sqrt(scale), m^-1/2) for the feature map code."""
    if fmap == PERFORMER:
        m = int(w.shape[0])
        return m, scale**0.5, m**-0.5
    return dh, 1.0, 1.0


def launch_state(x: Tensor, y: Tensor, a: Tensor, b: Tensor, c: Tensor, w: Tensor, *,
                 fmap: int, m: int, sqrt_s: float, mfac: float, chunk: int | None = None,
                 ) -> tuple[Tensor, Tensor]:
    """S = sum_r phi(x_r)^T (a_r y_r), z = sum_r b_r phi(x_r), per chunk of rows.

    x (BH, L, dh), y (BH, L, dv), a/b/c (BH, L) fp32 -> S (BH, NC, m, dv), z (BH, NC, m) fp32
    with NC = cdiv(L, chunk) (one chunk when chunk is None)."""
    BH, L, dh = x.shape
    dv = y.shape[-1]
    chunk = chunk or max(L, 1)
    nc = triton.cdiv(L, chunk)
    S = torch.empty(BH, nc, m, dv, device=x.device, dtype=torch.float32)
    z = torch.empty(BH, nc, m, device=x.device, dtype=torch.float32)
    def grid(meta):
        return (BH * nc, triton.cdiv(m, meta["BLOCK_F"]), triton.cdiv(dv, meta["BLOCK_DV"]))

    flurka_state_kernel[grid](
        x, y, a, b, c, w, S, z, L, chunk, nc, sqrt_s, mfac, dh, dv, m,
        FMAP=fmap, PREC=_prec(x.dtype), DT=_dot_dtype(x.dtype), BLOCK_K=block_k(dh))
    return S, z


def launch_rows_fwd(x: Tensor, S: Tensor, z: Tensor, w: Tensor, a: Tensor, c: Tensor,
                    out: Tensor, den: Tensor, *, mode: int, fmap: int, m: int, sqrt_s: float,
                    mfac: float, eps: float, cf: Tensor | None = None) -> None:
    """Run flurka_rows_fwd_kernel (see its docstring for the modes) on x (BH, R, dh); cf
    (BH, m): per-feature log scales of S, z (FSCALE, the fused low-rank state)."""
    BH, R, dh = x.shape
    dv = S.shape[-1]
    def grid(meta):
        return (BH, triton.cdiv(R, meta["BLOCK_R"]), triton.cdiv(dv, meta["BLOCK_DV"]))

    flurka_rows_fwd_kernel[grid](
        x, S, z, w, a, c, out, den, z if cf is None else cf, R, sqrt_s, mfac, eps, dh, dv, m,
        FMAP=fmap, MODE=mode, PREC=_prec(x.dtype), DT=_dot_dtype(x.dtype),
        FSCALE=cf is not None, BLOCK_K=block_k(dh))


def launch_rows_bwd(x: Tensor, g: Tensor, a: Tensor, beta: Tensor, c: Tensor, T: Tensor,
                    tz: Tensor, w: Tensor, *, fmap: int, m: int, sqrt_s: float, mfac: float,
                    query: bool) -> Tensor:
    """dx (BH, R, dh) of sum_f phi(x)_f (a (g . T_f) + beta t_f); x (BH, R, dh), g (BH, R, dv)."""
    BH, R, dh = x.shape
    dv = g.shape[-1]
    dx = torch.empty_like(x)
    bufs = _wide_buffers(x, m, fmap, query)
    grid = lambda meta: (BH, triton.cdiv(R, meta["BLOCK_R"]))  # noqa: E731
    flurka_rows_bwd_kernel[grid](
        x, g, a, beta, c, T, tz, w, dx, *bufs, R, sqrt_s, mfac, dh, dv, m,
        FMAP=fmap, PREC=_prec(x.dtype), DT=_dot_dtype(x.dtype), QUERY=query,
        BLOCK_K=block_k(dh))
    _launch_dx(bufs, x, w, dx, sqrt_s=sqrt_s, query=query)
    return dx


def key_stabilizer(ls: Tensor, maskf: Tensor) -> Tensor:
    """Performer key stabilizer of the non-causal path from the keys' own row maxima ls
    (BH, M): one max over the real keys of each (batch, kv-head), repeated per real key row:
    (BH, M) fp32. Padded rows keep their own row max (their phi is multiplied by 0 and must
    stay finite); all keys padded: 0."""
    BH, M = ls.shape
    keep = maskf > 0
    cmax = ls.masked_fill(~keep, float("-inf")).amax(-1, keepdim=True)  # (BH, 1)
    cmax = torch.where(torch.isfinite(cmax), cmax, torch.zeros_like(cmax))
    return torch.where(keep, cmax.expand(BH, M), ls).contiguous()


def _views(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None):
    B, H, N, dh = q.shape
    Hkv, M, dv = k.shape[1], k.shape[2], v.shape[-1]
    BH, G = B * Hkv, H // Hkv
    q3 = q.contiguous().view(BH, G * N, dh)
    k3 = k.contiguous().view(BH, M, dh)
    v3 = v.contiguous().view(BH, M, dv)
    if mask is None:
        maskf = torch.ones(BH, M, device=q.device, dtype=torch.float32)
    else:
        maskf = mask.to(torch.float32)[:, None, :].expand(B, Hkv, M).reshape(BH, M).contiguous()
    return q3, k3, v3, maskf


def core_forward(q: Tensor, k: Tensor, v: Tensor, w: Tensor | None, mask: Tensor | None,
                 fmap: int, scale: float, causal: bool, eps: float):
    """Fused forward. Returns out (B, H, N, dv) in q's dtype and, for the backward, the query
    stabilizer c_q and denominator den (BH, G*N), the key stabilizer rows c_k (BH, M) and the
    state S (BH, NC, m, dv), z (BH, NC, m) (NC = 1 non-causal; causal: exclusive prefixes)."""
    B, H, N, dh = q.shape
    dv = v.shape[-1]
    q3, k3, v3, maskf = _views(q, k, v, mask)
    BH, M = k3.shape[0], k3.shape[1]
    wt = w.contiguous().float() if w is not None else q.new_empty(0, dtype=torch.float32)
    m, sqrt_s, mfac = _consts(fmap, w, dh, scale)
    if fmap == PERFORMER:  # causal: each key's own max; non-causal: one shared max
        ck = _key_row_max(k3, wt, m=m, sqrt_s=sqrt_s)
        ck = ck if causal else key_stabilizer(ck, maskf)
    else:
        ck = torch.zeros(BH, M, device=q.device, dtype=torch.float32)
    R = q3.shape[1]
    out = torch.empty(BH, R, dv, device=q.device, dtype=q.dtype)
    cq = torch.zeros(BH, R, device=q.device, dtype=torch.float32)
    den = torch.empty(BH, R, device=q.device, dtype=torch.float32)
    if not causal:
        S, z = launch_state(k3, v3, maskf, maskf, ck, wt, fmap=fmap, m=m, sqrt_s=sqrt_s,
                            mfac=mfac)
        launch_rows_fwd(q3, S, z, wt, maskf, cq, out, den, mode=0, fmap=fmap, m=m,
                        sqrt_s=sqrt_s, mfac=mfac, eps=eps)
        return out.view(B, H, N, dv), cq, den, ck, S, z
    C = causal_chunk()
    nc = triton.cdiv(N, C)
    ci, e_end, crow, ep = ck, None, ck, ck.new_zeros(BH, nc)
    if fmap == PERFORMER:
        ci, e_end, crow, ep = _causal_scales(ck, maskf, C)
    Sc, zc = launch_state(k3, v3, maskf, maskf, crow, wt, fmap=fmap, m=m, sqrt_s=sqrt_s,
                          mfac=mfac, chunk=C)
    S, z = _exclusive_scan(Sc, zc, e_end)
    G = H // k.shape[1]
    grid = lambda meta: (BH, G * nc, triton.cdiv(dv, meta["BLOCK_DV"]))  # noqa: E731
    flurka_causal_fwd_kernel[grid](
        q3, k3, v3, maskf, ck, ci, ep, S, z, wt, out, cq, den, N, nc, sqrt_s, mfac, eps,
        dh, dv, m, FMAP=fmap, PREC=_prec(q.dtype), DT=_dot_dtype(q.dtype), CHUNK=C,
        BLOCK_K=block_k(dh))
    return out.view(B, H, N, dv), cq, den, ck, S, z


def _key_row_max(k3: Tensor, w: Tensor, *, m: int, sqrt_s: float) -> Tensor:
    """Performer: each key's own row max of u, ls (BH, N) fp32 (its causal stabilizer)."""
    ls = torch.empty(k3.shape[0], k3.shape[1], device=k3.device, dtype=torch.float32)
    launch_rows_fwd(k3, ls.new_zeros(1, 1, 1), ls.new_empty(0), w, ls.new_empty(0), ls,
                    ls.new_empty(0), ls.new_empty(0), mode=2, fmap=PERFORMER, m=m,
                    sqrt_s=sqrt_s, mfac=1.0, eps=0.0)
    return ls


def _causal_scales(ls: Tensor, maskf: Tensor, C: int):
    """Performer stabilizers of the causal path from the keys' own row maxima ls (BH, N), all
    (log) scales: ci (BH, N) the running max of ls over real keys (-1e30 before the first),
    e_end (BH, NC) the running max at the end of each chunk, the scale of that chunk's state,
    crow (BH, N) the scale at which each key enters its chunk's state (e_end of its chunk; its
    own ls for padded keys), and ep (BH, NC) the scale of the exclusive state of each chunk
    (e_end of the chunk before; -1e30 for the first)."""
    N = ls.shape[1]
    keep = maskf > 0
    ci = torch.cummax(torch.where(keep, ls, torch.full_like(ls, -1e30)), -1).values
    ends = torch.arange(C - 1, N + C - 1, C, device=ls.device).clamp_max(N - 1)
    e_end = ci[:, ends].contiguous()  # (BH, NC): scale of each chunk's state
    crow = e_end.repeat_interleave(C, 1)[:, :N]
    crow = torch.where(keep, crow, ls).contiguous()  # padded keys: own max, finite phi
    ep = torch.cat([torch.full_like(e_end[:, :1], -1e30), e_end[:, :-1]], 1).contiguous()
    return ci.contiguous(), e_end, crow, ep


def _exclusive_scan(Sc: Tensor, zc: Tensor, e: Tensor | None) -> tuple[Tensor, Tensor]:
    """Exclusive prefix sums over chunks, (BH, NC, m, dv) and (BH, NC, m), in fp32. With
    scales e (BH, NC) (the scale of chunk t's state, nondecreasing), chunk t' < t is rescaled by
    exp(e_t' - e_t) <= 1 (a log-depth scan); the result for chunk t is at scale e_{t-1}.
    Summing forward (no cumsum(S) - S) avoids cancellation."""
    S, z = Sc, zc
    nc = Sc.shape[1]
    step = 1
    while step < nc:
        if e is None:
            S = torch.cat([S[:, :step], S[:, step:] + S[:, :-step]], 1)
            z = torch.cat([z[:, :step], z[:, step:] + z[:, :-step]], 1)
        else:
            f = torch.exp(e[:, :-step] - e[:, step:])  # (BH, NC - step), <= 1
            S = torch.cat([S[:, :step], S[:, step:] + S[:, :-step] * f[..., None, None]], 1)
            z = torch.cat([z[:, :step], z[:, step:] + z[:, :-step] * f[..., None]], 1)
        step *= 2
    S = torch.cat([torch.zeros_like(S[:, :1]), S[:, :-1]], 1).contiguous()
    z = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1]], 1).contiguous()
    return S, z


def noncausal_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Tensor | None,
                       mask: Tensor | None, out: Tensor, cq: Tensor, den: Tensor, ck: Tensor,
                       S: Tensor, z: Tensor, fmap: int, scale: float):
    """Gradients (dq, dk, dv) of the non-causal core, shapes of q, k, v.

    With gn = dO/den and gd = -(dO.O)/den: dS = phi(Q)^T gn, dz = phi(Q)^T gd (summed over the
    G query heads of a kv-head), dphi(Q) = gn S^T + gd z^T, dphi(K) = mask (V dS^T + dz^T),
    dV = mask phi(K) dS; dphi is then taken through the feature map in the row kernels."""
    B, H, N, dh = q.shape
    dv = v.shape[-1]
    q3, k3, v3, maskf = _views(q, k, v, mask)
    BH, R = q3.shape[0], q3.shape[1]
    do3 = dout.contiguous().view(BH, R, dv).to(q.dtype)
    o3 = out.contiguous().view(BH, R, dv)
    wt = w.contiguous().float() if w is not None else q.new_empty(0, dtype=torch.float32)
    m, sqrt_s, mfac = _consts(fmap, w, dh, scale)
    delta = (do3.float() * o3.float()).sum(-1)  # (BH, R)
    # a row whose keys are all padding has out = 0 / eps and no gradient path: drop it
    # (a = 1/eps would overflow a 16-bit dot operand), as in causal_backward
    seen = (maskf.amax(-1, keepdim=True) > 0).expand(BH, R)
    aq = torch.where(seen, 1.0 / den, 0.0).contiguous()
    bq = torch.where(seen, -delta / den, 0.0).contiguous()
    S, z = S.view(BH, m, dv), z.view(BH, m)
    # phi(q) carries no m^-1/2 (performer: a softmax over features, cq its log-sum-exp)
    dS, dz = launch_state(q3, do3, aq, bq, cq, wt, fmap=fmap, m=m, sqrt_s=sqrt_s, mfac=1.0)
    dS, dz = dS.view(BH, m, dv), dz.view(BH, m)
    dq = launch_rows_bwd(q3, do3, aq, bq, cq, S, z, wt, fmap=fmap, m=m, sqrt_s=sqrt_s, mfac=1.0,
                         query=True)
    dk = launch_rows_bwd(k3, v3, maskf, maskf, ck, dS, dz, wt, fmap=fmap, m=m, sqrt_s=sqrt_s,
                         mfac=mfac, query=False)
    dvv = torch.empty_like(v3)
    launch_rows_fwd(k3, dS, dz, wt, maskf, ck, dvv, den.new_empty(0), mode=1, fmap=fmap, m=m,
                    sqrt_s=sqrt_s, mfac=mfac, eps=0.0)
    return dq.view(q.shape), dk.view(k.shape), dvv.view(v.shape)


def _reverse_exclusive_scan(Dc: Tensor, dc: Tensor, ep: Tensor | None) -> tuple[Tensor, Tensor]:
    """Exclusive suffix sums over chunks, R_t = sum_{t' > t} D_t', in fp32.

    Dc (BH, NC, m, dv), dc (BH, NC, m). With scales ep (BH, NC), nondecreasing, chunk t' holds
    its queries' terms times exp(ep_t' - c_i) (<= 1); chunk t' > t is rescaled by
    exp(ep_{t+1} - ep_t') <= 1, so R_t comes out at scale ep_{t+1}, the running max at the end
    of chunk t. This is ``_exclusive_scan`` on the reversed chunks with scales -ep (which are
    nondecreasing there)."""
    e = None if ep is None else (-ep).flip(1)
    R, r = _exclusive_scan(Dc.flip(1), dc.flip(1), e)
    return R.flip(1).contiguous(), r.flip(1).contiguous()


def causal_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Tensor | None,
                    mask: Tensor | None, out: Tensor, cq: Tensor, den: Tensor, ck: Tensor,
                    S: Tensor, z: Tensor, fmap: int, scale: float,
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of the causal core, shapes and dtypes of q, k, v.

    Reuses the forward's out, cq, den, ck (performer: the keys' own stabilizers ls) and the
    exclusive prefix states S, z. With a = 1/den, b = -(dO . O)/den per query: the suffix
    states R = sum_{later chunks} phi(Q)^T (a dO), r = phi(Q)^T b (``flurka_state_kernel`` per
    chunk of each query head, summed over the G heads, then a reverse scan), then one kernel
    each for dq, dk, dv (intra-chunk C x C products + the states). Extra memory: the per-head
    chunk states, O(G * N/C * m * dv) fp32; never N x N."""
    B, H, N, dh = q.shape
    dv = v.shape[-1]
    q3, k3, v3, maskf = _views(q, k, v, mask)
    BH, R = q3.shape[0], q3.shape[1]
    G = R // N
    do3 = dout.contiguous().view(BH, R, dv).to(q.dtype)
    o3 = out.contiguous().view(BH, R, dv)
    wt = w.contiguous().float() if w is not None else q.new_empty(0, dtype=torch.float32)
    m, sqrt_s, mfac = _consts(fmap, w, dh, scale)
    delta = (do3.float() * o3.float()).sum(-1)  # (BH, G*N)
    # a query with no real key at or before it has out = 0 / eps and no gradient path: drop
    # it (a = 1/eps would overflow a 16-bit dot operand)
    seen = (torch.cummax(maskf, -1).values > 0).repeat(1, G)  # (BH, G*N)
    aq = torch.where(seen, 1.0 / den, 0.0).contiguous()
    bq = torch.where(seen, -delta / den, 0.0).contiguous()
    C = causal_chunk()
    nc = triton.cdiv(N, C)
    if fmap == PERFORMER:
        ci, e_end, _, ep = _causal_scales(ck, maskf, C)
        # query i enters its chunk's suffix state at scale ep of the chunk: exp(ep - c_i) <= 1
        erow = torch.exp(ep.repeat_interleave(C, 1)[:, :N] - ci)  # (BH, N)
        a_s = (aq.view(BH, G, N) * erow[:, None]).view(BH * G, N)
        b_s = (bq.view(BH, G, N) * erow[:, None]).view(BH * G, N)
        scan_scale = ep
    else:
        ci, e_end, ep = ck, ck.new_zeros(BH, nc), ck.new_zeros(BH, nc)
        a_s, b_s, scan_scale = aq.view(BH * G, N), bq.view(BH * G, N), None
    # each query head's rows are one contiguous (N, .) slab of the (BH, G*N, .) layout
    Dc, dc = launch_state(q3.view(BH * G, N, dh), do3.view(BH * G, N, dv), a_s, b_s,
                          cq.view(BH * G, N), wt, fmap=fmap, m=m, sqrt_s=sqrt_s, mfac=1.0,
                          chunk=C)
    Dc = Dc.view(BH, G, nc, m, dv).sum(1)
    dc = dc.view(BH, G, nc, m).sum(1)
    Rs, rz = _reverse_exclusive_scan(Dc, dc, scan_scale)
    prec, dt, bk = _prec(q.dtype), _dot_dtype(q.dtype), block_k(dh)
    dq = torch.empty_like(q3)
    qbufs = _wide_buffers(q3, m, fmap, query=True)
    flurka_causal_bwd_q_kernel[(BH, G * nc)](
        q3, k3, v3, do3, maskf, ck, ci, ep, cq, aq, bq, S, z, wt, dq, *qbufs, N, nc, sqrt_s,
        mfac, dh, dv, m, FMAP=fmap, PREC=prec, DT=dt, CHUNK=C, BLOCK_K=bk)
    _launch_dx(qbufs, q3, wt, dq, sqrt_s=sqrt_s, query=True)
    dk = torch.empty_like(k3)
    du, _, rs = _wide_buffers(k3, m, fmap, query=False)
    flurka_causal_bwd_k_kernel[(BH, nc)](
        q3, k3, v3, do3, maskf, ck, ci, e_end, cq, aq, bq, Rs, rz, wt, dk, du, rs, N, nc, G,
        sqrt_s, mfac, dh, dv, m, FMAP=fmap, PREC=prec, DT=dt, CHUNK=C, BLOCK_K=bk)
    _launch_dx((du, du, rs), k3, wt, dk, sqrt_s=sqrt_s, query=False)
    dvv = torch.empty_like(v3)
    grid = lambda meta: (BH, nc, triton.cdiv(dv, meta["BLOCK_DV"]))  # noqa: E731
    flurka_causal_bwd_v_kernel[grid](
        q3, k3, do3, maskf, ck, ci, e_end, cq, aq, Rs, wt, dvv, N, nc, G, sqrt_s, mfac,
        dh, dv, m, FMAP=fmap, PREC=prec, DT=dt, CHUNK=C, BLOCK_K=bk)
    return dq.view(q.shape), dk.view(k.shape), dvv.view(v.shape)
