"""Triton FLuRKA kernels against the PyTorch reference, forward and backward.

On a machine without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1,
set here before triton is imported when the caller did not set it); with CUDA they run on
the GPU. Shapes are tiny and odd (N = 37, 70; M = 23; head dims 20 and 48; dv != dh) so that
every block has a masked tail. Oracle: ``reference.attention_core`` (plain PyTorch, fp32).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

triton = pytest.importorskip("triton", reason="the triton package is not installed")

from flurka_rewrite.kernels.attention import FlurkaAttention  # noqa: E402
from flurka_rewrite.kernels import dispatch  # noqa: E402
from flurka_rewrite.kernels.feature_maps import build_feature_map  # noqa: E402
from flurka_rewrite.kernels.reference import attention_core  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from flurka_rewrite.kernels.triton_ops import triton_attention_core  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FMAPS = ["performer", "relu", "rnn", "ffk"]
# (B, H, Hkv, N, M, dh, dv, masked): GQA + padding + odd sizes; and MHA with dh=48, N=70.
SHAPES = {
    "gqa-mask-n37-d20": (2, 4, 2, 37, 23, 20, 23, True),
    "mha-n70-d48": (1, 2, 2, 70, 70, 48, 48, False),
}
# fp32: the kernels use exact fp32 products (input_precision="ieee") and fp32 sums in another
# order than PyTorch; measured errors are ~1e-6. 1e-4 leaves a wide margin while a wrong
# term (mask, GQA group, stabilizer, a missing gradient path) gives errors > 1e-2.
TOL_FP32 = 1e-4
# bf16/fp16: dot operands (phi, S, V) are rounded to the input dtype (8 / 11 mantissa bits)
# before fp32 accumulation, and the output is rounded: relative errors of a few 1e-3.
TOL_LOWP = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error |a - b| / |b| in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_inputs(shape, causal: bool, dtype=torch.float32, seed: int = 0):
    B, H, Hkv, N, M, dh, dv, masked = shape
    M = N if causal else M
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, dh, generator=g)
    k = torch.randn(B, Hkv, M, dh, generator=g)
    v = torch.randn(B, Hkv, M, dv, generator=g)
    mask = None
    if masked:
        mask = torch.rand(B, M, generator=g) > 0.3
        mask[0, :3] = False  # leading padding: the causal prefix starts empty
        mask[:, -1] = True
        mask = mask.to(DEVICE)
    q, k, v = (t.to(DEVICE, dtype).requires_grad_(True) for t in (q, k, v))
    return q, k, v, mask


def make_map(name: str, shape):
    _, _, Hkv, _, _, dh, _, _ = shape
    fm = build_feature_map(name, head_dim=dh, kv_heads=Hkv, num_features=40, seed=1)
    return fm.to(DEVICE)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("fmap", FMAPS)
def test_forward_backward_match_reference(fmap: str, shape_id: str, causal: bool) -> None:
    shape = SHAPES[shape_id]
    fm = make_map(fmap, shape)
    q, k, v, mask = make_inputs(shape, causal)
    out = triton_attention_core(q, k, v, feature_map=fm, key_padding_mask=mask, causal=causal)
    ref = attention_core(q, k, v, feature_map=fm, key_padding_mask=mask, causal=causal)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < TOL_FP32, f"output: {rel_err(out, ref):.2e}"
    dout = torch.randn_like(out)
    params = list(fm.parameters())  # ffk weights; empty for the others
    g_tri = torch.autograd.grad(out, (q, k, v, *params), dout)
    g_ref = torch.autograd.grad(ref, (q, k, v, *params), dout)
    names = ["dq", "dk", "dv"] + [f"d{n}" for n, _ in fm.named_parameters()]
    for name, a, b in zip(names, g_tri, g_ref):
        assert rel_err(a, b) < TOL_FP32, f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fmap", ["performer", "rnn"])
def test_low_precision_forward_backward(fmap: str, dtype: torch.dtype, causal: bool) -> None:
    """bf16/fp16 against the fp32 reference; the causal path has the same rounding points
    (dot operands, output) plus the C x C intra-chunk matrices rounded before their products:
    measured errors on this shape are <= 1e-2 (bf16) and 9e-4 (fp16), as non-causal."""
    shape = SHAPES["gqa-mask-n37-d20"]
    fm = make_map(fmap, shape)
    q, k, v, mask = make_inputs(shape, causal=causal, dtype=dtype)
    out = triton_attention_core(q, k, v, feature_map=fm, key_padding_mask=mask, causal=causal)
    # oracle: the fp32 reference on the same (already rounded) inputs
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = attention_core(q32, k32, v32, feature_map=fm, key_padding_mask=mask, causal=causal)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL_LOWP[dtype], f"output: {rel_err(out, ref):.2e}"
    dout = torch.randn_like(ref)
    g_tri = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    g_ref = torch.autograd.grad(ref, (q32, k32, v32), dout)
    for name, a, b in zip(["dq", "dk", "dv"], g_tri, g_ref):
        assert a.dtype == dtype
        assert rel_err(a, b) < 2 * TOL_LOWP[dtype], f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("fmap", ["performer", "rnn"])
def test_fp16_noncausal_backward_with_a_fully_padded_row(fmap: str) -> None:
    """A batch row whose keys are all padding has out = 0 / eps: its 1/eps must not overflow
    the fp16 dot operands (it did: NaN dk). Oracle: dk, dv of that row exactly 0, every
    gradient finite, the other row equal to the fp32 reference (fp16 tolerance as above)."""
    shape = SHAPES["gqa-mask-n37-d20"]
    fm = make_map(fmap, shape)
    q, k, v, mask = make_inputs(shape, causal=False, dtype=torch.float16)
    mask[0] = False
    out = triton_attention_core(q, k, v, feature_map=fm, key_padding_mask=mask)
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = attention_core(q32, k32, v32, feature_map=fm, key_padding_mask=mask)
    dout = torch.randn_like(ref)
    g_tri = torch.autograd.grad(out, (q, k, v), dout.half())
    g_ref = torch.autograd.grad(ref, (q32, k32, v32), dout)
    for name, a, b in zip(["dq", "dk", "dv"], g_tri, g_ref):
        assert torch.isfinite(a).all(), name
        err = rel_err(a[1], b[1])
        assert err < 2 * TOL_LOWP[torch.float16], f"{name}: {err:.2e}"
    assert (g_tri[1][0] == 0).all() and (g_tri[2][0] == 0).all()


# Causal scan edge cases, (B, H, Hkv, N, dh, dv, mask kind, key growth). Under the interpreter
# the chunk is 16: "lead" pads all of chunk 0 and part of chunk 1 of batch 0 (the scan starts
# from empty states, the performer's running max from -1e30) with N = 3 whole chunks and key
# norms growing 0.3 -> 4 along the sequence (the running max of the performer's per-key
# stabilizers moves inside and across chunks); "g3" has N below one chunk and 3 query heads per
# kv-head (dk, dv sum over them); "allpad" pads all of batch 0 (its dk, dv must be exactly 0)
# with dv = 40 > BLOCK_DV.
CAUSAL_CASES = {
    "lead-n48": (2, 2, 1, 48, 16, 8, "lead", 4.0),
    "g3-n5": (1, 3, 1, 5, 8, 8, "rand", 1.0),
    "allpad-dv40": (2, 2, 2, 33, 16, 40, "allpad", 1.0),
}


def make_causal_case(case: str, seed: int = 0):
    """Inputs of one CAUSAL_CASES entry: q, k, v (fp32, requiring grad) and the key mask."""
    B, H, Hkv, N, dh, dv, kind, growth = CAUSAL_CASES[case]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, dh, generator=g)
    k = torch.randn(B, Hkv, N, dh, generator=g) * torch.linspace(0.3, growth, N)[:, None]
    v = torch.randn(B, Hkv, N, dv, generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    if kind == "lead":
        mask[0, :20] = False
    elif kind == "rand":
        mask = torch.rand(B, N, generator=g) > 0.5
        mask[:, -1] = True
    else:
        mask[0] = False
    q, k, v = (t.to(DEVICE).requires_grad_(True) for t in (q, k, v))
    return q, k, v, mask.to(DEVICE)


@pytest.mark.parametrize("case", list(CAUSAL_CASES))
@pytest.mark.parametrize("fmap", ["performer", "relu", "rnn"])
def test_causal_backward_edge_cases(fmap: str, case: str) -> None:
    """The Triton causal backward (reverse suffix-state scan + intra-chunk C x C products)
    equals autograd through the chunked PyTorch reference; fp32, TOL_FP32 (measured <= 5e-6)."""
    q, k, v, mask = make_causal_case(case)
    fm = build_feature_map(fmap, head_dim=q.shape[-1], num_features=24, seed=1).to(DEVICE)
    out = triton_attention_core(q, k, v, feature_map=fm, key_padding_mask=mask, causal=True)
    ref = attention_core(q, k, v, feature_map=fm, key_padding_mask=mask, causal=True)
    assert rel_err(out, ref) < TOL_FP32, f"output: {rel_err(out, ref):.2e}"
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    g_tri = torch.autograd.grad(out, (q, k, v), dout)
    g_ref = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, b in zip(["dq", "dk", "dv"], g_tri, g_ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < TOL_FP32, f"{name}: {rel_err(a, b):.2e}"
    keep = mask[:, None, :, None]  # padded keys: exactly zero gradients
    assert not torch.where(keep, 0.0, g_tri[1]).any() and not torch.where(keep, 0.0, g_tri[2]).any()


@pytest.mark.parametrize("fmap", ["performer", "rnn"])
def test_causal_backward_runs_without_the_reference(fmap: str, monkeypatch) -> None:
    """The causal backward is the Triton kernels: with the PyTorch causal reference made to
    raise, forward and backward still run and give the reference's gradients."""
    import flurka_rewrite.kernels.reference as reference
    import flurka_rewrite.kernels.triton_ops as ops

    shape = (1, 2, 1, 21, 21, 8, 12, True)
    fm = make_map(fmap, shape)
    q, k, v, mask = make_inputs(shape, causal=True)
    ref = attention_core(q, k, v, feature_map=fm, key_padding_mask=mask, causal=True)
    dout = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (q, k, v), dout)

    def fail(*args, **kwargs):
        raise AssertionError("the Triton causal path must not call the PyTorch reference")

    for name in ("causal_kernel_attention", "_causal_stabilized", "attention_core"):
        monkeypatch.setattr(reference, name, fail)
        monkeypatch.setattr(ops, name, fail, raising=False)
    out = triton_attention_core(q, k, v, feature_map=fm, key_padding_mask=mask, causal=True)
    g_tri = torch.autograd.grad(out, (q, k, v), dout)
    for name, a, b in zip(["dq", "dk", "dv"], g_tri, g_ref):
        assert rel_err(a, b) < TOL_FP32, f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("kernel", ["performer", "ffk"])
def test_flurka_module_triton_equals_torch(kernel: str) -> None:
    """Full FLuRKA layer (low-rank E, F then the fused core): outputs and gradients of q, k,
    v, E, F (and the ffk weights) with backend="triton" equal backend="torch"."""
    B, H, Hkv, N, dh, dk = 2, 4, 2, 37, 20, 12
    mods = {}
    for backend in ("torch", "triton"):
        mods[backend] = FlurkaAttention(kernel=kernel, heads=H, kv_heads=Hkv, head_dim=dh,
                                        dk=dk, max_seq_len=48, e_init="gaussian",
                                        num_features=40, seed=3, backend=backend).to(DEVICE)
    mods["triton"].load_state_dict(mods["torch"].state_dict())
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, N, dh, generator=g).to(DEVICE)
    k = torch.randn(B, Hkv, N, dh, generator=g).to(DEVICE)
    v = torch.randn(B, Hkv, N, dh, generator=g).to(DEVICE)
    mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    mask[1, 30:] = False
    outs, grads = {}, {}
    for backend, mod in mods.items():
        mod.eval()
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = mod(qq, kk, vv, key_padding_mask=mask)
        params = dict(mod.named_parameters())
        gr = torch.autograd.grad(out, (qq, kk, vv, *params.values()),
                                 torch.ones_like(out) / out.numel() ** 0.5)
        outs[backend] = out
        grads[backend] = dict(zip(["q", "k", "v", *params], gr))
    assert rel_err(outs["triton"], outs["torch"]) < TOL_FP32
    assert {"E", "F"} <= set(grads["torch"])
    for name, ref in grads["torch"].items():
        err = rel_err(grads["triton"][name], ref)
        assert err < TOL_FP32, f"grad {name}: {err:.2e}"


def test_export_sees_one_custom_op_node() -> None:
    """torch.export keeps the fused core as one opaque node (the fake impl gives its shapes)."""
    fm = make_map("relu", SHAPES["mha-n70-d48"])

    class Core(torch.nn.Module):
        def forward(self, q, k, v):
            return triton_attention_core(q, k, v, feature_map=fm)

    q = torch.randn(1, 2, 20, 48, device=DEVICE)
    k = torch.randn(1, 2, 17, 48, device=DEVICE)
    ep = torch.export.export(Core(), (q, k, k.clone()))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("flurka_core_fwd" in t for t in targets) == 1, targets
    out = ep.module()(q, k, k.clone())
    assert rel_err(out, attention_core(q, k, k.clone(), feature_map=fm)) < TOL_FP32


def test_backend_triton_on_cpu_without_interpreter_raises(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fm = build_feature_map("relu", head_dim=8)
    q = torch.randn(1, 1, 5, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.attention_core_dispatch(q, q, q, feature_map=fm, backend="triton")


def test_backend_auto_on_cpu_uses_reference(monkeypatch) -> None:
    import flurka_rewrite.kernels.triton_ops as ops

    def fail(*args, **kwargs):
        raise AssertionError("backend='auto' must not run Triton on CPU tensors")

    monkeypatch.setattr(ops, "triton_attention_core", fail)
    fm = build_feature_map("rnn", head_dim=8)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(3))
    assert dispatch.resolve_backend("auto", "cpu", fm) == "torch"
    out = dispatch.attention_core_dispatch(q, k, v, feature_map=fm, backend="auto")
    assert torch.equal(out, attention_core(q, k, v, feature_map=fm))


def test_auto_uses_triton_on_cuda_only_for_head_dims_measured_faster(monkeypatch) -> None:
    """On CUDA, "auto" picks Triton for dh <= 128 and the reference for wider heads (dh=325
    measured ~30x slower in Triton, docs/benchmarks.md); "triton" still forces Triton."""
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    fm = build_feature_map("performer", head_dim=8)
    assert dispatch.resolve_backend("auto", "cuda", fm, head_dim=64) == "triton"
    assert dispatch.resolve_backend("auto", "cuda", fm, head_dim=128) == "triton"
    assert dispatch.resolve_backend("auto", "cuda", fm, head_dim=325) == "torch"
    assert dispatch.resolve_backend("triton", "cuda", fm, head_dim=325) == "triton"
    assert dispatch.resolve_backend("auto", "cuda", None, head_dim=64) == "torch"  # softmax


@pytest.mark.parametrize("fmap", ["performer", "rnn"])
def test_causal_mask_shared_by_the_batch_triton_equals_torch(fmap: str) -> None:
    """A causal site called with one (1, 1, N, N) additive mask for the whole batch (built with
    masked_fill, as many models do): ``key_keep`` reduces it to a (1, M) key mask, which the
    reference broadcasts and the Triton path refused ("key_padding_mask must be (B, M)").
    Outputs and gradients of q, k, v with backend="triton" equal backend="torch" (TOL_FP32)."""
    B, H, N, dh = 2, 2, 40, 16
    future = torch.ones(N, N, dtype=torch.bool).triu(1)
    mask = torch.zeros(1, 1, N, N).masked_fill(future, torch.finfo(torch.float32).min)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, H, N, dh, generator=g).to(DEVICE) for _ in range(3))
    dout = torch.randn(B, H, N, dh, generator=g).to(DEVICE)
    res = {}
    for backend in ("torch", "triton"):
        mod = FlurkaAttention(kernel=fmap, heads=H, head_dim=dh, causal=True, num_features=24,
                              seed=3, backend=backend).to(DEVICE).eval()
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = mod(qq, kk, vv, attn_mask=mask.to(DEVICE))
        res[backend] = (out, *torch.autograd.grad(out, (qq, kk, vv), dout))
    for name, a, b in zip(["out", "dq", "dk", "dv"], res["triton"], res["torch"]):
        assert rel_err(a, b) < TOL_FP32, f"{name}: {rel_err(a, b):.2e}"


def test_key_mask_broadcast_over_the_batch_and_refused_otherwise() -> None:
    """A (1, M) or (M,) key mask is expanded to (B, M) (same result as the explicit (B, M)
    mask); one that cannot broadcast to (B, M) still raises."""
    shape = SHAPES["gqa-mask-n37-d20"]
    fm = make_map("relu", shape)
    q, k, v, _ = make_inputs(shape, causal=False)
    row = torch.rand(k.shape[2], generator=torch.Generator().manual_seed(2)) > 0.3
    row = row.to(DEVICE)
    full = triton_attention_core(q, k, v, feature_map=fm, key_padding_mask=row.expand(2, -1))
    for shared in (row[None], row):
        out = triton_attention_core(q, k, v, feature_map=fm, key_padding_mask=shared)
        assert torch.equal(out, full)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(B, M\)"):
        triton_attention_core(q, k, v, feature_map=fm, key_padding_mask=row[None].repeat(3, 1))
