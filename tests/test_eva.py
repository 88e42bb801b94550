"""EVA and FLuRKA-EVA (kernels/eva.py, ``kernel="eva"``).

Oracles:
* ``eva_f64``: the formula of kernels/eva.py (the paper's Eq. 11-12 with this package's
  partition and proposal) written out again here, query by query in float64 loops;
* exact softmax (SDPA): EVA's error falls as the number of chunks m grows, and EVA is exact
  when every chunk holds one key (m >= K) or one local window holds every key (eva_chunk >= K);
* FlopCounterMode for the cost model's matrix-product count.

Tolerances: fp32 against fp64 with O(1) inputs and at most a few hundred terms per softmax,
atol 2e-5 / rtol 1e-4 (float32 rounding of the logits, ~1e-6 relative, amplified by exp);
"exact" cases against SDPA, atol 1e-5 (both fp32, different summation order).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import flurka_rewrite as fr
from flurka_rewrite.cli import build_parser
from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.kernels.dispatch import resolve_backend
from flurka_rewrite.kernels.eva import DEFAULT_EVA_CHUNK, EvaFeatures, eva_attention
from flurka_rewrite.kernels.reference import rel_error, softmax_attention
from flurka_rewrite.kernels.registry import FEATURE_MAPS, FeatureMap, kernel_choices
from flurka_rewrite.passes import cost_model

TOL = dict(atol=2e-5, rtol=1e-4)


def eva_f64(q, k, v, *, m, w, keep=None, causal=False, scale=None, spacing=None):
    """EVA by loops in float64: r = ceil(K/m) keys per chunk, g = max(1, w // r) chunks per
    local group of W = g r keys; query i's group holds key floor(i num / den); local = the
    group's real keys (<= i if causal), remote = every other (earlier, if causal) chunk with
    a real key, logit s q.k~_c + log |P_c|, value beta_c (Eq. 11) with w_c = s^.5 (q-bar +
    k~_c); q-bar = the mean query (of real positions when aligned), per chunk when causal."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, N, dh = q.shape
    hkv, K, dv = k.shape[1], k.shape[2], v.shape[-1]
    s = scale if scale is not None else dh ** -0.5
    r = math.ceil(K / m)
    g = max(1, w // r)
    W = g * r
    chunks = [range(c * r, min(K, (c + 1) * r)) for c in range(math.ceil(K / r))]
    groups = math.ceil(len(chunks) / g)
    num, den = spacing if spacing is not None else (K, N)
    aligned = spacing is None and K == N
    out = torch.zeros(B, H, N, dv, dtype=torch.float64)
    for b in range(B):
        real = [keep is None or bool(keep[b, j]) for j in range(K)]
        for h in range(H):
            kh = h // (H // hkv)
            qs = [i for i in range(N) if not aligned or real[i]]
            qmean = sum(q[b, h, i] for i in qs) / max(1, len(qs))
            summ = []
            for c, idx in enumerate(chunks):
                P = [j for j in idx if real[j]]
                if not P:
                    continue
                kbar = sum(k[b, kh, j] for j in P) / len(P)
                qbar = sum(q[b, h, j] for j in P) / len(P) if causal else qmean
                omega = math.sqrt(s) * (qbar + kbar)
                lg = torch.stack([omega @ (math.sqrt(s) * k[b, kh, j])
                                  - 0.5 * s * k[b, kh, j] @ k[b, kh, j] for j in P])
                wts = torch.softmax(lg, 0)
                beta = sum(wts[t] * v[b, kh, j] for t, j in enumerate(P))
                summ.append((len(P), kbar, beta, c // g))
            for i in range(N):
                grp = min(((i * num) // den) // W, groups - 1)
                logits, values = [], []
                for j in range(grp * W, min(K, (grp + 1) * W)):
                    if real[j] and (not causal or j <= i):
                        logits.append(s * q[b, h, i] @ k[b, kh, j])
                        values.append(v[b, kh, j])
                for n, kbar, beta, cg in summ:
                    if (cg < grp) if causal else (cg != grp):
                        logits.append(s * q[b, h, i] @ kbar + math.log(n))
                        values.append(beta)
                if logits:
                    p = torch.softmax(torch.stack(logits), 0)
                    out[b, h, i] = sum(p[t] * values[t] for t in range(len(values)))
    return out


def _qkv(B=2, H=4, hkv=4, N=13, K=None, dh=8, seed=0, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    K = K or N
    return (torch.randn(B, H, N, dh, generator=g) * scale,
            torch.randn(B, hkv, K, dh, generator=g) * scale,
            torch.randn(B, hkv, K, dh, generator=g))


# -- the formula -----------------------------------------------------------------------------
@pytest.mark.parametrize("N,m,w", [(13, 5, 6), (17, 4, 3), (9, 9, 2), (20, 3, 4), (11, 6, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_the_f64_formula(N, m, w, causal):
    """Odd N, chunks nesting in windows (r | w), windows inside one chunk (r > w), m >= K."""
    q, k, v = _qkv(N=N)
    got = eva_attention(q, k, v, num_features=m, eva_chunk=w, causal=causal)
    torch.testing.assert_close(got.double(), eva_f64(q, k, v, m=m, w=w, causal=causal), **TOL)


def test_gqa_key_padding_and_cross_lengths():
    q, k, v = _qkv(H=4, hkv=2, N=15, seed=1)
    keep = torch.ones(2, 15, dtype=torch.bool)
    keep[1, 10:] = False
    got = eva_attention(q, k, v, num_features=4, eva_chunk=8, key_padding_mask=keep)
    torch.testing.assert_close(got.double(), eva_f64(q, k, v, m=4, w=8, keep=keep), **TOL)
    # GQA is the same as repeated kv-heads
    rep = eva_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                        num_features=4, eva_chunk=8, key_padding_mask=keep)
    torch.testing.assert_close(got, rep, atol=1e-6, rtol=1e-6)
    # padding: NaN in padded keys/values and other padded queries change no real row
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    k2[1, :, 10:], v2[1, :, 10:], q2[1, :, 10:] = float("nan"), float("nan"), 5.0
    again = eva_attention(q2, k2, v2, num_features=4, eva_chunk=8, key_padding_mask=keep)
    torch.testing.assert_close(again[:, :, :10], got[:, :, :10], atol=1e-6, rtol=1e-6)
    assert torch.isfinite(again).all()
    # cross-attention lengths (N != K) and a spacing (FLuRKA-EVA's dk / max_seq_len)
    q, k, v = _qkv(N=14, K=9, seed=2)
    for spacing in (None, (9, 20), (9, 5)):  # (9, 5): queries past the last key
        got = eva_attention(q, k, v, num_features=5, eva_chunk=4, key_spacing=spacing)
        torch.testing.assert_close(got.double(),
                                   eva_f64(q, k, v, m=5, w=4, spacing=spacing), **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_when_one_window_or_one_key_per_chunk(causal):
    q, k, v = _qkv(N=40, dh=16, seed=3)
    ref = softmax_attention(q, k, v, causal=causal)
    wide = eva_attention(q, k, v, num_features=4, eva_chunk=64, causal=causal)  # w > N
    torch.testing.assert_close(wide, ref, atol=1e-5, rtol=1e-5)
    fine = eva_attention(q, k, v, num_features=40, eva_chunk=8, causal=causal)  # m = K
    torch.testing.assert_close(fine, ref, atol=1e-5, rtol=1e-5)


def test_error_falls_as_num_features_grows():
    """Positionally smooth q, k (random walks, like token sequences): mean rel. error over 4
    seeds at m = 16, 64, 256 chunks of N = 320 keys must fall (measured 0.40, 0.21, 0.11)."""
    errs = {16: [], 64: [], 256: []}
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(2, 2, 320, 16, generator=g).cumsum(2) / 320 ** 0.5 * 3
        k = torch.randn(2, 2, 320, 16, generator=g).cumsum(2) / 320 ** 0.5 * 3 + 0.5 * q
        v = torch.randn(2, 2, 320, 16, generator=g)
        ref = softmax_attention(q, k, v)
        for m in errs:
            errs[m].append(rel_error(eva_attention(q, k, v, num_features=m, eva_chunk=16), ref))
    mean = {m: sum(e) / len(e) for m, e in errs.items()}
    assert mean[16] > mean[64] > mean[256], mean


def test_causality_future_tokens_change_nothing():
    q, k, v = _qkv(N=30, seed=4)
    out = eva_attention(q, k, v, num_features=6, eva_chunk=5, causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, 17:] *= 50
    out2 = eva_attention(q2, k2, v2, num_features=6, eva_chunk=5, causal=True)
    torch.testing.assert_close(out2[:, :, :17], out[:, :, :17], atol=1e-6, rtol=1e-6)


# -- FlurkaAttention, FLuRKA-EVA, gradients, backends -----------------------------------------
def test_flurka_eva_hoisted_equals_unhoisted_and_the_formula():
    torch.manual_seed(0)
    B, M, dm, H, dh, dk, L = 2, 19, 12, 2, 6, 8, 24
    fa = FlurkaAttention(kernel="eva", heads=H, head_dim=dh, dk=dk, max_seq_len=L,
                         num_features=3, eva_chunk=12, e_init="gaussian", backend="torch").eval()
    # 12 positions of 24 are 12 * 8 / 24 = 4 of the 8 down-sampled keys
    assert fa.feature_map.key_spacing == (dk, L) and fa.num_features == 3
    x = torch.randn(B, M, dm)
    lin_k, lin_v = torch.nn.Linear(dm, H * dh), torch.nn.Linear(dm, H * dh)
    q = torch.randn(B, H, M, dh)
    keep = torch.ones(B, M, dtype=torch.bool)
    keep[0, 15:] = False

    def heads(t):
        return t.view(B, -1, H, dh).transpose(1, 2)

    k, v = heads(lin_k(x)), heads(lin_v(x))
    flat = fa(q, k, v, key_padding_mask=keep)
    kh = heads(fa.project_kv(x, lin_k.weight, lin_k.bias, "k", keep))
    vh = heads(fa.project_kv(x, lin_v.weight, lin_v.bias, "v", keep))
    hoisted = fa(q, kh, vh, key_padding_mask=keep, source_len=M)
    torch.testing.assert_close(hoisted, flat, atol=1e-5, rtol=1e-5)
    E, F_ = fa.E.detach()[:, :M], fa.F.detach()[:, :M]
    km = torch.where(keep[:, None, :, None], k, 0.0)
    vm = torch.where(keep[:, None, :, None], v, 0.0)
    want = eva_f64(q, E @ km, F_ @ vm, m=3, w=4, spacing=(dk, L))
    torch.testing.assert_close(flat.double(), want, **TOL)


def test_gradients_flow_in_training():
    torch.manual_seed(1)
    fa = FlurkaAttention(kernel="eva", heads=2, head_dim=8, dk=6, max_seq_len=20,
                         num_features=3, eva_chunk=2, backend="torch").train()
    q, k, v = (torch.randn(2, 2, 20, 8, requires_grad=True) for _ in range(3))
    out = fa(q, k, v)
    out.square().sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v), ("E", fa.E), ("F", fa.F)):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name
    fa.eval()
    with torch.no_grad():  # training draws w_c ~ N(mu_c, I); eval uses w_c = mu_c
        assert not torch.allclose(fa(q, k, v), out)
    causal = FlurkaAttention(kernel="eva", heads=2, head_dim=8, num_features=4, causal=True,
                             eva_chunk=5, backend="torch").train()
    causal(q, k, v).sum().backward()
    assert torch.isfinite(q.grad).all()


def test_triton_backend_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="backend='torch'"):
        FlurkaAttention(kernel="eva", heads=2, head_dim=8, backend="triton")
    fm = FlurkaAttention(kernel="eva", heads=2, head_dim=8, backend="torch").feature_map
    with pytest.raises(ValueError, match="backend='torch'"):
        resolve_backend("triton", "cuda", fm)
    assert resolve_backend("auto", "cuda", fm) == "torch"
    with pytest.raises(ValueError, match="eva_chunk must be a positive int"):
        FlurkaAttention(kernel="eva", heads=2, head_dim=8, eva_chunk=0)


def test_window_combines_with_eva_and_a_map_without_a_windowed_form_is_refused():
    """EVA has a windowed form (kernels/eva_window.py, tests/test_eva_window.py); a
    custom-attention map without ``attend_window`` is refused up front, naming the fix."""
    from flurka_rewrite.kernels.attention import check_window
    from flurka_rewrite.passes.config import RewriteConfig
    assert EvaFeatures.has_window_form()
    assert RewriteConfig(kernel="eva", dk=None, window=8).window == 8
    assert FlurkaAttention(kernel="eva", heads=2, head_dim=8, window=8).window == 8

    class NoWindow(EvaFeatures):
        attend_window = FeatureMap.attend_window  # the base's: no windowed form

    assert not NoWindow.has_window_form()
    FEATURE_MAPS["_nowindow"] = NoWindow
    try:
        with pytest.raises(ValueError, match="no windowed form; use window=None"):
            check_window(8, "_nowindow", None, "auto")
    finally:
        del FEATURE_MAPS["_nowindow"]


def test_registry_entry_and_cli_choice():
    cls = FEATURE_MAPS["eva"]
    assert cls is EvaFeatures and cls.custom_attention and cls.triton_code is None
    assert cls.auto_role is None and cls.takes_num_features
    assert "eva" in kernel_choices() and "eva" in " ".join(build_parser().format_help().split())
    assert FlurkaAttention(kernel="eva", heads=1, head_dim=8).feature_map.eva_chunk == \
        DEFAULT_EVA_CHUNK


@pytest.mark.parametrize("case", ["plain", "causal", "lowrank", "gqa"])
def test_site_flops_equal_flop_counter(case):
    B, N, H, hkv, dh, m = 2, 70, 4, 4, 8, 8
    kw = dict(dk=None, causal=case == "causal")
    if case == "lowrank":
        kw = dict(dk=12, max_seq_len=80)
    if case == "gqa":
        hkv = 2
    fa = FlurkaAttention(kernel="eva", heads=H, kv_heads=hkv, head_dim=dh, num_features=m,
                         backend="torch", **kw)
    q, k, v = _qkv(B=B, H=H, hkv=hkv, N=N, dh=dh)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fa(q, k, v)
    want = cost_model.site_flops(kernel="eva", B=B, N=N, M=N, H=H, Hkv=hkv, dh=dh,
                                 num_features=m, projections=False, gemm_only=True, **kw)
    assert fc.get_total_flops() == want
    total = cost_model.site_flops(kernel="eva", B=B, N=N, M=N, H=H, Hkv=hkv, dh=dh,
                                  num_features=m, projections=False, **kw)
    assert total > want  # plus the elementwise work


# -- through the compiler ---------------------------------------------------------------------
def _text(vocab, b, n, seed, pad_row=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    if pad_row is not None:
        mask[pad_row, n - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _bert():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2,
                        num_attention_heads=3, intermediate_size=64, max_position_embeddings=40)
    return tf.BertModel._from_config(cfg, attn_implementation="sdpa").eval()


def _gpt2():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=120, n_positions=40, n_embd=48, n_layer=2, n_head=3)
    return tf.GPT2Model._from_config(cfg, attn_implementation="sdpa").eval()


def _rewritten_and_verified(model):
    """Every site rewritten with eva and verified; EVA is not exact there (0 < error)."""
    report = model.flurka_report
    assert report.sites and len(report.rewritten) == len(report.sites), str(report)
    assert all(s.verified for s in report.rewritten), str(report)
    assert all(1e-4 < s.rel_error < 0.5 for s in report.rewritten), str(report)
    mods = [m for m in model.modules() if isinstance(m, FlurkaAttention)]
    assert mods and all(m.kernel == "eva" for m in mods)
    return mods


@pytest.mark.parametrize("dk", [None, 8])
def test_bert_converts_verifies_saves_and_loads(dk, tmp_path):
    ex = _text(120, 2, 37, 0, pad_row=1)  # 2 local windows of 30 (dk: 6 of the 8) keys
    new = fr.convert(_bert(), kernel="eva", dk=dk, num_features=4, example_inputs=ex)
    mods = _rewritten_and_verified(new)
    assert all(m.dk == dk for m in mods)
    mods[0].feature_map.eva_chunk = 2  # a map setting, saved and restored
    with torch.no_grad():
        ref = new(**ex).last_hidden_state
    assert torch.isfinite(ref).all()
    fr.save(new, tmp_path / "bert", example_inputs=ex)
    loaded = fr.load(tmp_path / "bert")
    assert [m.feature_map.eva_chunk for m in loaded.modules() if isinstance(m, FlurkaAttention)] \
        == [2] + [DEFAULT_EVA_CHUNK] * (len(mods) - 1)
    with torch.no_grad():
        assert torch.equal(loaded(**ex).last_hidden_state, ref)


def test_gpt2_causal_converts_and_stays_causal():
    ex = _text(120, 2, 37, 1)  # chunks of 8 keys, 2 local windows of 32
    model = _gpt2()
    new = fr.convert(model, kernel="eva", dk=None, num_features=5, example_inputs=ex)
    mods = _rewritten_and_verified(new)
    assert all(m.causal for m in mods)
    with torch.no_grad():
        out = new(**ex).last_hidden_state
        ids = dict(ex, input_ids=ex["input_ids"].clone())
        ids["input_ids"][:, 15:] = 7  # future tokens
        out2 = new(**ids).last_hidden_state
    torch.testing.assert_close(out2[:, :15], out[:, :15], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,dk", [("bert", 8), ("bert", None), ("gpt2", None)])
def test_onnx_export_matches(arch, dk, tmp_path):
    """At the example's length and another: without dk the chunking depends on the length,
    which once exported the -(-a // b) ceil as a floor (ONNX's Div truncates) and failed in
    ONNX Runtime."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    ex = _text(120, 2, 13, 0, pad_row=1 if arch == "bert" else None)
    model = _bert() if arch == "bert" else _gpt2()
    new = fr.convert(model, kernel="eva", dk=dk, num_features=4, example_inputs=ex)
    path = str(tmp_path / "bert_eva.onnx")
    info = fr.export_onnx(new, ex, path, dynamic_batch=False)
    assert info.dynamic_axes == {k: [1] for k in ex}, info.dynamic_axes
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for feed in (ex, _text(120, 2, 29, 1, pad_row=0 if arch == "bert" else None)):
        got = sess.run(None, {k: v.numpy() for k, v in feed.items()})
        with torch.no_grad():
            ref = new(**feed)
        for name, g in zip(info.output_names, got):
            torch.testing.assert_close(torch.from_numpy(g), ref[name], atol=1e-4, rtol=1e-4)
