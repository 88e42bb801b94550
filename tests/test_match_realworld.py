"""The compiler on attention as real code writes it (tests/models_realworld.py).

Oracle: the original module. Exact mode within 1e-5 (fp32: SDPA against an explicit softmax,
reassociation only); every site rewritten and verified. Approximate kernels: verified, finite,
and (causal sites) causal: outputs before position t do not depend on inputs from t on.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import flurka_rewrite as fr
from models_realworld import CASES, N, UNREPRESENTABLE, x_input

ATOL = RTOL = 1e-5


def _convert(model, inputs, kernel, dk):
    with warnings.catch_warnings():
        warnings.simplefilter("error", fr.AllSitesSkippedWarning)
        return fr.convert(model, kernel=kernel, dk=dk, example_inputs=inputs)


@pytest.mark.parametrize("name", list(CASES))
def test_exact_mode_reproduces_the_original(name: str) -> None:
    model, inputs, sites, causal = CASES[name]()
    model.eval()
    new = _convert(model, inputs, "softmax", None)
    rep = new.flurka_report
    assert len(rep.sites) == sites, str(rep)
    for r in rep.sites:
        assert r.status == "rewritten" and r.verified is True, str(rep)
        assert r.causal is causal, str(rep)
    with torch.no_grad():
        torch.testing.assert_close(new(*inputs), model(*inputs), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", list(CASES))
def test_approximate_kernel_runs_and_is_verified(name: str) -> None:
    model, inputs, sites, causal = CASES[name]()
    model.eval()
    new = _convert(model, inputs, "performer", 4)
    rep = new.flurka_report
    assert len(rep.rewritten) == sites and all(r.verified for r in rep.sites), str(rep)
    with torch.no_grad():
        out = new(*inputs)
    assert torch.isfinite(out).all()
    if causal:  # a change at position t changes nothing before t
        x2 = inputs[0].clone()
        x2[:, N // 2:] += 1.0
        with torch.no_grad():
            out2 = new(x2, *inputs[1:])
        torch.testing.assert_close(out2[:, : N // 2], out[:, : N // 2], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out2[:, N // 2:], out[:, N // 2:])


def test_capture_failure_tries_the_parent(monkeypatch) -> None:
    """A module that cannot be captured on its own call is captured through its parent."""
    from flurka_rewrite.passes import units
    real = units.capture_module

    def fail_inner(path, *a, **k):
        if path == "0":
            raise RuntimeError("cannot capture the inner module")
        return real(path, *a, **k)
    monkeypatch.setattr(units, "capture_module", fail_inner)
    model, inputs, _, _ = CASES["softmax_module"]()
    wrapped = torch.nn.Sequential(model).eval()
    new = _convert(wrapped, inputs, "softmax", None)
    (r,) = new.flurka_report.sites
    assert r.status == "rewritten" and r.verified, str(new.flurka_report)
    with torch.no_grad():
        torch.testing.assert_close(new(*inputs), wrapped(*inputs), atol=ATOL, rtol=RTOL)


def test_output_attentions_is_refused_not_dropped() -> None:
    """A converted HF eager model asked for output_attentions raises instead of returning an
    empty tuple (the rewritten modules compute no weights)."""
    zoo = pytest.importorskip("zoo_hf")
    e = zoo.build("bert", "eager")
    new = fr.convert(e.model, kernel="softmax", dk=None, example_inputs=e.example_inputs)
    assert len(new.flurka_report.rewritten) == 2
    with torch.no_grad():
        assert len(e.model(**e.example_inputs, output_attentions=True).attentions) == 2
        with pytest.raises(ValueError, match="output_attentions"):
            new(**e.example_inputs, output_attentions=True)


@pytest.mark.parametrize("name", list(UNREPRESENTABLE))
def test_every_attention_softmax_gets_a_row(name: str) -> None:
    """Soft-capping, eager ALiBi, relative bias, sparsity: a skipped row with the reason (and
    the model unchanged); a classifier softmax: no row."""
    model, reason = UNREPRESENTABLE[name]()
    model.eval()
    x = x_input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fr.AllSitesSkippedWarning)
        new = fr.convert(model, kernel="performer", dk=None, example_inputs=(x,))
    rows = new.flurka_report.sites
    if reason is None:
        assert rows == [], str(new.flurka_report)
    else:
        assert len(rows) == 1 and rows[0].status == "skipped", str(new.flurka_report)
        assert reason in rows[0].reason, rows[0].reason
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), atol=0, rtol=0)
