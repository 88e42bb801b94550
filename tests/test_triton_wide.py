"""Triton FLuRKA kernels at head dims above 128 (the paper's dh = 325, an odd dh = 130), where
the kernels loop over dh in chunks of BLOCK_K = 64 and the performer's dx goes through the dU
buffers and ``flurka_dx_kernel`` (``kernels/triton_dx.py``); against the PyTorch reference,
forward and backward, fp32, causal and non-causal, GQA and key padding.

Tiny N, M, m and dv (the interpreter is slow); dh itself is the point and stays wide. Oracle:
``reference.attention_core`` (plain PyTorch, fp32) and autograd through it.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

triton = pytest.importorskip("triton", reason="the triton package is not installed")

from flurka_rewrite.kernels.feature_maps import build_feature_map  # noqa: E402
from flurka_rewrite.kernels.reference import attention_core  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from flurka_rewrite.kernels import triton_launch  # noqa: E402
from flurka_rewrite.kernels.triton_ops import triton_attention_core  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 with exact fp32 products (input_precision="ieee"): the only difference from the
# reference is the order of the fp32 sums (over d-chunks, feature blocks and the chunk
# scan), measured <= 1e-6 relative at dh = 325; 1e-4 is the bound of tests/test_triton.py,
# while a wrong chunk (a dropped or doubled d-chunk, a wrong -s|x|^2/2 or -s rs x term, the
# softmax Jacobian's rs P term) gives errors > 1e-2.
TOL_FP32 = 1e-4
# (B, H, Hkv, N, M, dh, dv): GQA (2 query heads per kv-head), M != N for the non-causal
# case, N = 20 > the interpreter's causal chunk of 16 (two chunks, a masked tail).
WIDE = {"d325": (2, 2, 1, 20, 11, 325, 24), "d130": (1, 2, 1, 20, 13, 130, 130)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error |a - b| / |b| in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_case(shape, causal: bool, seed: int = 0):
    """q, k, v (fp32, requiring grad) and a key mask with leading padding in batch 0."""
    B, H, Hkv, N, M, dh, dv = shape
    M = N if causal else M
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, dh, generator=g)
    k = torch.randn(B, Hkv, M, dh, generator=g)
    v = torch.randn(B, Hkv, M, dv, generator=g)
    mask = torch.rand(B, M, generator=g) > 0.3
    mask[0, :3] = False  # leading padding: the causal prefix starts empty
    mask[:, -1] = True
    q, k, v = (t.to(DEVICE).requires_grad_(True) for t in (q, k, v))
    return q, k, v, mask.to(DEVICE)


def check(fmap: str, q, k, v, mask, causal: bool) -> dict[str, float]:
    """Forward and backward against the reference; returns the errors."""
    fm = build_feature_map(fmap, head_dim=q.shape[-1], kv_heads=k.shape[1], num_features=40,
                           seed=1).to(DEVICE)
    out = triton_attention_core(q, k, v, feature_map=fm, key_padding_mask=mask, causal=causal)
    ref = attention_core(q, k, v, feature_map=fm, key_padding_mask=mask, causal=causal)
    errs = {"out": rel_err(out, ref)}
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    g_tri = torch.autograd.grad(out, (q, k, v), dout)
    g_ref = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, b in zip(["dq", "dk", "dv"], g_tri, g_ref):
        assert torch.isfinite(a).all(), name
        errs[name] = rel_err(a, b)
    for name, err in errs.items():
        assert err < TOL_FP32, f"{name}: {err:.2e} ({errs})"
    return errs


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("shape_id", list(WIDE))
@pytest.mark.parametrize("fmap", ["performer", "rnn"])
def test_wide_head_dims_match_reference(fmap: str, shape_id: str, causal: bool) -> None:
    q, k, v, mask = make_case(WIDE[shape_id], causal)
    check(fmap, q, k, v, mask, causal)


def test_wide_performer_takes_the_chunked_dx_path(monkeypatch) -> None:
    """At dh = 325 the performer's dq and dk are formed by flurka_dx_kernel from dU (two
    calls: queries, keys) and the row kernels get BLOCK_K = 64 < dh."""
    calls = []
    real = triton_launch._launch_dx

    def spy(bufs, x, w, dx, *, sqrt_s, query):
        calls.append((query, bufs[0].shape))
        real(bufs, x, w, dx, sqrt_s=sqrt_s, query=query)

    monkeypatch.setattr(triton_launch, "_launch_dx", spy)
    q, k, v, mask = make_case((1, 2, 1, 9, 7, 325, 16), causal=False)
    check("performer", q, k, v, mask, causal=False)
    assert [(qr, tuple(s)) for qr, s in calls] == [(True, (1, 18, 40)), (False, (1, 7, 40))]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("fmap", ["performer", "relu"])
def test_chunked_path_at_a_small_head_dim(fmap: str, causal: bool, monkeypatch) -> None:
    """FLURKA_TRITON_BLOCK_K=16 forces the chunked code path at dh = 40 (3 chunks, a masked
    tail), cheaply: same results as the reference."""
    monkeypatch.setenv("FLURKA_TRITON_BLOCK_K", "16")
    q, k, v, mask = make_case((2, 2, 1, 20, 11, 40, 12), causal)
    check(fmap, q, k, v, mask, causal)


def test_block_k() -> None:
    """One chunk (dh's next power of two, >= 16) up to dh = 128; 64 above."""
    assert [triton_launch.block_k(d) for d in (8, 20, 64, 100, 128)] == [16, 32, 64, 128, 128]
    assert triton_launch.block_k(130) == triton_launch.block_k(325) == 64


# bf16/fp16, as tests/test_triton.py: dot operands (x, W, phi, S, V and here the stored dU
# and phi(q) of the dx kernel) rounded to the input dtype before fp32 accumulation, and the
# outputs rounded: relative errors of a few 1e-3 (gradients twice the bound).
TOL_LOWP = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_wide_performer_low_precision(dtype: torch.dtype) -> None:
    """dh = 130 in bf16/fp16 (the dU and P buffers in the input dtype) against the fp32
    reference on the same rounded inputs."""
    q, k, v, mask = make_case(WIDE["d130"], causal=False)
    q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    fm = build_feature_map("performer", head_dim=130, kv_heads=1, num_features=40,
                           seed=1).to(DEVICE)
    out = triton_attention_core(q, k, v, feature_map=fm, key_padding_mask=mask)
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = attention_core(q32, k32, v32, feature_map=fm, key_padding_mask=mask)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL_LOWP[dtype], f"output: {rel_err(out, ref):.2e}"
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    g_tri = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    g_ref = torch.autograd.grad(ref, (q32, k32, v32), dout)
    for name, a, b in zip(["dq", "dk", "dv"], g_tri, g_ref):
        assert a.dtype == dtype
        assert rel_err(a, b) < 2 * TOL_LOWP[dtype], f"{name}: {rel_err(a, b):.2e}"
