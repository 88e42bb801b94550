"""Backend choice for the attention core (everything after the low-rank projection).

``backend="auto"``: Triton on CUDA tensors, the PyTorch reference otherwise.
``backend="torch"``: always the reference.
``backend="triton"``: Triton; on CPU tensors only under ``TRITON_INTERPRET=1``, else an error.
Never a silent fallback: a Triton request that cannot be served raises and says why.
"""
from __future__ import annotations

import os

from torch import Tensor

from .feature_maps import FeatureMap
from .reference import attention_core

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken triton install (not only ImportError) means none
        return False
    return True


# "auto" runs Triton only for head dims where it was measured faster than the reference
# (H100, docs/benchmarks.md): dh=64 gave 2.2-7.6x at N >= 8k, dh=325 was ~30x slower when its
# tiles were 512 wide. Head dims above 128 now run in BLOCK_K chunks (triton_launch.block_k),
# not yet measured on a GPU, so the rule stays until they are. backend="triton" forces Triton.
AUTO_TRITON_MAX_HEAD_DIM = 128


def resolve_backend(backend: str, device_type: str, feature_map: FeatureMap | None,
                    head_dim: int | None = None) -> str:
    """Return "torch" or "triton" for tensors on ``device_type`` with head dim ``head_dim``;
    raise when the requested backend is impossible."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if feature_map is not None and feature_map.custom_attention:  # e.g. EVA: reference only
        if backend == "triton":
            raise ValueError(f"kernel {feature_map.name!r} has no Triton kernel (it computes its "
                             "own attention in PyTorch); use backend='torch' or backend='auto'")
        return "torch"
    if backend == "torch" or feature_map is None:  # softmax paths use SDPA: no Triton kernel
        return "torch"
    if backend == "auto":
        fast = head_dim is None or head_dim <= AUTO_TRITON_MAX_HEAD_DIM
        return "triton" if device_type == "cuda" and fast and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package: pip install triton")
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' got {device_type} tensors; Triton runs on CUDA GPUs, or on the CPU "
            "only under TRITON_INTERPRET=1 (slow, for tests). Use backend='torch' or 'auto' on CPU."
        )
    return "triton"


def attention_core_dispatch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: FeatureMap | None,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
    backend: str = "auto",
) -> Tensor:
    """``reference.attention_core`` on the chosen backend (same arguments, same result)."""
    which = resolve_backend(backend, q.device.type, feature_map, head_dim=q.shape[-1])
    if which == "triton":
        from .triton_ops import triton_attention_core

        return triton_attention_core(
            q, k, v, feature_map=feature_map, key_padding_mask=key_padding_mask, causal=causal,
            eps=eps,
        )
    return attention_core(
        q, k, v, feature_map=feature_map, key_padding_mask=key_padding_mask, causal=causal,
        scale=scale, eps=eps, chunk_size=chunk_size,
    )
