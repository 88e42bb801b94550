"""Cost model (DESIGN section 4): FLOPs of full, low-rank, kernel and FLuRKA attention.

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

``choose`` resolves ``kernel="auto"`` and ``dk="auto"`` per site (rule in docs/cost_model.md).
All formulas are documented per term in docs/cost_model.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from flurka_rewrite.kernels.feature_maps import default_performer_features

METHODS = ("full", "lowrank", "kernel", "flurka")
KERNELS = ("performer", "relu", "rnn", "ffk", "softmax")
# kernel="auto" picks among these; ffk is trainable and left out (it needs up-training).
AUTO_KERNELS_PRETRAINED = ("performer", "softmax")
AUTO_KERNELS_TRAINABLE = ("performer", "relu", "rnn", "softmax")
# Per score of softmax attention: scale, running max, subtract, exp, sum (the output division
# is counted per output element).
SOFTMAX_ELEMWISE_PER_SCORE = 5
# Per element of torch.softmax: max, subtract, exp, sum, divide.
SOFTMAX_ELEMWISE = 5


def method_of(kernel: str, dk: int | None) -> str:
    """Name the method of a (kernel, dk) pair: softmax+None -> "full", softmax+int -> "lowrank",
    feature map+None -> "kernel", feature map+int -> "flurka"."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    if kernel == "softmax":
        return "full" if dk is None else "lowrank"
    return "kernel" if dk is None else "flurka"


def default_num_features(kernel: str, dh: int) -> int | None:
    """Number of features m the feature map uses by default: performer dh*ln(dh) rounded up
    (``default_performer_features``), relu/rnn/ffk m = dh, softmax None."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    if kernel == "softmax":
        return None
    if kernel == "performer":
        return default_performer_features(dh)
    return dh


def features_used(kernel: str, dh: int, num_features: int | None) -> int | None:
    """m the feature map really uses: relu and rnn ignore ``num_features`` (m = dh)."""
    if kernel in ("softmax", "relu", "rnn"):
        return default_num_features(kernel, dh)
    return int(num_features) if num_features else default_num_features(kernel, dh)


class _Tally:
    """Accumulates matrix-product and elementwise FLOPs separately."""

    def __init__(self) -> None:
        self.gemm = 0
        self.elem = 0

    def total(self, gemm_only: bool) -> int:
        return self.gemm if gemm_only else self.gemm + self.elem


def _query_features(t: _Tally, kernel: str, rows: int, dh: int, m: int) -> None:
    """phi(q) for ``rows`` query vectors of width dh (feature_maps.py, is_query=True)."""
    if kernel == "performer":
        t.gemm += 2 * rows * dh * m  # x @ (s^1/2 W)^T, W (m, dh)
        t.elem += rows * SOFTMAX_ELEMWISE * m  # softmax over the features
    else:
        _plain_features(t, kernel, rows, dh, m)


def _key_features(t: _Tally, kernel: str, rows: int, dh: int, m: int, *, groups: int,
                  causal: bool) -> None:
    """phi(k) for ``rows`` key vectors; ``groups`` = B * Hkv (one performer stabilizer each).
    Causal performer keys use ``causal_key_features`` (a per-key stabilizer)."""
    if kernel != "performer":
        _plain_features(t, kernel, rows, dh, m)
        return
    t.gemm += 2 * rows * dh * m  # x @ (s^1/2 W)^T
    t.elem += rows * (2 * dh + 1 + m)  # exponent: x*x, sum, * s/2, u - |x'|^2/2
    if causal:
        t.elem += rows * (3 * m + 1)  # per-key max, + log(m)/2, u - ls, exp
    else:
        t.elem += rows * 3 * m + 2 * groups  # max over keys and features, u - c, exp;
        # per group: clamp_min and c + log(m)/2


def _plain_features(t: _Tally, kernel: str, rows: int, dh: int, m: int) -> None:
    """The maps without a stabilizer (same for queries and keys)."""
    if kernel in ("relu", "rnn"):
        t.elem += 2 * rows * dh  # relu(x) + 1e-3 / elu(x) + 1
    elif kernel == "ffk":
        t.gemm += 2 * 2 * rows * dh * m  # x W_o and x W_g
        t.elem += 5 * rows * m  # + b_o, + b_g, sigmoid, product, softplus
    else:
        raise ValueError(f"no feature map for kernel {kernel!r}")


def _causal_pairs(N: int, K: int) -> int:
    """Scores a causal mask keeps: query i sees keys j <= i + (K - N) (SDPA's tril(K - N))."""
    lo = max(0, N - K)  # first query that sees any key
    # sum over i in [lo, N) of (i + 1 + K - N): an arithmetic series ending at K
    first, count = lo + 1 + K - N, N - lo
    return (first + K) * count // 2


def _check_sizes(**sizes: int | None) -> None:
    for name, val in sizes.items():
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
            raise ValueError(f"{name} must be a positive int; got {val!r}")


def site_flops(
    *, kernel: str, dk: int | None, B: int, N: int, M: int, H: int, Hkv: int, dh: int,
    dm: int | None = None, num_features: int | None = None, causal: bool = False,
    hoisted: bool = False, projections: bool = True, gemm_only: bool = False,
    bias: bool = True, padding_mask: bool = False, chunk_size: int = 64,
) -> int:
    """FLOPs of one attention site as the reference (``FlurkaAttention``) computes it.

    Sizes: batch B, query length N, key length M, heads H, kv-heads Hkv, head dim dh (= dv),
    model width dm. ``projections`` (with dm given): the K and V projections X W^T + b from
    width dm, the part hoisting changes (Q and output projections are unchanged by a rewrite
    and never counted). ``hoisted`` (low-rank only): down-sample X before the projections,
    (E X) W^T + (E 1) b^T; needs dm. ``bias``: the K/V projections carry a bias.
    ``padding_mask``: a key-padding mask is applied. ``chunk_size``: causal kernel chunk C.
    ``gemm_only``: only what ``FlopCounterMode`` counts (see the module docstring).
    """
    method = method_of(kernel, dk)
    _check_sizes(B=B, N=N, M=M, H=H, Hkv=Hkv, dh=dh, dm=dm, dk=dk, chunk_size=chunk_size)
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
    if hoisted:  # FlurkaAttention.project_kv, once for K and once for V
        t.gemm += 2 * (2 * B * dk * M * dm)  # E[:, :M] @ X: (dk, M) @ (B, M, dm)
        if projections:
            t.gemm += 2 * (2 * B * dk * dm * width)  # F.linear(E X, W): (B, dk, dm) @ (dm, out)
            if bias:
                t.gemm += 2 * (2 * B * dk * M)  # E 1: (dk, M) @ (B, M, 1)
                t.elem += 2 * (2 * B * dk * width)  # (E 1) * b, then the add
    else:
        if projections and dm is not None:
            t.gemm += 2 * (2 * B * M * dm * width)  # X W^T (addmm)
            if bias:
                t.elem += 2 * B * M * width  # the bias add inside addmm
        if dk is not None:
            t.gemm += 2 * (2 * B * Hkv * dk * M * dh)  # E[:, :M] @ K: (dk, M) @ (B, Hkv, M, dh)
    if dk is not None and padding_mask:
        t.gemm += 2 * B * M * dk  # lowrank_keep: padding (B, M) @ support^T (M, dk)
    K = M if dk is None else dk  # keys the attention core sees

    # -- attention core -----------------------------------------------------------------------
    if kernel == "softmax":  # SDPA over K keys
        if causal and not gemm_only:  # query i attends keys j <= i + (K - N)
            pairs = _causal_pairs(N, K)
        else:
            pairs = N * K
        t.gemm += 2 * 2 * B * H * pairs * dh  # q k^T and P v
        t.elem += B * H * (SOFTMAX_ELEMWISE_PER_SCORE * pairs + N * dh)
        return t.total(gemm_only)

    _key_features(t, kernel, B * Hkv * K, dh, m, groups=B * Hkv, causal=causal)
    _query_features(t, kernel, B * H * N, dh, m)
    if not causal:  # reference.kernel_state and kernel_readout
        t.gemm += 2 * B * Hkv * K * m * (dh + 1)  # [S | z] = phi(k)^T [v | 1]
        t.gemm += 2 * B * H * N * m * (dh + 1)  # phi(q) [S | z]
        t.elem += B * H * N * (1 + dh)  # + eps, division
        return t.total(gemm_only)
    C = chunk_size  # reference.causal_kernel_attention: N padded to nc chunks of C
    nc = -(-N // C)
    Np = nc * C
    if kernel == "performer":
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


def _env_calibration() -> object | None:
    """The calibration FLURKA_CALIBRATION opts into (passes/calibration.py), or None when the
    variable is unset: the default ranking is by FLOPs and imports nothing more."""
    if not os.environ.get("FLURKA_CALIBRATION", "").strip():
        return None
    from .calibration import from_env  # it imports this module: import lazily

    return from_env()


@dataclass(frozen=True)
class Choice:
    """The cost model's decision for one site: kernel, dk (None: no low-rank), features m
    (None for softmax), FLOPs of that configuration, and a reason for the report."""

    kernel: str
    dk: int | None
    num_features: int | None
    flops: int
    reason: str


def _label(kernel: str, dk: int | None, hoisted: bool) -> str:
    """Short name of a configuration for reasons: flurka(performer, dk=128, hoisted)."""
    method = method_of(kernel, dk)
    if method == "full":
        return "full softmax"
    parts = [] if kernel == "softmax" else [kernel]
    if dk is not None:
        parts.append(f"dk={dk}")
        if hoisted:
            parts.append("hoisted")
    return f"{method}({', '.join(parts)})"


def _ratio_text(flops: int, full: int) -> str:
    if flops == full:
        return "same FLOPs as full"
    if flops < full:
        return f"{full / max(flops, 1):.1f}x fewer FLOPs than full"
    return f"{flops / max(full, 1):.1f}x more FLOPs than full"


def choose(
    *, kernel: str, dk: int | str | None, num_features: int | None, B: int, N: int, M: int,
    H: int, Hkv: int, dh: int, dm: int | None, causal: bool, hoistable: bool,
    min_dk: int = 64, pretrained: bool = True, padding_mask: bool = False,
    calibration: object | None = None,
) -> Choice:
    """Resolve ``"auto"`` for ``kernel`` and/or ``dk`` at one site (DESIGN section 4).

    dk="auto": the cheapest of dk=None and the legal dk in [min_dk, M // 2] (the quality
    floor); None when M // 2 < min_dk. Causal sites: dk=None (low-rank is not causal). An
    int dk > M raises ValueError. kernel="auto": the cheapest of performer and full softmax
    (``pretrained=True``: performer is the kernel that approximates a pretrained softmax model
    without training), or of performer, relu, rnn and full softmax (``pretrained=False``),
    ties going to the earlier one. FLOPs: ``site_flops`` with projections when dm is known,
    hoisted when ``hoistable`` and low-rank; ``padding_mask``: the site has key padding. The
    reason string is shown in the report.

    ``calibration`` (a ``passes.calibration.Calibration``; default: the one the environment
    variable FLURKA_CALIBRATION opts into, else none): rank the candidates by its predicted
    seconds instead of FLOPs (``Choice.flops`` stays the FLOP count). Without one, FLOPs.
    """
    if kernel != "auto" and kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of "
                         f"{', '.join(KERNELS)}, auto")
    if not (dk is None or dk == "auto" or (isinstance(dk, int) and not isinstance(dk, bool))):
        raise ValueError(f"dk must be an int, None or 'auto'; got {dk!r}")
    if isinstance(dk, int) and dk < 1:
        raise ValueError(f"dk must be a positive int; got {dk}")
    _check_sizes(B=B, N=N, M=M, H=H, Hkv=Hkv, dh=dh, dm=dm, min_dk=min_dk)
    at = f"N={N}" if N == M else f"N={N}, M={M}"
    notes: list[str] = []
    if causal and dk is not None:
        notes.append(f"causal site: dk={dk} not applied (low-rank projection mixes future "
                     "tokens into every key)")
    elif isinstance(dk, int) and dk > M:
        raise ValueError(f"dk={dk} is larger than the key length M={M} at this site; use "
                         f"dk <= {M}, dk='auto' or dk=None")
    elif dk == "auto" and M // 2 < min_dk:
        notes.append(f"sequence too short for low-rank: M/2={M // 2} < min_dk={min_dk}, dk=None")

    def hoist(d: int | None) -> bool:
        return hoistable and d is not None and dm is not None

    def cost(k: str, d: int | None) -> int:
        return site_flops(
            kernel=k, dk=d, B=B, N=N, M=M, H=H, Hkv=Hkv, dh=dh, dm=dm,
            num_features=features_used(k, dh, num_features), causal=causal, hoisted=hoist(d),
            projections=dm is not None, padding_mask=padding_mask)

    def dk_options() -> list[int | None]:
        if causal or dk is None:
            return [None]
        if isinstance(dk, int):
            return [dk]
        if M // 2 < min_dk:
            return [None]
        return [None, min_dk, M // 2]  # cost is affine in dk: its minimum is at an end

    if kernel == "auto":
        pool = AUTO_KERNELS_PRETRAINED if pretrained else AUTO_KERNELS_TRAINABLE
        configs = [(k, d) for k in pool for d in ([None] if k == "softmax" else dk_options())]
    else:
        configs = [(kernel, d) for d in dk_options()]
    flop_costs = [cost(k, d) for k, d in configs]
    if calibration is None and len(configs) > 1:
        calibration = _env_calibration()
    calibrated = calibration is not None and len(configs) > 1

    def seconds(k: str, d: int | None) -> float:  # passes/calibration.py
        return calibration.site_seconds(
            kernel=k, dk=d, B=B, N=N, M=M, H=H, Hkv=Hkv, dh=dh, dm=dm,
            num_features=features_used(k, dh, num_features), causal=causal, hoisted=hoist(d),
            projections=dm is not None, padding_mask=padding_mask)

    costs = [seconds(k, d) for k, d in configs] if calibrated else flop_costs
    best = min(range(len(configs)), key=lambda i: (costs[i], i))  # ties: earlier wins
    k, d = configs[best]
    flops = flop_costs[best]
    full = cost("softmax", None)
    label = _label(k, d, hoist(d))
    if kernel == "auto" or dk == "auto":
        runner = [i for i in range(len(configs)) if i != best]
        if k == "softmax" and d is None:
            head = f"auto: full softmax kept, the cheapest at {at}"
            if runner:
                j = min(runner, key=lambda i: costs[i])
                more = costs[j] / (costs[best] or 1)
                head += (f" ({_label(*configs[j], hoist(configs[j][1]))} would cost "
                         f"{more:.2f}x as much)" if more < 1.1 else
                         f" ({_label(*configs[j], hoist(configs[j][1]))} would cost "
                         f"{more:.1f}x more)")
        else:
            head = f"auto: {label} {_ratio_text(flops, full)} at {at}"
        if kernel == "auto":
            head += ("; candidates performer (it approximates a pretrained softmax) and full"
                     if pretrained else "; candidates performer, relu, rnn and full")
        if dk == "auto" and d is not None:
            head += f"; dk={d} is the cheapest in [min_dk={min_dk}, M/2={M // 2}]"
        elif dk == "auto" and not causal and M // 2 >= min_dk:
            head += f"; no dk in [min_dk={min_dk}, M/2={M // 2}] is cheaper than dk=None"
        if calibrated:
            head += (f"; ranked by measured calibration: {1e3 * costs[best]:.3g} ms predicted "
                     f"(full softmax {1e3 * seconds('softmax', None):.3g} ms)")
    else:
        what = "exact" if k == "softmax" and d is None else _ratio_text(flops, full)
        head = f"{label} as asked: {what} at {at}"
        if d is not None and d > M // 2:
            notes.append(f"dk={d} > M/2={M // 2}: the low-rank projection saves little here")
    reason = "; ".join([head, *notes])
    return Choice(kernel=k, dk=d, num_features=features_used(k, dh, num_features),
                  flops=flops, reason=reason)
