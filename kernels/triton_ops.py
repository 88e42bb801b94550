"""FLuRKA attention core on Triton: custom ops, autograd, and the public entry point.

Layering (docs/style.md §7): kernels (``triton_kernels``, ``triton_causal``,
``triton_causal_bwd``, ``triton_dx``; shared jit helpers in ``triton_common``) -> launchers
(``triton_launch``) -> ``torch.library`` custom ops ``flurka_rewrite::flurka_core_fwd`` /
``flurka_core_bwd`` (with fake implementations, so ``torch.compile`` and ``torch.export`` see
one opaque node) -> one ``torch.autograd.Function``
per kernel family (non-causal, causal) -> ``triton_attention_core``, which
``dispatch.attention_core_dispatch`` calls and which returns what ``reference.attention_core``
returns.

Low-rank sites (non-causal, unhoisted, in-kernel maps; ``dispatch.lowrank_fusion`` decides):
``flurka_core_fwd_lowrank`` / ``flurka_core_bwd_lowrank`` and ``FlurkaLowrankCoreFunction``
take the full-length K, V with E, F (``triton_lowrank``: projection, phi(K~) and the state in
one kernel; gradients of q, k, v, E, F), entry point ``triton_lowrank_core``.

Feature maps: a map whose class declares a ``triton_code`` (performer, relu, rnn) is computed
inside the kernels (phi(Q) is never stored). A map without one (``triton_code = None``: ffk,
whose weights are trainable, or a newly registered map) has its phi(q), phi(k) computed by the
module in PyTorch, and the fused core then runs with the identity map, so autograd reaches
its weights.
Causal forward and backward: the Triton chunked prefix-sum kernels (``triton_causal``,
``triton_causal_bwd``; memory O(N/C * m * dv), never N x N).
CPU tensors: under TRITON_INTERPRET=1 the ops interpret the kernels; otherwise their CPU
implementation is the PyTorch reference (``cpu_runs_triton``), so a compiled or exported graph
holding the ops runs on a CPU too (``tests/test_triton_compile.py``: ``torch.compile`` with
``fullgraph=True``, no graph break).
A key-padding mask shared by the batch ((1, M), from a (1, 1, N, M) attention mask) is
expanded to (B, M) (``broadcast_key_mask``), as the reference broadcasts it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .feature_maps import FEATURE_MAPS, FeatureMap, PerformerFeatures
from .reference import attention_core
from .registry import TRITON_IDENTITY
from .triton_kernels import FMAP_ELU, FMAP_PERFORMER, FMAP_RELU
from .triton_launch import (
    PERFORMER,
    causal_backward,
    causal_chunk,
    core_forward,
    noncausal_backward,
)
from .triton_tuning import interpreting

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
    return tuple(q.new_empty(shape, dtype=dtype)
                 for shape, dtype in _forward_shapes(q, k, v, w, fmap, causal))


def _forward_shapes(q, k, v, w, fmap, causal):
    """(shape, dtype) of each output of flurka_core_fwd: out (B, H, N, dv) in q's dtype, then
    c_q, den (BH, G*N), c_k (BH, M), S (BH, NC, m, dv), z (BH, NC, m) in fp32."""
    B, H, N, dh = q.shape
    Hkv, M, dv = k.shape[1], k.shape[2], v.shape[-1]
    BH, R = B * Hkv, (H // Hkv) * N
    m = w.shape[0] if fmap == PERFORMER else dh
    nc = (N + causal_chunk() - 1) // causal_chunk() if causal else 1
    f32 = torch.float32
    return [((B, H, N, dv), q.dtype), ((BH, R), f32), ((BH, R), f32), ((BH, M), f32),
            ((BH, nc, m, dv), f32), ((BH, nc, m), f32)]


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


# -- CPU implementation ---------------------------------------------------------------------
# CPU tensors run the Triton kernels under the interpreter (TRITON_INTERPRET=1: the tests of
# the kernels); otherwise the ops compute the same result with the PyTorch reference, so a
# graph holding them (torch.compile, torch.export) also runs on a CPU. The reference fills
# only ``out``: the other outputs are the kernels' saved state, which its backward does not
# read (it differentiates the reference again), and are returned as zeros of their shapes.
def cpu_runs_triton() -> bool:
    """True when the ops run the Triton kernels (interpreted) on CPU tensors."""
    return interpreting()


class _IdentityMap(torch.nn.Module):
    """phi(x) = x: the kernels' FMAP_IDENTITY (phi already applied by the caller)."""

    custom_attention = False  # read by reference.attention_core (FeatureMap's default)

    def forward(self, x: Tensor, *, is_query: bool, key_mask: Tensor | None = None) -> Tensor:
        return x.float()

    def causal_key_features(self, x: Tensor, key_mask: Tensor | None = None):
        return x.float(), None


class _GivenPerformer(PerformerFeatures):
    """The performer map with the W the op was given (nothing drawn): the reference of the
    kernels' FMAP_PERFORMER."""

    def __init__(self, w: Tensor, scale: float) -> None:
        self.__dict__["_given_w"] = w  # read by _draw, which __init__ calls
        super().__init__(w.shape[1], num_features=w.shape[0], scale=scale, redraw_interval=None)

    def _draw(self, i: int) -> Tensor:
        return self.__dict__["_given_w"]


def reference_map(fmap: int, w: Tensor | None, scale: float, head_dim: int) -> torch.nn.Module:
    """The feature map of the kernels' code ``fmap`` as a PyTorch module (reference formulas)."""
    if fmap == TRITON_IDENTITY:
        return _IdentityMap()
    if fmap == PERFORMER:
        return _GivenPerformer(w.float(), scale)
    for cls in FEATURE_MAPS.values():
        if cls.triton_code == fmap:
            return cls(head_dim)
    raise ValueError(f"no feature map with triton_code {fmap}")


def _reference_out(q, k, v, w, mask, fmap, scale, causal, eps):
    return attention_core(q, k, v, feature_map=reference_map(fmap, w, scale, q.shape[-1]),
                          key_padding_mask=mask, causal=causal, eps=eps)


@flurka_core_fwd.register_kernel("cpu")
def _(q, k, v, w, mask, fmap, scale, causal, eps):
    if cpu_runs_triton():
        return core_forward(q, k, v, w, mask, fmap, scale, causal, eps)
    out = _reference_out(q, k, v, w, mask, fmap, scale, causal, eps)
    rest = [q.new_zeros(shape, dtype=dtype)
            for shape, dtype in _forward_shapes(q, k, v, w, fmap, causal)[1:]]
    return (out, *rest)


@flurka_core_bwd.register_kernel("cpu")
def _(dout, q, k, v, w, mask, out, cq, den, ck, S, z, fmap, scale, causal, eps):
    if cpu_runs_triton():
        if causal:
            return causal_backward(dout, q, k, v, w, mask, out, cq, den, ck, S, z, fmap, scale)
        return noncausal_backward(dout, q, k, v, w, mask, out, cq, den, ck, S, z, fmap, scale)
    # torch.func.vjp: autograd proper is switched off inside an op's kernel (the dispatcher
    # runs it below the Autograd keys), functorch's transform is not
    def ref(q_, k_, v_):
        return _reference_out(q_, k_, v_, w, mask, fmap, scale, causal, eps)

    out_ref, pull = torch.func.vjp(ref, q, k, v)
    return pull(dout.to(out_ref.dtype))


# -- autograd -------------------------------------------------------------------------------
# forward/backward are staticmethods (torch.compile traces those, not classmethods); the two
# families share _core_forward / _core_backward and differ in ``causal`` only.
def _core_forward(ctx, q, k, v, w, mask, fmap, scale, eps, causal):
    out, cq, den, ck, S, z = torch.ops.flurka_rewrite.flurka_core_fwd(
        q, k, v, w, mask, fmap, scale, causal, eps)
    ctx.save_for_backward(q, k, v, w, mask, out, cq, den, ck, S, z)
    ctx.fmap, ctx.scale, ctx.eps = fmap, scale, eps
    ctx.mark_non_differentiable(cq, den, ck, S, z)
    return out, cq, den, ck, S, z


def _core_backward(ctx, dout, causal):
    q, k, v, w, mask, out, cq, den, ck, S, z = ctx.saved_tensors
    dq, dk, dv = torch.ops.flurka_rewrite.flurka_core_bwd(
        dout.contiguous(), q, k, v, w, mask, out, cq, den, ck, S, z, ctx.fmap, ctx.scale,
        causal, ctx.eps)
    return dq, dk, dv, None, None, None, None, None


class FlurkaCoreFunction(torch.autograd.Function):
    """Non-causal fused FLuRKA core: state kernel + on-the-fly phi(Q) output kernel."""

    @staticmethod
    def forward(ctx, q, k, v, w, mask, fmap, scale, eps):  # type: ignore[override]
        return _core_forward(ctx, q, k, v, w, mask, fmap, scale, eps, False)

    @staticmethod
    def backward(ctx, dout, *_):  # type: ignore[override]
        return _core_backward(ctx, dout, False)


class FlurkaCausalCoreFunction(torch.autograd.Function):
    """Causal kernel attention: chunked prefix-sum kernel (inter-chunk state carry)."""

    @staticmethod
    def forward(ctx, q, k, v, w, mask, fmap, scale, eps):  # type: ignore[override]
        return _core_forward(ctx, q, k, v, w, mask, fmap, scale, eps, True)

    @staticmethod
    def backward(ctx, dout, *_):  # type: ignore[override]
        return _core_backward(ctx, dout, True)


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
    key_padding_mask = broadcast_key_mask(key_padding_mask, q.shape[0], k.shape[2])
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


def broadcast_key_mask(mask: Tensor | None, batch: int, kv_len: int) -> Tensor | None:
    """A key-padding mask that broadcasts to (B, M), expanded to it; the reference broadcasts
    (B, 1 or M) masks implicitly (``key_padding_mask[:, None, :, None]``), the kernels index
    one row per batch. A mask shared by the batch arises from a (1, 1, N, M) attention mask
    (e.g. a causal mask built with masked_fill), which ``FlurkaAttention.key_keep`` reduces to
    (1, M). Anything that does not broadcast is left as it is for ``_check`` to refuse."""
    if mask is None or tuple(mask.shape) == (batch, kv_len):
        return mask
    if mask.dim() == 1:
        mask = mask[None]
    if mask.dim() != 2 or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, kv_len):
        return mask
    return mask.expand(batch, kv_len)


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
