"""FLOPs of the sliding-window hybrid core (``kernels/window.py: window_attention``), in
``cost_model.site_flops``' conventions: ``gemm`` the matrix products as ``FlopCounterMode``
counts them (2 per multiply-add), ``elem`` the elementwise ops at 1 per output element
(reductions 1 per input element; selections, padding and concatenation free).

Sizes: queries padded to nc chunks of C rows (Np = nc C), each chunk against Kn = (P + 1) C
keys (P = 1 causal, 2 non-causal); the kernel part over the dk down-sampled keys (low-rank) or
over the original keys outside the window (per-chunk states, prefix / suffix sums, the key
bands masked to the window's complement). Formulas per term: docs/cost_model.md and
docs/operator.md, "Sliding window".
"""
from __future__ import annotations

from flurka_rewrite.kernels.registry import feature_map_class
from flurka_rewrite.kernels.window import window_chunk


def window_core_flops(*, kernel: str, dk: int | None, window: int, B: int, N: int, H: int,
                      Hkv: int, dh: int, m: int | None, causal: bool) -> tuple[int, int]:
    """(gemm, elem) FLOPs of ``window_attention`` for one site (dv = dh). ``dk``: the number of
    down-sampled kernel keys (None: the kernel runs over the original keys outside the
    window); ``kernel`` "softmax" with dk: softmax over the down-sampled keys."""
    C = window_chunk(window, causal, N)  # as run eagerly
    nc = -(-N // C)
    Np, Kn = nc * C, (2 if causal else 3) * C
    bh, bk, dv1 = B * H, B * Hkv, dh + 1
    # window: scaled q, scores, their max; exp(s - c), p v, row sums; the combination
    gemm = 2 * bh * Np * Kn * dh + 2 * bh * Np * Kn * dh
    elem = B * H * N * dh + bh * Np * Kn  # q * scale; amax
    elem += 3 * bh * Np * Kn  # s - c, exp, sum(p)
    elem += bh * Np * (1 + 2 + 1 + 1 + 2 + 1 + 1 + 1)  # lam + theta, log(clamp), +, max,
    # lam - c and exp, f * den, + sum(p), clamp
    elem += 3 * bh * Np * dh  # f * num_k, + p v, division
    fmap = feature_map_class(kernel)
    if fmap is not None and fmap.custom_attention:  # its own windowed core (EVA)
        f = fmap.window_flops(B=B, N=N, H=H, Hkv=Hkv, dh=dh, m=m, causal=causal,
                              window=window, dk=dk)
        return f.gemm, f.elem
    if fmap is None:  # Linformer + window: softmax over the dk keys
        gemm += 2 * bh * Np * dk * dh + 2 * bh * Np * dk * dv1  # q k~^T, p [v~ | 1]
        elem += B * H * N * dh + 3 * bh * Np * dk  # q * scale; amax, s - lam, exp
        return gemm, elem
    stab = fmap.causal_stabilized  # row_features: causal_key_features for q and k
    rows_k = bk * (N if dk is None else dk)
    for rows, is_query in ((rows_k, False), (B * H * N, True)):
        f = fmap.flops(rows, dh, m, is_query=is_query and not stab, causal=stab, groups=bk)
        gemm += f.gemm
        elem += f.elem
    if stab:  # key_shift (a max over keys, or the bound of W), exp(l - b) * phi; lam = l + b
        elem += (2 * m * dh + m if causal else rows_k) + rows_k * (2 + m) + bh * Np
    if dk is not None:  # kernel_state of the dk keys, read out by every (padded) query row
        gemm += 2 * bk * dk * m * dv1 + 2 * bh * Np * m * dv1
        return gemm, elem
    gemm += 2 * bk * Np * m * dv1  # per-chunk states phi(k)^T [v | 1]
    elem += bk * nc * m * dv1 * (1 if causal else 3)  # cumsum (+ reversed cumsum, add)
    gemm += 2 * bh * Np * m * dv1  # phi(q) . far states
    gemm += 2 * bh * Np * Kn * m + 2 * bh * Np * Kn * dv1  # A = phi(q) phi(k)^T on the bands, A v
    elem += bh * Np * dv1  # far + band
    return gemm, elem
