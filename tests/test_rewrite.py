"""Approximate rewrites: performer / rnn / relu with a small dk run, stay finite and train;
hoisting is an exact identity; filter_fn excludes sites; rel_error is measured; the rewritten
graph accepts other sequence lengths.
"""
from __future__ import annotations

import pytest
import torch

import flurka_rewrite as fr
from models_handwritten import CASES, build

DK = 5  # < N=11 and < M=7: a real down-sampling
TRAIN_CASES = ["matmul_div_add", "einsum_bnhd", "bmm_3d", "cross_attention", "sdpa_causal_gqa",
               "causal_tril_buffer", "mha_batch_first", "transformer_encoder"]


def _first(y):
    return y[0] if isinstance(y, tuple) else y


def _flurka(model: torch.nn.Module) -> list[fr.FlurkaAttention]:
    return [m for m in model.modules() if isinstance(m, fr.FlurkaAttention)]


@pytest.mark.parametrize("kernel", ["performer", "rnn", "relu"])
@pytest.mark.parametrize("name", TRAIN_CASES)
def test_kernels_finite_and_train(name: str, kernel: str) -> None:
    case = build(name)
    new = fr.convert(case.model, kernel=kernel, dk=DK, example_inputs=case.inputs)
    rep = new.flurka_report
    assert len(rep.rewritten) == case.rewritten, rep.to_json()
    attns = _flurka(new)
    assert attns and all(a.kernel == kernel for a in attns)
    for s in rep.rewritten:
        assert s.dk == (None if case.causal else DK), f"{s.path}: dk={s.dk}"
        if case.causal:
            assert "dk not applied" in (s.reason or ""), s.reason
    new.train()
    out = _first(new(*case.inputs))
    assert torch.isfinite(out).all(), f"{name}/{kernel}: non-finite output"
    # one optimizer step must move E (low-rank) or the attention's projections (causal)
    watched = [a.E for a in attns if a.E is not None] or \
              [p for n, p in new.named_parameters() if "weight" in n][:1]
    before = [w.detach().clone() for w in watched]
    opt = torch.optim.SGD(new.parameters(), lr=0.1)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * target).sum().backward()  # not a LayerNorm invariant like out.square().mean()
    opt.step()
    assert any(not torch.equal(b, w.detach()) for b, w in zip(before, watched)), \
        f"{name}/{kernel}: the step did not change the watched parameters"


@pytest.mark.parametrize("name", ["matmul_div_add", "sdpa_padding", "scale_q_masked_fill",
                                  "cross_attention", "mha_batch_first"])
def test_hoisted_equals_unhoisted(name: str) -> None:
    """E (X W^T + 1 b^T) == (E X) W^T + (E 1) b^T with a random (gaussian) E, padding included.
    Tolerance 1e-5: the two orders of the same fp32 products."""
    case = build(name)
    kw = dict(kernel="performer", dk=DK, example_inputs=case.inputs, e_init="gaussian", seed=3)
    hoisted = fr.convert(case.model, hoist=True, **kw)
    plain = fr.convert(case.model, hoist=False, **kw)
    assert [s.hoisted for s in hoisted.flurka_report.rewritten] == [True] * case.rewritten
    assert [s.hoisted for s in plain.flurka_report.rewritten] == [False] * case.rewritten
    with torch.no_grad():
        a, b = _first(hoisted(*case.inputs)), _first(plain(*case.inputs))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_filter_fn_excludes_a_site() -> None:
    case = build("transformer_encoder")
    seen = []

    def keep(path: str, site) -> bool:
        seen.append(path)
        return not path.startswith("enc.layers.1")

    new = fr.convert(case.model, kernel="rnn", dk=DK, example_inputs=case.inputs,
                     filter_fn=keep)
    rows = {s.path: s for s in new.flurka_report.sites}
    assert seen == ["enc.layers.0.self_attn", "enc.layers.1.self_attn"]
    assert rows["enc.layers.0.self_attn:mha"].status == "rewritten"
    assert rows["enc.layers.1.self_attn:mha"].status == "skipped"
    assert "filter_fn" in rows["enc.layers.1.self_attn:mha"].reason
    assert type(new.enc.layers[1].self_attn) is torch.nn.MultiheadAttention


def test_rel_error_measured_and_sane() -> None:
    """rel_error is |out - ref| / |ref| of the site: ~0 in exact mode, > 0 for performer."""
    case = build("matmul_div_add")
    exact = fr.convert(case.model, kernel="softmax", dk=None, example_inputs=case.inputs)
    approx = fr.convert(case.model, kernel="performer", dk=DK, example_inputs=case.inputs)
    assert exact.flurka_report.sites[0].rel_error < 1e-6
    e = approx.flurka_report.sites[0].rel_error
    assert e is not None and 1e-4 < e < 10


@pytest.mark.parametrize("name", ["matmul_div_add", "sdpa_padding", "einsum_bnhd"])
def test_rewritten_accepts_other_lengths(name: str) -> None:
    """The graph is captured once (N=11) and must still equal the original at N=8."""
    case = build(name)
    new = fr.convert(case.model, kernel="softmax", dk=None, example_inputs=case.inputs)
    short = tuple(t[:, :8] if t.dim() == 3 else t[..., :8] for t in case.inputs)
    with torch.no_grad():
        torch.testing.assert_close(new(*short), case.model(*short), atol=1e-5, rtol=1e-5)


def test_params_added_counts_E_F() -> None:
    case = build("sdpa_padding")
    new = fr.convert(case.model, kernel="rnn", dk=DK, example_inputs=case.inputs)
    s = new.flurka_report.sites[0]
    attn = _flurka(new)[0]
    assert s.params_added == sum(p.numel() for p in attn.parameters()) == 2 * DK * 11


def test_all_cases_listed() -> None:
    assert set(TRAIN_CASES) <= set(CASES)
