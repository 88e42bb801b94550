"""Autotune configurations for the FLuRKA Triton kernels: small lists, pruned by shape.

Under ``TRITON_INTERPRET=1`` (CPU tests) every list is one small config: the interpreter is
slow and autotuning there would only multiply the run time. BLOCK_D (the padded head dim)
is not tuned: it is the next power of two of dh, set by the launcher.
"""
from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _select(configs: list[triton.Config]) -> list[triton.Config]:
    """All configs, or only number i when FLURKA_TRITON_CONFIG=i (debugging, quick GPU tests)."""
    pick = os.environ.get("FLURKA_TRITON_CONFIG")
    if pick is None or pick == "":
        return configs
    return [configs[int(pick) % len(configs)]]


def _cfg(r: int, f: int, v: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_R": r, "BLOCK_F": f, "BLOCK_DV": v}, num_warps=warps,
                         num_stages=stages)


_INTERP = [_cfg(32, 32, 32, 1, 1)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose blocks are much wider than the problem (dv, m) or whose tiles would
    not fit in registers next to a wide padded head dim."""
    dv, m = named_args["dv"], named_args["m"]
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    dvp = max(16, triton.next_power_of_2(dv))
    mp = max(16, triton.next_power_of_2(m))
    kept = [c for c in configs
            if c.kwargs["BLOCK_DV"] <= dvp and c.kwargs["BLOCK_F"] <= mp
            and c.kwargs["BLOCK_R"] * block_d <= 128 * 256]
    return kept or configs[:1]


def state_configs() -> list[triton.Config]:
    """flurka_state_kernel: (rows per step, features, value columns)."""
    if interpreting():
        return _INTERP
    return _select([_cfg(64, 64, 64, 4, 3), _cfg(64, 64, 128, 8, 3), _cfg(32, 128, 64, 4, 3),
                    _cfg(64, 128, 128, 8, 2), _cfg(32, 64, 64, 4, 2)])


def rows_fwd_configs() -> list[triton.Config]:
    """flurka_rows_fwd_kernel: (rows per program, features per step, value columns)."""
    if interpreting():
        return _INTERP
    return _select([_cfg(64, 64, 64, 4, 3), _cfg(128, 64, 64, 8, 3), _cfg(64, 64, 128, 8, 3),
                    _cfg(128, 32, 128, 8, 2), _cfg(128, 64, 128, 8, 2), _cfg(64, 32, 64, 4, 2)])


def rows_bwd_configs() -> list[triton.Config]:
    """flurka_rows_bwd_kernel: (rows per program, features per step, value columns per step)."""
    if interpreting():
        return _INTERP
    return _select([_cfg(64, 64, 64, 4, 2), _cfg(32, 64, 64, 4, 2), _cfg(64, 32, 64, 8, 2),
                    _cfg(128, 32, 64, 8, 2)])


def causal_configs() -> list[triton.Config]:
    """flurka_causal_fwd_kernel: the chunk (BLOCK_R) is fixed by the launcher; features, dv."""
    if interpreting():
        return [triton.Config({"BLOCK_F": 32, "BLOCK_DV": 32}, num_warps=1, num_stages=1)]
    return _select([triton.Config({"BLOCK_F": f, "BLOCK_DV": v}, num_warps=w, num_stages=s)
                    for f, v, w, s in [(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2),
                                       (32, 128, 8, 2)]])


PRUNE = {"early_config_prune": _prune}
