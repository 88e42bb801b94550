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


def _smem_bytes(c: triton.Config, block_d: int, rows: int) -> int:
    """Rough shared-memory need of a config: pipelined (rows + features) x BLOCK_D operand
    tiles in 16-bit, plus the features x BLOCK_DV state tile in fp32."""
    f, v = c.kwargs["BLOCK_F"], c.kwargs["BLOCK_DV"]
    return max(1, c.num_stages) * ((rows + f) * block_d * 2 + f * v * 4)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose blocks are much wider than the problem (dv, m) or whose tiles would
    not fit in shared memory next to a wide padded head dim (dh = 325 pads to 512)."""
    dv, m = named_args["dv"], named_args["m"]
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    chunk = kwargs.get("CHUNK", named_args.get("CHUNK", 64))
    dvp = max(16, triton.next_power_of_2(dv))
    mp = max(16, triton.next_power_of_2(m))
    kept = []
    for c in configs:
        rows = c.kwargs.get("BLOCK_R", 2 * chunk)  # the causal kernel holds q and k tiles
        if (c.kwargs["BLOCK_DV"] <= dvp and c.kwargs["BLOCK_F"] <= mp
                and _smem_bytes(c, block_d, rows) <= 160 * 1024):
            kept.append(c)
    small = {  # same keys, small blocks, no pipelining: fits whatever the head dim
        k: (16 if k == "BLOCK_DV" and dvp <= 16 else 32) for k in configs[0].kwargs}
    if kept and block_d < 256:
        return kept
    # Wide head dims: keep the small config as a safe candidate next to the kept ones (the
    # autotuner skips a config that runs out of shared memory; a lone config is not tried).
    return kept + [triton.Config(small, num_warps=4, num_stages=1)]


def state_configs() -> list[triton.Config]:
    """flurka_state_kernel: (rows per step, features, value columns)."""
    if interpreting():
        return _INTERP
    return _select([_cfg(64, 64, 64, 4, 3), _cfg(64, 64, 128, 8, 3), _cfg(32, 128, 64, 4, 3),
                    _cfg(64, 128, 128, 8, 2), _cfg(32, 64, 64, 4, 2),
                    # wide head dims (dh = 325 -> BLOCK_D = 512): no pipelining, wide dv
                    _cfg(32, 64, 128, 8, 1), _cfg(64, 32, 128, 8, 1)])


def rows_fwd_configs() -> list[triton.Config]:
    """flurka_rows_fwd_kernel: (rows per program, features per step, value columns)."""
    if interpreting():
        return _INTERP
    return _select([_cfg(64, 64, 64, 4, 3), _cfg(128, 64, 64, 8, 3), _cfg(64, 64, 128, 8, 3),
                    _cfg(128, 32, 128, 8, 2), _cfg(128, 64, 128, 8, 2), _cfg(64, 32, 64, 4, 2),
                    # wide head dims (dh = 325 -> BLOCK_D = 512): fewer dv blocks, each of
                    # which recomputes phi(q); no pipelining to fit the 512-wide tiles
                    _cfg(64, 32, 128, 8, 1), _cfg(32, 32, 128, 4, 1), _cfg(64, 32, 256, 8, 1)])


def rows_bwd_configs() -> list[triton.Config]:
    """flurka_rows_bwd_kernel: (rows per program, features per step, value columns per step)."""
    if interpreting():
        return _INTERP
    # BLOCK_R = 64 gave illegal memory accesses on an H100 (Triton 3.6, bf16/fp16 performer,
    # configs (64, 64, 64, 4) and (64, 32, 64, 8)) while 32 runs clean: only 32 here.
    return _select([_cfg(32, 64, 64, 4, 2), _cfg(32, 32, 64, 4, 2), _cfg(32, 64, 64, 8, 2),
                    _cfg(32, 128, 64, 8, 2)])


def causal_configs() -> list[triton.Config]:
    """flurka_causal_fwd_kernel: the chunk (BLOCK_R) is fixed by the launcher; features, dv."""
    if interpreting():
        return [triton.Config({"BLOCK_F": 32, "BLOCK_DV": 32}, num_warps=1, num_stages=1)]
    return _select([triton.Config({"BLOCK_F": f, "BLOCK_DV": v}, num_warps=w, num_stages=s)
                    for f, v, w, s in [(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2),
                                       (32, 128, 8, 2)]])


def causal_bwd_configs() -> list[triton.Config]:
    """The three causal backward kernels (dq, dk, dv): the chunk is fixed by the launcher;
    features, value columns. They hold two C x C fp32 tiles next to the q and k tiles, hence
    smaller feature blocks and less pipelining than the forward (untuned: no GPU measurement
    yet)."""
    if interpreting():
        return [triton.Config({"BLOCK_F": 32, "BLOCK_DV": 32}, num_warps=1, num_stages=1)]
    return _select([triton.Config({"BLOCK_F": f, "BLOCK_DV": v}, num_warps=w, num_stages=s)
                    for f, v, w, s in [(32, 64, 4, 2), (64, 64, 4, 1), (32, 64, 8, 2),
                                       (64, 128, 8, 1), (32, 32, 4, 1)]])


PRUNE = {"early_config_prune": _prune}
