"""Host side of the fused low-rank FLuRKA core (``triton_lowrank``): forward, backward and the
PyTorch reference of the same op (its CPU implementation outside the interpreter).

Forward, two launches: ``flurka_lowrank_state_kernel`` (K~ = E K, V~ = F V, phi(K~), S and z
with a per-feature online stabiliser) and ``flurka_rows_fwd_kernel`` (MODE 0, FSCALE: phi(Q)
on the fly, the per-feature scales folded in). Apart from allocations, the only PyTorch glue is
the fp32 casts of the key and row masks.

Backward, a documented decomposition (no new kernel): with the saved K~, V~ (BH, dk, d) the
core after the projection is the non-causal core on dk keys, so
``triton_launch.noncausal_backward`` (state kernel for dS, dz; row kernels for dQ, dK~, dV~)
gives dq, dK~ and dV~, the state first put on the common scale c* (S_f exp(c_f - c*)) and the
key stabiliser of row r set to c* (real rows) or 0 (empty rows: K~_r = 0, so u = 0). Then the
projection, by the chain rule through K~ = E[:, :M] (mu . K) (mu the key mask, rho the rows):

  dK = mu . (E[:, :M]^T dK~)    dV = mu . (F[:, :M]^T dV~)
  dE[:, :M] = sum_{b,h} dK~ (mu . K)^T    dF[:, :M] = sum_{b,h} dV~ (mu . V)^T

four dense fp32 GEMMs in PyTorch (columns >= M of dE, dF are 0; the support mask of a pool E
is applied by autograd through ``FlurkaAttention._proj``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F_
import triton
from torch import Tensor

from .reference import attention_core, lowrank_project
from .triton_launch import (
    PERFORMER,
    _consts,
    _dot_dtype,
    _prec,
    block_k,
    launch_rows_fwd,
    noncausal_backward,
)
from .triton_lowrank import flurka_lowrank_state_kernel


def support_columns(support: Tensor) -> Tensor:
    """(dk, 2) int32 [lo, hi): the columns outside which row r of ``support`` (dk, M_max) is
    zero ([0, 0) for an empty row); the band the fused kernel loops over."""
    nz = support != 0
    cols = torch.arange(nz.shape[1], device=nz.device)
    lo = torch.where(nz, cols, nz.shape[1]).amin(1)
    hi = torch.where(nz, cols + 1, 0).amax(1)
    lo = torch.where(hi > 0, lo, 0)
    return torch.stack([lo, hi], 1).to(torch.int32).contiguous()


def _masks(k: Tensor, E: Tensor, mask: Tensor | None, rows: Tensor | None):
    """Key mask (B, M) and row mask (B, dk) as fp32 (ones where None)."""
    B, M, dk = k.shape[0], k.shape[2], E.shape[0]
    mk = (torch.ones(B, M, device=k.device) if mask is None
          else mask.to(torch.float32).expand(B, M).contiguous())
    rw = (torch.ones(B, dk, device=k.device) if rows is None
          else rows.to(torch.float32).expand(B, dk).contiguous())
    return mk, rw


def lowrank_forward(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, w: Tensor | None,
                    mask: Tensor | None, rows: Tensor | None, cols: Tensor, fmap: int,
                    scale: float, eps: float):
    """Fused forward: (out (B, H, N, dv), cq, den (BH, G*N), K~ (B, Hkv, dk, dh), V~ (B, Hkv,
    dk, dv), S (BH, m, dv), z (BH, m), cf (BH, m)); S, z at the per-feature scales cf
    (performer; zeros otherwise). q, k, v share a dtype; E, F (dk, M_max), M_max >= M."""
    B, H, N, dh = q.shape
    Hkv, M, dv = k.shape[1], k.shape[2], v.shape[-1]
    dk, BH, R = E.shape[0], B * Hkv, (H // Hkv) * N
    q3 = q.contiguous().view(BH, R, dh)
    k3, v3 = k.contiguous().view(BH, M, dh), v.contiguous().view(BH, M, dv)
    Ec, Fc = E.contiguous(), F.contiguous()
    mk, rw = _masks(k, E, mask, rows)
    wt = w.contiguous().float() if w is not None else q.new_empty(0, dtype=torch.float32)
    m, sqrt_s, mfac = _consts(fmap, w, dh, scale)
    f32 = dict(device=q.device, dtype=torch.float32)
    S, z, cf = torch.empty(BH, m, dv, **f32), torch.empty(BH, m, **f32), torch.empty(BH, m, **f32)
    kt = torch.empty(BH, dk, dh, device=q.device, dtype=k.dtype)
    vt = torch.empty(BH, dk, dv, device=q.device, dtype=v.dtype)

    def grid(meta):
        return (BH, triton.cdiv(m, meta["BLOCK_F"]), triton.cdiv(dv, meta["BLOCK_DV"]))

    flurka_lowrank_state_kernel[grid](
        k3, v3, Ec, Fc, mk, rw, cols, wt, S, z, cf, kt, vt, M, Ec.shape[1], Hkv, sqrt_s, mfac,
        dk, dh, dv, m, FMAP=fmap, PREC=_prec(k.dtype), PREC_E=_prec(k.dtype),
        DT=_dot_dtype(k.dtype), BLOCK_K=block_k(dh))
    out = torch.empty(BH, R, dv, device=q.device, dtype=q.dtype)
    cq = torch.zeros(BH, R, **f32) if fmap != PERFORMER else torch.empty(BH, R, **f32)
    den = torch.empty(BH, R, **f32)
    launch_rows_fwd(q3, S, z, wt, cq, cq, out, den, mode=0, fmap=fmap, m=m, sqrt_s=sqrt_s,
                    mfac=mfac, eps=eps, cf=cf if fmap == PERFORMER else None)
    return (out.view(B, H, N, dv), cq, den, kt.view(B, Hkv, dk, dh), vt.view(B, Hkv, dk, dv),
            S, z, cf)


def lowrank_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor,
                     w: Tensor | None, mask: Tensor | None, rows: Tensor | None, out: Tensor,
                     cq: Tensor, den: Tensor, kt: Tensor, vt: Tensor, S: Tensor, z: Tensor,
                     cf: Tensor, fmap: int, scale: float):
    """(dq, dk, dv, dE, dF) of the fused forward (module docstring: the decomposition)."""
    Hkv, M = k.shape[1], k.shape[2]
    mk, rw = _masks(k, E, mask, rows)
    rwb = rw.repeat_interleave(Hkv, 0)  # (BH, dk)
    if fmap == PERFORMER:
        cstar = cf.amax(-1, keepdim=True)  # (BH, 1)
        fs = torch.exp(cf - cstar)
        S, z = S * fs[..., None], z * fs
        ck = torch.where(rwb > 0, cstar, 0.0).contiguous()
    else:
        ck = torch.zeros_like(rwb)
    rows_b = rw > 0
    dq, dkt, dvt = noncausal_backward(dout, q, kt, vt, w, rows_b, out, cq, den, ck, S, z,
                                      fmap, scale)
    keep = (mk > 0)[:, None, :, None]  # (B, 1, M, 1)
    kf = torch.where(keep, k.float(), 0.0)
    vf = torch.where(keep, v.float(), 0.0)
    EM, FM = E[:, :M].float(), F[:, :M].float()
    dkt, dvt = dkt.float(), dvt.float()
    dK = torch.where(keep, EM.t() @ dkt, 0.0).to(k.dtype)
    dV = torch.where(keep, FM.t() @ dvt, 0.0).to(v.dtype)
    pad = E.shape[1] - M
    dE = F_.pad(torch.einsum("bhrd,bhjd->rj", dkt, kf), (0, pad)).to(E.dtype)
    dF = F_.pad(torch.einsum("bhrd,bhjd->rj", dvt, vf), (0, pad)).to(F.dtype)
    return dq, dK, dV, dE, dF


def lowrank_reference(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, mask: Tensor | None,
                      rows: Tensor | None, feature_map: torch.nn.Module, eps: float) -> Tensor:
    """The same op in plain PyTorch (``FlurkaAttention``'s unfused path): low-rank projection,
    then ``reference.attention_core`` over the dk keys with the row mask."""
    kt = lowrank_project(k, E, mask)
    vt = lowrank_project(v, F, mask)
    return attention_core(q, kt, vt, feature_map=feature_map, key_padding_mask=rows, eps=eps)
