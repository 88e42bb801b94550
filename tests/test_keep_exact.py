"""Hybrid by layer (issue 15): ``keep_exact=K`` / ``max_rel_error`` keep the sites with the
largest measured error as the original attention.

Oracle: the same conversion without the option (same seed, so the same kernels and the same
per-site errors) says which sites have the largest errors; a kept site computes the original
attention, so keeping every site gives the original model's outputs.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import flurka_rewrite as fr

transformers = pytest.importorskip("transformers")
OPTS = dict(kernel="performer", dk=16, num_features=16)


def _model() -> torch.nn.Module:
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    m = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # peaked attention: larger q/k weights, errors differ per layer
        for i, layer in enumerate(m.encoder.layer):
            layer.attention.self.query.weight.mul_(1.0 + 1.5 * i)
    return m


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(3, 100, (2, 48), generator=g)}


def _convert(model: torch.nn.Module, **extra) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fr.convert(model, example_inputs=_inputs(), **OPTS, **extra)


def _errors(model: torch.nn.Module) -> dict[str, float]:
    return {r.path: r.rel_error for r in model.flurka_report.sites}


def test_keep_exact_keeps_the_worst_sites() -> None:
    model = _model()
    base = _convert(model)
    errs = _errors(base)
    assert len(errs) == 4 and len(set(errs.values())) == 4
    worst = sorted(errs, key=errs.get)[-2:]
    new = _convert(model, keep_exact=2)
    rows = {r.path: r for r in new.flurka_report.sites}
    kept = {p for p, r in rows.items() if r.status == "skipped"}
    assert kept == set(worst)
    for p in kept:
        assert rows[p].reason.startswith("kept exact") and "keep_exact=2" in rows[p].reason
        assert f"rel_error {errs[p]:.3g}" in rows[p].reason  # the error it avoids
        assert rows[p].params_added is None and rows[p].verified is None
    for p in set(rows) - kept:  # the others are rewritten exactly as before
        assert rows[p].status == "rewritten" and rows[p].rel_error == pytest.approx(errs[p])
    x = _inputs()
    with torch.no_grad():
        ref = model(**x).last_hidden_state
        e_base = (base(**x).last_hidden_state - ref).norm() / ref.norm()
        e_new = (new(**x).last_hidden_state - ref).norm() / ref.norm()
    assert e_new < e_base  # keeping the worst layers exact buys accuracy
    assert new.flurka_report.end_to_end_error == pytest.approx(float(e_new), rel=1e-3)


def test_keep_every_site_gives_the_original() -> None:
    model = _model()
    new = _convert(model, keep_exact=10)
    assert not new.flurka_report.rewritten
    x = _inputs()
    with torch.no_grad():  # fp32, the same modules: equal up to kernel-choice rounding
        torch.testing.assert_close(new(**x).last_hidden_state, model(**x).last_hidden_state,
                                   rtol=0, atol=1e-6)


def test_max_rel_error_keeps_sites_above_the_budget() -> None:
    model = _model()
    errs = _errors(_convert(model))
    budget = sorted(errs.values())[1] * 1.001  # two sites within it, two above
    new = _convert(model, max_rel_error=budget)
    rows = {r.path: r for r in new.flurka_report.sites}
    assert {p for p, r in rows.items() if r.status == "skipped"} == \
        {p for p, e in errs.items() if e > budget}
    assert all("max_rel_error" in r.reason for r in rows.values() if r.status == "skipped")
    assert all(r.rel_error <= budget for r in rows.values() if r.status == "rewritten")


def test_keep_exact_round_trips_through_save_and_load(tmp_path) -> None:
    new = _convert(_model(), keep_exact=1)
    fr.save(new, tmp_path / "saved")
    back = fr.load(tmp_path / "saved")
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(back(**x).last_hidden_state, new(**x).last_hidden_state)
    assert [r.status for r in back.flurka_report.sites] == \
        [r.status for r in new.flurka_report.sites]


def test_keep_exact_needs_example_inputs_and_valid_values() -> None:
    class NoDummy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = torch.nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.att(x, x, x, need_weights=False)[0]

    with pytest.raises(ValueError, match="pass example_inputs"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fr.convert(NoDummy(), kernel="performer", dk=None, keep_exact=1)
    for bad in (dict(keep_exact=-1), dict(keep_exact=1.5), dict(keep_exact=True),
                dict(max_rel_error=0), dict(max_rel_error="0.1")):
        with pytest.raises(ValueError):
            fr.RewriteConfig(**bad)


def test_plan_says_keep_exact_is_decided_by_convert() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = fr.plan(_model(), example_inputs=_inputs(), keep_exact=1, **OPTS)
    assert report.rewritten and all("convert may keep this site exact" in r.reason
                                    for r in report.rewritten)
