"""``torch.compile`` of a model whose FlurkaAttention runs the Triton custom ops
(``backend="triton"``): one graph, no graph break, the fused core kept as the two opaque ops
``flurka_rewrite::flurka_core_fwd`` / ``flurka_core_bwd`` (their fake implementations give
the shapes), and the compiled model's outputs and gradients equal the eager model's on the
PyTorch backend.

On a CPU the ops run their CPU implementation, the PyTorch reference
(``triton_ops.cpu_runs_triton()`` made False here; under TRITON_INTERPRET=1 it would otherwise
interpret the Triton kernels, which ``test_triton.py`` tests). TRITON_INTERPRET=1 is set only
so that ``backend="triton"`` accepts CPU tensors (``dispatch.resolve_backend``). With CUDA the
kernels themselves run.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton", reason="the triton package is not installed")

from flurka_rewrite.kernels import triton_ops  # noqa: E402
from flurka_rewrite.kernels.attention import FlurkaAttention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32; the CPU ops compute the reference itself, in the same order: measured ~1e-7
TOL = 1e-5
D, H, DH = 32, 4, 8


class Block(nn.Module):
    """A minimal attention block: fused qkv projection, FlurkaAttention, output projection."""

    def __init__(self, kernel: str, causal: bool, dk: int | None, backend: str) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)
        self.attn = FlurkaAttention(kernel=kernel, heads=H, head_dim=DH, dk=dk, max_seq_len=24,
                                    causal=causal, num_features=16, e_init="gaussian", seed=3,
                                    backend=backend)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, H, DH).permute(2, 0, 3, 1, 4)
        o = self.attn(q, k, v, key_padding_mask=mask)
        return self.out(o.transpose(1, 2).reshape(B, N, D))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


CASES = {  # (kernel, causal, dk, padded)
    "performer-lowrank-padded": ("performer", False, 12, True),
    "rnn-causal": ("rnn", True, None, False),
    "ffk-kernel-only": ("ffk", False, None, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compile_fullgraph_keeps_the_custom_ops(case: str, monkeypatch) -> None:
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    kernel, causal, dk, padded = CASES[case]
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(triton_ops, "cpu_runs_triton", lambda: False)
    torch._dynamo.reset()
    # eval: in training mode the performer's redraw counter (int(self.calls)) breaks the graph
    eager = Block(kernel, causal, dk, "torch").to(DEVICE).eval()
    model = Block(kernel, causal, dk, "triton").to(DEVICE).eval()
    model.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, D, generator=g).to(DEVICE)
    mask = None
    if padded:
        mask = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
        mask[1, 13:] = False

    explained = torch._dynamo.explain(model)(x, mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    ops: list[str] = []

    def record(gm, _inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True,
                             backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    out = compiled(x, mask)
    ref = eager(x, mask)
    assert rel_err(out, ref) < TOL, f"output: {rel_err(out, ref):.2e}"
    dout = torch.randn(out.shape, generator=g).to(DEVICE)
    out.backward(dout)
    ref.backward(dout)
    assert sum("flurka_core_fwd" in t for t in ops) == 1, ops
    assert sum("flurka_core_bwd" in t for t in ops) == 1, ops
    grads = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        err = rel_err(p.grad, grads[name].grad)
        assert err < TOL, f"grad {name}: {err:.2e}"


def test_cpu_kernel_is_the_reference_and_its_backward_differentiates_it(monkeypatch) -> None:
    """Without the interpreter the ops' CPU implementation returns the reference's output and
    gradients (performer, the map whose in-kernel form has the most parts)."""
    from flurka_rewrite.kernels.feature_maps import build_feature_map
    from flurka_rewrite.kernels.reference import attention_core

    monkeypatch.setattr(triton_ops, "cpu_runs_triton", lambda: False)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 11, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 11, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 11, 6, generator=g, requires_grad=True)
    mask = torch.rand(2, 11, generator=g) > 0.3
    mask[:, 0] = True
    fm = build_feature_map("performer", head_dim=8, num_features=16, seed=2)
    for causal in (False, True):
        out = triton_ops.triton_attention_core(q, k, v, feature_map=fm, key_padding_mask=mask,
                                               causal=causal)
        ref = attention_core(q, k, v, feature_map=fm, key_padding_mask=mask, causal=causal)
        assert rel_err(out, ref) < TOL
        dout = torch.randn(out.shape, generator=g)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), dout),
                        torch.autograd.grad(ref, (q, k, v), dout)):
            assert rel_err(a, b) < TOL
