"""FLuRKA attention core on Triton: custom ops, autograd, and the public entry point.

Layering (docs/style.md §7): kernels (``triton_kernels``, ``triton_causal``,
``triton_causal_bwd``) -> launchers (``triton_launch``) -> ``torch.library`` custom ops
``flurka_rewrite::flurka_core_fwd`` / ``flurka_core_bwd`` (with fake implementations, so
``torch.compile`` and ``torch.export`` see one opaque node) -> one ``torch.autograd.Function``
per kernel family (non-causal, causal) -> ``triton_attention_core``, which
``dispatch.attention_core_dispatch`` calls and which returns what ``reference.attention_core``
returns.

Feature maps: a map whose class declares a ``triton_code`` (performer, relu, rnn) is computed
inside the kernels (phi(Q) is never stored). A map without one (``triton_code = None``: ffk,
whose weights are trainable, or a newly registered map) has its phi(q), phi(k) computed by the
module in PyTorch, and the fused core then runs with the identity map, so autograd reaches
its weights.
Causal forward and backward: the Triton chunked prefix-sum kernels (``triton_causal``,
``triton_causal_bwd``; memory O(N/C * m * dv), never N x N).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .feature_maps import FEATURE_MAPS, FeatureMap
from .registry import TRITON_IDENTITY
from .triton_kernels import FMAP_ELU, FMAP_PERFORMER, FMAP_RELU
from .triton_launch import (
    PERFORMER,
    causal_backward,
    causal_chunk,
    core_forward,
    noncausal_backward,
)

_NO_FACTS = object()
# The registry's codes the kernels have a branch for (triton_kernels._phi / _dphi).
IN_KERNEL_CODES = frozenset(c.value for c in (FMAP_RELU, FMAP_ELU, FMAP_PERFORMER))


# -- custom ops -----------------------------------------------------------------------------
@torch.library.custom_op("flurka_rewrite::flurka_core_fwd", mutates_args=())
def flurka_core_fwd(
    q: Tensor, k: Tensor, v: Tensor, w: Tensor | None, mask: Tensor | None, fmap: int,
    scale: float, causal: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused forward: (out, c_q, den, c_k, S, z); see ``triton_launch.core_forward``."""
    return core_forward(q, k, v, w, mask, fmap, scale, causal, eps)


@flurka_core_fwd.register_fake
def _(q, k, v, w, mask, fmap, scale, causal, eps):
    B, H, N, dh = q.shape
    Hkv, M, dv = k.shape[1], k.shape[2], v.shape[-1]
    BH, R = B * Hkv, (H // Hkv) * N
    m = w.shape[0] if fmap == PERFORMER else dh
    nc = (N + causal_chunk() - 1) // causal_chunk() if causal else 1
    f32 = torch.float32
    return (q.new_empty(B, H, N, dv), q.new_empty(BH, R, dtype=f32), q.new_empty(BH, R, dtype=f32),
            q.new_empty(BH, M, dtype=f32), q.new_empty(BH, nc, m, dv, dtype=f32),
            q.new_empty(BH, nc, m, dtype=f32))


@torch.library.custom_op("flurka_rewrite::flurka_core_bwd", mutates_args=())
def flurka_core_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Tensor | None, mask: Tensor | None,
    out: Tensor, cq: Tensor, den: Tensor, ck: Tensor, S: Tensor, z: Tensor, fmap: int,
    scale: float, causal: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused backward of the core: (dq, dk, dv) in the dtypes of q, k, v; see
    ``triton_launch.noncausal_backward`` and ``triton_launch.causal_backward``."""
    if causal:
        return causal_backward(dout, q, k, v, w, mask, out, cq, den, ck, S, z, fmap, scale)
    return noncausal_backward(dout, q, k, v, w, mask, out, cq, den, ck, S, z, fmap, scale)


@flurka_core_bwd.register_fake
def _(dout, q, k, v, w, mask, out, cq, den, ck, S, z, fmap, scale, causal, eps):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# -- autograd -------------------------------------------------------------------------------
class _CoreFunction(torch.autograd.Function):
    """Shared forward/backward for the kernel families; subclasses fix ``causal``."""

    causal = False

    @classmethod
    def forward(cls, ctx, q, k, v, w, mask, fmap, scale, eps):  # type: ignore[override]
        out, cq, den, ck, S, z = torch.ops.flurka_rewrite.flurka_core_fwd(
            q, k, v, w, mask, fmap, scale, cls.causal, eps)
        ctx.save_for_backward(q, k, v, w, mask, out, cq, den, ck, S, z)
        ctx.fmap, ctx.scale, ctx.eps = fmap, scale, eps
        ctx.mark_non_differentiable(cq, den, ck, S, z)
        return out, cq, den, ck, S, z

    @classmethod
    def backward(cls, ctx, dout, *_):  # type: ignore[override]
        q, k, v, w, mask, out, cq, den, ck, S, z = ctx.saved_tensors
        dq, dk, dv = torch.ops.flurka_rewrite.flurka_core_bwd(
            dout.contiguous(), q, k, v, w, mask, out, cq, den, ck, S, z, ctx.fmap, ctx.scale,
            cls.causal, ctx.eps)
        return dq, dk, dv, None, None, None, None, None


class FlurkaCoreFunction(_CoreFunction):
    """Non-causal fused FLuRKA core: state kernel + on-the-fly phi(Q) output kernel."""

    causal = False


class FlurkaCausalCoreFunction(_CoreFunction):
    """Causal kernel attention: chunked prefix-sum kernel (inter-chunk state carry)."""

    causal = True


# -- entry point ----------------------------------------------------------------------------
def triton_attention_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: FeatureMap,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """Kernel attention after the low-rank projection, on Triton; equals
    ``reference.attention_core`` with the same arguments.

    q (B, H, N, dh), k (B, Hkv, M, dh), v (B, Hkv, M, dv), key_padding_mask (B, M) bool
    (True = real key) -> (B, H, N, dv) in q's dtype. Sums and states are fp32."""
    _check(q, k, v, key_padding_mask, causal)
    name = getattr(feature_map, "name", None)
    code = getattr(feature_map, "triton_code", _NO_FACTS)  # the map class's (registry.py)
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous()
    w, scale = None, 1.0
    if code is None and not (causal and getattr(feature_map, "causal_stabilized", False)):
        kmask = None if mask is None else mask[:, None, :, None]
        xq = feature_map(q, is_query=True)  # (B, H, N, m) fp32, autograd to the map's weights
        xk = feature_map(k, is_query=False, key_mask=kmask)  # (B, Hkv, M, m)
        fmap = TRITON_IDENTITY
    elif code in IN_KERNEL_CODES:
        xq, xk, fmap = q, k, code
        if fmap == PERFORMER:
            w, scale = feature_map.W.detach().to(q.device), float(feature_map.scale)
            if w.shape[1] != q.shape[-1]:
                raise ValueError(
                    f"performer W has shape {tuple(w.shape)} but the head dim is {q.shape[-1]}; "
                    f"build the feature map with head_dim={q.shape[-1]}")
    else:
        raise NotImplementedError(
            f"no Triton kernel for feature map {name!r} (have {', '.join(FEATURE_MAPS)}; a map "
            "whose causal keys need a per-key stabilizer needs a triton_code); use "
            "backend='torch' for it")
    v = v.to(xq.dtype) if v.dtype != xq.dtype else v
    fn = FlurkaCausalCoreFunction if causal else FlurkaCoreFunction
    out = fn.apply(xq, xk.to(xq.dtype), v, w, mask, fmap, scale, eps)[0]
    return out.to(q.dtype)


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected 4-D q, k, v (B, H, N, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, _ = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != B or H % k.shape[1]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share (B, Hkv, M) with "
                         f"q's batch {B}, and Hkv must divide H={H}")
    if causal and k.shape[2] != N:
        raise ValueError(f"causal attention needs as many keys as queries; got N={N}, "
                         f"M={k.shape[2]}")
    if mask is not None and tuple(mask.shape) != (B, k.shape[2]):
        raise ValueError(f"key_padding_mask must be (B, M) = {(B, k.shape[2])}; "
                         f"got {tuple(mask.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q must be fp32, fp16 or bf16; got {q.dtype}")


__all__ = ["triton_attention_core", "FlurkaCoreFunction", "FlurkaCausalCoreFunction",
           "flurka_core_fwd", "flurka_core_bwd"]
