"""Claim 1 on a grid, under the cost model's exact accounting (docs/cost_model.md).

Claim 1 (FLuRKA paper): for N > dk(H+2) > dm > dk > dh, FLuRKA costs fewer FLOPs than both the
low-rank and the kernel method. For every grid point inside that region this script counts,
with ``passes.cost_model.site_flops`` (B=1, self-attention, non-causal, K/V projections with
bias, default feature counts m), the FLOPs of

    flurka   kernel phi with dk, hoisted (E X before the projections)
    lr-h     low-rank softmax with dk, hoisted the same way
    lr-u     low-rank softmax with dk, unhoisted (E K after the projections, as in Linformer)
    kernel   kernel phi without dk (nothing to hoist)

and prints, per feature map, on how many points FLuRKA is cheaper. Two grids: ``standard``
(dm = H*dh, every head full width, Hkv = H) and ``free`` (dm independent of H*dh).

    python benchmarks/claim1_grid.py            # Markdown tables (pasted in docs/cost_model.md)
"""
from __future__ import annotations

import itertools

from flurka_rewrite.passes.cost_model import default_num_features, site_flops

FEATURE_MAPS = ("performer", "relu", "rnn", "ffk")


def grid(kind: str) -> list[dict[str, int]]:
    """Points (dh, H, dm, dk, N) of the Claim-1 region: N > dk(H+2) > dm > dk > dh."""
    points = []
    for dh, H, dk, N in itertools.product(
            (32, 48, 64, 80, 128), (2, 4, 8, 12, 16), (48, 64, 96, 128, 192, 256, 384, 512),
            (1024, 4096, 16384, 65536)):
        for dm in ((H * dh,) if kind == "standard" else (256, 512, 768, 1024, 2048)):
            if N > dk * (H + 2) > dm > dk > dh:
                points.append(dict(dh=dh, H=H, dm=dm, dk=dk, N=N))
    return points


def compare(kernel: str, p: dict[str, int]) -> dict[str, int]:
    """FLOPs of FLuRKA and the three baselines at one point."""
    g = dict(B=1, N=p["N"], M=p["N"], H=p["H"], Hkv=p["H"], dh=p["dh"], dm=p["dm"])
    return {
        "flurka": site_flops(kernel=kernel, dk=p["dk"], hoisted=True, **g),
        "lr-h": site_flops(kernel="softmax", dk=p["dk"], hoisted=True, **g),
        "lr-u": site_flops(kernel="softmax", dk=p["dk"], hoisted=False, **g),
        "kernel": site_flops(kernel=kernel, dk=None, **g),
    }


def table(kind: str) -> str:
    """Markdown table: per feature map, points where FLuRKA is cheaper than each baseline."""
    pts = grid(kind)
    lines = [f"grid `{kind}`: {len(pts)} points with N > dk(H+2) > dm > dk > dh", "",
             "| map | m (dh=64) | < lr-h | < lr-u | < kernel | < lr-h and < kernel |",
             "|---|---|---|---|---|---|"]
    for kernel in FEATURE_MAPS:
        wins = {"lr-h": 0, "lr-u": 0, "kernel": 0, "both": 0}
        for p in pts:
            f = compare(kernel, p)
            lh, lu, kr = f["flurka"] < f["lr-h"], f["flurka"] < f["lr-u"], f["flurka"] < f["kernel"]
            wins["lr-h"] += lh
            wins["lr-u"] += lu
            wins["kernel"] += kr
            wins["both"] += lh and kr
        n = len(pts)
        lines.append(f"| {kernel} | {default_num_features(kernel, 64)} | "
                     + " | ".join(f"{wins[k]}/{n}" for k in ("lr-h", "lr-u", "kernel", "both"))
                     + " |")
    return "\n".join(lines)


def per_query(kernel: str, dk: int | None, dh: int) -> int:
    """FLOPs per query row of one head in the attention core: the slope in N at fixed keys."""
    g = dict(kernel=kernel, dk=dk, B=1, M=4 * (dk or 64), H=1, Hkv=1, dh=dh, projections=False)
    return site_flops(**g, N=2) - site_flops(**g, N=1)


def threshold(kernel: str, dh: int) -> int | None:
    """Smallest dk at which FLuRKA's per-query cost is below low-rank's (leading order
    of the comparison with hoisted low-rank; the key side adds O(dk) per head)."""
    for dk in range(1, 64 * dh):
        if per_query(kernel, dk, dh) < per_query("softmax", dk, dh):
            return dk
    return None


def threshold_table() -> str:
    """Markdown table of ``threshold`` per feature map and head dim."""
    dhs = (32, 64, 80, 128)
    lines = ["| map | " + " | ".join(f"dh={d} (m)" for d in dhs) + " |",
             "|---|" + "---|" * len(dhs)]
    for kernel in FEATURE_MAPS:
        cells = [f"{threshold(kernel, d)} ({default_num_features(kernel, d)})" for d in dhs]
        lines.append(f"| {kernel} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Print both tables."""
    print(table("standard"))
    print()
    print(table("free"))
    print()
    print("smallest dk beating hoisted low-rank per query (leading order):")
    print()
    print(threshold_table())


if __name__ == "__main__":
    main()
