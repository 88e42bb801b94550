"""Backend choice for the attention core (everything after the low-rank projection).

``backend="auto"``: Triton on CUDA tensors, the PyTorch reference otherwise.
``backend="torch"``: always the reference.
``backend="triton"``: Triton; on CPU tensors only under ``TRITON_INTERPRET=1``, else an error.
Never a silent fallback: a Triton request that cannot be served raises and says why.

Low-rank sites (``fused_lowrank_dispatch``, called by ``FlurkaAttention`` before it projects
K and V): where Triton was chosen, ``lowrank_fusion`` decides between the fused kernel
(projection, feature map and state in one pass, ``triton_lowrank``) and the unfused path
(``lowrank_project`` in PyTorch, then the core), and says why; both compute the same result.
"""
from __future__ import annotations

import math
import os

from torch import Tensor

from .feature_maps import FeatureMap, PerformerFeatures
from .reference import attention_core, is_exporting

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


# A dense (gaussian) E: the fused kernel recomputes E K (E F V) once per (feature, value) tile
# of the state (triton_lowrank's docstring); it is used while that is at most this many times
# the unfused GEMM's work, counted at the widest tiles (128 features, 128 value columns).
# An E with a sparse support (pool) reads only its band of K and V per tile and is always
# fused (the rows' column ranges, ``support_cols``, whatever dk). Not yet
# measured on a GPU.
FUSED_DENSE_MAX_RECOMPUTE = 2


def lowrank_fusion(layer, q: Tensor, k: Tensor, v: Tensor) -> tuple[bool, str]:
    """(use the fused low-rank kernel?, why) for FlurkaAttention ``layer`` on unprojected k, v
    (B, Hkv, M, d). Hoisted and windowed sites are the caller's to exclude."""
    fm = layer.feature_map
    if getattr(layer, "dk", None) is None or layer.causal:
        return False, "not a (non-causal) low-rank site"
    if resolve_backend(layer.backend, q.device.type, fm, head_dim=q.shape[-1]) != "triton":
        return False, "the backend is the PyTorch reference"
    from .triton_ops import IN_KERNEL_CODES  # triton imports: only once Triton was chosen

    if getattr(fm, "triton_code", None) not in IN_KERNEL_CODES:
        return False, (f"feature map {getattr(fm, 'name', None)!r} is computed in PyTorch on the "
                       "projected keys (no in-kernel code): unfused")
    if k.shape[-2] > layer.E.shape[1]:
        return False, "sequence longer than max_seq_len: the unfused path raises the error"
    w = getattr(fm, "W", None)
    if w is not None and w.shape[1] != q.shape[-1]:
        return False, "performer W does not match the head dim: the unfused path raises"
    if not layer._dense:
        return True, "E with a fixed sparse support (pool): each row block reads its band only"
    m, dv = fm.num_features, v.shape[-1]
    tiles_v = math.ceil(dv / 128)
    performer = fm.triton_code == PerformerFeatures.triton_code
    redo = math.ceil(m / 128) * tiles_v if performer else tiles_v
    if redo <= FUSED_DENSE_MAX_RECOMPUTE:
        return True, f"dense E, E K recomputed {redo}x: fused"
    return False, (f"dense E, E K would be recomputed {redo}x (> {FUSED_DENSE_MAX_RECOMPUTE}) "
                   "by the fused kernel: the unfused GEMM is cheaper")


def support_cols(layer) -> Tensor:
    """``triton_lowrank_launch.support_columns`` of a FlurkaAttention's fixed ``E_support``,
    cached on the layer per (support tensor, version, device) outside export/compile."""
    from .triton_lowrank_launch import support_columns

    support = layer.E_support
    if is_exporting():
        return support_columns(support)
    key = (id(support), support._version, support.device)
    hit = layer.__dict__.get("_fused_cols")
    if hit is None or hit[0] != key:
        hit = (key, support_columns(support))
        layer.__dict__["_fused_cols"] = hit
    return hit[1]


def fused_lowrank_dispatch(layer, q: Tensor, k: Tensor, v: Tensor,
                           key_padding_mask: Tensor | None) -> Tensor | None:
    """FLuRKA ``layer``'s output from the full-length q, k, v through the fused low-rank
    Triton kernel when ``lowrank_fusion`` says so, else None (the caller then projects K, V
    and runs ``attention_core_dispatch``)."""
    if not lowrank_fusion(layer, q, k, v)[0]:
        return None
    from .triton_lowrank_ops import triton_lowrank_core

    M = k.shape[-2]
    rows = layer._lowrank_keep(M, key_padding_mask, q.shape[0])
    return triton_lowrank_core(
        q, k, v, layer._proj("k"), layer._proj("v"), cols=support_cols(layer),
        feature_map=layer.feature_map, key_padding_mask=key_padding_mask, row_mask=rows,
        eps=layer.eps)


def window_backend(backend: str, device_type: str) -> str:
    """"torch" or "triton" for a windowed layer (``window=w``). "auto" stays on the PyTorch
    reference (``window.window_attention``) on every device until the Triton band kernel
    (``triton_window_ops``) is measured on a GPU (docs/benchmarks.md); "triton" forces it, with
    the checks of ``resolve_backend`` (triton installed; CUDA, or CPU under the interpreter)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend != "triton":
        return "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package: pip install triton")
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' got {device_type} tensors; Triton runs on CUDA GPUs, or on the CPU "
            "only under TRITON_INTERPRET=1 (slow, for tests). Use backend='torch' or 'auto' on CPU."
        )
    return "triton"


def window_attention_dispatch(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "auto",
                              **kwargs) -> Tensor:
    """``window.window_attention`` (same keyword arguments, same result) on the backend
    ``window_backend`` chooses: the reference, or ``triton_window_ops``'s band kernel. A
    ``custom_attention`` map (EVA) computes its own windowed form (``attend_window``)."""
    fm = kwargs.get("feature_map")
    if fm is not None and fm.custom_attention:  # e.g. EVA: reference only (kernels/eva_window.py)
        resolve_backend(backend, q.device.type, feature_map=fm)  # raises for "triton"
        kwargs.pop("feature_map")
        return fm.attend_window(q, k, v, **kwargs)
    if window_backend(backend, q.device.type) == "triton":
        from .triton_window_ops import triton_window_attention

        return triton_window_attention(q, k, v, **kwargs)
    from .window import window_attention

    return window_attention(q, k, v, **kwargs)
