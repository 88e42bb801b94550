"""Plain-PyTorch reference for every attention variant (the ``naive.py`` of this package).

Layout everywhere: q (B, H, N, dh), k (B, Hkv, M, dh), v (B, Hkv, M, dv), H a multiple of Hkv
(GQA: query head h reads kv-head h // (H // Hkv)). Masks:
  * ``attn_mask``: as in ``F.scaled_dot_product_attention`` (bool, True = attend, or additive
    float), broadcastable to (B, H, N, M); softmax paths only;
  * ``key_padding_mask``: bool (B, M), True where the key is a real token. Padded keys
    contribute nothing (their feature rows are zeroed, or masked out of the softmax).
Kernel paths accumulate phi(k) sums and the state phi(k)^T v in fp32 whatever the input dtype,
and return the dtype of q.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .feature_maps import FeatureMap


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Exact attention softmax(s q k^T + mask) v via ``F.scaled_dot_product_attention``.

    Causal and an explicit mask may be combined (SDPA alone refuses both)."""
    mask = _merge_masks(attn_mask, key_padding_mask, causal, q.shape[-2], k.shape[-2], q.device)
    is_causal = causal and mask is None
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )


def _merge_masks(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, causal: bool, n: int, m: int,
    device: torch.device,
) -> Tensor | None:
    parts: list[Tensor] = []
    if key_padding_mask is not None:
        parts.append(key_padding_mask[:, None, None, :].bool())  # (B, 1, 1, M)
    if causal and (attn_mask is not None or parts):
        parts.append(torch.ones(n, m, dtype=torch.bool, device=device).tril(m - n))
    bool_mask = None
    for p in parts:
        bool_mask = p if bool_mask is None else bool_mask & p
    if attn_mask is None:
        return bool_mask
    if bool_mask is None:
        return attn_mask
    if attn_mask.dtype == torch.bool:
        return attn_mask & bool_mask
    return attn_mask.masked_fill(~bool_mask, float("-inf"))


def kernel_attention(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Non-causal linear attention O = phi(q) S / (phi(q) z + eps), S = phi(k)^T v, z = phi(k)^T 1.

    phi_q (B, H, N, m), phi_k (B, Hkv, M, m), v (B, Hkv, M, dv) -> (B, H, N, dv) in fp32.
    """
    B, H, N, m = phi_q.shape
    hkv = phi_k.shape[1]
    phi_k = phi_k.float()
    if key_padding_mask is not None:
        phi_k = phi_k * key_padding_mask[:, None, :, None].to(phi_k.dtype)
    vf = v.float()
    S = phi_k.transpose(-1, -2) @ vf  # (B, Hkv, m, dv)
    z = phi_k.sum(-2, keepdim=True).transpose(-1, -2)  # (B, Hkv, m, 1)
    qg = phi_q.float().reshape(B, hkv, (H // hkv) * N, m)  # group query heads by kv-head
    out = (qg @ S) / (qg @ z + eps)  # (B, Hkv, G*N, dv)
    return out.reshape(B, H, N, -1)


def causal_kernel_attention(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> Tensor:
    """Causal linear attention by chunked prefix sums: O_i = phi(q_i) S_i / (phi(q_i) z_i + eps),
    S_i = sum_{j<=i} phi(k_j) v_j^T. Within a chunk: masked C x C products; across chunks: an
    exclusive prefix sum of per-chunk states. Memory O(N/C * m * dv), never N x N.

    phi_q (B, H, N, m), phi_k (B, Hkv, N, m), v (B, Hkv, N, dv) -> (B, H, N, dv) in fp32.
    """
    B, H, N, m = phi_q.shape
    hkv, M, dv = phi_k.shape[1], phi_k.shape[2], v.shape[-1]
    if M != N:
        raise ValueError(f"causal kernel attention needs as many keys as queries; got N={N}, M={M}")
    G, C = H // hkv, chunk_size
    phi_k, vf, phi_q = phi_k.float(), v.float(), phi_q.float()
    if key_padding_mask is not None:
        phi_k = phi_k * key_padding_mask[:, None, :, None].to(phi_k.dtype)
    pad = (-N) % C
    if pad:  # zero rows at the end: they add nothing to any state
        phi_q, phi_k, vf = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, vf))
    nc = (N + pad) // C
    q = phi_q.reshape(B, hkv, G, nc, C, m)
    k = phi_k.reshape(B, hkv, 1, nc, C, m)
    vv = vf.reshape(B, hkv, 1, nc, C, dv)
    kv = k.transpose(-1, -2) @ vv  # (B, Hkv, 1, nc, m, dv): each chunk's state
    ks = k.sum(-2)  # (B, Hkv, 1, nc, m)
    S = torch.cumsum(kv, 3) - kv  # state of all earlier chunks
    z = torch.cumsum(ks, 3) - ks
    tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    A = (q @ k.transpose(-1, -2)).masked_fill(~tril, 0.0)  # (B, Hkv, G, nc, C, C)
    num = q @ S + A @ vv  # (B, Hkv, G, nc, C, dv)
    den = (q * z[..., None, :]).sum(-1) + A.sum(-1)  # (B, Hkv, G, nc, C)
    out = num / (den[..., None] + eps)
    return out.reshape(B, H, nc * C, dv)[:, :, :N]


def lowrank_project(x: Tensor, E: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """Down-sample along the sequence axis (-2): E[:, :M] @ x, padded rows zeroed first.

    x (B, ..., M, d), E (dk, M_max) with M <= M_max -> (B, ..., dk, d)."""
    M, m_max = x.shape[-2], E.shape[-1]
    if M > m_max:
        raise ValueError(
            f"sequence length {M} exceeds the maximum {m_max} this low-rank projection was built "
            f"for; convert the model with example inputs (or max_seq_len) of length >= {M}"
        )
    if key_padding_mask is not None:
        keep = key_padding_mask.to(x.dtype)
        x = x * keep.reshape(keep.shape[0], *([1] * (x.dim() - 3)), M, 1)
    return E[:, :M].to(x.dtype) @ x


def lowrank_keep(
    E: Tensor, F_: Tensor, M: int, key_padding_mask: Tensor | None, batch: int
) -> Tensor | None:
    """(B, dk) bool: which down-sampled rows hold any real token. A row of E whose support
    (non-zero entries) covers only padding, or only positions >= M, is an empty key and is
    masked (e.g. the blocks of a ``pool`` E past the actual length). None when all are real."""
    support = ((E[:, :M] != 0) & (F_[:, :M] != 0)).float()  # (dk, M)
    if key_padding_mask is None:
        rows = support.sum(-1) > 0  # (dk,)
        if bool(rows.all()):
            return None
        return rows[None].expand(batch, -1)
    return (key_padding_mask.float() @ support.t()) > 0  # (B, dk)


def flurka_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: FeatureMap | None = None,
    E: Tensor | None = None,
    F_: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> Tensor:
    """FLuRKA (DESIGN 3.3), unhoisted: low-rank K~ = E K, V~ = F V (when E, F given), then
    kernel attention with ``feature_map`` (softmax over the dk keys when it is None).

    q (B, H, N, dh), k/v (B, Hkv, M, d), E/F_ (dk, M_max) -> (B, H, N, dv) in q's dtype.
    E=None: kernel-only attention; feature_map=None and E=None: exact attention.
    """
    keep = key_padding_mask
    if E is not None:
        if F_ is None:
            raise ValueError("low-rank attention needs both E and F_")
        if causal:
            raise ValueError(
                "low-rank projection mixes future tokens into every key, so it cannot be causal; "
                "use dk=None (kernel-only) for causal attention"
            )
        M = k.shape[-2]
        keep = lowrank_keep(E, F_, M, key_padding_mask, k.shape[0])
        k = lowrank_project(k, E, key_padding_mask)
        v = lowrank_project(v, F_, key_padding_mask)
    return attention_core(
        q, k, v, feature_map=feature_map, key_padding_mask=keep, causal=causal, scale=scale,
        eps=eps, chunk_size=chunk_size,
    )


def attention_core(
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
) -> Tensor:
    """Softmax (feature_map None) or kernel attention over the given (possibly down-sampled)
    keys: the part of FLuRKA after the low-rank projection. Returns q's dtype."""
    if feature_map is None:
        return softmax_attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal,
                                 scale=scale)
    kmask = None if key_padding_mask is None else key_padding_mask[:, None, :, None]
    phi_q = feature_map(q, is_query=True)
    phi_k = feature_map(k, is_query=False, key_mask=kmask)
    if causal:
        out = causal_kernel_attention(phi_q, phi_k, v, key_padding_mask=key_padding_mask,
                                      eps=eps, chunk_size=chunk_size)
    else:
        out = kernel_attention(phi_q, phi_k, v, key_padding_mask=key_padding_mask, eps=eps)
    return out.to(q.dtype)
