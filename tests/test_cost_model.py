"""Cost model (passes/cost_model.py) against counts taken on the reference implementation.

Oracles: ``FlopCounterMode`` (matrix products) and an op-level counter (every elementwise op on
activations) run on a tiny layer, K/V ``nn.Linear`` + ``FlurkaAttention`` (hoisted through
``project_kv``), with odd sizes. FLOP counts are integers: every comparison is exact.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.passes.choose import Choice, choose
from flurka_rewrite.passes.cost_model import (
    METHODS,
    default_num_features,
    method_of,
    site_flops,
)

aten = torch.ops.aten
KERNELS = ("performer", "relu", "rnn", "ffk", "eva", "softmax")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one thread avoids OpenMP start-up and contention on a loaded 2-core runner."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sdpa_products(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode's SDPA formula (q k^T and P v), for the CPU op it does not register."""
    b, hq, sq, d = q
    return 2 * b * hq * sq * k[-2] * d + 2 * b * hq * sq * k[-2] * v[-1]


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts CPU SDPA (``_scaled_dot_product_flash_attention_for_cpu``
    is missing from its registry, so on CPU it would count exact attention as 0)."""
    return FlopCounterMode(
        display=False,
        custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_products})


_ELEMWISE = {"add", "sub", "mul", "div", "exp", "relu", "elu", "sigmoid", "softplus", "clamp_min",
             "neg", "rsub", "add_", "sub_", "mul_", "div_", "exp_"}
_REDUCE = {"sum", "amax", "cumsum", "cummax"}
_GEMM = {"mm", "bmm", "addmm", "baddbmm"}


class OpCounter(TorchDispatchMode):
    """Counts FLOPs op by op, independently of the cost model: products as FlopCounterMode does
    (plus the bias add of addmm), 1 per output element of an arithmetic op, 1 per input element
    of a reduction, 5 per element of a softmax, SDPA as its products plus 5 per attended score
    and 1 per output element.
    Only ops fed by the activations count (ops on parameters alone are weight preparation)."""

    def __init__(self, *seeds: torch.Tensor) -> None:
        super().__init__()
        self.flops = 0
        self._live: dict[int, torch.Tensor] = {id(t): t for t in seeds}

    def _tainted(self, x) -> bool:
        return isinstance(x, torch.Tensor) and id(x) in self._live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = list(torch.utils._pytree.tree_leaves((args, kwargs)))
        if not any(self._tainted(a) for a in flat):
            return out
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                self._live[id(o)] = o
        name = func.overloadpacket.__name__
        o0 = out[0] if isinstance(out, (tuple, list)) else out
        if name in _GEMM:
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            self.flops += 2 * a.numel() * b.shape[-1]
            self.flops += o0.numel() if name in ("addmm", "baddbmm") else 0
        elif name in _ELEMWISE:
            self.flops += o0.numel()
        elif name in _REDUCE:
            self.flops += args[0].numel()
        elif name == "_softmax":  # one fused op: max, subtract, exp, sum, divide
            self.flops += 5 * o0.numel()
        elif name == "_scaled_dot_product_flash_attention_for_cpu":
            q, k, v = args[:3]
            n, m = q.shape[-2], k.shape[-2]
            keep = torch.ones(n, m, dtype=torch.bool)
            if kwargs.get("is_causal", args[4] if len(args) > 4 else False):
                keep = keep.tril(m - n)
            pairs = q.shape[0] * q.shape[1] * int(keep.sum())
            self.flops += pairs * (2 * q.shape[-1] + 2 * v.shape[-1] + 5) + o0.numel()
        return out


def run_site(kernel, dk, *, B, N, M, H, Hkv, dh, dm, causal, hoisted, bias, chunk, mode):
    """K/V nn.Linear (width dm) + FlurkaAttention on random inputs, under ``mode``."""
    attn = FlurkaAttention(
        kernel=kernel, heads=H, head_dim=dh, kv_heads=Hkv, dk=dk,
        max_seq_len=None if dk is None else M + 3,  # E sliced to M < M_max
        causal=causal, e_init="gaussian", backend="torch", chunk_size=chunk).eval()
    k_lin, v_lin = nn.Linear(dm, Hkv * dh, bias=bias), nn.Linear(dm, Hkv * dh, bias=bias)
    x, q = torch.randn(B, M, dm), torch.randn(B, H, N, dh)
    mode = mode(x, q)
    with torch.no_grad(), mode:
        if hoisted:
            k = attn.project_kv(x, k_lin.weight, k_lin.bias, "k")  # (B, dk, Hkv*dh)
            v = attn.project_kv(x, v_lin.weight, v_lin.bias, "v")
        else:
            k, v = k_lin(x), v_lin(x)  # (B, M, Hkv*dh)
        L = k.shape[1]
        k = k.view(B, L, Hkv, dh).transpose(1, 2)  # (B, Hkv, L, dh)
        v = v.view(B, L, Hkv, dh).transpose(1, 2)
        attn(q, k, v, source_len=M if hoisted else None)
    return mode.get_total_flops() if isinstance(mode, FlopCounterMode) else mode.flops


def _cases():
    for kernel, low, causal, gqa, hoisted in itertools.product(
            KERNELS, (False, True), (False, True), (False, True), (False, True)):
        if (hoisted and not low) or (low and causal):
            continue  # hoisting needs low-rank; low-rank is not causal
        cid = (f"{method_of(kernel, 1 if low else None)}-{kernel}-{'causal' if causal else 'bidir'}"
               f"-{'gqa' if gqa else 'mha'}{'-hoisted' if hoisted else ''}")
        yield pytest.param(kernel, low, causal, gqa, hoisted, id=cid)


SIZES = dict(B=2, dh=10, dm=22, chunk=8)  # N=37 is not a multiple of the chunk (8)


@pytest.mark.parametrize("kernel,low,causal,gqa,hoisted", list(_cases()))
def test_flops_match_reference(kernel, low, causal, gqa, hoisted):
    H, Hkv = (6, 2) if gqa else (3, 3)
    N, M = (37, 37) if causal else (37, 29)  # cross-attention shape when not causal
    dk = 13 if low else None
    geo = dict(B=SIZES["B"], N=N, M=M, H=H, Hkv=Hkv, dh=SIZES["dh"], dm=SIZES["dm"])
    for bias in (True, False) if hoisted else (not gqa,):  # unhoisted: one bias per case
        run = dict(causal=causal, hoisted=hoisted, bias=bias, chunk=SIZES["chunk"])
        model = dict(kernel=kernel, dk=dk, **geo, causal=causal, hoisted=hoisted, bias=bias,
                     chunk_size=SIZES["chunk"], max_seq_len=None if dk is None else M + 3)
        torch.manual_seed(0)
        gemm = run_site(kernel, dk, **geo, **run, mode=lambda *_: flop_counter())
        assert site_flops(**model, gemm_only=True) == gemm, f"products, bias={bias}"
        torch.manual_seed(0)
        total = run_site(kernel, dk, **geo, **run, mode=OpCounter)
        assert site_flops(**model) == total, f"all ops, bias={bias}"


def test_projections_flag_drops_only_the_projections():
    geo = dict(kernel="relu", dk=13, B=2, N=37, M=29, H=3, Hkv=3, dh=10, dm=22, gemm_only=True)
    with_proj = site_flops(**geo, hoisted=True)
    without = site_flops(**geo, hoisted=True, projections=False)
    # hoisted: (E X) W^T for K and V, plus (E 1) for the biases
    assert with_proj - without == 2 * (2 * 2 * 13 * 22 * 30) + 2 * (2 * 2 * 13 * 29)
    unhoisted = site_flops(**geo) - site_flops(**geo, projections=False)
    assert unhoisted == 2 * (2 * 2 * 29 * 22 * 30)


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
@pytest.mark.parametrize("kernel", ["performer", "relu", "ffk", "softmax"])
def test_pool_init_and_padding_mask(kernel, padded):
    """Default pool E with M_max well above M (its rows past M are empty keys, masked) and a
    key-padding mask (which adds lowrank_keep's (B, M) @ (M, dk) product)."""
    attn = FlurkaAttention(kernel=kernel, heads=3, head_dim=10, dk=13, max_seq_len=60,
                           backend="torch").eval()
    q, k, v = torch.randn(2, 3, 37, 10), torch.randn(2, 3, 29, 10), torch.randn(2, 3, 29, 10)
    pad = torch.ones(2, 29, dtype=torch.bool)
    pad[1, 20:] = False
    pad = pad if padded else None
    geo = dict(kernel=kernel, dk=13, B=2, N=37, M=29, H=3, Hkv=3, dh=10, projections=False,
               padding_mask=padded)
    with torch.no_grad(), flop_counter() as fc:
        attn(q, k, v, key_padding_mask=pad)
    assert site_flops(**geo, gemm_only=True) == fc.get_total_flops()
    counter = OpCounter(q, k, v, *([pad] if padded else []))
    with torch.no_grad(), counter:
        attn(q, k, v, key_padding_mask=pad)
    assert site_flops(**geo) == counter.flops


# -- Claim 1 (docs/cost_model.md, "Claim 1") ---------------------------------------------------
def _per_row(kernel: str, dh: int, m: int) -> tuple[int, int, int]:
    """(c_q, c_k, per-group) of the documented closed form: FLOPs per query row, per key row,
    and per (batch, kv-head) of a non-causal kernel core."""
    if kernel in ("relu", "rnn"):
        return 2 * dh + 2 * m * (dh + 1) + 1 + dh, 2 * dh + 2 * m * (dh + 1), 0
    if kernel == "performer":
        return 4 * dh * m + 7 * m + dh + 1, 4 * dh * m + 6 * m + 2 * dh + 1, 2
    return 6 * dh * m + 7 * m + dh + 1, 6 * dh * m + 7 * m, 0  # ffk


def _claim1_grid(standard: bool):
    for dh, H, dk, N in itertools.product((32, 64, 80), (2, 4, 12), (48, 96, 128, 256, 384),
                                          (1024, 16384)):
        for dm in ((H * dh,) if standard else (256, 768)):
            if N > dk * (H + 2) > dm > dk > dh:
                yield dict(dh=dh, H=H, dm=dm, dk=dk, N=N)


@pytest.mark.parametrize("kernel", ["performer", "relu", "rnn", "ffk"])
def test_claim1_closed_forms(kernel):
    """FLOPs(low-rank, hoisted) - FLOPs(flurka, hoisted) and FLOPs(kernel) - FLOPs(flurka,
    hoisted) equal the closed forms of docs/cost_model.md at every grid point. The closed
    forms are the paper's, for a dense E (gaussian); a pool E runs banded and is checked
    against FlopCounterMode in test_banded_pool_E_is_counted_as_it_runs."""
    pts = list(_claim1_grid(True)) + list(_claim1_grid(False))
    assert len(pts) > 40
    for p in pts:
        dh, H, dm, dk, N = p["dh"], p["H"], p["dm"], p["dk"], p["N"]
        m = default_num_features(kernel, dh)
        g = dict(B=1, N=N, M=N, H=H, Hkv=H, dh=dh, dm=dm, e_init="gaussian")
        flurka = site_flops(kernel=kernel, dk=dk, hoisted=True, **g)
        c_q, c_k, c_g = _per_row(kernel, dh, m)
        d_lr = H * N * (4 * dk * dh + 5 * dk + dh - c_q) - H * (dk * c_k + c_g)
        assert site_flops(kernel="softmax", dk=dk, hoisted=True, **g) - flurka == d_lr, p
        w = H * dh
        d_k = (4 * dm * w * (N - dk) - 4 * dk * N * dm + 2 * N * w - 4 * dk * N - 4 * dk * w
               + H * (N - dk) * c_k)
        assert site_flops(kernel=kernel, dk=None, **g) - flurka == d_k, p


@pytest.mark.parametrize("kernel", ["performer", "relu", "rnn", "ffk"])
def test_claim1_region(kernel):
    """Where Claim 1 holds under this accounting (docs/cost_model.md): with dm = H*dh, FLuRKA
    beats the kernel method everywhere; it beats hoisted low-rank everywhere for relu/rnn, and
    for the performer exactly where dk > m (on this grid, N >= 1024, no dk in (m, m + 3])."""
    for p in _claim1_grid(True):
        g = dict(B=1, N=p["N"], M=p["N"], H=p["H"], Hkv=p["H"], dh=p["dh"], dm=p["dm"])
        flurka = site_flops(kernel=kernel, dk=p["dk"], hoisted=True, **g)
        assert flurka < site_flops(kernel=kernel, dk=None, **g), p
        lowrank = site_flops(kernel="softmax", dk=p["dk"], hoisted=True, **g)
        if kernel in ("relu", "rnn"):
            assert flurka < lowrank, p
        elif kernel == "performer":
            assert (flurka < lowrank) == (p["dk"] > default_num_features(kernel, p["dh"])), p


def test_claim1_fails_when_projection_narrower_than_dk():
    """dm free of H*dh: with Hkv*dh < dk, down-sampling X with a dense E (dk*N*dm) costs more
    than the projection rows it saves, and the kernel method is cheaper (docs: 'free' grid).
    A pool E down-samples banded (about 32*N*dm), which is why it is not the case there."""
    g = dict(B=1, N=16384, M=16384, H=2, Hkv=2, dh=32, dm=256,  # Hkv*dh = 64 < dk = 96
             e_init="gaussian")
    assert 16384 > 96 * (2 + 2) > 256 > 96 > 32  # inside the claimed region
    for kernel in ("relu", "rnn", "performer"):
        assert site_flops(kernel=kernel, dk=96, hoisted=True, **g) > site_flops(
            kernel=kernel, dk=None, **g), kernel


# -- choose() ---------------------------------------------------------------------------------
SITE = dict(num_features=None, B=1, H=12, Hkv=12, dh=64, dm=768, hoistable=True)


@pytest.mark.parametrize("dk", [None, 128, "auto"], ids=["dk-none", "dk-128", "dk-auto"])
@pytest.mark.parametrize("kernel", ["auto", "performer", "relu", "softmax"])
def test_choose_causal_drops_dk(kernel, dk):
    c = choose(kernel=kernel, dk=dk, N=1000, M=1000, causal=True, **SITE)
    assert c.dk is None
    if dk is not None:
        assert "causal" in c.reason and "dk" in c.reason, c.reason
    assert c.flops == site_flops(kernel=c.kernel, dk=None, N=1000, M=1000, H=12, Hkv=12, dh=64,
                                 dm=768, B=1, causal=True, num_features=c.num_features)


@pytest.mark.parametrize("M", [130, 256, 999, 4000])
@pytest.mark.parametrize("min_dk", [64, 100])
def test_choose_auto_dk_is_the_cheapest_legal(M, min_dk):
    c = choose(kernel="relu", dk="auto", N=M, M=M, causal=False, min_dk=min_dk, **SITE)
    g = dict(kernel="relu", B=1, N=M, M=M, H=12, Hkv=12, dh=64, dm=768)
    legal = {d: site_flops(dk=d, hoisted=True, **g) for d in range(min_dk, M // 2 + 1)}
    legal[None] = site_flops(dk=None, **g)
    best = min(legal.values())
    assert c.dk is None or min_dk <= c.dk <= M // 2
    assert c.flops == best == legal[c.dk], (c, best)
    assert "auto" in c.reason and f"N={M}" in c.reason


def test_choose_too_short_for_lowrank():
    c = choose(kernel="performer", dk="auto", N=100, M=100, causal=False, **SITE)  # 50 < 64
    assert c.dk is None and "too short" in c.reason and "min_dk=64" in c.reason


def test_choose_explicit_dk_larger_than_m_raises():
    with pytest.raises(ValueError, match=r"dk=300.*M=257"):
        choose(kernel="relu", dk=300, N=257, M=257, causal=False, **SITE)
    ok = choose(kernel="relu", dk=200, N=257, M=257, causal=False, **SITE)  # > M/2 but legal
    assert ok.dk == 200


@pytest.mark.parametrize("N", [64, 300, 2048, 16384])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("pretrained", [True, False], ids=["pretrained", "trainable"])
def test_choose_auto_kernel_is_the_cheapest_by_the_rule(N, causal, pretrained):
    c = choose(kernel="auto", dk="auto", N=N, M=N, causal=causal, pretrained=pretrained, **SITE)
    pool = ("performer", "softmax") if pretrained else ("performer", "relu", "rnn", "softmax")
    assert c.kernel in pool
    fixed = {k: choose(kernel=k, dk=None if k == "softmax" else "auto", N=N, M=N, causal=causal,
                       **SITE) for k in pool}
    assert c.flops == min(f.flops for f in fixed.values())
    assert (c.kernel, c.dk) == (fixed[c.kernel].kernel, fixed[c.kernel].dk)
    assert c.num_features == default_num_features(c.kernel, 64)
    if c.kernel == "softmax":
        assert c.dk is None and "full softmax kept" in c.reason
    else:
        assert "fewer FLOPs than full" in c.reason, c.reason
    if N == 64:
        assert c.kernel == "softmax"  # very short: exact attention is cheapest
    if N == 16384:
        assert c.kernel == ("performer" if pretrained else "relu")  # relu ties rnn, listed first


def test_choose_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown kernel 'favor'"):
        choose(kernel="favor", dk=None, N=64, M=64, causal=False, **SITE)
    with pytest.raises(ValueError, match="dk must be"):
        choose(kernel="relu", dk="big", N=64, M=64, causal=False, **SITE)


def test_method_of_and_defaults():
    assert [method_of(k, d) for k, d in [("softmax", None), ("softmax", 8), ("rnn", None),
                                         ("performer", 8)]] == list(METHODS)
    assert default_num_features("performer", 64) == 272  # 64 ln 64 = 266.2 -> multiple of 16
    assert default_num_features("relu", 48) == 48 and default_num_features("softmax", 48) is None
    assert isinstance(choose(kernel="rnn", dk=None, N=64, M=64, causal=False, **SITE), Choice)


@pytest.mark.parametrize("e_init", ["pool", "gaussian"])
@pytest.mark.parametrize("hoisted", [False, True], ids=["unhoisted", "hoisted"])
@pytest.mark.parametrize("M", [256, 200], ids=["M=Mmax", "M<Mmax"])
def test_banded_pool_E_is_counted_as_it_runs(e_init, hoisted, M):
    """A pool E with dk >= 64 runs band by band (kernels/reference.py lowrank_bands), so the
    report must count only its non-zero blocks. Oracle: FlopCounterMode on the real module,
    with E of width 256 and keys of length M (the banded product is clipped to M)."""
    B, H, dh, dk, dm, L, m = 1, 2, 16, 64, 24, 256, 32
    attn = FlurkaAttention(kernel="performer", heads=H, head_dim=dh, dk=dk, max_seq_len=L,
                           num_features=m, e_init=e_init, backend="torch").eval()
    if e_init == "pool":
        assert attn._bands is not None  # the case under test: E runs banded
    k_lin, v_lin = nn.Linear(dm, H * dh), nn.Linear(dm, H * dh)
    x, q = torch.randn(B, M, dm), torch.randn(B, H, M, dh)
    mode = flop_counter()
    with torch.no_grad(), mode:
        if hoisted:
            k, v = (attn.project_kv(x, lin.weight, lin.bias, w) for lin, w in
                    ((k_lin, "k"), (v_lin, "v")))
        else:
            k, v = k_lin(x), v_lin(x)
        n = k.shape[1]
        k, v = (t.view(B, n, H, dh).transpose(1, 2) for t in (k, v))
        attn(q, k, v, source_len=M if hoisted else None)
    predicted = site_flops(kernel="performer", dk=dk, B=B, N=M, M=M, H=H, Hkv=H, dh=dh, dm=dm,
                           num_features=m, hoisted=hoisted, gemm_only=True, e_init=e_init,
                           max_seq_len=L)
    assert predicted == mode.get_total_flops()
    dense = site_flops(kernel="performer", dk=dk, B=B, N=M, M=M, H=H, Hkv=H, dh=dh, dm=dm,
                       num_features=m, hoisted=hoisted, gemm_only=True, e_init="gaussian",
                       max_seq_len=L)
    assert (predicted < dense) == (e_init == "pool")
