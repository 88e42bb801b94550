"""The sliding-window hybrid on Triton (kernels/triton_window.py, triton_window_ops.py)
against the PyTorch reference ``window.window_attention``, forward and backward.

On a machine without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1,
set here before triton is imported when the caller did not set it). The interpreter's blocks
are 16 x 16 (``window_blocks``), so N = 37 and 70 span several query and key blocks with
masked tails, and w = 20 makes a band cross key blocks (the online max/sum runs over more
than one block). The reference is tested against a dense fp64 oracle in tests/test_window.py.

Tolerances. fp32: the kernels use exact fp32 products (input_precision="ieee") and sum the
band in another order and at another running shift than the reference (online max); the
measured relative errors are 1e-7 to 1e-6, forward and gradients. FWD_TOL = 1e-5 and
GRAD_TOL = 1e-4 (as test_window.py) are far below a wrong mask, shift or missing gradient
path (errors >= 1e-2). bf16: q, k, v are bf16 (the reference gets the same values in fp32);
the output and the gradients are rounded to bf16 (8 mantissa bits: up to 4e-3 relative per
element) and on a GPU the band's dot operands are bf16 too: BF16_TOL = 3e-2, as
test_triton.py's.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

triton = pytest.importorskip("triton", reason="the triton package is not installed")

from flurka_rewrite.kernels import dispatch  # noqa: E402
from flurka_rewrite.kernels.attention import FlurkaAttention  # noqa: E402
from flurka_rewrite.kernels.feature_maps import build_feature_map  # noqa: E402
from flurka_rewrite.kernels.reference import rel_error  # noqa: E402
from flurka_rewrite.kernels.window import window_attention  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

import flurka_rewrite.kernels.triton_window_ops as wops  # noqa: E402
from flurka_rewrite.kernels.triton_window_ops import triton_window_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FWD_TOL, GRAD_TOL, BF16_TOL = 1e-5, 1e-4, 3e-2


def _inputs(B, H, hkv, N, dh, dv, masked, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, dh, generator=g)
    k = torch.randn(B, hkv, N, dh, generator=g)
    v = torch.randn(B, hkv, N, dv, generator=g)
    theta = torch.randn(H, generator=g) * 0.5
    keep = None
    if masked:
        keep = torch.ones(B, N, dtype=torch.bool)
        keep[-1, N - 5:] = False  # trailing padding in the last batch row
        keep[0, 3] = False  # and a hole inside the first one's windows
        keep = keep.to(DEVICE)
    xs = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
    return (*xs, theta.to(DEVICE).requires_grad_(), keep)


def _fmap(kind, dh, hkv):
    fm = build_feature_map(kind, head_dim=dh, kv_heads=hkv, scale=dh ** -0.5, seed=1,
                           num_features=16 if kind in ("performer", "ffk") else None)
    return fm.to(DEVICE)


def _both(kind, causal, w, shape, masked):
    """(Triton out, reference out, Triton grads, reference grads) on the same leaves (q, k, v,
    theta and the map's trainable weights), one random cotangent."""
    B, H, hkv, N, dh, dv = shape
    fm = _fmap(kind, dh, hkv)
    q, k, v, theta, keep = _inputs(B, H, hkv, N, dh, dv, masked)
    leaves = (q, k, v, theta, *[p for p in fm.parameters() if p.requires_grad])
    kw = dict(window=w, feature_map=fm, log_weight=theta, scale=dh ** -0.5, causal=causal,
              key_padding_mask=keep)
    out = triton_window_attention(q, k, v, **kw)
    ref = window_attention(q, k, v, **kw)
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    return (out, ref, torch.autograd.grad(out, leaves, cot),
            torch.autograd.grad(ref, leaves, cot))


# (kind, causal, w, (B, H, Hkv, N, dh, dv), masked): GQA, padding, odd N, dv != dh, bands
# across key blocks (w = 20), w >= N (the whole sequence is the window: causal w >= N,
# non-causal w >= 2N - 1), the performer, elementwise maps, and ffk (no in-kernel code: the
# kernel part is PyTorch anyway).
CASES = {
    "performer-causal-gqa-mask": ("performer", True, 5, (2, 4, 2, 37, 8, 12), True),
    "performer-bidir-gqa-mask": ("performer", False, 5, (2, 4, 2, 37, 8, 12), True),
    "relu-causal-w20-n70": ("relu", True, 20, (1, 2, 1, 70, 16, 16), True),
    "rnn-bidir-w20-n70": ("rnn", False, 20, (1, 2, 2, 70, 16, 8), False),
    "ffk-causal-n19": ("ffk", True, 3, (1, 2, 2, 19, 8, 8), True),
    "performer-causal-w-ge-n": ("performer", True, 19, (1, 2, 1, 19, 8, 8), True),
    "relu-bidir-w-ge-2n": ("relu", False, 40, (1, 2, 2, 19, 8, 8), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_match_reference(case):
    kind, causal, w, shape, masked = CASES[case]
    out, ref, grads, grads_ref = _both(kind, causal, w, shape, masked)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel_error(out, ref) < FWD_TOL, f"out: {rel_error(out, ref):.2e}"
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert rel_error(a, b) < GRAD_TOL, f"grad {i}: {rel_error(a, b):.2e}"


def test_bf16_forward_and_backward_match_fp32_reference():
    B, H, hkv, N, dh, dv = 2, 4, 2, 37, 16, 16
    fm = _fmap("performer", dh, hkv)
    q, k, v, theta, keep = _inputs(B, H, hkv, N, dh, dv, True, dtype=torch.bfloat16)
    x32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    kw = dict(window=6, feature_map=fm, scale=dh ** -0.5, causal=True, key_padding_mask=keep)
    out = triton_window_attention(q, k, v, log_weight=theta, **kw)
    th32 = theta.detach().clone().requires_grad_()
    ref = window_attention(*x32, log_weight=th32, **kw)
    assert out.dtype == torch.bfloat16
    assert rel_error(out.float(), ref) < BF16_TOL
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v, theta), cot.bfloat16())
    grads_ref = torch.autograd.grad(ref, (*x32, th32), cot)
    for name, a, b in zip("q k v theta".split(), grads, grads_ref):
        assert rel_error(a.float(), b) < BF16_TOL, f"d{name}: {rel_error(a.float(), b):.2e}"


@pytest.mark.parametrize("kernel", ["performer", "softmax"])  # FLuRKA + window, Linformer + w
def test_lowrank_module_triton_equals_torch(kernel):
    """Non-causal low-rank site: the window over the original keys (Triton band), the kernel
    part over the dk down-sampled ones; gradients reach E, F and theta."""
    B, H, hkv, N, dh = 2, 4, 2, 37, 8
    q, k, v, _, keep = _inputs(B, H, hkv, N, dh, dh, True, seed=4)
    outs, grads = [], []
    for backend in ("triton", "torch"):
        attn = FlurkaAttention(kernel=kernel, heads=H, head_dim=dh, kv_heads=hkv, dk=6,
                               max_seq_len=40, window=5, seed=2, num_features=16,
                               backend=backend).to(DEVICE)
        out = attn(q, k, v, key_padding_mask=keep)
        leaves = (q, k, v, attn.E, attn.F, attn.kernel_log_weight)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    assert rel_error(outs[0], outs[1]) < FWD_TOL
    for i, (a, b) in enumerate(zip(*grads)):
        assert rel_error(a, b) < GRAD_TOL, f"grad {i}: {rel_error(a, b):.2e}"


def test_causal_module_with_a_mask_shared_by_the_batch():
    """backend='triton' on a causal windowed site given a (1, 1, N, N) causal mask (reduced to a
    (1, N) key mask, broadcast over the batch) equals backend='torch'."""
    B, H, N, dh = 2, 2, 23, 8
    q, k, v, _, _ = _inputs(B, H, H, N, dh, dh, False, seed=6)
    mask = torch.ones(N, N, dtype=torch.bool, device=DEVICE).tril()[None, None]
    outs = [FlurkaAttention(kernel="rnn", heads=H, head_dim=dh, causal=True, window=4,
                            backend=b).to(DEVICE)(q, k, v, mask) for b in ("triton", "torch")]
    assert rel_error(outs[0], outs[1]) < FWD_TOL


def test_cpu_implementation_without_the_interpreter_equals_reference(monkeypatch):
    """Outside the interpreter the ops' CPU implementation is ``band_reference`` (PyTorch), so a
    compiled or exported graph holding them runs on a CPU; it computes the same."""
    if DEVICE != "cpu":
        pytest.skip("the CPU implementation is for CPU tensors")
    monkeypatch.setattr(wops, "cpu_runs_triton", lambda: False)
    monkeypatch.setattr(wops, "band_forward", None)  # the Triton launchers must not run
    monkeypatch.setattr(wops, "band_backward", None)
    out, ref, grads, grads_ref = _both("relu", False, 5, (2, 4, 2, 37, 8, 12), True)
    assert rel_error(out, ref) < FWD_TOL
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert rel_error(a, b) < GRAD_TOL, f"grad {i}: {rel_error(a, b):.2e}"


def test_auto_keeps_windowed_layers_on_the_reference(monkeypatch):
    """backend='auto' never picks the (unmeasured) Triton band kernel, on CUDA either."""
    assert dispatch.window_backend("auto", "cuda") == "torch"
    assert dispatch.window_backend("torch", "cuda") == "torch"
    assert dispatch.window_backend("triton", DEVICE) == "triton"

    def fail(*args, **kwargs):
        raise AssertionError("auto must not run the Triton window kernel")

    monkeypatch.setattr(wops, "triton_window_attention", fail)
    q, k, v, _, keep = _inputs(1, 2, 2, 19, 8, 8, True)
    FlurkaAttention(kernel="relu", heads=2, head_dim=8, window=4, backend="auto").to(DEVICE)(
        q, k, v, key_padding_mask=keep)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.window_backend("triton", "cpu")


def test_refusals_match_the_reference():
    q, k, v, theta, _ = _inputs(1, 2, 2, 10, 8, 8, False)
    fm = _fmap("relu", 8, 2)
    with pytest.raises(ValueError, match="self-attention"):
        triton_window_attention(q, k[:, :, :7], v[:, :, :7], window=3, feature_map=fm,
                                log_weight=theta, scale=0.3)
    with pytest.raises(ValueError, match="no kernel part"):
        triton_window_attention(q, k, v, window=3, feature_map=None, log_weight=theta,
                                scale=0.3)


def test_torch_compile_fullgraph_equals_eager_reference(monkeypatch):
    """``torch.compile(fullgraph=True)`` of a windowed backend='triton' layer: no graph break
    (the band is the opaque ops; their fake implementations give the shapes and strides);
    outputs and gradients equal the eager PyTorch backend's. On a CPU the ops run
    ``band_reference`` (as tests/test_triton_compile.py); with CUDA the kernels themselves."""
    if DEVICE == "cpu":
        monkeypatch.setattr(wops, "cpu_runs_triton", lambda: False)
    torch._dynamo.reset()
    q, k, v, _, keep = _inputs(2, 2, 2, 19, 8, 8, True, seed=8)
    layers = [FlurkaAttention(kernel="relu", heads=2, head_dim=8, window=4, causal=True,
                              backend=b).to(DEVICE) for b in ("triton", "torch")]
    compiled = torch.compile(layers[0], fullgraph=True)
    outs = [compiled(q, k, v, key_padding_mask=keep), layers[1](q, k, v, key_padding_mask=keep)]
    grads = [torch.autograd.grad(o.square().sum(), (q, k, v)) for o in outs]
    assert rel_error(outs[0], outs[1]) < FWD_TOL
    for a, b in zip(*grads):
        assert rel_error(a, b) < GRAD_TOL
