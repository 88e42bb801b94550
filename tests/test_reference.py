"""Oracles for ``kernels/reference.py``: every attention variant against a brute-force O(N^2)
evaluation in float64 written here, independently of the code under test (docs/design.md §6).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flurka_rewrite.kernels.feature_maps import build_feature_map
from flurka_rewrite.kernels.reference import (
    attention_core,
    causal_kernel_attention,
    flurka_attention,
    kernel_attention,
    lowrank_keep,
    lowrank_project,
    softmax_attention,
)

KERNELS = ["performer", "relu", "rnn", "ffk"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, M, d) -> (B, H, M, d): query head h reads kv-head h // (H // Hkv)."""
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def brute_softmax(q, k, v, *, mask=None, causal=False, scale=None, key_padding_mask=None):
    """softmax(s q k^T + mask) v with explicit (N, M) matrices, in float64."""
    q, k, v = q.double(), repeat_kv(k.double(), q.shape[1]), repeat_kv(v.double(), q.shape[1])
    s = scale if scale is not None else q.shape[-1] ** -0.5
    logits = s * torch.einsum("bhnd,bhmd->bhnm", q, k)
    N, M = logits.shape[-2:]
    allowed = torch.ones(N, M, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(N, M, dtype=torch.bool).tril(M - N)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].bool()
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            logits = logits + mask.double()
    logits = logits.masked_fill(~allowed, -math.inf)
    return torch.softmax(logits, -1) @ v


def make_map(name: str, dh: int, kv_heads: int, seed: int = 0):
    fm = build_feature_map(name, head_dim=dh, kv_heads=kv_heads, seed=seed)
    if name == "ffk":  # move off the initialisation so the test sees a generic gated MLP
        with torch.no_grad():
            for p in fm.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return fm


def brute_kernel(fm, q, k, v, *, causal=False, eps=0.0, key_padding_mask=None):
    """O_i = sum_j phi(q_i).phi(k_j) v_j / (sum_j phi(q_i).phi(k_j) + eps), phi from
    ``FeatureMap.formula`` (no stabilizer), explicit (N, M) matrix in float64."""
    H = q.shape[1]
    pq = fm.formula(q, is_query=True).double()
    pk = repeat_kv(fm.formula(k, is_query=False).double(), H)  # map kv heads, then repeat
    A = pq @ pk.transpose(-1, -2)  # (B, H, N, M)
    if causal:
        A = A.tril()
    if key_padding_mask is not None:
        A = A * key_padding_mask[:, None, None, :].double()
    return (A @ repeat_kv(v.double(), H)) / (A.sum(-1, keepdim=True) + eps)


# --- exact softmax -----------------------------------------------------------------------
MASK_CASES = ["none", "bool", "additive", "causal", "causal+padding", "padding", "gqa",
              "gqa+causal"]


@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("N,dh", [(63, 48), (37, 80)], ids=["N63-dh48", "N37-dh80"])
def test_softmax_attention_matches_brute_force_and_sdpa(case, N, dh):
    g = torch.Generator().manual_seed(1)
    B, H = 2, 4
    hkv = 2 if "gqa" in case else H
    q = torch.randn(B, H, N, dh, generator=g)
    k, v = (torch.randn(B, hkv, N, dh, generator=g) for _ in range(2))
    mask = kpm = None
    causal = "causal" in case
    if case == "bool":
        mask = torch.rand(B, 1, N, N, generator=g) > 0.3
        mask[..., 0] = True  # every row attends somewhere
    if case == "additive":
        mask = torch.randn(B, H, N, N, generator=g)
    if "padding" in case:
        kpm = torch.ones(B, N, dtype=torch.bool)
        kpm[0, N - 10:] = False
    out = softmax_attention(q, k, v, attn_mask=mask, key_padding_mask=kpm, causal=causal)
    ref = brute_softmax(q, k, v, mask=mask, causal=causal, key_padding_mask=kpm)
    # fp32 SDPA vs float64 brute force: a few ulp of fp32 over a length-63 sum.
    assert rel_err(out, ref) < 1e-5, f"softmax_attention({case}) vs brute force"
    if kpm is None:
        sdpa = F.scaled_dot_product_attention(q, repeat_kv(k, H), repeat_kv(v, H), attn_mask=mask,
                                              is_causal=causal)
        assert rel_err(out, sdpa) < 1e-5, "softmax_attention vs SDPA"


# --- kernel attention: each map against its own formula -------------------------------------
@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("N,dh,hkv", [(63, 48, 3), (130, 16, 1)], ids=["N63-dh48-mha", "N130-gqa"])
def test_kernel_attention_matches_formula(name, causal, N, dh, hkv):
    g = torch.Generator().manual_seed(2)
    B, H = 2, 3
    q = torch.randn(B, H, N, dh, generator=g) * 0.7
    k, v = (torch.randn(B, hkv, N, dh, generator=g) * 0.7 for _ in range(2))
    fm = make_map(name, dh, hkv)
    # eps=0: the performer's stabilizers rescale the denominator, so an absolute eps would
    # differ from the brute force by eps/den; without it the two are the same ratio.
    out = attention_core(q, k, v, feature_map=fm, causal=causal, eps=0.0, chunk_size=16)
    ref = brute_kernel(fm, q, k, v, causal=causal)
    # fp32 features and sums against float64: 1e-5 relative (observed ~5e-7).
    assert rel_err(out, ref) < 1e-5, f"{name} causal={causal} vs brute force"


@pytest.mark.parametrize("name", ["relu", "rnn", "ffk"])
def test_kernel_attention_eps_convention(name):
    """Maps without a stabilizer: O = phi(q)S / (phi(q)z + eps) with eps in plain units."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 21, 8, generator=g) for _ in range(3))
    fm = make_map(name, 8, 2)
    eps = 0.5  # large, so a missing or misplaced eps is visible
    out = kernel_attention(fm(q, is_query=True), fm(k, is_query=False), v, eps=eps)
    ref = brute_kernel(fm, q, k, v, eps=eps)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("name", KERNELS)
def test_causal_output_ignores_future_tokens(name):
    g = torch.Generator().manual_seed(4)
    B, H, N, dh, i = 1, 2, 77, 16, 40
    q, k, v = (torch.randn(B, H, N, dh, generator=g) for _ in range(3))
    fm = make_map(name, dh, H)
    out = attention_core(q, k, v, feature_map=fm, causal=True, chunk_size=16)
    k2, v2, q2 = k.clone(), v.clone(), q.clone()
    # Future keys with huge norms: a stabilizer shared by all keys would shift every past
    # feature (and underflow them); the causal path must not notice.
    k2[:, :, i + 1:] = 50 * torch.randn(B, H, N - i - 1, dh, generator=g)
    v2[:, :, i + 1:] = 1e3
    q2[:, :, i + 1:] = 0.0
    out2 = attention_core(q2, k2, v2, feature_map=fm, causal=True, chunk_size=16)
    # Same arithmetic on positions <= i: equal up to fp32 reassociation (1e-6).
    assert rel_err(out2[:, :, : i + 1], out[:, :, : i + 1]) < 1e-6, f"{name}: future leaked"
    assert not torch.allclose(out2[:, :, i + 1:], out[:, :, i + 1:]), "test must change outputs"


def test_causal_chunk_size_does_not_change_result():
    g = torch.Generator().manual_seed(5)
    phi_q, phi_k = (torch.rand(2, 4, 101, 12, generator=g) for _ in range(2))
    v = torch.randn(2, 2, 101, 8, generator=g)
    a = causal_kernel_attention(phi_q, phi_k[:, :2], v, chunk_size=7)
    b = causal_kernel_attention(phi_q, phi_k[:, :2], v, chunk_size=128)
    assert rel_err(a, b) < 1e-5


def test_causal_needs_equal_lengths():
    with pytest.raises(ValueError, match="N=5, M=6"):
        causal_kernel_attention(torch.rand(1, 1, 5, 4), torch.rand(1, 1, 6, 4),
                                torch.rand(1, 1, 6, 4))


# --- GQA -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["softmax", *KERNELS])
def test_gqa_equals_repeated_kv_heads(name):
    g = torch.Generator().manual_seed(6)
    B, H, hkv, N, dh = 2, 6, 2, 45, 16
    q = torch.randn(B, H, N, dh, generator=g)
    k, v = (torch.randn(B, hkv, N, dh, generator=g) for _ in range(2))
    fm = None if name == "softmax" else make_map(name, dh, hkv)
    out = attention_core(q, k, v, feature_map=fm)
    if name == "ffk":  # the repeated problem needs ffk weights repeated per query head too
        fm_rep = make_map(name, dh, H)
        with torch.no_grad():
            for p_rep, p in zip(fm_rep.parameters(), fm.parameters()):
                p_rep.copy_(p.repeat_interleave(H // hkv, 0))
        fm = fm_rep
    ref = attention_core(q, repeat_kv(k, H), repeat_kv(v, H), feature_map=fm)
    assert rel_err(out, ref) < 1e-5


# --- low-rank ----------------------------------------------------------------------------------
def test_lowrank_project_slices_and_zeroes_padding():
    g = torch.Generator().manual_seed(7)
    E = torch.randn(5, 40, generator=g)
    x = torch.randn(2, 3, 29, 6, generator=g)
    kpm = torch.ones(2, 29, dtype=torch.bool)
    kpm[1, 20:] = False
    out = lowrank_project(x, E, kpm)
    ref = torch.einsum("rm,bhmd->bhrd", E[:, :29].double(), x.double() * kpm[:, None, :, None])
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("M", [100, 77, 30], ids=["M=max", "M<max", "M<dk"])
def test_lowrank_bands_equal_dense_product(M):
    """A pool-structured E (blocks of positions, dk=40 rows over 100 positions, 7 rows per
    band) projected band by band equals the dense product, with and without padding."""
    from flurka_rewrite.kernels.attention import init_lowrank
    from flurka_rewrite.kernels.reference import lowrank_bands

    g = torch.Generator().manual_seed(13)
    support = init_lowrank(40, 100, "pool", g) != 0
    E = torch.randn(40, 100, generator=g) * support  # trained values, same block structure
    bands = lowrank_bands(support, rows_per_band=7)
    assert bands is not None and len(bands) == 6
    x = torch.randn(2, 3, M, 5, generator=g)
    kpm = torch.rand(2, M, generator=g) > 0.3
    for mask in (None, kpm):
        ref = torch.einsum("rm,bhmd->bhrd", E[:, :M].double(),
                           x.double() * (1.0 if mask is None else mask[:, None, :, None].double()))
        assert rel_err(lowrank_project(x, E, mask, bands=bands), ref) < 1e-6
    assert lowrank_bands(torch.ones(40, 100)) is None  # dense: nothing to skip


@pytest.mark.parametrize("M", [65, 1000])
def test_lowrank_past_max_len_names_the_length(M):
    with pytest.raises(ValueError, match=rf"sequence length {M} exceeds the maximum 64"):
        lowrank_project(torch.randn(1, M, 4), torch.randn(8, 64))


def test_lowrank_project_half_sums_in_fp32():
    """Half inputs whose fp16 partial sums would overflow (2000 * 60 > 65504) but whose
    result fits: the product must be accumulated in fp32."""
    x = torch.full((1, 2000, 4), 60.0, dtype=torch.float16)
    E = torch.full((3, 2000), 1.0 / 2000)
    out = lowrank_project(x, E)
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), torch.full((1, 3, 4), 60.0), rtol=1e-3)


def test_lowrank_keep_masks_empty_rows():
    E = torch.zeros(4, 8)
    for r in range(4):
        E[r, 2 * r: 2 * r + 2] = 0.5  # pool blocks of 2
    assert lowrank_keep(E, E, 8, None, 2) is None
    rows = lowrank_keep(E, E, 5, None, 2)  # rows 3 (positions 6, 7) is past M=5
    assert rows.tolist() == [[True, True, True, False]] * 2
    kpm = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert lowrank_keep(E, E, 8, kpm, 2).tolist() == [[True] * 4, [True, True, False, False]]


PAD_CASES = [(n, "kernel-only") for n in KERNELS] + [(n, "low-rank") for n in ["softmax", *KERNELS]]


@pytest.mark.parametrize("name,mode", PAD_CASES, ids=[f"{n}-{m}" for n, m in PAD_CASES])
def test_padding_equals_truncated_sequence(name, mode):
    """Right padding contributes nothing: the padded batch row equals the same row computed on
    its unpadded length (for low-rank, E sliced to that length). Also: changing the padded
    tokens' values changes nothing."""
    g = torch.Generator().manual_seed(8)
    B, H, N, dh, real = 2, 2, 50, 16, 31
    q, k, v = (torch.randn(B, H, N, dh, generator=g) for _ in range(3))
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, real:] = False
    fm = None if name == "softmax" else make_map(name, dh, H)
    E = F_ = None
    if mode == "low-rank":
        E = torch.randn(12, 64, generator=g) / 12**0.5
        F_ = torch.randn(12, 64, generator=g) / 12**0.5
    run = lambda q, k, v, kpm: flurka_attention(q, k, v, feature_map=fm, E=E, F_=F_,  # noqa: E731
                                               key_padding_mask=kpm)
    out = run(q, k, v, kpm)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, real:] = 1e4 * torch.randn(H, N - real, dh, generator=g)
    v2[1, :, real:] = float("nan")
    out2 = run(q, k2, v2, kpm)
    assert torch.equal(out2, out), "padded token values changed the output"
    short = run(q[1:], k[1:, :, :real], v[1:, :, :real], None)
    # Same sums up to the zero terms of the padding (fp32 order may differ): 1e-5.
    assert rel_err(out[1:], short) < 1e-5


def test_lowrank_attention_matches_brute_force():
    """Linformer (softmax over E K) and FLuRKA (kernel over E K) against explicit products."""
    g = torch.Generator().manual_seed(9)
    B, H, N, dh, dk = 1, 2, 57, 16, 10
    q, k, v = (torch.randn(B, H, N, dh, generator=g) for _ in range(3))
    E, F_ = torch.randn(dk, 70, generator=g) / dk**0.5, torch.randn(dk, 70, generator=g) / dk**0.5
    kt = torch.einsum("rm,bhmd->bhrd", E[:, :N].double(), k.double())
    vt = torch.einsum("rm,bhmd->bhrd", F_[:, :N].double(), v.double())
    lin = flurka_attention(q, k, v, E=E, F_=F_)
    assert rel_err(lin, brute_softmax(q, kt, vt)) < 1e-5
    fm = make_map("rnn", dh, H)
    fl = flurka_attention(q, k, v, E=E, F_=F_, feature_map=fm)
    assert rel_err(fl, brute_kernel(fm, q, kt.float(), vt.float(), eps=1e-6)) < 1e-5


def test_lowrank_refuses_causal():
    E = torch.randn(4, 16)
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(ValueError, match="cannot be causal"):
        flurka_attention(q, q, q, E=E, F_=E, causal=True)


# --- dtypes and sizes ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["softmax", *KERNELS])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_half_inputs_large_logits_are_finite_and_match_fp32(dtype, name, causal):
    """q, k scaled by 30 (logits in the thousands): fp16 would overflow exp and the sums; the
    operator accumulates in fp32, so the output is finite and equals the fp32 computation on
    the same (rounded) inputs up to the output's rounding."""
    g = torch.Generator().manual_seed(10)
    B, H, N, dh = 1, 2, 70, 16
    q, k = (30 * torch.randn(B, H, N, dh, generator=g) for _ in range(2))
    v = torch.randn(B, H, N, dh, generator=g)
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    fm = None if name == "softmax" else make_map(name, dh, H)
    out = attention_core(qh, kh, vh, feature_map=fm, causal=causal, chunk_size=16)
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), f"{name} {dtype}: non-finite output"
    ref = attention_core(qh.float(), kh.float(), vh.float(), feature_map=fm, causal=causal,
                         chunk_size=16)
    # Outputs are convex combinations of v (|v| < 5): compare absolutely at the output's
    # rounding, 8 ulp of bf16 around 1 (0.06) / of fp16 (0.008).
    tol = 0.06 if dtype == torch.bfloat16 else 0.008
    assert (out.float() - ref).abs().max() < tol


@pytest.mark.parametrize("name", ["softmax", "performer", "rnn"])
def test_long_odd_length(name):
    """N = 500 (not a multiple of the chunk or of any block size), dh = 80."""
    g = torch.Generator().manual_seed(11)
    B, H, N, dh = 1, 1, 500, 80
    q, k, v = (torch.randn(B, H, N, dh, generator=g) * 0.5 for _ in range(3))
    fm = None if name == "softmax" else make_map(name, dh, H)
    for causal in (False, True):
        out = attention_core(q, k, v, feature_map=fm, causal=causal, eps=0.0)
        ref = brute_softmax(q, k, v, causal=causal) if fm is None else brute_kernel(
            fm, q, k, v, causal=causal)
        assert rel_err(out, ref) < 1e-5, f"{name} causal={causal}"


def test_chunked_readout_matches_unchunked(monkeypatch):
    """attention_core reads phi(q) out a block of rows at a time; the blocks (here 7 rows,
    forced) must give the same result as one kernel_attention over all rows, in both the
    no-grad path (written into a (B, N, H, d) buffer) and the autograd path."""
    import flurka_rewrite.kernels.reference as ref_mod

    g = torch.Generator().manual_seed(12)
    B, H, N, dh = 2, 3, 61, 16
    q = torch.randn(B, N, H, dh, generator=g).transpose(1, 2)  # (B, H, N, dh) view
    k, v = (torch.randn(B, H, 20, dh, generator=g) for _ in range(2))
    fm = make_map("performer", dh, H)
    whole = kernel_attention(fm(q, is_query=True), fm(k, is_query=False), v)
    monkeypatch.setattr(ref_mod, "_CHUNK_ELEMS", 7 * B * H * fm.num_features)
    with torch.no_grad():
        blocks = attention_core(q, k, v, feature_map=fm)
    assert blocks.transpose(1, 2).is_contiguous(), "output should keep q's (B, N, H, d) layout"
    assert rel_err(blocks, whole) < 1e-6
    qg = q.detach().clone().requires_grad_(True)
    out = attention_core(qg, k, v, feature_map=fm)
    out.sum().backward()
    assert rel_err(out, whole) < 1e-6 and qg.grad is not None
