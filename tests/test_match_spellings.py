"""Every hand-written attention spelling is found, counted exactly, and rewritten in exact mode
(kernel="softmax", dk=None) to the same outputs; negative cases are left alone.

Oracle: the original model's outputs. Tolerance 1e-5 (fp32): exact mode computes the same
softmax attention through SDPA, so only summation order differs (observed <= 1e-6).
"""
from __future__ import annotations

import pytest
import torch

import flurka_rewrite as fr
from models_handwritten import CASES, NEGATIVE, build

ATOL = RTOL = 1e-5


def _first(y):
    return y[0] if isinstance(y, tuple) else y


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_exact_mode_reproduces_outputs(name: str) -> None:
    case = build(name)
    with torch.no_grad():
        ref = _first(case.model(*case.inputs))
    new = fr.convert(case.model, kernel="softmax", dk=None, example_inputs=case.inputs)
    report = new.flurka_report
    assert len(report.sites) == case.sites, report.to_json()
    assert len(report.rewritten) == case.rewritten, report.to_json()
    assert any(isinstance(m, fr.FlurkaAttention) for m in new.modules()), "no rewrite"
    with torch.no_grad():
        out = _first(new(*case.inputs))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL, msg=f"{name}: output")
    for s in report.rewritten:
        assert s.causal == case.causal, f"{s.path}: causal={s.causal}"
        assert s.rel_error is not None and s.rel_error < 1e-5, f"{s.path}: rel_error"


@pytest.mark.parametrize("name", list(NEGATIVE), ids=list(NEGATIVE))
def test_negative_cases_left_alone(name: str) -> None:
    case = build(name)
    with torch.no_grad():
        ref = _first(case.model(*case.inputs))
    new = fr.convert(case.model, kernel="performer", dk=5, example_inputs=case.inputs)
    report = new.flurka_report
    assert len(report.sites) == case.sites, report.to_json()
    assert not report.rewritten, report.to_json()
    for s in report.skipped:
        assert case.reason in s.reason, f"{s.path}: reason {s.reason!r}"
    assert not any(isinstance(m, fr.FlurkaAttention) for m in new.modules())
    with torch.no_grad():
        out = _first(new(*case.inputs))
    torch.testing.assert_close(out, ref, atol=0, rtol=0, msg=f"{name}: untouched output")


def test_patterns_name_the_spelling() -> None:
    """The report says which spelling matched (einsum, baddbmm, sdpa, mha)."""
    want = {"einsum_bnhd": "einsum", "baddbmm_3d": "baddbmm", "sdpa_padding": "sdpa",
            "mha_batch_first": "mha", "permute_where_fp32": "where"}
    for name, word in want.items():
        case = build(name)
        rep = fr.plan(case.model, kernel="softmax", dk=None, example_inputs=case.inputs)
        assert word in rep.sites[0].pattern, f"{name}: pattern {rep.sites[0].pattern}"


@pytest.mark.parametrize("name", ["sdpa_causal_gqa", "repeat_kv_triu"])
def test_gqa_kv_heads_reported(name: str) -> None:
    """enable_gqa and repeat_kv (expand + reshape) both give kv_heads=2 < heads=4."""
    case = build(name)
    rep = fr.plan(case.model, kernel="rnn", dk=None, example_inputs=case.inputs)
    s = rep.sites[0]
    assert (s.heads, s.kv_heads, s.head_dim, s.causal) == (4, 2, 10, True)


def test_cross_attention_lengths() -> None:
    case = build("cross_attention")
    rep = fr.plan(case.model, kernel="rnn", dk=None, example_inputs=case.inputs)
    s = rep.sites[0]
    assert (s.seq_len, s.kv_seq_len, s.mask) == (11, 7, "padding")
