"""EVA with a sliding window (kernels/eva_window.py, ``kernel="eva", window=w``).

Oracles:
* ``eva_window_f64``: the module docstring's formula written out again, query by query in
  float64 loops, from the definition (window W(i); every chunk's real keys left of the
  window, and right of it when non-causal, one remote subset each), not from the prefix /
  suffix layout the code uses;
* exact softmax (SDPA): with one key per chunk (m >= K) or a window covering every key the
  hybrid is exact at theta = 0; its error falls as m grows;
* FlopCounterMode for the cost model's matrix-product count.

Tolerances: fp32 against fp64 with O(1) inputs and a few dozen terms per softmax, atol 2e-5 /
rtol 1e-4 (fp32 rounding of the logits, ~1e-6 relative, amplified by exp); "exact" cases
against SDPA, atol 1e-5 (both fp32, different summation order).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.kernels.eva_window import eva_window_attention
from flurka_rewrite.kernels.reference import rel_error, softmax_attention
from flurka_rewrite.passes import cost_model

TOL = dict(atol=2e-5, rtol=1e-4)


def _subset(q, k, v, P, qbar, s, eps):
    """(|P|, k~_P, beta_P) of one subset P (key indices) [Eq. 11], w_P = s^.5 (q-bar + k~)."""
    kbar = sum(k[j] for j in P) / len(P)
    omega = math.sqrt(s) * (qbar + kbar) + (0 if eps is None else eps)
    lg = torch.stack([omega @ (math.sqrt(s) * k[j]) - 0.5 * s * k[j] @ k[j] for j in P])
    wts = torch.softmax(lg, 0)
    return len(P), kbar, sum(wts[t] * v[j] for t, j in enumerate(P))


def eva_window_f64(q, k, v, *, m, w, theta, keep=None, causal=False, scale=None,
                   low=None, noise=None):
    """The hybrid by loops in float64. low: (kk, vk, kkeep) down-sampled keys of a low-rank
    site (every chunk of them one remote subset, q-bar the mean of all queries)."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, N, dh = q.shape
    hkv = k.shape[1]
    s = scale if scale is not None else dh ** -0.5
    reach = w - 1 if causal else w // 2
    kx, vx = (k, v) if low is None else (low[0].double(), low[1].double())
    K = kx.shape[2]
    r = math.ceil(K / m)
    chunks = [range(c * r, min(K, (c + 1) * r)) for c in range(math.ceil(K / r))]
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        real = [keep is None or bool(keep[b, j]) for j in range(N)]
        realx = real if low is None else [low[2] is None or bool(low[2][b, j]) for j in range(K)]
        for h in range(H):
            kh = h // (H // hkv)
            qs = [i for i in range(N) if low is not None or real[i]]
            qmean = sum(q[b, h, i] for i in qs) / max(1, len(qs))
            for i in range(N):
                logits, values = [], []
                for j in range(N):
                    inw = (i - w < j <= i) if causal else abs(i - j) <= reach
                    if inw and real[j]:
                        logits.append(s * q[b, h, i] @ k[b, kh, j])
                        values.append(v[b, kh, j])
                for c, idx in enumerate(chunks):
                    if low is not None:
                        sides = [[j for j in idx if realx[j]]]
                    else:
                        sides = [[j for j in idx if realx[j] and j < i - reach]]
                        if not causal:
                            sides.append([j for j in idx if realx[j] and j > i + reach])
                    for P in sides:
                        if not P:
                            continue
                        qbar = (sum(q[b, h, j] for j in P) / len(P)
                                if causal and low is None else qmean)
                        eps = None if noise is None else noise[c].double()
                        n, kbar, beta = _subset(q[b, h], kx[b, kh], vx[b, kh], P, qbar, s, eps)
                        logits.append(s * q[b, h, i] @ kbar + math.log(n) + theta[h].double())
                        values.append(beta)
                if logits:
                    p = torch.softmax(torch.stack(logits), 0)
                    out[b, h, i] = sum(p[t] * values[t] for t in range(len(values)))
    return out


def _qkv(B=2, H=4, hkv=4, N=13, dh=8, seed=0, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, dh, generator=g) * scale,
            torch.randn(B, hkv, N, dh, generator=g) * scale,
            torch.randn(B, hkv, N, dh, generator=g))


def _run(q, k, v, **kw):
    kw.setdefault("scale", q.shape[-1] ** -0.5)
    kw.setdefault("log_weight", torch.zeros(q.shape[1]))
    return eva_window_attention(q, k, v, **kw)


# -- the formula -------------------------------------------------------------------------------
@pytest.mark.parametrize("N,m,w", [(13, 5, 4), (17, 4, 3), (9, 3, 2), (20, 3, 6), (11, 2, 1),
                                   (23, 7, 9)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_the_f64_formula(N, m, w, causal):
    """Odd N, windows inside a chunk (r > w), chunks inside a window, both boundaries in one
    chunk (non-causal, r > w + 1), a nonzero per-head theta."""
    q, k, v = _qkv(N=N)
    theta = torch.tensor([0.0, -0.5, 0.3, 1.0])
    got = _run(q, k, v, window=w, num_features=m, causal=causal, log_weight=theta)
    want = eva_window_f64(q, k, v, m=m, w=w, theta=theta, causal=causal)
    torch.testing.assert_close(got.double(), want, **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_gqa_and_key_padding(causal):
    q, k, v = _qkv(H=4, hkv=2, N=19, seed=2)
    keep = torch.ones(2, 19, dtype=torch.bool)
    keep[0, :4] = False  # left padding
    keep[1, 7:10] = False  # a hole inside chunks and windows
    theta = torch.tensor([0.2, -0.1, 0.0, 0.4])
    got = _run(q, k, v, window=5, num_features=4, causal=causal, key_padding_mask=keep,
               log_weight=theta)
    want = eva_window_f64(q, k, v, m=4, w=5, theta=theta, keep=keep, causal=causal)
    torch.testing.assert_close(got.double(), want, **TOL)
    rep = _run(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), window=5,
               num_features=4, causal=causal, key_padding_mask=keep, log_weight=theta)
    torch.testing.assert_close(got, rep, atol=1e-6, rtol=1e-6)  # GQA = repeated kv-heads
    # padded keys contribute nothing: changing them changes no output
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :4], v2[1, :, 7:10] = 50.0, -50.0
    again = _run(q, k2, v2, window=5, num_features=4, causal=causal, key_padding_mask=keep,
                 log_weight=theta)
    torch.testing.assert_close(again, got, atol=1e-6, rtol=1e-6)


def test_training_noise_is_the_sample_of_each_subsets_chunk():
    q, k, v = _qkv(N=15, seed=3)
    noise = torch.randn(8, 8, generator=torch.Generator().manual_seed(4))
    for causal in (False, True):
        got = _run(q, k, v, window=4, num_features=5, causal=causal, noise=noise)
        want = eva_window_f64(q, k, v, m=5, w=4, theta=torch.zeros(4), causal=causal,
                              noise=noise)
        torch.testing.assert_close(got.double(), want, **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_with_one_key_per_chunk_or_a_window_over_every_key(causal):
    q, k, v = _qkv(N=21, seed=5, scale=1.5)
    ref = softmax_attention(q, k, v, causal=causal)
    for w, m in ((3, 21), (1, 64), (64, 2), (21 if causal else 40, 3)):
        got = _run(q, k, v, window=w, num_features=m, causal=causal)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_error_falls_as_num_features_grows():
    """Peaked attention (scale 1.5), N = 96, w = 8: the error against exact softmax falls as
    the chunks get finer (m = 4, 16, 48: 24, 6 and 2 keys per chunk)."""
    errs = {m: [] for m in (4, 16, 48)}
    for seed in range(3):
        q, k, v = _qkv(B=1, N=96, dh=16, seed=seed, scale=1.5)
        ref = softmax_attention(q, k, v)
        for m in errs:
            errs[m].append(rel_error(_run(q, k, v, window=8, num_features=m), ref))
    mean = {m: sum(e) / len(e) for m, e in errs.items()}
    assert mean[4] > mean[16] > mean[48], mean


def test_causality_future_tokens_change_nothing():
    q, k, v = _qkv(N=20, seed=6)
    out = _run(q, k, v, window=4, num_features=6, causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, 12:], k2[:, :, 12:], v2[:, :, 12:] = 9.0, -9.0, 3.0
    out2 = _run(q2, k2, v2, window=4, num_features=6, causal=True)
    torch.testing.assert_close(out2[:, :, :12], out[:, :, :12], atol=1e-6, rtol=1e-6)


# -- FlurkaAttention: low-rank, parameters, gradients --------------------------------------------
def test_flurka_eva_window_lowrank_equals_the_formula_hoisted_or_not():
    torch.manual_seed(7)
    H, dh, L, dk, N = 2, 8, 24, 6, 19
    fa = FlurkaAttention(kernel="eva", heads=H, head_dim=dh, dk=dk, max_seq_len=L,
                         num_features=4, window=4, e_init="gaussian", backend="torch").eval()
    with torch.no_grad():
        fa.kernel_log_weight.copy_(torch.tensor([0.3, -0.2]))
    q, k, v = _qkv(H=H, hkv=H, N=N, dh=dh, seed=8)
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[1, 15:] = False
    with torch.no_grad():
        got = fa(q, k, v, key_padding_mask=keep)
        E, F_ = fa.E[:, :N], fa.F[:, :N]
        km = torch.where(keep[:, None, :, None], k, 0.0)
        vm = torch.where(keep[:, None, :, None], v, 0.0)
        kk, vk = E @ km, F_ @ vm
        hoisted = fa(q, kk, vk, key_padding_mask=keep, source_len=N, window_kv=(k, v))
    want = eva_window_f64(q, k, v, m=4, w=4, theta=fa.kernel_log_weight.detach(), keep=keep,
                          low=(kk, vk, None))
    torch.testing.assert_close(got.double(), want, **TOL)
    torch.testing.assert_close(hoisted, got, atol=1e-6, rtol=1e-6)


def test_theta_starts_at_zero_and_gradients_flow():
    fa = FlurkaAttention(kernel="eva", heads=2, head_dim=8, num_features=3, window=4,
                         backend="torch").train()
    assert torch.equal(fa.kernel_log_weight.detach(), torch.zeros(2))  # EVA estimates exp(s)
    q, k, v = (torch.randn(2, 2, 20, 8, requires_grad=True) for _ in range(3))
    out = fa(q, k, v)
    out.square().sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v), ("theta", fa.kernel_log_weight)):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name
    fa.eval()
    with torch.no_grad():  # training draws w_P ~ N(mu_P, I); eval uses mu_P
        assert not torch.allclose(fa(q, k, v), out)
    causal = FlurkaAttention(kernel="eva", heads=2, head_dim=8, dk=None, num_features=4,
                             causal=True, window=3, backend="torch").train()
    causal(q, k, v).sum().backward()
    assert torch.isfinite(q.grad).all()


def test_gradients_match_the_f64_formula():
    q, k, v = (t.double().requires_grad_() for t in _qkv(B=1, H=2, hkv=2, N=11, seed=9))
    theta = torch.tensor([0.1, -0.3], dtype=torch.float64, requires_grad=True)
    for causal in (False, True):
        got = eva_window_attention(q.float(), k.float(), v.float(), window=3, num_features=4,
                                   log_weight=theta.float(), scale=8 ** -0.5, causal=causal)
        want = eva_window_f64(q, k, v, m=4, w=3, theta=theta, causal=causal)
        gw = torch.randn_like(want)
        g1 = torch.autograd.grad((got.double() * gw).sum(), (q, k, v, theta))
        g2 = torch.autograd.grad((want * gw).sum(), (q, k, v, theta))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_eva_chunk_beside_a_window_and_triton_are_refused():
    with pytest.raises(ValueError, match="pass one of them"):
        FlurkaAttention(kernel="eva", heads=2, head_dim=8, window=4, eva_chunk=8)
    with pytest.raises(ValueError, match="backend='torch'"):
        FlurkaAttention(kernel="eva", heads=2, head_dim=8, window=4, backend="triton")


@pytest.mark.parametrize("case", ["plain", "causal", "lowrank", "gqa"])
def test_site_flops_equal_flop_counter(case):
    B, N, H, hkv, dh, m, w = 2, 70, 4, 4, 8, 8, 6
    kw = dict(dk=None, causal=case == "causal")
    if case == "lowrank":
        kw = dict(dk=12, max_seq_len=80)
    if case == "gqa":
        hkv = 2
    fa = FlurkaAttention(kernel="eva", heads=H, kv_heads=hkv, head_dim=dh, num_features=m,
                         window=w, backend="torch", **kw)
    q, k, v = _qkv(B=B, H=H, hkv=hkv, N=N, dh=dh)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fa(q, k, v)
    args = dict(kernel="eva", B=B, N=N, M=N, H=H, Hkv=hkv, dh=dh, num_features=m, window=w,
                projections=False, **kw)
    want = cost_model.site_flops(gemm_only=True, **args)
    assert fc.get_total_flops() == want
    assert cost_model.site_flops(**args) > want  # plus the elementwise work


# -- through the CLI -------------------------------------------------------------------------
def test_cli_kernel_eva_with_a_window(tmp_path, capsys):
    """``flurka-rewrite --demo --kernel eva --window 16``: every site EVA with the window in the
    report, and the saved program computes what the converted model computed (error printed)."""
    import json

    from flurka_rewrite.cli import main
    from flurka_rewrite.demo import build_demo_model, demo_inputs
    from flurka_rewrite.report import RewriteReport

    out, rep = str(tmp_path / "eva.pt2"), str(tmp_path / "report.json")
    rc = main(["--demo", "-o", out, "--kernel", "eva", "--dk", "none", "--window", "16",
               "--num-features", "8", "--example-shape", "2,60", "--report", rep, "-q"])
    assert rc == 0, capsys.readouterr().err
    report = RewriteReport.from_dict(json.load(open(rep)))
    assert report.sites and all(s.kernel == "eva" and s.window == 16 and s.verified
                                for s in report.sites), str(report)
    x = demo_inputs(2, 60, seed=3, pad_last=10)
    with torch.no_grad():
        y = torch.export.load(out).module()(**x)
        ref = build_demo_model()(**x)
    assert torch.isfinite(y).all() and 0 < rel_error(y, ref) < 0.5  # approximate, not broken
