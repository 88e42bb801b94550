"""The compiler on 34 more Hugging Face families (tests/zoo_hf_more.py: encoders, decoders,
encoder-decoders, vision, speech; tiny random configs with peaked attention).

For each: the report lists exactly the expected sites; representable sites are rewritten and
verified, the others skipped with the specific reason; exact mode (kernel="softmax", dk=None)
equals the original on every output tensor (tolerance 1e-5: fp32, SDPA against an explicit
softmax); converted from an all-ones mask it still equals the original on a padded batch; an
approximate kernel runs, is verified and stays finite. Oracle: the original model.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import flurka_rewrite as fr

zm = pytest.importorskip("zoo_hf_more")
ATOL = RTOL = 1e-5

# compiler reason keyword for each kind of expected skip (zoo_hf_more's ground truth)
REASON_WORDS = {zm.SOFTCAP_SKIP: "soft-capping"}
BIAS_WORD = "bias"


def _tensors(out) -> dict[str, torch.Tensor]:
    items = out.items() if hasattr(out, "items") else enumerate(out)
    return {str(k): v for k, v in items if isinstance(v, torch.Tensor)}


def _assert_same(out, ref, what: str) -> None:
    a, b = _tensors(out), _tensors(ref)
    assert a.keys() == b.keys(), f"{what}: outputs {sorted(a)} != {sorted(b)}"
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=f"{what}: {k}")


def _convert(model, inputs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fr.AllSitesSkippedWarning)
        return fr.convert(model, example_inputs=inputs, **kw)


def _check_rows(e, rep) -> None:
    got = {s.path.rsplit(":", 1)[0]: s for s in rep.sites}
    assert len(rep.sites) == e.expected_sites, str(rep)
    assert sorted(got) == sorted(s.path for s in e.sites), str(rep)
    for want in e.sites:
        row = got[want.path]
        if want.rewritable:
            assert row.status == "rewritten" and row.verified, f"{want.path}: {row.reason}"
            assert row.causal == want.causal, f"{want.path}: causal={row.causal}"
        elif want.reason in zm.APPROX_ONLY_SKIPS:  # exact mode may keep a banded mask
            assert row.status == "skipped" or row.verified, f"{want.path}: {row.reason}"
            assert row.status == "skipped" or row.causal == want.causal, f"{want.path}"
        else:
            assert row.status == "skipped", f"{want.path}: rewritten, expected {want.reason}"
            word = REASON_WORDS.get(want.reason, BIAS_WORD)
            assert word in row.reason, f"{want.path}: {row.reason!r} (expected {word!r})"


@pytest.mark.parametrize("name", list(zm.ZOO_MORE))
def test_exact_mode_every_output(name: str) -> None:
    e = zm.build_more(name)
    with torch.no_grad():
        ref = e.model(**e.example_inputs)
    new = _convert(e.model, e.example_inputs, kernel="softmax", dk=None)
    _check_rows(e, new.flurka_report)
    assert type(new) is type(e.model)
    with torch.no_grad():
        _assert_same(new(**e.example_inputs), ref, name)


TEXT = [n for n in zm.ZOO_MORE
        if "attention_mask" in zm.build_more(n).example_inputs]


@pytest.mark.parametrize("name", TEXT)
def test_converted_unpadded_runs_padded(name: str) -> None:
    """Converted from an all-ones mask (every mask of the example), run on the padded batch:
    the mask stays a run-time input."""
    e = zm.build_more(name)
    ones = {k: (torch.ones_like(v) if "attention_mask" in k else v)
            for k, v in e.example_inputs.items()}
    new = _convert(e.model, ones, kernel="softmax", dk=None)
    with torch.no_grad():
        _assert_same(new(**e.example_inputs), e.model(**e.example_inputs), name)


APPROX = ["xlm_roberta", "gemma", "phi3", "falcon", "gpt_neox", "mbart", "whisper", "deit",
          "siglip_vision", "wav2vec2", "clip_text", "megatron_bert"]


@pytest.mark.parametrize("name", APPROX)
def test_approximate_kernel_runs_verified(name: str) -> None:
    e = zm.build_more(name)
    new = _convert(e.model, e.example_inputs, kernel="performer", dk=6)
    rep = new.flurka_report
    want = sum(s.rewritable for s in e.sites)
    assert len(rep.rewritten) == want and all(r.verified for r in rep.rewritten), str(rep)
    with torch.no_grad():
        out = new(**e.example_inputs)[e.output_key]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["gemma", "mbart", "deit", "falcon"])
def test_exact_mode_eager(name: str) -> None:
    e = zm.build_more(name, "eager")
    with torch.no_grad():
        ref = e.model(**e.example_inputs)
    new = _convert(e.model, e.example_inputs, kernel="softmax", dk=None)
    _check_rows(e, new.flurka_report)
    with torch.no_grad():
        _assert_same(new(**e.example_inputs), ref, name)
