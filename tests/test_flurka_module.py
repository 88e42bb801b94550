"""``FlurkaAttention``: exact mode against brute force, hoisted == unhoisted, padding,
GQA, gradients, low-rank initialisation and errors (docs/design.md §3.1, 3.3, 3.4, 6)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flurka_rewrite.kernels.attention import FlurkaAttention, init_lowrank

KERNELS = ["softmax", "performer", "relu", "rnn", "ffk"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def brute_softmax(q, k, v, *, allowed=None, additive=None, scale=None):
    """softmax(s q k^T + additive, masked where not allowed) v, explicit matrices in float64;
    kv heads repeated for GQA."""
    H = q.shape[1]
    k = k.double().repeat_interleave(H // k.shape[1], 1)
    v = v.double().repeat_interleave(H // v.shape[1], 1)
    s = scale if scale is not None else q.shape[-1] ** -0.5
    logits = s * q.double() @ k.transpose(-1, -2)
    if additive is not None:
        logits = logits + additive.double()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)
    return torch.softmax(logits, -1) @ v


def heads(t: torch.Tensor, h: int) -> torch.Tensor:
    B, L, D = t.shape
    return t.view(B, L, h, D // h).transpose(1, 2)  # (B, h, L, d)


# --- exact mode ----------------------------------------------------------------------------------
EXACT_CASES = ["plain", "bool", "additive", "causal", "gqa", "gqa+causal+padding"]


@pytest.mark.parametrize("case", EXACT_CASES)
def test_exact_mode_matches_brute_force_and_sdpa(case):
    g = torch.Generator().manual_seed(0)
    B, H, N, dh = 2, 4, 63, 48
    hkv = 2 if "gqa" in case else H
    causal = "causal" in case
    layer = FlurkaAttention(kernel="softmax", heads=H, kv_heads=hkv, head_dim=dh, causal=causal)
    q = torch.randn(B, H, N, dh, generator=g)
    k, v = (torch.randn(B, hkv, N, dh, generator=g) for _ in range(2))
    allowed = torch.ones(B, 1, N, N, dtype=torch.bool)
    mask = additive = kpm = None
    if case == "bool":
        mask = torch.rand(B, 1, N, N, generator=g) > 0.4
        mask[..., 0] = True
        allowed = mask
    if case == "additive":
        mask = additive = torch.randn(B, 1, N, N, generator=g)
    if causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    if "padding" in case:
        kpm = torch.ones(B, N, dtype=torch.bool)
        kpm[1, 50:] = False
        allowed = allowed & kpm[:, None, None, :]
    out = layer(q, k, v, mask, key_padding_mask=kpm)
    ref = brute_softmax(q, k, v, allowed=allowed, additive=additive)
    # fp32 against float64 over 63 keys: 1e-5 relative.
    assert rel_err(out, ref) < 1e-5
    if kpm is None:
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=hkv != H)
        assert rel_err(out, sdpa) < 1e-5


# --- hoisted form -----------------------------------------------------------------------------
HOIST_CASES = [(k, pad, init) for k in KERNELS for pad in (False, True) for init in ("gaussian",)]
HOIST_CASES += [("performer", True, "pool"), ("softmax", False, "pool")]


@pytest.mark.parametrize("kernel,pad,init", HOIST_CASES,
                         ids=[f"{k}-{'pad' if p else 'nopad'}-{i}" for k, p, i in HOIST_CASES])
def test_hoisted_equals_unhoisted(kernel, pad, init):
    """E (X W^T + 1 b^T) == (E X) W^T + (E 1) b^T with a random (gaussian) E, a biased Linear
    projection, and padded rows zeroed on both sides."""
    torch.manual_seed(1)
    B, M, dm, H, hkv, dk = 2, 57, 40, 4, 2, 12
    dh = dm // H
    layer = FlurkaAttention(kernel=kernel, heads=H, kv_heads=hkv, head_dim=dh, dk=dk,
                            max_seq_len=70, e_init=init, seed=3)
    wq, wk, wv = nn.Linear(dm, dm), nn.Linear(dm, hkv * dh), nn.Linear(dm, hkv * dh)
    with torch.no_grad():
        wk.bias.normal_(0, 1.0)  # a large bias: a missing (E 1) b^T term would show
        wv.bias.normal_(0, 1.0)
    x = torch.randn(B, M, dm)
    kpm = None
    if pad:
        kpm = torch.ones(B, M, dtype=torch.bool)
        kpm[1, 40:] = False
    q = heads(wq(x), H)
    unhoisted = layer(q, heads(wk(x), hkv), heads(wv(x), hkv), key_padding_mask=kpm)
    k_t = heads(layer.project_kv(x, wk.weight, wk.bias, "k", kpm), hkv)  # (B, hkv, dk, dh)
    v_t = heads(layer.project_kv(x, wv.weight, wv.bias, "v", kpm), hkv)
    hoisted = layer(q, k_t, v_t, key_padding_mask=kpm, source_len=M)
    # Same sums in another order (fp32): 1e-5 relative.
    assert rel_err(hoisted, unhoisted) < 1e-5
    if init == "gaussian":
        assert layer.E.std() > 0.2  # really a random E (std 1/sqrt(12)), not the identity


# --- padding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel,dk", [("performer", None), ("rnn", None), ("softmax", 16),
                                       ("performer", 16), ("ffk", 16)],
                         ids=["performer-kernel-only", "rnn-kernel-only", "linformer",
                              "flurka-performer", "flurka-ffk"])
@pytest.mark.parametrize("how", ["hf-additive-mask", "key_padding_mask"])
def test_padded_tokens_have_no_effect(kernel, dk, how):
    """Change the padded tokens' values: the outputs at real positions do not change."""
    g = torch.Generator().manual_seed(2)
    B, H, N, dh = 2, 2, 45, 16
    layer = FlurkaAttention(kernel=kernel, heads=H, head_dim=dh, dk=dk, max_seq_len=64)
    q, k, v = (torch.randn(B, H, N, dh, generator=g) for _ in range(3))
    real = torch.ones(B, N, dtype=torch.bool)
    real[0, 30:] = False
    kwargs = {"key_padding_mask": real}
    if how == "hf-additive-mask":  # (B, 1, 1, N), finfo.min on padding, as HF encoders build it
        kwargs = {"attn_mask": torch.zeros(B, 1, 1, N).masked_fill(~real[:, None, None],
                                                                   torch.finfo(torch.float32).min)}
    out = layer(q, k, v, **kwargs)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[0, :, 30:] = 100 * torch.randn(H, N - 30, dh, generator=g)
    out2 = layer(q2, k2, v2, **kwargs)
    assert rel_err(out2[0, :, :30], out[0, :, :30]) < 1e-6
    assert torch.equal(out2[1], out[1])


def test_mask_varying_across_queries_is_refused():
    layer = FlurkaAttention(kernel="rnn", heads=1, head_dim=8)
    mask = torch.rand(1, 1, 9, 9) > 0.5
    mask[..., 0] = True
    q = torch.randn(1, 1, 9, 8)
    with pytest.raises(ValueError, match="varies across queries"):
        layer(q, q, q, mask)


# --- GQA, gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["softmax", "performer", "rnn"])
def test_gqa_module_equals_repeated_kv(kernel):
    torch.manual_seed(3)
    B, H, hkv, N, dh = 1, 6, 2, 33, 8
    gqa = FlurkaAttention(kernel=kernel, heads=H, kv_heads=hkv, head_dim=dh, dk=10, max_seq_len=40)
    mha = FlurkaAttention(kernel=kernel, heads=H, head_dim=dh, dk=10, max_seq_len=40)
    mha.load_state_dict(gqa.state_dict())  # same E, F, W
    q = torch.randn(B, H, N, dh)
    k, v = torch.randn(B, hkv, N, dh), torch.randn(B, hkv, N, dh)
    out = gqa(q, k, v)
    ref = mha(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("hoist", [False, True], ids=["unhoisted", "hoisted"])
def test_gradients_reach_E_F_and_ffk(hoist):
    torch.manual_seed(4)
    B, N, dm, H = 2, 29, 24, 3
    layer = FlurkaAttention(kernel="ffk", heads=H, head_dim=dm // H, dk=8, max_seq_len=32)
    wk, wv = nn.Linear(dm, dm), nn.Linear(dm, dm)
    x = torch.randn(B, N, dm)
    q = heads(x, H)
    if hoist:
        k = heads(layer.project_kv(x, wk.weight, wk.bias, "k"), H)
        v = heads(layer.project_kv(x, wv.weight, wv.bias, "v"), H)
        out = layer(q, k, v, source_len=N)
    else:
        out = layer(q, heads(wk(x), H), heads(wv(x), H))
    loss = (out ** 2).mean() + 1e-3 * layer.feature_map.penalty()
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    # A pool E keeps its block structure: no gradient outside the support.
    assert (layer.E.grad * (1 - layer.E_support)).abs().sum() == 0
    assert wk.weight.grad is not None


# --- low-rank initialisation and limits ----------------------------------------------------------
def test_init_lowrank_pool_and_gaussian():
    g = torch.Generator().manual_seed(0)
    E = init_lowrank(7, 50, "pool", g)
    assert torch.allclose(E.sum(1), torch.ones(7))  # each row averages its block
    for r in range(7):
        nz = E[r].nonzero().flatten().tolist()
        assert nz == list(range(nz[0], nz[-1] + 1)), f"row {r} is not a contiguous block"
    assert (E != 0).sum(0).tolist() == [1] * 50  # the blocks tile the positions
    G = init_lowrank(64, 4000, "gaussian", g)
    assert abs(float(G.var()) * 64 - 1) < 0.05  # N(0, 1/dk)
    with pytest.raises(ValueError, match="expected one of pool, gaussian"):
        init_lowrank(4, 8, "xavier", g)


def test_pool_rows_past_length_are_masked():
    """A pool E built for 64 positions run on 40: rows covering only positions >= 40 are
    empty keys, masked; the result equals softmax over the non-empty rows only."""
    torch.manual_seed(5)
    layer = FlurkaAttention(kernel="softmax", heads=2, head_dim=8, dk=16, max_seq_len=64)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    out = layer(q, k, v)
    E = layer.E.detach()[:, :40]
    rows = E.abs().sum(1) > 0
    assert 0 < int(rows.sum()) < 16
    kt, vt = E[rows] @ k, layer.F.detach()[:, :40][rows] @ v
    assert rel_err(out, brute_softmax(q, kt, vt)) < 1e-5


@pytest.mark.parametrize("hoist", [False, True], ids=["unhoisted", "hoisted"])
def test_past_max_seq_len_error_names_length(hoist):
    layer = FlurkaAttention(kernel="performer", heads=2, head_dim=8, dk=8, max_seq_len=64)
    x = torch.randn(1, 70, 16)
    with pytest.raises(ValueError, match="sequence length 70 exceeds the maximum 64"):
        if hoist:
            layer.project_kv(x, torch.randn(16, 16), None, "k")
        else:
            t = heads(x, 2)
            layer(t, t, t)


def test_constructor_errors_say_what_to_do():
    with pytest.raises(ValueError, match="dk must be None on a causal site"):
        FlurkaAttention(kernel="rnn", heads=2, head_dim=8, dk=8, max_seq_len=16, causal=True)
    with pytest.raises(ValueError, match="unknown kernel 'favor'"):
        FlurkaAttention(kernel="favor", heads=2, head_dim=8)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        FlurkaAttention(kernel="rnn", heads=3, kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="needs max_seq_len"):
        FlurkaAttention(kernel="rnn", heads=2, head_dim=8, dk=8)


def test_causal_kernel_module_with_padding():
    """Causal kernel-only site with right padding: position i depends on tokens <= i only."""
    torch.manual_seed(6)
    layer = FlurkaAttention(kernel="performer", heads=2, head_dim=16, causal=True)
    q, k, v = (torch.randn(1, 2, 50, 16) for _ in range(3))
    kpm = torch.ones(1, 50, dtype=torch.bool)
    kpm[0, 45:] = False
    out = layer(q, k, v, key_padding_mask=kpm)
    k2 = k.clone()
    k2[:, :, 21:] = 20 * torch.randn(1, 2, 29, 16)
    out2 = layer(q, k2, v, key_padding_mask=kpm)
    assert rel_err(out2[:, :, :21], out[:, :, :21]) < 1e-6


def test_torch_export_with_dynamic_length():
    """A hoisted FLuRKA layer exports with a dynamic sequence length (no guard on N: the
    shape-dependent fast paths step aside under export) and the exported program equals
    eager at another length, including one below max_seq_len where pool rows are empty."""
    torch.manual_seed(7)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = nn.Linear(32, 32)
            self.attn = FlurkaAttention(kernel="performer", heads=2, head_dim=16, dk=16,
                                        max_seq_len=128)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, N, _ = x.shape
            q = heads(x, 2)
            k = heads(self.attn.project_kv(x, self.k.weight, self.k.bias, "k"), 2)
            return self.attn(q, k, k, source_len=N)

    layer = Layer().eval()
    dim = torch.export.Dim("N", min=2, max=128)
    ep = torch.export.export(layer, (torch.randn(1, 100, 32),), dynamic_shapes=({1: dim},))
    for n in (77, 9):
        x = torch.randn(1, n, 32)
        assert rel_err(ep.module()(x), layer(x)) < 1e-5, f"N={n}"


@pytest.mark.parametrize("dk", [None, 4])
def test_performer_padded_keys_give_finite_zero_gradients(dk) -> None:
    """A batch row with every key padded, and padded keys holding huge values: the loss on
    the real row has finite gradients, zero at the padded keys (before the fix the key
    stabiliser overflowed exp() there and backward gave 0 * inf = NaN, reaching E and k)."""
    torch.manual_seed(0)
    fa = FlurkaAttention(kernel="performer", heads=2, head_dim=8, dk=dk, max_seq_len=16,
                         backend="torch")
    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1] = False  # all padded
    mask[0, 12:] = False
    with torch.no_grad():
        k[0, :, 12:] *= 1e3  # garbage at the padded keys of row 0
    k.requires_grad_(True)
    out = fa(q, k, v, key_padding_mask=mask)
    out[0].sum().backward()
    assert torch.isfinite(out[0]).all() and torch.isfinite(k.grad).all()
    assert k.grad[:, :, 12:].abs().max() == 0 and k.grad[1].abs().max() == 0
    if dk is not None:
        assert torch.isfinite(fa.E.grad).all()
