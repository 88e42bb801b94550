"""Autotune configurations for the FLuRKA Triton kernels: small lists, pruned by shape.

Under ``TRITON_INTERPRET=1`` (CPU tests) every list is one small config: the interpreter is
slow and autotuning there would only multiply the run time. BLOCK_K (the head-dim chunk) of
the row, state and causal kernels is set by the launcher (``triton_launch.block_k``: dh's next
power of two up to 128, one chunk; 64 above, or FLURKA_TRITON_BLOCK_K), not tuned here: it
decides between the one-chunk and the chunked code path. ``flurka_dx_kernel`` (wide head dims
only) tunes its BLOCK_K, a grid tile there. Configs with BLOCK_DV > 128 serve dv > 128 only
(pruned below that): they cover dv = 325 in one or few blocks, so phi(x) is computed once
or twice per row block instead of once per 64/128 value columns.
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


def _smem_bytes(c: triton.Config, block_k: int, rows: int) -> int:
    """Rough shared-memory need of a config: pipelined (rows + features) x BLOCK_K operand
    tiles in 16-bit, plus the features x BLOCK_DV state tile in fp32."""
    f, v = c.kwargs["BLOCK_F"], c.kwargs["BLOCK_DV"]
    return max(1, c.num_stages) * ((rows + f) * block_k * 2 + f * v * 4)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose blocks are much wider than the problem (dv, m) or whose tiles would
    not fit in shared memory next to the head-dim chunk BLOCK_K (<= 128)."""
    dv, m = named_args["dv"], named_args["m"]
    block_k = kwargs.get("BLOCK_K", named_args.get("BLOCK_K", 64))
    chunk = kwargs.get("CHUNK", named_args.get("CHUNK", 64))
    dvp = max(16, triton.next_power_of_2(dv))
    mp = max(16, triton.next_power_of_2(m))
    kept = []
    for c in configs:
        rows = c.kwargs.get("BLOCK_R", 2 * chunk)  # the causal kernel holds q and k tiles
        if (c.kwargs["BLOCK_DV"] <= dvp and c.kwargs["BLOCK_F"] <= mp
                and _smem_bytes(c, block_k, rows) <= 160 * 1024):
            kept.append(c)
    if kept:
        return kept
    small = {  # same keys, small blocks, no pipelining: fits whatever the sizes
        k: (16 if k == "BLOCK_DV" and dvp <= 16 else 32) for k in configs[0].kwargs}
    return [triton.Config(small, num_warps=4, num_stages=1)]


def state_configs() -> list[triton.Config]:
    """flurka_state_kernel: (rows per step, features, value columns)."""
    if interpreting():
        return _INTERP
    return _select([_cfg(64, 64, 64, 4, 3), _cfg(64, 64, 128, 8, 3), _cfg(32, 128, 64, 4, 3),
                    _cfg(64, 128, 128, 8, 2), _cfg(32, 64, 64, 4, 2),
                    # wide dv (dv = 325): phi(x) once per 1-3 dv blocks, no pipelining
                    _cfg(32, 64, 128, 8, 1), _cfg(64, 32, 128, 8, 1), _cfg(32, 32, 256, 8, 1),
                    _cfg(32, 32, 512, 8, 1)])


def rows_fwd_configs() -> list[triton.Config]:
    """flurka_rows_fwd_kernel: (rows per program, features per step, value columns)."""
    if interpreting():
        return _INTERP
    return _select([_cfg(64, 64, 64, 4, 3), _cfg(128, 64, 64, 8, 3), _cfg(64, 64, 128, 8, 3),
                    _cfg(128, 32, 128, 8, 2), _cfg(128, 64, 128, 8, 2), _cfg(64, 32, 64, 4, 2),
                    # wide dv (dv = 325): fewer dv blocks, each of which recomputes phi(q);
                    # BLOCK_DV = 512: phi(q) once per row block (a 32 x 512 fp32 accumulator)
                    _cfg(64, 32, 128, 8, 1), _cfg(32, 32, 128, 4, 1), _cfg(64, 32, 256, 8, 1),
                    _cfg(32, 32, 512, 8, 1), _cfg(32, 64, 512, 8, 2)])


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
                                       (32, 128, 8, 2), (32, 256, 8, 1)]])


def causal_bwd_configs() -> list[triton.Config]:
    """The three causal backward kernels (dq, dk, dv): the chunk is fixed by the launcher;
    features, value columns. They hold two C x C fp32 tiles next to the q and k tiles, hence
    smaller feature blocks and less pipelining than the forward (untuned: no GPU measurement
    yet)."""
    if interpreting():
        return [triton.Config({"BLOCK_F": 32, "BLOCK_DV": 32}, num_warps=1, num_stages=1)]
    return _select([triton.Config({"BLOCK_F": f, "BLOCK_DV": v}, num_warps=w, num_stages=s)
                    for f, v, w, s in [(32, 64, 4, 2), (64, 64, 4, 1), (32, 64, 8, 2),
                                       (64, 128, 8, 1), (32, 32, 4, 1), (32, 256, 8, 1)]])


def dx_configs() -> list[triton.Config]:
    """flurka_dx_kernel (wide head dims): (rows, features per step, head-dim chunk BLOCK_K);
    untuned (no GPU measurement yet)."""
    if interpreting():
        return [triton.Config({"BLOCK_R": 32, "BLOCK_F": 32, "BLOCK_K": 64}, num_warps=1,
                              num_stages=1)]
    return _select([triton.Config({"BLOCK_R": r, "BLOCK_F": f, "BLOCK_K": k}, num_warps=w,
                                  num_stages=s)
                    for r, f, k, w, s in [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3),
                                          (64, 32, 128, 4, 3), (128, 32, 128, 8, 2),
                                          (64, 64, 128, 8, 2)]])


def lowrank_configs() -> list[triton.Config]:
    """flurka_lowrank_state_kernel (``triton_lowrank``): key columns per step (BLOCK_M),
    down-sampled rows per step (BLOCK_DK), features, value columns. Wide feature and value
    blocks first: every program recomputes its rows of K~ (and V~), so fewer programs per
    (batch, head) mean less recomputation (untuned: no GPU measurement yet)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_DK": 16, "BLOCK_F": 32, "BLOCK_DV": 32},
                              num_warps=1, num_stages=1)]
    return _select([triton.Config({"BLOCK_M": bm, "BLOCK_DK": bd, "BLOCK_F": f, "BLOCK_DV": v},
                                  num_warps=w, num_stages=s)
                    for bm, bd, f, v, w, s in [(64, 32, 128, 64, 8, 2), (64, 32, 64, 64, 4, 2),
                                               (32, 32, 128, 128, 8, 1), (64, 64, 64, 64, 8, 2),
                                               (32, 16, 256, 64, 8, 1)]])


PRUNE = {"early_config_prune": _prune}
