"""Cost model (docs/design.md §4): FLOPs of full, low-rank, kernel and FLuRKA attention.

``site_flops`` counts, term by term, what the reference implementation computes for one site
(``kernels/reference.py`` through ``FlurkaAttention``, hoisted via ``project_kv``). Two counts:

* ``gemm_only=True``: the matrix products only, with ``FlopCounterMode``'s conventions
  (2 FLOPs per multiply-add; SDPA as its two products, dense even when causal; the bias of
  ``addmm`` and every elementwise op free). Tests check it equals ``FlopCounterMode`` exactly.
* ``gemm_only=False`` (the default, used by ``choose`` and the report): the products plus every
  elementwise op on activations at 1 FLOP per output element (exp, elu, sigmoid, softplus count
  as one; reductions 1 per input element); selections (masked_fill, where), copies, casts and
  the O(dk * M_max) preparation of the parameters E, F are free. Causal SDPA counts only the
  attended (lower-triangle) scores, as its fused kernels skip the masked blocks.

``passes/choose.py`` resolves ``kernel="auto"`` and ``dk="auto"`` per site with these counts
(rule in docs/cost_model.md).
All formulas are documented per term in docs/cost_model.md.
"""
from __future__ import annotations

from flurka_rewrite.kernels.registry import (
    SOFTMAX,
    NameView,
    auto_candidates,
    check_kernel,
    feature_map_class,
    kernel_names,
)

from .cost_window import window_core_flops

METHODS = ("full", "lowrank", "kernel", "flurka")
# Derived from the feature-map registry (kernels/registry.py) and recomputed on use: every
# kernel, and the candidates of kernel="auto" (each map's auto_role; softmax last).
KERNELS = NameView(kernel_names)
AUTO_KERNELS_PRETRAINED = NameView(lambda: auto_candidates(pretrained=True))
AUTO_KERNELS_TRAINABLE = NameView(lambda: auto_candidates(pretrained=False))
# Per score of softmax attention: scale, running max, subtract, exp, sum (the output division
# is counted per output element).
SOFTMAX_ELEMWISE_PER_SCORE = 5
# (Per element of torch.softmax, for the performer's query features: the registry's
# SOFTMAX_ELEMWISE, with the map's own FLOP count in kernels/feature_maps.py.)


def method_of(kernel: str, dk: int | None) -> str:
    """Name the method of a (kernel, dk) pair: softmax+None -> "full", softmax+int -> "lowrank",
    feature map+None -> "kernel", feature map+int -> "flurka"."""
    if check_kernel(kernel) == SOFTMAX:
        return "full" if dk is None else "lowrank"
    return "kernel" if dk is None else "flurka"


def default_num_features(kernel: str, dh: int) -> int | None:
    """Number of features m the feature map uses by default (its class's
    ``default_num_features``: performer dh*ln(dh) rounded up, relu/rnn/ffk m = dh), softmax
    None."""
    cls = feature_map_class(kernel)
    return None if cls is None else cls.default_num_features(dh)


def features_used(kernel: str, dh: int, num_features: int | None) -> int | None:
    """m the feature map really uses: maps that do not take ``num_features`` (relu, rnn)
    ignore it (m = their default)."""
    cls = feature_map_class(kernel)
    if cls is None or not cls.takes_num_features:
        return default_num_features(kernel, dh)
    return int(num_features) if num_features else default_num_features(kernel, dh)


class _Tally:
    """Accumulates matrix-product and elementwise FLOPs separately."""

    def __init__(self) -> None:
        self.gemm = 0
        self.elem = 0

    def total(self, gemm_only: bool) -> int:
        return self.gemm if gemm_only else self.gemm + self.elem


def _features(t: _Tally, kernel: str, rows: int, dh: int, m: int, *, is_query: bool,
              groups: int = 1, causal: bool = False) -> None:
    """phi of ``rows`` query or key vectors of width dh: the map class's own count
    (``FeatureMap.flops``; kernels/feature_maps.py). ``groups`` = B * Hkv for keys (one
    performer stabilizer each); causal keys use ``causal_key_features``."""
    f = feature_map_class(kernel).flops(rows, dh, m, is_query=is_query, causal=causal,
                                        groups=groups)
    t.gemm += f.gemm
    t.elem += f.elem


def _causal_pairs(N: int, K: int) -> int:
    """Scores a causal mask keeps: query i sees keys j <= i + (K - N) (SDPA's tril(K - N))."""
    lo = max(0, N - K)  # first query that sees any key
    # sum over i in [lo, N) of (i + 1 + K - N): an arithmetic series ending at K
    first, count = lo + 1 + K - N, N - lo
    return (first + K) * count // 2


def check_sizes(**sizes: int | None) -> None:
    for name, val in sizes.items():
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
            raise ValueError(f"{name} must be a positive int; got {val!r}")


ROWS_PER_BAND = 32  # kernels.reference.lowrank_bands' default


def lowrank_pairs(dk: int, M: int, max_seq_len: int | None = None, e_init: str = "pool") -> int:
    """(row, column) pairs of E[:, :M] that ``lowrank_project`` multiplies: dk * M for a dense
    (gaussian) E; for a ``pool`` E of width ``max_seq_len`` (default M), whose row r averages
    positions [r L / dk, (r + 1) L / dk), the product runs band by band (``lowrank_bands``:
    32 rows each, over the columns they cover, clipped to M) whenever that at least halves the
    work on the full width; otherwise dense."""
    L = max_seq_len or M
    if e_init != "pool":
        return dk * M

    def lo(r: int) -> int:
        return (r * L) // dk

    def hi(r: int) -> int:
        return max(lo(r) + 1, ((r + 1) * L) // dk)

    bands = [(r0, min(dk, r0 + ROWS_PER_BAND)) for r0 in range(0, dk, ROWS_PER_BAND)]
    full = sum((r1 - r0) * (hi(r1 - 1) - lo(r0)) for r0, r1 in bands)
    if 2 * full > dk * L:  # init_lowrank / lowrank_bands keep the dense product
        return dk * M
    return sum((r1 - r0) * max(0, min(hi(r1 - 1), M) - lo(r0)) for r0, r1 in bands)


def site_flops(
    *, kernel: str, dk: int | None, B: int, N: int, M: int, H: int, Hkv: int, dh: int,
    dm: int | None = None, num_features: int | None = None, causal: bool = False,
    hoisted: bool = False, projections: bool = True, gemm_only: bool = False,
    bias: bool = True, padding_mask: bool = False, chunk_size: int = 64,
    e_init: str = "pool", max_seq_len: int | None = None, window: int | None = None,
) -> int:
    """FLOPs of one attention site as the reference (``FlurkaAttention``) computes it.

    Sizes: batch B, query length N, key length M, heads H, kv-heads Hkv, head dim dh (= dv),
    model width dm. ``projections`` (with dm given): the K and V projections X W^T + b from
    width dm, the part hoisting changes (Q and output projections are unchanged by a rewrite
    and never counted). ``hoisted`` (low-rank only): down-sample X before the projections,
    (E X) W^T + (E 1) b^T; needs dm. ``bias``: the K/V projections carry a bias.
    ``padding_mask``: a key-padding mask is applied. ``chunk_size``: causal kernel chunk C.
    ``e_init`` / ``max_seq_len``: how E was initialised and its width; a ``pool`` E runs banded
    (``lowrank_pairs``), so only its non-zero blocks are counted.
    ``gemm_only``: only what ``FlopCounterMode`` counts (see the module docstring).
    ``window``: the sliding-window hybrid core (passes/cost_window.py) in place of the kernel
    or low-rank core; not for full softmax, self-attention (M == N) only.
    """
    method = method_of(kernel, dk)
    check_sizes(B=B, N=N, M=M, H=H, Hkv=Hkv, dh=dh, dm=dm, dk=dk, chunk_size=chunk_size)
    if H % Hkv:
        raise ValueError(f"H ({H}) must be a multiple of Hkv ({Hkv})")
    if dk is not None and causal:
        raise ValueError(f"{method} attention (dk={dk}) cannot be causal: the sequence "
                         "projection mixes future tokens into every key; use dk=None")
    if dk is not None and dk > M:
        raise ValueError(f"dk={dk} exceeds the key length M={M}; use dk <= M or dk=None")
    if hoisted and dk is None:
        raise ValueError("hoisted=True needs a low-rank site (dk set): only the sequence "
                         "down-sampling can be hoisted above the projections")
    if hoisted and dm is None:
        raise ValueError("hoisted=True needs dm, the width of the layer input X that E multiplies")
    if causal and method == "kernel" and M != N:
        raise ValueError(f"causal kernel attention needs M == N; got N={N}, M={M}")
    m = features_used(kernel, dh, num_features)
    width = Hkv * dh  # output width of the K (and V) projection
    t = _Tally()

    # -- K and V: projections and low-rank down-sampling (2 = one for K, one for V) ----------
    # (padded rows are zeroed by torch.where: a selection, free)
    pairs_e = 0 if dk is None else lowrank_pairs(dk, M, max_seq_len, e_init)  # E[:, :M] work
    if hoisted:  # FlurkaAttention.project_kv, once for K and once for V
        t.gemm += 2 * (2 * B * pairs_e * dm)  # E[:, :M] @ X: (dk, M) @ (B, M, dm)
        if projections:
            t.gemm += 2 * (2 * B * dk * dm * width)  # F.linear(E X, W): (B, dk, dm) @ (dm, out)
            if bias:
                t.gemm += 2 * (2 * B * dk * M)  # E 1: (dk, M) @ (B, M, 1), not banded
                t.elem += 2 * (2 * B * dk * width)  # (E 1) * b, then the add
    else:
        if projections and dm is not None:
            t.gemm += 2 * (2 * B * M * dm * width)  # X W^T (addmm)
            if bias:
                t.elem += 2 * B * M * width  # the bias add inside addmm
        if dk is not None:
            t.gemm += 2 * (2 * B * Hkv * pairs_e * dh)  # E[:, :M] @ K: (dk, M) @ (B, Hkv, M, dh)
    if dk is not None and padding_mask:
        t.gemm += 2 * B * M * dk  # lowrank_keep: padding (B, M) @ support^T (M, dk)
    K = M if dk is None else dk  # keys the attention core sees
    if window is not None:
        check_sizes(window=window)
        if method == "full" or M != N:
            raise ValueError("a window needs a kernel part and self-attention (M == N); got "
                             f"{method} attention with N={N}, M={M}")
        gemm, elem = window_core_flops(kernel=kernel, dk=dk, window=window, B=B, N=N, H=H,
                                       Hkv=Hkv, dh=dh, m=m, causal=causal)
        t.gemm += gemm
        t.elem += elem
        return t.total(gemm_only)

    # -- attention core -----------------------------------------------------------------------
    fmap = feature_map_class(kernel)
    if fmap is None:  # softmax: SDPA over K keys
        if causal and not gemm_only:  # query i attends keys j <= i + (K - N)
            pairs = _causal_pairs(N, K)
        else:
            pairs = N * K
        t.gemm += 2 * 2 * B * H * pairs * dh  # q k^T and P v
        t.elem += B * H * (SOFTMAX_ELEMWISE_PER_SCORE * pairs + N * dh)
        return t.total(gemm_only)

    if fmap.custom_attention:  # the map computes the whole core (EVA): its own count
        f = fmap.attention_flops(B=B, N=N, K=K, H=H, Hkv=Hkv, dh=dh, m=m, causal=causal,
                                 key_spacing=None if dk is None else (dk, max_seq_len or M))
        t.gemm += f.gemm
        t.elem += f.elem
        return t.total(gemm_only)
    _features(t, kernel, B * Hkv * K, dh, m, is_query=False, groups=B * Hkv, causal=causal)
    _features(t, kernel, B * H * N, dh, m, is_query=True)
    if not causal:  # reference.kernel_state and kernel_readout
        t.gemm += 2 * B * Hkv * K * m * (dh + 1)  # [S | z] = phi(k)^T [v | 1]
        t.gemm += 2 * B * H * N * m * (dh + 1)  # phi(q) [S | z]
        t.elem += B * H * N * (1 + dh)  # + eps, division
        return t.total(gemm_only)
    C = chunk_size  # reference.causal_kernel_attention: N padded to nc chunks of C
    nc = -(-N // C)
    Np = nc * C
    if fmap.causal_stabilized:  # per-key log scales (the performer)
        _causal_stabilized_flops(t, B, H, Hkv, nc, C, m, dh)
        return t.total(gemm_only)
    t.gemm += 2 * B * Hkv * Np * m * dh  # per-chunk states phi(k)^T v
    t.elem += B * Hkv * Np * m  # per-chunk sums of phi(k)
    t.elem += B * Hkv * nc * (m * dh + m)  # exclusive prefix sums (cumsum, shifted by one)
    t.gemm += 2 * B * H * Np * C * m  # A = phi(q) phi(k)^T within chunks (C x C)
    t.gemm += 2 * B * H * Np * m * dh + 2 * B * H * Np * C * dh  # phi(q) S and A v
    t.elem += B * H * Np * dh  # num = phi(q) S + A v
    t.elem += B * H * Np * (2 * m + C + 1)  # den = sum(phi(q) * z) + sum(A)
    t.elem += B * H * Np + B * H * Np * dh  # + eps, division
    return t.total(gemm_only)


def _causal_stabilized_flops(
    t: _Tally, B: int, H: int, Hkv: int, nc: int, C: int, m: int, dh: int
) -> None:
    """reference._causal_stabilized: nc sequential chunks with per-key log scales."""
    bh, bk = B * H, B * Hkv
    t.elem += bk * nc * C  # running max of the log scales (cummax)
    gemm = 2 * bh * C * C * m + 2 * bh * C * C * dh  # A = q k^T, A v
    gemm += 2 * bh * C * m * dh + 2 * bh * C * m  # q S, q z
    gemm += 2 * bk * m * C * dh  # chunk state (k w)^T v
    elem = 2 * bk * C * C + bh * C * C  # log-scale differences, exp; A * exp
    elem += 2 * bk * C + bh * C * dh + bh * C * dh  # inter = exp(c_prev - c); (q S) * inter; add
    elem += bh * C * C + 2 * bh * C + bh * C  # sum(A); (q z) * inter, add; + eps
    elem += bh * C * dh  # division
    elem += 2 * bk * C + 2 * bk + bk * C * m  # w = exp(l - c_new), decay, k * w
    elem += 2 * bk * m * dh + 2 * bk * m + bk * C * m  # S*decay + ., z*decay + ., sum(k w)
    t.gemm += nc * gemm
    t.elem += nc * elem
