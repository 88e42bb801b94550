"""The fused low-rank Triton path (``kernels/triton_lowrank.py``: K~ = E K, V~ = F V, phi(K~)
and the state in one kernel, then the output kernel) against the PyTorch reference, forward
and backward (grads of q, k, v, E, F), through ``FlurkaAttention(backend="triton")`` vs
``backend="torch"``; and the number of kernel launches per forward call, fused vs unfused.

Shapes are small and odd (M = 37 < max_seq_len = 45, so the pool E's last rows see no key;
dk = 13; m = 40 and dv = 40 span two 32-wide blocks under the interpreter), with GQA and key
padding (leading padding in batch 0, a tail in batch 1). Oracle: the reference layer
(``lowrank_project`` then ``attention_core``) and autograd through it.
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

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: exact fp32 products (input_precision="ieee") summed in another order than PyTorch
# (over key blocks, row blocks, with the per-feature rescaling); measured <= 1e-6 relative.
# A wrong term (an unmasked padded key, a dropped band, a stale stabiliser) gives > 1e-2.
TOL_FP32 = 1e-4
# (B, H, Hkv, N, M, dh, dv, dk, max_seq_len)
SHAPE = (2, 4, 2, 19, 37, 20, 40, 13, 45)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error |a - b| / |b| in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_layers(kernel: str, e_init: str, shape=SHAPE):
    B, H, Hkv, N, M, dh, dv, dk, max_len = shape
    layers = {}
    for backend in ("torch", "triton"):
        layers[backend] = FlurkaAttention(
            kernel=kernel, heads=H, kv_heads=Hkv, head_dim=dh, dk=dk, max_seq_len=max_len,
            e_init=e_init, num_features=40, seed=3, backend=backend).to(DEVICE).eval()
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    return layers


def make_inputs(shape=SHAPE, seed: int = 5, pad_all: bool = False):
    B, H, Hkv, N, M, dh, dv, _, _ = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, dh, generator=g)
    k = torch.randn(B, Hkv, M, dh, generator=g) * 1.5
    v = torch.randn(B, Hkv, M, dv, generator=g)
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[0, :6] = False
    mask[1, 24:] = False
    if pad_all:
        mask[0] = False
    v[~mask[:, None, :, None].expand_as(v)] = float("nan")  # padded values must not leak
    return (*(t.to(DEVICE) for t in (q, k, v)), mask.to(DEVICE))


def run_both(layers, q, k, v, mask):
    """(out, dq, dk, dv, dE, dF) per backend, dout fixed."""
    dout = None
    res = {}
    for backend, layer in layers.items():
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = layer(qq, kk, vv, key_padding_mask=mask)
        if dout is None:
            dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        grads = torch.autograd.grad(out, (qq, kk, vv, layer.E, layer.F), dout)
        res[backend] = (out, *grads)
    return res


@pytest.mark.parametrize("e_init", ["pool", "gaussian"])
@pytest.mark.parametrize("kernel", ["performer", "relu", "rnn"])
def test_fused_lowrank_matches_reference(kernel: str, e_init: str) -> None:
    """Outputs and gradients of q, k, v, E, F equal the reference layer (TOL_FP32), and the
    site really takes the fused path."""
    layers = make_layers(kernel, e_init)
    q, k, v, mask = make_inputs()
    use, why = dispatch.lowrank_fusion(layers["triton"], q, k, v)
    assert use, why
    res = run_both(layers, q, k, v, mask)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dE", "dF"], res["triton"], res["torch"]):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < TOL_FP32, f"{name}: {rel_err(a, b):.2e}"
    dk_, dv_ = res["triton"][2], res["triton"][3]
    keep = mask[:, None, :, None]  # padded keys: exactly zero gradients
    assert not torch.where(keep, 0.0, dk_).any() and not torch.where(keep, 0.0, dv_).any()


def test_fused_performer_chunked_head_dim_and_all_padded_row(monkeypatch) -> None:
    """BLOCK_K = 16 < dh = 20: the performer's u = sqrt(s) K~ W^T - s|K~|^2/2 summed over two
    head-dim chunks (and dK~ through the dU buffers); batch 0 entirely padded: zero output and
    zero dk, dv there, finite everywhere. Batch 1 and dE, dF (to which batch 0 adds nothing)
    equal the reference run on batch 1 alone (the reference's own dE is NaN with a fully
    padded row: its performer key stabiliser is -1e30 there, exp overflows under the mask)."""
    monkeypatch.setenv("FLURKA_TRITON_BLOCK_K", "16")
    layers = make_layers("performer", "pool")
    q, k, v, mask = make_inputs(pad_all=True)
    got = run_both({"triton": layers["triton"]}, q, k, v, mask)["triton"]
    dout = torch.randn(got[0].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref_layer = layers["torch"]
    qq, kk, vv = (t[1:].clone().requires_grad_(True) for t in (q, k, v))
    out = ref_layer(qq, kk, vv, key_padding_mask=mask[1:])
    ref = (out, *torch.autograd.grad(out, (qq, kk, vv, ref_layer.E, ref_layer.F), dout[1:]))
    for name, a, b in zip(["out", "dq", "dk", "dv", "dE", "dF"], got, ref):
        assert torch.isfinite(a).all(), name
        a = a if name in ("dE", "dF") else a[1:]
        assert rel_err(a, b) < TOL_FP32, f"{name}: {rel_err(a, b):.2e}"
    assert not got[0][0].any() and not got[2][0].any() and not got[3][0].any()


def test_dispatch_reasons() -> None:
    """Fused: performer/relu/rnn with a pool E, or a dense E with few state tiles. Unfused
    (the old path), with a reason: ffk (phi in PyTorch), a dense E with many tiles, the torch
    backend, a kernel-only site."""
    q, k, v, _ = make_inputs()
    assert dispatch.lowrank_fusion(make_layers("rnn", "pool")["triton"], q, k, v)[0]
    use, why = dispatch.lowrank_fusion(make_layers("ffk", "pool")["triton"], q, k, v)
    assert not use and "PyTorch" in why
    wide = make_layers("performer", "gaussian", (*SHAPE[:7], 13, 45))["triton"]
    wide.feature_map.num_features = 512  # 4 feature tiles of 128: E K recomputed 4x
    use, why = dispatch.lowrank_fusion(wide, q, k, v)
    assert not use and "recomputed 4x" in why
    use, why = dispatch.lowrank_fusion(make_layers("rnn", "pool")["torch"], q, k, v)
    assert not use and "reference" in why


class _Launches:
    """Counts Triton kernel launches (JITFunction / InterpretedFunction ``run``) and aten ops
    (a TorchDispatchMode) while active."""

    def __init__(self, monkeypatch) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        self.triton = 0
        counter = self

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.aten += 1
                return func(*args, **(kwargs or {}))

        self.aten, self._mode = 0, Ops()
        classes = [triton.runtime.jit.JITFunction]
        if os.environ.get("TRITON_INTERPRET") == "1":
            from triton.runtime.interpreter import InterpretedFunction
            classes.append(InterpretedFunction)
        for cls in classes:
            orig = cls.run

            def run(fn_self, *a, _orig=orig, **kw):
                counter.triton += 1
                return _orig(fn_self, *a, **kw)

            monkeypatch.setattr(cls, "run", run)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


@pytest.mark.parametrize("e_init", ["pool", "gaussian"])
def test_fused_path_launches_fewer_kernels(e_init: str, monkeypatch) -> None:
    """Per forward call of a padded performer site: the fused path launches 2 Triton kernels
    (state, output) against 3 unfused (key row max, state, output), and fewer aten ops (the
    unfused path adds lowrank_project, the row keep and the key stabiliser in PyTorch)."""
    layer = make_layers("performer", e_init, (2, 4, 2, 19, 120, 20, 40, 32, 128))["triton"]
    q, k, v, mask = make_inputs((2, 4, 2, 19, 120, 20, 40, 32, 128))
    counts = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(dispatch, "lowrank_fusion", lambda *a: (False, "test"))
        with torch.no_grad():
            layer(q, k, v, key_padding_mask=mask)  # warm caches (row keep, support columns)
            with _Launches(monkeypatch) as n:
                out = layer(q, k, v, key_padding_mask=mask)
        counts[fused] = (n.triton, n.aten, out)
    print(f"\n{e_init}: launches per forward (triton, aten): fused {counts[True][:2]}, "
          f"unfused {counts[False][:2]}")
    assert counts[True][0] == 2 and counts[False][0] == 3
    assert counts[True][1] < counts[False][1]
    assert rel_err(counts[True][2], counts[False][2]) < TOL_FP32
