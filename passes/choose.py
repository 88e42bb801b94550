"""``choose``: resolve ``kernel="auto"`` and ``dk="auto"`` for one site (docs/design.md §4,
rule in docs/cost_model.md), ranking the candidates by their FLOPs (``cost_model.site_flops``)
or, when ``FLURKA_CALIBRATION`` opts in, by the seconds a measured calibration predicts
(passes/calibration.py)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from flurka_rewrite.kernels.registry import AUTO, SOFTMAX, auto_candidates, check_kernel

from .cost_model import check_sizes, features_used, method_of, site_flops

def _cheapest(cost: Callable[[int], int], floor: Callable[[int], int], lo: int, hi: int
              ) -> int:
    """The d in [lo, hi] of least ``cost`` (ties: the smaller d), given ``floor`` <= cost,
    affine in d. cost is affine too except for a pool E's banded products, so the minimum is
    at an end or within the few d next to it whose floor is below the best cost seen: scan
    from the cheaper end while the floor could still win."""
    best_d = min((lo, hi), key=lambda d: (cost(d), d))
    best = cost(best_d)
    step = 1 if floor(hi) >= floor(lo) else -1  # the floor rises away from this end
    for d in range(lo, hi + 1) if step == 1 else range(hi, lo - 1, -1):
        if floor(d) > best:
            break
        c = cost(d)
        if c < best or (c == best and d < best_d):
            best, best_d = c, d
    return best_d


def _env_calibration() -> object | None:
    """The calibration FLURKA_CALIBRATION opts into, or None when the variable is unset: the
    default ranking is by FLOPs and imports nothing more."""
    if not os.environ.get("FLURKA_CALIBRATION", "").strip():
        return None
    from .calibration import from_env

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
    parts = [] if kernel == SOFTMAX else [kernel]
    if dk is not None:
        parts.append(f"dk={dk}")
        if hoisted:
            parts.append("hoisted")
    return f"{method}({', '.join(parts)})"


def _candidates_text(maps: tuple[str, ...], pretrained: bool) -> str:
    """'; candidates performer (it approximates a pretrained softmax) and full'."""
    why = ""
    if pretrained:
        why = (" (it approximates a pretrained softmax)" if len(maps) == 1 else
               " (they approximate a pretrained softmax)")
    return f"; candidates {', '.join(maps)}{why} and full"


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
    calibration: object | None = None, e_init: str = "pool", max_seq_len: int | None = None,
    window: int | None = None,
) -> Choice:
    """Resolve ``"auto"`` for ``kernel`` and/or ``dk`` at one site (docs/design.md §4).

    dk="auto": the cheapest of dk=None and the legal dk in [min_dk, M // 2] (the quality
    floor); None when M // 2 < min_dk. Causal sites: dk=None (low-rank is not causal). An
    int dk > M raises ValueError. kernel="auto": the cheapest of ``auto_candidates`` (the
    registry's maps by ``auto_role``, then full softmax): performer and full softmax
    (``pretrained=True``: performer is the kernel that approximates a pretrained softmax model
    without training), or performer, relu, rnn and full softmax (``pretrained=False``), ties
    going to the earlier one. FLOPs: ``site_flops`` with projections when dm is known,
    hoisted when ``hoistable`` and low-rank; ``padding_mask``: the site has key padding;
    ``e_init`` / ``max_seq_len``: E's initialisation and width (a pool E runs banded). The
    reason string is shown in the report.

    ``window``: price every candidate but full softmax with the sliding window (which full
    softmax does not take); the choice itself is otherwise window-agnostic.

    ``calibration`` (a ``passes.calibration.Calibration``; default: the one the environment
    variable FLURKA_CALIBRATION opts into, else none): rank the candidates by its predicted
    seconds instead of FLOPs (``Choice.flops`` stays the FLOP count). Without one, FLOPs.
    """
    check_kernel(kernel, auto=True)
    if not (dk is None or dk == "auto" or (isinstance(dk, int) and not isinstance(dk, bool))):
        raise ValueError(f"dk must be an int, None or 'auto'; got {dk!r}")
    if isinstance(dk, int) and dk < 1:
        raise ValueError(f"dk must be a positive int; got {dk}")
    check_sizes(B=B, N=N, M=M, H=H, Hkv=Hkv, dh=dh, dm=dm, min_dk=min_dk)
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
            projections=dm is not None, padding_mask=padding_mask, e_init=e_init,
            max_seq_len=max_seq_len,
            window=None if (k == SOFTMAX and d is None) else window)

    def floor(k: str, d: int) -> int:
        """cost(k, d) without E's down-sampling products, which a pool E runs banded (not
        affine in d): a lower bound of cost(k, d) that is affine in d."""
        dense = site_flops(
            kernel=k, dk=d, B=B, N=N, M=M, H=H, Hkv=Hkv, dh=dh, dm=dm,
            num_features=features_used(k, dh, num_features), causal=causal, hoisted=hoist(d),
            projections=dm is not None, padding_mask=padding_mask, e_init="gaussian",
            window=window)
        return dense - 4 * B * (dm if hoist(d) else Hkv * dh) * d * M

    def dk_options(k: str) -> list[int | None]:
        if causal or dk is None:
            return [None]
        if isinstance(dk, int):
            return [dk]
        if M // 2 < min_dk:
            return [None]
        ends = [min_dk, M // 2]
        best = _cheapest(lambda d: cost(k, d), lambda d: floor(k, d), min_dk, M // 2)
        return [None, *ends, *([best] if best not in ends else [])]

    if kernel == AUTO:
        pool = auto_candidates(pretrained)
        configs = [(k, d) for k in pool for d in ([None] if k == SOFTMAX else dk_options(k))]
    else:
        configs = [(kernel, d) for d in dk_options(kernel)]
    flop_costs = [cost(k, d) for k, d in configs]
    if calibration is None and len(configs) > 1:
        calibration = _env_calibration()
    calibrated = calibration is not None and len(configs) > 1

    def seconds(k: str, d: int | None) -> float:  # passes/calibration.py
        return calibration.site_seconds(
            kernel=k, dk=d, B=B, N=N, M=M, H=H, Hkv=Hkv, dh=dh, dm=dm,
            num_features=features_used(k, dh, num_features), causal=causal, hoisted=hoist(d),
            projections=dm is not None, padding_mask=padding_mask, e_init=e_init,
            max_seq_len=max_seq_len)

    costs = [seconds(k, d) for k, d in configs] if calibrated else flop_costs
    best = min(range(len(configs)), key=lambda i: (costs[i], i))  # ties: earlier wins
    k, d = configs[best]
    flops = flop_costs[best]
    full = cost(SOFTMAX, None)
    label = _label(k, d, hoist(d))
    if kernel == AUTO or dk == "auto":
        runner = [i for i in range(len(configs)) if i != best]
        if k == SOFTMAX and d is None:
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
        if kernel == AUTO:
            head += _candidates_text(tuple(k for k in pool if k != SOFTMAX), pretrained)
        if dk == "auto" and d is not None:
            head += f"; dk={d} is the cheapest in [min_dk={min_dk}, M/2={M // 2}]"
        elif dk == "auto" and not causal and M // 2 >= min_dk:
            head += f"; no dk in [min_dk={min_dk}, M/2={M // 2}] is cheaper than dk=None"
        if calibrated:
            head += (f"; ranked by measured calibration: {1e3 * costs[best]:.3g} ms predicted "
                     f"(full softmax {1e3 * seconds(SOFTMAX, None):.3g} ms)")
    else:
        what = "exact" if k == SOFTMAX and d is None else _ratio_text(flops, full)
        head = f"{label} as asked: {what} at {at}"
        if d is not None and d > M // 2:
            notes.append(f"dk={d} > M/2={M // 2}: the low-rank projection saves little here")
    reason = "; ".join([head, *notes])
    return Choice(kernel=k, dk=d, num_features=features_used(k, dh, num_features),
                  flops=flops, reason=reason)
