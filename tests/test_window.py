"""Sliding-window hybrid (``window=w``, kernels/window.py) against a dense fp64 oracle.

Oracle: ``dense`` below, written independently of the code under test: the full N x N score
matrix in float64, the band mask built from the definition (causal: i - w < j <= i;
non-causal: |i - j| <= w // 2), exp(s) on the band, alpha_h phi(q) . phi(k) elsewhere (the
maps' plain formulas written out in float64, no stabilizer), one sum and one division.
Tolerances: the code runs in fp32 with a block-wise, max-shifted evaluation; its relative
error against fp64 is ~1e-7 to 5e-7 (measured), so forward comparisons use 1e-5 and gradients
(one more reduction chain each) 1e-4, both far below a wrong mask or normaliser (errors of
order 1e-2 and above). w >= N (non-causal: w >= 2N - 1, so that the band holds every key)
must give exact softmax within 1e-5.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import flurka_rewrite as fr
from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.kernels.feature_maps import build_feature_map
from flurka_rewrite.kernels.reference import rel_error, softmax_attention
from flurka_rewrite.kernels.window import window_attention
from flurka_rewrite.passes.config import RewriteConfig
from flurka_rewrite.passes.cost_model import site_flops

KERNELS = ("performer", "relu", "rnn", "ffk")
FWD_TOL, GRAD_TOL, EXACT_TOL = 1e-5, 1e-4, 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- the oracle ----------------------------------------------------------------------------
def phi64(fm: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    """The map's formula in float64 (docs/design.md §3.2), no stabilizer."""
    x = x.double()
    if kind == "performer":
        W, s = fm.W.double(), fm.scale
        u = math.sqrt(s) * x @ W.t() - 0.5 * s * (x * x).sum(-1, keepdim=True)
        return torch.exp(u) / math.sqrt(fm.num_features)
    if kind == "relu":
        return F.relu(x) + 1e-3
    if kind == "rnn":
        return F.elu(x) + 1.0
    if kind == "ffk":
        B, Hx, N, dh = x.shape
        hkv = fm.W_o.shape[0]
        xg = x.reshape(B, hkv, Hx // hkv * N, dh)
        gate = torch.sigmoid(xg @ fm.W_g.double() + fm.b_g.double())
        return F.softplus((xg @ fm.W_o.double() + fm.b_o.double()) * gate).reshape(B, Hx, N, -1)
    raise KeyError(kind)


def dense(q, k, v, *, window, fm, kind, theta, scale, causal, keep=None, kk=None, vk=None,
          kkeep=None) -> torch.Tensor:
    """O = sum_j A_ij v_j / sum_j A_ij with A = exp(s) on the band, alpha kappa elsewhere (or
    alpha kappa over the down-sampled keys kk, vk), all in float64 and N x N."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, N, _ = q.shape
    G = H // k.shape[1]
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = scale * q @ kr.transpose(-1, -2)  # (B, H, N, N)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    band = ((j <= i) & (j > i - window)) if causal else (i - j).abs() <= window // 2
    real = (torch.ones(B, N, dtype=torch.bool) if keep is None else keep.bool())[:, None, None]
    alpha = theta.double().exp()[None, :, None, None]
    A = torch.where(band & real, s.exp(), 0.0)
    num, den = A @ vr, A.sum(-1)
    if kk is None:
        kap = phi64(fm, q, kind) @ phi64(fm, kr, kind).transpose(-1, -2)
        far = ~band & real & ((j <= i) if causal else True)
        Ak = torch.where(far, alpha * kap, 0.0)
        num, den = num + Ak @ vr, den + Ak.sum(-1)
    else:
        kkr, vkr = kk.double().repeat_interleave(G, 1), vk.double().repeat_interleave(G, 1)
        kap = ((scale * q @ kkr.transpose(-1, -2)).exp() if fm is None
               else phi64(fm, q, kind) @ phi64(fm, kkr, kind).transpose(-1, -2))
        if kkeep is not None:
            kap = torch.where(kkeep.bool()[:, None, None, :], kap, 0.0)
        Ak = alpha * kap
        num, den = num + Ak @ vkr, den + Ak.sum(-1)
    return num / den[..., None]


def _qkv(B, H, hkv, N, dh, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(B, h, N, dh, generator=g).requires_grad_(grad) for h in (H, hkv, hkv)]
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[-1, N - 4:] = False
    return (*t, keep)


def _fmap(kind, dh, hkv):
    return build_feature_map(kind, head_dim=dh, kv_heads=hkv, scale=dh ** -0.5, seed=1,
                             num_features=16 if kind in ("performer", "ffk") else None)


# -- forward and backward against the oracle -------------------------------------------------
SHAPES = [(37, 5, 4, 2), (70, 8, 2, 1), (19, 3, 2, 2)]  # N (odd / uneven), w, H, Hkv (GQA)


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-w{s[1]}-H{s[2]}-kv{s[3]}")
def test_forward_and_backward_match_dense(kind, causal, shape):
    N, w, H, hkv = shape
    dh = 8
    fm = _fmap(kind, dh, hkv)
    q, k, v, keep = _qkv(2, H, hkv, N, dh, grad=True)
    theta = (torch.randn(H, generator=torch.Generator().manual_seed(5)) * 0.5).requires_grad_()
    out = window_attention(q, k, v, window=w, feature_map=fm, log_weight=theta,
                           scale=dh ** -0.5, causal=causal, key_padding_mask=keep)
    leaves = (q, k, v, theta)
    x64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = dense(*x64[:3], window=w, fm=fm, kind=kind, theta=x64[3], scale=dh ** -0.5,
                causal=causal, keep=keep)
    assert rel_error(out, ref) < FWD_TOL
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad(out, leaves, cot)
    grads64 = torch.autograd.grad(ref, x64, cot.double())
    for name, a, b in zip("q k v theta".split(), grads, grads64):
        assert rel_error(a, b) < GRAD_TOL, f"d{name}: {rel_error(a, b):.2e}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("kind", ["performer", "relu"])
def test_window_covering_every_key_is_exact_softmax(kind, causal):
    N, dh = 21, 8
    w = N if causal else 2 * N - 1  # the band holds every key: the kernel part is empty
    q, k, v, keep = _qkv(2, 4, 2, N, dh)
    theta = torch.full((4,), 3.0)  # a large alpha would show any kernel leak
    out = window_attention(q, k, v, window=w, feature_map=_fmap(kind, dh, 2), log_weight=theta,
                           scale=dh ** -0.5, causal=causal, key_padding_mask=keep)
    ref = softmax_attention(q, k, v, key_padding_mask=keep, causal=causal, scale=dh ** -0.5)
    assert rel_error(out, ref) < EXACT_TOL


def _lowrank_oracle(attn, q, k, v, keep, kind, theta):
    """The dense oracle for a low-rank module: k~ = E k, v~ = F v over the real tokens,
    an empty row of E (support on padding only) masked."""
    N = k.shape[-2]
    sup = attn.E_support.double()[:, :N]
    real = keep.double()[:, None, :, None]
    kk = (attn.E.double()[:, :N] * sup) @ (k.double() * real)
    vk = (attn.F.double()[:, :N] * sup) @ (v.double() * real)
    kkeep = (keep.double() @ sup.t()) > 0
    return dense(q, k, v, window=attn.window, fm=attn.feature_map, kind=kind, theta=theta,
                 scale=attn.scale, causal=False, keep=keep, kk=kk, vk=vk, kkeep=kkeep)


@pytest.mark.parametrize("kind", ["performer", "rnn", "softmax"])
@pytest.mark.parametrize("e_init", ["pool", "gaussian"])
def test_lowrank_window_over_original_keys_kernel_over_downsampled(kind, e_init):
    N, dh, H, hkv = 23, 8, 4, 2
    attn = FlurkaAttention(kernel=kind, heads=H, head_dim=dh, kv_heads=hkv, dk=6,
                           max_seq_len=30, window=5, e_init=e_init, seed=2,
                           num_features=16 if kind == "performer" else None)
    with torch.no_grad():
        attn.kernel_log_weight.copy_(torch.tensor([0.0, -1.0, 0.5, 1.0]))
    q, k, v, keep = _qkv(2, H, hkv, N, dh, seed=3)
    out = attn(q, k, v, key_padding_mask=keep)
    ref = _lowrank_oracle(attn, q, k, v, keep, kind, attn.kernel_log_weight.detach())
    assert rel_error(out, ref) < FWD_TOL


def test_hoisted_call_equals_unhoisted():
    """project_kv on the layer input plus window_kv = the unhoisted call on linear(x)."""
    B, N, D, H = 2, 17, 24, 3
    dh = D // H
    attn = FlurkaAttention(kernel="performer", heads=H, head_dim=dh, dk=5, max_seq_len=20,
                           window=4, seed=1, num_features=16, e_init="gaussian")
    lin_k, lin_v = nn.Linear(D, D), nn.Linear(D, D)
    g = torch.Generator().manual_seed(0)
    x, q = torch.randn(B, N, D, generator=g), torch.randn(B, H, N, dh, generator=g)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, -3:] = False
    split = lambda t: t.view(B, -1, H, dh).transpose(1, 2)  # noqa: E731
    k, v = split(lin_k(x)), split(lin_v(x))
    kd = split(attn.project_kv(x, lin_k.weight, lin_k.bias, "k", keep))
    vd = split(attn.project_kv(x, lin_v.weight, lin_v.bias, "v", keep))
    hoisted = attn(q, kd, vd, key_padding_mask=keep, source_len=N, window_kv=(k, v))
    plain = attn(q, k, v, key_padding_mask=keep)
    assert rel_error(hoisted, plain) < FWD_TOL
    with pytest.raises(ValueError, match="window_kv"):
        attn(q, kd, vd, key_padding_mask=keep, source_len=N)


def test_no_window_is_unchanged_bit_for_bit():
    """window=None: no new parameter, the same output as a module built without the keyword."""
    torch.manual_seed(0)
    q, k, v, keep = _qkv(2, 4, 2, 19, 8)
    for kw in (dict(kernel="performer", num_features=16), dict(kernel="relu", causal=True),
               dict(kernel="rnn", dk=5, max_seq_len=20)):
        a = FlurkaAttention(heads=4, head_dim=8, kv_heads=2, seed=4, window=None, **kw)
        b = FlurkaAttention(heads=4, head_dim=8, kv_heads=2, seed=4, **kw)
        assert "kernel_log_weight" not in a.state_dict() and "window" not in repr(a)
        assert torch.equal(a(q, k, v, key_padding_mask=keep), b(q, k, v, key_padding_mask=keep))


# -- memory: block-wise, never N x N ---------------------------------------------------------
class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind,causal", [("performer", True), ("relu", False)])
def test_largest_intermediate_is_far_below_n_squared(kind, causal):
    """At N = 4096, w = 64 the biggest tensor (scores of a chunk against its key bands,
    N (P + 1) C elements) stays below N^2 / 16; a dense N x N score would be 16x that."""
    N, dh = 4096, 8
    q, k, v, keep = _qkv(1, 1, 1, N, dh)
    with torch.no_grad(), LargestTensor() as rec:
        window_attention(q, k, v, window=64, feature_map=_fmap(kind, dh, 1),
                         log_weight=torch.zeros(1), scale=dh ** -0.5, causal=causal,
                         key_padding_mask=keep)
    assert rec.largest <= N * N // 16, rec.largest


# -- options ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "8"])
def test_config_refuses_a_bad_window(bad):
    with pytest.raises(ValueError, match="window must be a positive int or None"):
        RewriteConfig(kernel="relu", window=bad)


def test_config_refuses_window_on_exact_softmax_and_accepts_triton():
    with pytest.raises(ValueError, match="kernel part"):
        RewriteConfig(kernel="softmax", dk=None, window=8)
    # the band has a Triton kernel (tests/test_triton_window.py)
    assert RewriteConfig(kernel="relu", dk=None, window=8, backend="triton").window == 8
    assert RewriteConfig(kernel="softmax", dk=8, window=8).window == 8  # Linformer + window


def test_cli_window_option_reaches_convert():
    from flurka_rewrite.cli import build_parser
    from flurka_rewrite.cli_options import extra_options

    args = build_parser().parse_args(["in.pt", "-o", "out.pt", "--window", "16"])
    assert extra_options(args)["window"] == 16
    args = build_parser().parse_args(["in.pt", "-o", "out.pt"])
    assert extra_options(args)["window"] is None


# -- cost model against FlopCounterMode ------------------------------------------------------
FLOP_CASES = {
    "performer-bidirectional-padding": dict(kernel="performer", causal=False, dk=None),
    "performer-causal": dict(kernel="performer", causal=True, dk=None),
    "relu-causal-gqa": dict(kernel="relu", causal=True, dk=None, hkv=2),
    "ffk-bidirectional-gqa": dict(kernel="ffk", causal=False, dk=None, hkv=2),
    "rnn-dk7-padding": dict(kernel="rnn", causal=False, dk=7),
    "softmax-dk7": dict(kernel="softmax", causal=False, dk=7),
}


@pytest.mark.parametrize("case", list(FLOP_CASES))
def test_site_flops_count_the_window_products(case):
    c = dict(FLOP_CASES[case])
    B, H, N, dh, w = 2, 4, 45, 8, 6
    hkv = c.pop("hkv", H)
    m = 16 if c["kernel"] in ("performer", "ffk") else None
    attn = FlurkaAttention(heads=H, head_dim=dh, kv_heads=hkv, num_features=m, window=w,
                           max_seq_len=50 if c["dk"] else None, **c)
    q, k, v, keep = _qkv(B, H, hkv, N, dh)
    pad = "padding" in case
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        attn(q, k, v, key_padding_mask=keep if pad else None)
    want = site_flops(B=B, N=N, M=N, H=H, Hkv=hkv, dh=dh, num_features=attn.num_features,
                      window=w, projections=False, gemm_only=True, padding_mask=pad,
                      max_seq_len=attn.max_seq_len, **c)
    assert fc.get_total_flops() == want
    total = site_flops(B=B, N=N, M=N, H=H, Hkv=hkv, dh=dh, num_features=attn.num_features,
                       window=w, projections=False, padding_mask=pad,
                       max_seq_len=attn.max_seq_len, **c)
    assert total > want  # the elementwise part is counted too


def test_site_flops_refuses_window_without_kernel_or_cross_attention():
    with pytest.raises(ValueError, match="window"):
        site_flops(kernel="softmax", dk=None, B=1, N=8, M=8, H=1, Hkv=1, dh=4, window=2)
    with pytest.raises(ValueError, match="window"):
        site_flops(kernel="relu", dk=None, B=1, N=8, M=9, H=1, Hkv=1, dh=4, window=2)


# -- integration: Hugging Face models, save / load, ONNX -------------------------------------
MODELS = {  # zoo model -> kernel: bidirectional with padding; causal; causal GQA + RoPE
    "bert": dict(kernel="performer", dk=None), "bert-dk8": dict(kernel="performer", dk=8),
    "gpt2": dict(kernel="relu", dk=None), "llama": dict(kernel="rnn", dk=None),
    # EVA with the window as its local set (kernels/eva_window.py): 4 chunks, not exact
    "gpt2-eva": dict(kernel="eva", dk=None, num_features=4),
    "bert-eva-dk8": dict(kernel="eva", dk=8, num_features=4),
}


def _converted(name: str):
    pytest.importorskip("transformers")
    import zoo_hf

    e = zoo_hf.build(name.split("-")[0])
    new = fr.convert(e.model, example_inputs=e.example_inputs, window=8, **MODELS[name])
    return e, new


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_models_convert_with_a_window_verified(name):
    e, new = _converted(name)
    sites = new.flurka_report.sites
    assert sites and all(s.status == "rewritten" and s.verified is True and s.window == 8
                         for s in sites), str(new.flurka_report)
    assert all(s.hoisted is False for s in sites)  # the window reads K, V at full length
    assert all(s.rel_error < 0.5 for s in sites)
    assert " w=8" in str(new.flurka_report)
    assert new.flurka_report.to_dict()["config"]["window"] == 8
    mods = [m for m in new.modules() if isinstance(m, FlurkaAttention)]
    assert mods and all(m.window == 8 and "window=8" in repr(m) for m in mods)


@pytest.mark.parametrize("name", ["bert", "gpt2", "gpt2-eva", "bert-eva-dk8"])
def test_save_load_and_onnx_round_trips(name, tmp_path):
    e, new = _converted(name)
    for m in new.modules():  # a trained-looking theta: not the initial value
        if isinstance(m, FlurkaAttention):
            with torch.no_grad():
                m.kernel_log_weight.add_(torch.linspace(-0.5, 0.5, m.heads))
    fr.save(new, tmp_path / "saved", example_inputs=e.example_inputs)
    back = fr.load(tmp_path / "saved")
    with torch.no_grad():
        ref = new(**e.example_inputs)[0]
        assert torch.equal(back(**e.example_inputs)[0], ref)
    assert [s.window for s in back.flurka_report.sites] == [8] * len(back.flurka_report.sites)
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = str(tmp_path / "model.onnx")
    fr.export_onnx(new, e.example_inputs, path, dynamic_batch=False)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (e.example_inputs["input_ids"].shape[1], 9):  # a second, shorter length
        feed = {k: v[:, :n] for k, v in e.example_inputs.items()}
        with torch.no_grad():
            want = new(**feed)[0]
        got = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in feed.items()})[0])
        assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))
