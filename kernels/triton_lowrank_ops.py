"""The fused low-rank core as custom ops (kernels/triton_lowrank.py: the projection K~ = E K,
V~ = F V, the feature map and the state in one kernel): the ops ``flurka_core_fwd_lowrank`` /
``flurka_core_bwd_lowrank`` with their fake shapes and CPU kernels, one autograd Function, and
the entry point ``triton_lowrank_core`` that ``dispatch.fused_lowrank_dispatch`` calls.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .feature_maps import FeatureMap
from .triton_launch import PERFORMER
from .triton_lowrank_launch import lowrank_backward, lowrank_forward, lowrank_reference
from . import triton_ops  # cpu_runs_triton read at call time (tests patch it)
from .triton_ops import IN_KERNEL_CODES, _check, broadcast_key_mask, reference_map


# -- fused low-rank core (kernels/triton_lowrank.py) ---------------------------------------
# The projection K~ = E K, V~ = F V and the core in one op: "_lowrank" ops next to the core's.
@torch.library.custom_op("flurka_rewrite::flurka_core_fwd_lowrank", mutates_args=())
def flurka_core_fwd_lowrank(
    q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, w: Tensor | None, mask: Tensor | None,
    rows: Tensor | None, cols: Tensor, fmap: int, scale: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, c_q, den, K~, V~, S, z, c_f); see ``triton_lowrank_launch.lowrank_forward``."""
    return lowrank_forward(q, k, v, E, F, w, mask, rows, cols, fmap, scale, eps)


def _lowrank_shapes(q, k, v, E, w, fmap):
    B, H, N, dh = q.shape
    Hkv, dv, dk = k.shape[1], v.shape[-1], E.shape[0]
    BH, R = B * Hkv, (H // Hkv) * N
    m = w.shape[0] if fmap == PERFORMER else dh
    f32 = torch.float32
    return [((B, H, N, dv), q.dtype), ((BH, R), f32), ((BH, R), f32), ((B, Hkv, dk, dh), k.dtype),
            ((B, Hkv, dk, dv), v.dtype), ((BH, m, dv), f32), ((BH, m), f32), ((BH, m), f32)]


@flurka_core_fwd_lowrank.register_fake
def _(q, k, v, E, F, w, mask, rows, cols, fmap, scale, eps):
    return tuple(q.new_empty(s, dtype=d) for s, d in _lowrank_shapes(q, k, v, E, w, fmap))


@flurka_core_fwd_lowrank.register_kernel("cpu")
def _(q, k, v, E, F, w, mask, rows, cols, fmap, scale, eps):
    if triton_ops.cpu_runs_triton():
        return lowrank_forward(q, k, v, E, F, w, mask, rows, cols, fmap, scale, eps)
    out = lowrank_reference(q, k, v, E, F, mask, rows, reference_map(fmap, w, scale, q.shape[-1]),
                            eps)
    rest = [q.new_zeros(s, dtype=d) for s, d in _lowrank_shapes(q, k, v, E, w, fmap)[1:]]
    return (out.to(q.dtype), *rest)


@torch.library.custom_op("flurka_rewrite::flurka_core_bwd_lowrank", mutates_args=())
def flurka_core_bwd_lowrank(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, w: Tensor | None,
    mask: Tensor | None, rows: Tensor | None, out: Tensor, cq: Tensor, den: Tensor, kt: Tensor,
    vt: Tensor, S: Tensor, z: Tensor, cf: Tensor, fmap: int, scale: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dE, dF); see ``triton_lowrank_launch.lowrank_backward``."""
    return lowrank_backward(dout, q, k, v, E, F, w, mask, rows, out, cq, den, kt, vt, S, z, cf,
                            fmap, scale)


@flurka_core_bwd_lowrank.register_fake
def _(dout, q, k, v, E, F, w, mask, rows, out, cq, den, kt, vt, S, z, cf, fmap, scale, eps):
    return tuple(torch.empty_like(t) for t in (q, k, v, E, F))


@flurka_core_bwd_lowrank.register_kernel("cpu")
def _(dout, q, k, v, E, F, w, mask, rows, out, cq, den, kt, vt, S, z, cf, fmap, scale, eps):
    if triton_ops.cpu_runs_triton():
        return lowrank_backward(dout, q, k, v, E, F, w, mask, rows, out, cq, den, kt, vt, S, z,
                                cf, fmap, scale)
    fm = reference_map(fmap, w, scale, q.shape[-1])

    def ref(*xs):  # torch.func.vjp, as flurka_core_bwd's CPU implementation
        return lowrank_reference(*xs, mask, rows, fm, eps)

    out_ref, pull = torch.func.vjp(ref, q, k, v, E, F)
    return pull(dout.to(out_ref.dtype))


class FlurkaLowrankCoreFunction(torch.autograd.Function):
    """Non-causal FLuRKA with the low-rank projection fused: gradients of q, k, v, E, F."""

    @staticmethod
    def forward(ctx, q, k, v, E, F, w, mask, rows, cols, fmap, scale, eps):  # type: ignore[override]
        res = torch.ops.flurka_rewrite.flurka_core_fwd_lowrank(
            q, k, v, E, F, w, mask, rows, cols, fmap, scale, eps)
        ctx.save_for_backward(q, k, v, E, F, w, mask, rows, *res)
        ctx.fmap, ctx.scale, ctx.eps = fmap, scale, eps
        ctx.mark_non_differentiable(*res[1:])
        return res

    @staticmethod
    def backward(ctx, dout, *_):  # type: ignore[override]
        q, k, v, E, F, w, mask, rows, out, cq, den, kt, vt, S, z, cf = ctx.saved_tensors
        grads = torch.ops.flurka_rewrite.flurka_core_bwd_lowrank(
            dout.contiguous(), q, k, v, E, F, w, mask, rows, out, cq, den, kt, vt, S, z, cf,
            ctx.fmap, ctx.scale, ctx.eps)
        return (*grads, None, None, None, None, None, None, None)


def triton_lowrank_core(
    q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, *, cols: Tensor,
    feature_map: FeatureMap, key_padding_mask: Tensor | None = None,
    row_mask: Tensor | None = None, eps: float = 1e-6,
) -> Tensor:
    """FLuRKA attention from the full-length keys, projection fused (``triton_lowrank``):
    equals ``reference.attention_core(q, E K, F V, key_padding_mask=row_mask)`` with K, V
    projected by ``lowrank_project`` under ``key_padding_mask``.

    q (B, H, N, dh), k (B, Hkv, M, dh), v (B, Hkv, M, dv), E, F (dk, M_max) (restricted to
    their support), cols (dk, 2) int32 (``support_columns``), key_padding_mask (B, M) and
    row_mask (B, dk) bool (True = real) -> (B, H, N, dv) in q's dtype. Maps with a
    ``triton_code`` (performer, relu, rnn) only."""
    code = getattr(feature_map, "triton_code", None)
    if code not in IN_KERNEL_CODES:
        raise NotImplementedError(f"the fused low-rank core needs an in-kernel feature map; "
                                  f"{getattr(feature_map, 'name', None)!r} has none")
    mask = broadcast_key_mask(key_padding_mask, q.shape[0], k.shape[2])
    _check(q, k, v, mask, False)
    mask = None if mask is None else mask.to(torch.bool).contiguous()
    w, scale = None, 1.0
    if code == PERFORMER:
        w, scale = feature_map.W.detach().to(q.device), float(feature_map.scale)
    k, v = k.to(q.dtype), v.to(q.dtype)
    out = FlurkaLowrankCoreFunction.apply(q, k, v, E, F, w, mask, row_mask, cols, code, scale,
                                          eps)[0]
    return out.to(q.dtype)


__all__ = ["triton_lowrank_core", "FlurkaLowrankCoreFunction", "flurka_core_fwd_lowrank",
           "flurka_core_bwd_lowrank"]
