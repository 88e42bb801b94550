"""The sliding-window hybrid on Triton: launchers, custom ops, autograd, and the entry point
``triton_window_attention`` (same arguments and result as ``window.window_attention``).

Split: the kernel part (far keys, or the dk down-sampled keys of a low-rank site) runs in
PyTorch, ``window.window_kernel_part``: the reference's own code, so its states, shift b and
per-map details are shared, and autograd carries its gradients to q, k, v, theta and the
map's weights. The exact band and the one normaliser run in Triton (``triton_window``): ops
``flurka_rewrite::window_band_fwd`` -> (out, lse) and ``window_band_bwd`` -> (dq, dk, dv,
dnum, dden, dlam), one ``torch.autograd.Function``. Backward, FlashAttention-2 style, from the
saved lse (no band recomputation of the forward's max/sum): with delta_i = dO_i . O_i and
w_i = exp(lam_i - lse_i), the band's dq, dk, dv come from the kernels and the kernel part's
inputs get dnum = w dO, dden = -w delta, dlam = w (dO . num - delta den) (PyTorch, O(N dv)).
CPU tensors: under TRITON_INTERPRET=1 the ops interpret the kernels; otherwise they compute
the same with ``band_reference`` (chunked PyTorch, O(N w)), so a compiled or exported graph
holding them runs on a CPU (as ``triton_ops``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from .feature_maps import FeatureMap
from .triton_launch import _dot_dtype, _prec
from .triton_ops import broadcast_key_mask
from .triton_tuning import interpreting
from .triton_window import window_dkdv_kernel, window_dq_kernel, window_fwd_kernel
from .window import (
    _bands,
    _group,
    check_window_args,
    window_chunk,
    window_kernel_part,
    window_reach,
)

_TINY = torch.finfo(torch.float32).tiny


def window_blocks() -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the band kernels: 16 x 16 under the interpreter (the
    tests' short sequences span several blocks), 64 x 64 with 4 warps on a GPU (not yet tuned
    or measured: docs/benchmarks.md)."""
    return (16, 16, 1) if interpreting() else (64, 64, 4)


def _meta(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, window: int, causal: bool,
          scale: float) -> tuple[tuple, dict]:
    """The kernels' shared runtime arguments and constexprs."""
    B, H, N, dh = q.shape
    G, dv = H // k.shape[1], v.shape[-1]
    bm, bn, warps = window_blocks()
    args = (N, H, G, window, window_reach(window, False), float(scale))
    meta = dict(dh=dh, dv=dv, CAUSAL=causal, HAS_MASK=mask is not None, PREC=_prec(q.dtype),
                DT=_dot_dtype(q.dtype), BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_D=max(16, triton.next_power_of_2(dh)),
                BLOCK_V=max(16, triton.next_power_of_2(dv)), num_warps=warps)
    return args, meta


def _maskf(q: Tensor, mask: Tensor | None) -> Tensor:
    """The key mask as fp32 1/0 (B, N), or a 1-element placeholder when there is none."""
    return q.new_ones(1, dtype=torch.float32) if mask is None else mask.float().contiguous()


def band_forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, num: Tensor, den: Tensor,
                 lam: Tensor, window: int, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """(out (B, H, N, dv) in q's dtype, lse (B, H, N) fp32) from the Triton forward kernel."""
    B, H, N, _ = q.shape
    args, meta = _meta(q, k, v, mask, window, causal, scale)
    out = q.new_empty(B, H, N, v.shape[-1])
    lse = q.new_empty(B, H, N, dtype=torch.float32)
    grid = (triton.cdiv(N, meta["BLOCK_M"]), B * H)
    window_fwd_kernel[grid](q.contiguous(), k.contiguous(), v.contiguous(), _maskf(q, mask),
                            num.float().contiguous(), den.float().contiguous(),
                            lam.float().contiguous(), out, lse, *args, **meta)
    return out, lse


def kernel_part_grads(dout: Tensor, out: Tensor, lse: Tensor, num: Tensor, den: Tensor,
                      lam: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(delta, dnum, dden, dlam), fp32: delta_i = dO_i . O_i and the gradients of the kernel
    part's inputs, w_i = exp(lam_i - lse_i) their weight in O_i (module docstring)."""
    g = dout.float()
    delta = (g * out.float()).sum(-1)
    w = torch.exp(lam.float() - lse)
    return delta, g * w[..., None], -w * delta, w * ((g * num.float()).sum(-1) - delta * den)


def band_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                  out: Tensor, lse: Tensor, num: Tensor, den: Tensor, lam: Tensor, window: int,
                  scale: float, causal: bool) -> tuple[Tensor, ...]:
    """(dq, dk, dv, dnum, dden, dlam): the band's from the Triton kernels, the kernel part's
    inputs' from ``kernel_part_grads``."""
    B, H, N, _ = q.shape
    delta, dnum, dden, dlam = (t.contiguous() for t in
                               kernel_part_grads(dout, out, lse, num, den, lam))
    args, meta = _meta(q, k, v, mask, window, causal, scale)
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous()
    maskf, delta = _maskf(q, mask), delta.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    window_dq_kernel[(triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, maskf, dout, lse, delta, dq, *args, **meta)
    window_dkdv_kernel[(triton.cdiv(N, meta["BLOCK_N"]), B * k.shape[1])](
        q, k, v, maskf, dout, lse, delta, dk, dv, *args, **meta)
    return dq, dk, dv, dnum, dden, dlam


def band_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, num: Tensor,
                   den: Tensor, lam: Tensor, window: int, scale: float, causal: bool
                   ) -> tuple[Tensor, Tensor]:
    """What ``band_forward`` computes, in PyTorch (``window_attention``'s chunked bands, fp32):
    the CPU implementation of the op outside the interpreter."""
    B, H, N, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    G, reach = H // hkv, window_reach(window, causal)
    C = window_chunk(window, causal)
    P = 1 if causal else 2
    nc = (N + C - 1) // C
    pad = nc * C - N
    front, back = C, pad + (0 if causal else C)
    real = torch.ones(B, N, device=q.device) if mask is None else mask.float()
    kb = _bands(F.pad(k.float(), (0, 0, front, back)), B, hkv, nc, C, P)
    vb = _bands(F.pad(v.float(), (0, 0, front, back)), B, hkv, nc, C, P)
    rb = _bands(F.pad(real, (front, back))[:, None, :, None], B, 1, nc, C, P)[..., 0] > 0
    s = _group(q.float() * scale, B, hkv, G, nc, C, pad) @ kb[:, :, None].transpose(-1, -2)
    a = torch.arange(C, device=q.device)
    d = torch.arange((P + 1) * C, device=q.device)[None, :] - C - a[:, None]
    in_win = (d > -window) & (d <= 0) if causal else d.abs() <= reach
    s = s.masked_fill(~(in_win & rb[:, :, None, :, None, :]), float("-inf"))
    numc = _group(num.float(), B, hkv, G, nc, C, pad)
    denc = _group(den.float()[..., None], B, hkv, G, nc, C, pad)[..., 0]
    lamc = _group(lam.float()[..., None], B, hkv, G, nc, C, pad)[..., 0]
    c = torch.maximum(s.amax(-1), lamc + torch.log(denc.clamp_min(_TINY))).detach()
    p, f = torch.exp(s - c[..., None]), torch.exp(lamc - c)
    tot = (p.sum(-1) + f * denc).clamp_min(_TINY)
    out = (p @ vb[:, :, None] + f[..., None] * numc) / tot[..., None]
    out = out.reshape(B, H, nc * C, dv)[:, :, :N].to(q.dtype).contiguous()
    return out, (c + torch.log(tot)).reshape(B, H, nc * C)[:, :, :N].contiguous()


# -- custom ops -----------------------------------------------------------------------------
@torch.library.custom_op("flurka_rewrite::window_band_fwd", mutates_args=())
def window_band_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, num: Tensor,
                    den: Tensor, lam: Tensor, window: int, scale: float, causal: bool
                    ) -> tuple[Tensor, Tensor]:
    """(out, lse); see ``band_forward``."""
    return band_forward(q, k, v, mask, num, den, lam, window, scale, causal)


@window_band_fwd.register_fake
def _(q, k, v, mask, num, den, lam, window, scale, causal):
    return (q.new_empty(*q.shape[:3], v.shape[-1]),
            q.new_empty(q.shape[:3], dtype=torch.float32))


@window_band_fwd.register_kernel("cpu")
def _(q, k, v, mask, num, den, lam, window, scale, causal):
    if cpu_runs_triton():
        return band_forward(q, k, v, mask, num, den, lam, window, scale, causal)
    return band_reference(q, k, v, mask, num, den, lam, window, scale, causal)


@torch.library.custom_op("flurka_rewrite::window_band_bwd", mutates_args=())
def window_band_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                    out: Tensor, lse: Tensor, num: Tensor, den: Tensor, lam: Tensor,
                    window: int, scale: float, causal: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dnum, dden, dlam); see ``band_backward``."""
    return band_backward(dout, q, k, v, mask, out, lse, num, den, lam, window, scale, causal)


@window_band_bwd.register_fake
def _(dout, q, k, v, mask, out, lse, num, den, lam, window, scale, causal):
    return tuple(t.new_empty(t.shape, dtype=d) for t, d in  # contiguous, as the kernels
                 ((q, q.dtype), (k, k.dtype), (v, v.dtype), (num, torch.float32),
                  (den, torch.float32), (lam, torch.float32)))


@window_band_bwd.register_kernel("cpu")
def _(dout, q, k, v, mask, out, lse, num, den, lam, window, scale, causal):
    if cpu_runs_triton():
        return band_backward(dout, q, k, v, mask, out, lse, num, den, lam, window, scale,
                             causal)

    def ref(*xs):  # torch.func.vjp: autograd proper is off inside an op's kernel
        return band_reference(xs[0], xs[1], xs[2], mask, *xs[3:], window, scale, causal)[0]

    _, pull = torch.func.vjp(ref, q, k, v, num.float(), den.float(), lam.float())
    return tuple(g.contiguous() for g in pull(dout.to(q.dtype)))


def cpu_runs_triton() -> bool:
    """True when the ops run the Triton kernels (interpreted) on CPU tensors."""
    return interpreting()


class WindowBandFunction(torch.autograd.Function):
    """The exact band plus the given kernel part under one normaliser (``triton_window``)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, num, den, lam, window, scale, causal):  # type: ignore[override]
        out, lse = torch.ops.flurka_rewrite.window_band_fwd(q, k, v, mask, num, den, lam,
                                                            window, scale, causal)
        ctx.save_for_backward(q, k, v, mask, out, lse, num, den, lam)
        ctx.window, ctx.scale, ctx.causal = window, scale, causal
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q, k, v, mask, out, lse, num, den, lam = ctx.saved_tensors
        dq, dk, dv, dnum, dden, dlam = torch.ops.flurka_rewrite.window_band_bwd(
            dout.contiguous(), q, k, v, mask, out, lse, num, den, lam, ctx.window, ctx.scale,
            ctx.causal)
        return dq, dk, dv, None, dnum, dden, dlam, None, None, None


# -- entry point ----------------------------------------------------------------------------
def triton_window_attention(
    q: Tensor, k: Tensor, v: Tensor, *, window: int, feature_map: FeatureMap | None,
    log_weight: Tensor, scale: float, causal: bool = False,
    key_padding_mask: Tensor | None = None, kernel_k: Tensor | None = None,
    kernel_v: Tensor | None = None, kernel_keep: Tensor | None = None,
) -> Tensor:
    """``window.window_attention`` with the exact band on Triton (module docstring); same
    arguments, same result, (B, H, N, dv) in q's dtype."""
    B, H, N, _ = q.shape
    check_window_args(N, k.shape[2], window, feature_map, kernel_k)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q must be fp32, fp16 or bf16; got {q.dtype}")
    if k.shape[0] != B or H % k.shape[1] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share (B, Hkv, N) "
                         f"with q's batch {B}, and Hkv must divide H={H}")
    mask = broadcast_key_mask(key_padding_mask, B, N)
    if mask is not None and tuple(mask.shape) != (B, N):
        raise ValueError(f"key_padding_mask must be (B, N) = {(B, N)}; got {tuple(mask.shape)}")
    mask = None if mask is None else mask.bool().contiguous()
    num, den, lam = window_kernel_part(
        q, k, v, window=window, feature_map=feature_map, log_weight=log_weight, scale=scale,
        causal=causal, key_padding_mask=mask, kernel_k=kernel_k, kernel_v=kernel_v,
        kernel_keep=kernel_keep)
    return WindowBandFunction.apply(q, k.to(q.dtype), v.to(q.dtype), mask, num, den, lam,
                                    window, float(scale), causal)[0]


__all__ = ["triton_window_attention", "WindowBandFunction", "window_band_fwd",
           "window_band_bwd", "band_reference"]
