"""Plain-PyTorch reference for every attention variant (the ``naive.py`` of this package).

Layout everywhere: q (B, H, N, dh), k (B, Hkv, M, dh), v (B, Hkv, M, dv), H a multiple of Hkv
(GQA: query head h reads kv-head h // (H // Hkv)). Masks:
  * ``attn_mask``: as in ``F.scaled_dot_product_attention`` (bool, True = attend, or additive
    float), broadcastable to (B, H, N, M); softmax paths only;
  * ``key_padding_mask``: bool (B, M), True where the key is a real token. Padded keys
    contribute nothing (their feature rows are zeroed, or masked out of the softmax).
Kernel paths accumulate phi(k) sums and the state phi(k)^T v in fp32 whatever the input dtype,
and return the dtype of q. ``attention_core`` reads the (non-causal) state out a block of query
rows at a time; ``causal_kernel_attention`` uses chunked prefix sums. Conventions and measured
speed: docs/operator.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .feature_maps import FeatureMap



def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b >= 1, written (a + b - 1) // b: ONNX's integer Div
    truncates, so the -(-a // b) idiom on a symbolic length exports as a floor."""
    return (a + b - 1) // b

def is_exporting() -> bool:
    """True under torch.jit tracing, torch.compile/torch.export, or ONNX export: shape-
    dependent Python control flow (loops over chunks, bands, all-real shortcuts) must then
    give way to one plain tensor expression that holds for every length."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.onnx.is_in_onnx_export())


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


def kernel_state(
    phi_k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None
) -> Tensor:
    """The key side of linear attention: [S | z] = phi(k)^T [v | 1] in fp32.

    phi_k (B, Hkv, M, m), v (B, Hkv, M, dv) -> (B, Hkv, m, dv + 1); the last column is
    z = sum_j phi(k_j). Padded keys (key_padding_mask False) are left out entirely (their
    values too, so even inf/nan there cannot leak)."""
    phi_k, vf = phi_k.float(), v.float()
    ones = vf.new_ones(*vf.shape[:-1], 1)
    v1 = torch.cat([vf, ones], -1)  # (B, Hkv, M, dv + 1)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, :, None].bool()  # (B, 1, M, 1)
        phi_k = torch.where(keep, phi_k, 0.0)
        v1 = torch.where(keep, v1, 0.0)
    return phi_k.transpose(-1, -2) @ v1


def kernel_readout(phi_q: Tensor, state: Tensor, *, eps: float = 1e-6) -> Tensor:
    """The query side: O = phi(q) S / (phi(q) z + eps) from ``state`` = [S | z].

    phi_q (B, H, N, m), state (B, Hkv, m, dv + 1) -> (B, H, N, dv) in fp32. Query head h
    reads kv-head h // (H // Hkv) (GQA)."""
    B, H, N, m = phi_q.shape
    hkv = state.shape[1]
    qg = phi_q.float().reshape(B, hkv, (H // hkv) * N, m)  # group query heads by kv-head
    o = qg @ state  # (B, Hkv, G*N, dv + 1): numerator and denominator in one product
    out = o[..., :-1] / (o[..., -1:] + eps)
    return out.reshape(B, H, N, -1)


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
    state = kernel_state(phi_k, v, key_padding_mask=key_padding_mask)
    return kernel_readout(phi_q, state, eps=eps)


def causal_kernel_attention(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
    key_log_scale: Tensor | None = None,
) -> Tensor:
    """Causal linear attention by chunked prefix sums: O_i = phi(q_i) S_i / (phi(q_i) z_i + eps),
    S_i = sum_{j<=i} phi(k_j) v_j^T. Within a chunk: masked C x C products; across chunks: an
    exclusive prefix sum of per-chunk states. Memory O(N/C * m * dv), never N x N.

    phi_q (B, H, N, m), phi_k (B, Hkv, N, m), v (B, Hkv, N, dv) -> (B, H, N, dv) in fp32.
    key_log_scale (B, Hkv, N): the true features are phi_k[j] * exp(key_log_scale[j]) (a
    per-key stabilizer, e.g. the performer's); position i then uses the running maximum
    c_i = max_{j<=i} key_log_scale[j] as its scale, so no future key can affect it.
    """
    B, H, N, m = phi_q.shape
    hkv, M, dv = phi_k.shape[1], phi_k.shape[2], v.shape[-1]
    if M != N:
        raise ValueError(f"causal kernel attention needs as many keys as queries; got N={N}, M={M}")
    G, C = H // hkv, chunk_size
    phi_k, vf, phi_q = phi_k.float(), v.float(), phi_q.float()
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, :].bool()  # (B, 1, N)
        phi_k = torch.where(keep[..., None], phi_k, 0.0)
        vf = torch.where(keep[..., None], vf, 0.0)
        if key_log_scale is not None:
            key_log_scale = torch.where(keep, key_log_scale, -1e30)
    nc = (N + C - 1) // C
    pad = nc * C - N  # written so that N + pad = nc * C is evident to symbolic shapes
    if is_exporting() or pad:  # zero rows at the end: they add nothing to any state
        phi_q, phi_k, vf = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, vf))
        if key_log_scale is not None:
            key_log_scale = F.pad(key_log_scale, (0, pad), value=-1e30)
    q = phi_q.reshape(B, hkv, G, nc, C, m)
    k = phi_k.reshape(B, hkv, 1, nc, C, m)
    vv = vf.reshape(B, hkv, 1, nc, C, dv)
    tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if key_log_scale is not None:
        out = _causal_stabilized(q, k, vv, key_log_scale.float().reshape(B, hkv, nc, C), tril, eps)
        return out.reshape(B, H, nc * C, dv)[:, :, :N]
    kv = k.transpose(-1, -2) @ vv  # (B, Hkv, 1, nc, m, dv): each chunk's state
    ks = k.sum(-2)  # (B, Hkv, 1, nc, m)
    # Exclusive prefix sums (state of all earlier chunks), shifted rather than computed as
    # cumsum - kv: the subtraction would leak rounding of the current chunk's future tokens.
    S = F.pad(torch.cumsum(kv, 3)[:, :, :, :-1], (0, 0, 0, 0, 1, 0))
    z = F.pad(torch.cumsum(ks, 3)[:, :, :, :-1], (0, 0, 1, 0))
    A = (q @ k.transpose(-1, -2)).masked_fill(~tril, 0.0)  # (B, Hkv, G, nc, C, C)
    num = q @ S + A @ vv  # (B, Hkv, G, nc, C, dv)
    den = (q * z[..., None, :]).sum(-1) + A.sum(-1)  # (B, Hkv, G, nc, C)
    out = num / (den[..., None] + eps)
    return out.reshape(B, H, nc * C, dv)[:, :, :N]


def _causal_stabilized(
    q: Tensor, k: Tensor, v: Tensor, ls: Tensor, tril: Tensor, eps: float
) -> Tensor:
    """Chunked causal linear attention with per-key log scales ``ls`` (B, Hkv, nc, C).

    q (B, Hkv, G, nc, C, m), k (B, Hkv, 1, nc, C, m), v (B, Hkv, 1, nc, C, dv). The state
    after chunk t is kept at scale exp(c_end(t)) (running max); every rescaling factor is
    exp(smaller - larger) <= 1, so nothing overflows. Sequential over chunks (O(N))."""
    B, hkv, G, nc, C, m = q.shape
    dv = v.shape[-1]
    cm = torch.cummax(ls.reshape(B, hkv, nc * C), -1).values.reshape(B, hkv, nc, C)
    S = q.new_zeros(B, hkv, 1, m, dv)
    z = q.new_zeros(B, hkv, 1, m, 1)
    c_prev = cm[:, :, 0, :1]  # (B, Hkv, 1): scale of the (empty) initial state
    outs = []
    for t in range(nc):
        qt, kt, vt = q[:, :, :, t], k[:, :, :, t], v[:, :, :, t]  # (B, Hkv, G|1, C, .)
        lt, ct = ls[:, :, t], cm[:, :, t]  # (B, Hkv, C)
        expo = (lt[..., None, :] - ct[..., :, None]).masked_fill(~tril, -math.inf)
        A = (qt @ kt.transpose(-1, -2)) * expo.exp()[:, :, None]  # (B, Hkv, G, C, C)
        inter = torch.exp(c_prev - ct)[:, :, None, :, None]  # (B, Hkv, 1, C, 1), <= 1
        num = A @ vt + (qt @ S) * inter
        den = A.sum(-1, keepdim=True) + (qt @ z) * inter
        outs.append(num / (den + eps))
        c_new = ct[..., -1:]  # (B, Hkv, 1)
        w = torch.exp(lt - c_new)[:, :, None, :, None]  # (B, Hkv, 1, C, 1), <= 1
        decay = torch.exp(c_prev - c_new)[:, :, None, :, None]  # (B, Hkv, 1, 1, 1)
        kw = (kt * w).transpose(-1, -2)  # (B, Hkv, 1, m, C)
        S = S * decay + kw @ vt
        z = z * decay + kw.sum(-1, keepdim=True)
        c_prev = c_new
    return torch.stack(outs, 3)  # (B, Hkv, G, nc, C, dv)


def lowrank_project(
    x: Tensor, E: Tensor, key_padding_mask: Tensor | None = None, *,
    bands: list[tuple[int, int, int, int]] | None = None,
) -> Tensor:
    """Down-sample along the sequence axis (-2): E[:, :M] @ x, padded rows zeroed first.

    x (B, ..., M, d), E (dk, M_max) with M <= M_max -> (B, ..., dk, d) in x's dtype, summed
    in fp32 (half inputs are up-cast for the product).
    bands: optional [(r0, r1, c0, c1), ...] partitioning the rows of E, where rows r0:r1 are
    zero outside columns c0:c1 (``lowrank_bands``); the product is then taken band by band,
    skipping the zeros of a block-structured (``pool``) E: same result, dk/(rows per band)
    times fewer FLOPs."""
    M, m_max = x.shape[-2], E.shape[-1]
    if M > m_max:
        raise ValueError(
            f"sequence length {M} exceeds the maximum {m_max} this low-rank projection was built "
            f"for; convert the model with example inputs (or max_seq_len) of length >= {M}"
        )
    dtype = x.dtype
    xf = x.float()
    if key_padding_mask is not None:
        keep = key_padding_mask.bool().reshape(x.shape[0], *([1] * (x.dim() - 3)), M, 1)
        xf = torch.where(keep, xf, 0.0)
    Ef = E.float()
    if is_exporting():  # zero-pad x to M_max instead of slicing E: no guard on M == M_max
        return (Ef @ F.pad(xf, (0, 0, 0, m_max - M))).to(dtype)
    if bands is None:
        return (Ef[:, :M] @ xf).to(dtype)
    parts = []
    for r0, r1, c0, c1 in bands:  # (B, ..., r1 - r0, d) each
        c1 = min(c1, M)
        if c0 >= c1:  # the band lies past the actual length: empty rows
            parts.append(xf.new_zeros(*xf.shape[:-2], r1 - r0, xf.shape[-1]))
        else:
            parts.append(Ef[r0:r1, c0:c1] @ xf[..., c0:c1, :])
    return torch.cat(parts, -2).to(dtype)


def lowrank_bands(
    support: Tensor, rows_per_band: int = 32
) -> list[tuple[int, int, int, int]] | None:
    """Bands (r0, r1, c0, c1) covering the rows of ``support`` (dk, M_max), rows_per_band rows
    each, with the column range outside which those rows are zero. None when banding would not
    save at least half the work (e.g. a dense gaussian E)."""
    nz = support != 0
    dk, m_max = nz.shape
    bands, work = [], 0
    for r0 in range(0, dk, rows_per_band):
        r1 = min(dk, r0 + rows_per_band)
        cols = nz[r0:r1].any(0).nonzero().flatten()
        c0, c1 = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 0)
        bands.append((r0, r1, c0, c1))
        work += (r1 - r0) * (c1 - c0)
    return bands if 2 * work <= dk * m_max else None


def lowrank_keep(
    E: Tensor, F_: Tensor, M: int, key_padding_mask: Tensor | None, batch: int
) -> Tensor | None:
    """(B, dk) bool: which down-sampled rows hold any real token. A row of E whose support
    (non-zero entries) covers only padding, or only positions >= M, is an empty key and is
    masked (e.g. the blocks of a ``pool`` E past the actual length). None when all are real."""
    if is_exporting():  # the same on the full width, padding positions >= M (no slicing)
        support = ((E != 0) & (F_ != 0) & (torch.arange(E.shape[1], device=E.device) < M)).float()
        if key_padding_mask is None:
            return (support.sum(-1) > 0)[None].expand(batch, -1)
        kpm = F.pad(key_padding_mask.float(), (0, E.shape[1] - M))
        return (kpm @ support.t()) > 0  # (B, dk)
    support = ((E[:, :M] != 0) & (F_[:, :M] != 0)).float()  # (dk, M)
    if key_padding_mask is None:
        rows = support.sum(-1) > 0  # (dk,)
        if not is_exporting() and bool(rows.all()):
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
    """FLuRKA (docs/design.md §3.3), unhoisted: low-rank K~ = E K, V~ = F V (when E, F given), then
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
    if feature_map.custom_attention:  # the map computes the whole core (EVA: kernels/eva.py)
        return feature_map.attend(q, k, v, key_padding_mask=key_padding_mask, causal=causal,
                                  scale=scale, eps=eps, chunk_size=chunk_size).to(q.dtype)
    kmask = None if key_padding_mask is None else key_padding_mask[:, None, :, None].bool()
    if causal:
        phi_k, log_scale = feature_map.causal_key_features(k, kmask)
        phi_q = feature_map(q, is_query=True)
        out = causal_kernel_attention(phi_q, phi_k, v, key_padding_mask=key_padding_mask,
                                      eps=eps, chunk_size=chunk_size, key_log_scale=log_scale)
        return out.to(q.dtype)
    phi_k = feature_map(k, is_query=False, key_mask=kmask)
    state = kernel_state(phi_k, v, key_padding_mask=key_padding_mask)  # (B, Hkv, m, dv + 1)
    return _chunked_readout(q, feature_map, state, eps)


# Query rows per chunk: one chunk of phi(q) holds about 2M fp32 values (8 MiB), computed, used
# and freed while still in cache, instead of materialising phi(q) for all N (B*H*N*m values,
# 107 MB at N=8192, H=12, m=272, whose fresh pages alone cost tens of ms). Measured on the
# 2-core CPU: see docs/operator.md. Smaller chunks were as fast alone but many more ops, each
# a thread barrier, which costs more when the machine is shared.
_CHUNK_ELEMS = 1 << 21


def _chunked_readout(q: Tensor, feature_map: FeatureMap, state: Tensor, eps: float) -> Tensor:
    """phi(q) and the readout of ``kernel_readout``, a block of query rows at a time (the
    query feature map is row-wise, so this is the same computation). Returns q's dtype.

    q (B, H, N, dh), state (B, Hkv, m, dv + 1) -> (B, H, N, dv)."""
    B, H, N, _ = q.shape
    m, dv = state.shape[-2], state.shape[-1] - 1
    rows = max(16, _CHUNK_ELEMS // max(1, B * H * m))
    if is_exporting() or rows >= N:
        return kernel_readout(feature_map(q, is_query=True), state, eps=eps).to(q.dtype)
    blocks = range(0, N, rows)
    if torch.is_grad_enabled() and (q.requires_grad or state.requires_grad
                                    or any(p.requires_grad for p in feature_map.parameters())):
        parts = [kernel_readout(feature_map(q[:, :, s:s + rows], is_query=True), state, eps=eps)
                 for s in blocks]
        return torch.cat(parts, 2).to(q.dtype)
    # No autograd: write each block straight into the output. When q is a (B, N, H, dh)
    # tensor seen as (B, H, N, dh), the output gets the same layout, so the caller's
    # transpose(1, 2).reshape(B, N, H*dv) before the output projection copies nothing.
    if q.transpose(1, 2).is_contiguous():
        out = torch.empty(B, N, H, dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    else:
        out = torch.empty(B, H, N, dv, dtype=q.dtype, device=q.device)
    hkv = state.shape[1]
    for s in blocks:
        pq = feature_map(q[:, :, s:s + rows], is_query=True)  # (B, H, r, m)
        r = pq.shape[2]
        o = (pq.reshape(B, hkv, -1, m) @ state).view(B, H, r, dv + 1)  # same as kernel_readout
        torch.div(o[..., :-1], o[..., -1:].add_(eps), out=out[:, :, s:s + r])
    return out


def rel_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius, in float64; 0/0 counts as 0): the one relative
    error every report, check and test of this project quotes."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
