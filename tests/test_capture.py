"""Capture: discovery of the attention-holding modules, symbolic_trace vs torch.export, the
graph installed on the user's module, and the runtime guards of export captures."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import flurka_rewrite as fr
from flurka_rewrite.passes.capture import capture_module, discover, values_of
from models_handwritten import build


def test_discover_finds_innermost_holders_and_mha() -> None:
    case = build("with_classifier_head")  # root softmax (head) + attention in .attn
    d = discover(case.model, case.inputs)
    assert d.holders == ["attn", ""]  # innermost first-called order: attn, then the root head
    assert d.mha == []
    enc = build("transformer_encoder")
    d = discover(enc.model, enc.inputs)
    assert d.mha == ["enc.layers.0.self_attn", "enc.layers.1.self_attn"]
    assert d.calls["enc.layers.0.self_attn"] == 1


def test_symbolic_trace_then_export_fallback() -> None:
    case = build("matmul_div_add")
    d = discover(case.model, case.inputs)
    args, kwargs = d.inputs["attn"]
    cap = capture_module("attn", case.model.attn, args, kwargs)
    assert cap.how == "symbolic_trace"
    ref = case.model.attn(*args)
    vals = values_of(cap)
    out = [n for n in cap.gm.graph.nodes if n.op == "output"][0].args[0]
    torch.testing.assert_close(vals[out.name], ref)  # the graph computes the module

    class Shapey(nn.Module):  # data-dependent python on shapes: symbolic_trace fails
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x):
            shape = (*x.shape[:-1], -1)  # iterating a Proxy: symbolic_trace fails (HF-style)
            s = (self.lin(x) @ x.transpose(1, 2)).view(shape)
            return s.softmax(-1) @ x

    m = Shapey()
    x = torch.randn(2, 5, 6)
    cap = capture_module("", m, (x,), {})
    assert cap.how == "export"
    new = fr.convert(m, kernel="softmax", dk=None, example_inputs=(x,))
    assert type(new).__name__ == "Shapey" and len(new.flurka_report.rewritten) == 1
    x7 = torch.randn(3, 7, 6)  # dynamic sizes: another batch and length
    torch.testing.assert_close(new(x7), m(x7), atol=1e-5, rtol=1e-5)


def test_export_guard_rejects_a_changed_flag() -> None:
    class Flagged(nn.Module):
        def forward(self, x, scale_twice: bool = False, **kwargs):
            shape = (*x.shape[:-1], -1)  # forces torch.export
            s = (x @ x.transpose(1, 2)).view(shape)
            if scale_twice:
                s = s * 2
            return s.softmax(-1) @ x

    x = torch.randn(2, 5, 6)
    new = fr.convert(Flagged(), kernel="softmax", dk=None,
                     example_inputs={"x": x, "scale_twice": True})
    torch.testing.assert_close(new(x, scale_twice=True), Flagged()(x, scale_twice=True))
    with pytest.raises(RuntimeError, match="scale_twice"):
        new(x, scale_twice=False)
