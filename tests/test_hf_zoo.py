"""The compiler on tiny Hugging Face models (tests/zoo_hf.py, random weights from configs).

For each model: exact mode (kernel="softmax", dk=None) reproduces the original outputs and
the report lists exactly the expected sites (module paths, causal flags, rewritten/skipped);
performer / rnn / relu with a small dk run, stay finite and train; the converted model keeps
its class and behaviour (BertModel is a BertModel; GPT2LMHeadModel returns logits and a loss).
Oracle: the original model. Tolerance 1e-5 (fp32, same attention through SDPA).
"""
from __future__ import annotations

import pytest
import torch

import flurka_rewrite as fr

zoo = pytest.importorskip("zoo_hf")

ATOL = RTOL = 1e-5
DK = 6  # < SEQ=13 and < DEC_SEQ=9
EAGER = ("bert", "gpt2_lm", "llama", "bart")  # eager spelling too (slower to capture)


def _module_path(site_path: str) -> str:
    return site_path.rsplit(":", 1)[0]


def _check_exact(name: str, impl: str) -> None:
    e = zoo.build(name, impl)
    with torch.no_grad():
        ref = e.model(**e.example_inputs)[e.output_key]
    new = fr.convert(e.model, kernel="softmax", dk=None, example_inputs=e.example_inputs)
    rep = new.flurka_report
    assert type(new) is type(e.model)
    got = {_module_path(s.path): s for s in rep.sites}
    assert len(rep.sites) == e.expected_sites, rep.to_json()
    assert sorted(got) == sorted(s.path for s in e.sites), rep.to_json()
    for want in e.sites:
        s = got[want.path]
        assert (s.status == "rewritten") == want.rewritable, f"{want.path}: {s.status} {s.reason}"
        if want.rewritable:
            assert s.causal == want.causal, f"{want.path}: causal={s.causal}"
        else:
            assert "bias" in s.reason, f"{want.path}: {s.reason}"
    with torch.no_grad():
        out = new(**e.example_inputs)[e.output_key]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL, msg=f"{name}/{impl}")


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_exact_sdpa(name: str) -> None:
    _check_exact(name, "sdpa")


@pytest.mark.parametrize("name", EAGER)
def test_exact_eager(name: str) -> None:
    _check_exact(name, "eager")


@pytest.mark.parametrize("name,kernel", [("bert", "performer"), ("llama", "rnn"),
                                         ("bart", "relu"), ("gpt2_lm", "performer")])
def test_approximate_kernels_train(name: str, kernel: str) -> None:
    e = zoo.build(name)
    new = fr.convert(e.model, kernel=kernel, dk=DK, example_inputs=e.example_inputs)
    rep = new.flurka_report
    assert len(rep.rewritten) == len(e.rewritable_paths), rep.to_json()
    for s in rep.rewritten:
        assert s.dk == (None if s.causal else DK), f"{s.path}: dk={s.dk}"
        assert s.rel_error is not None
    new.train()
    out = new(**e.example_inputs)[e.output_key]
    assert torch.isfinite(out).all()
    attns = [m for m in new.modules() if isinstance(m, fr.FlurkaAttention)]
    watched = [a.E for a in attns if a.E is not None] or \
              [p for n, p in new.named_parameters() if "proj" in n or "attn" in n][:1]
    before = [w.detach().clone() for w in watched]
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * target).sum().backward()
    torch.optim.SGD(new.parameters(), lr=0.1).step()
    assert any(not torch.equal(b, w.detach()) for b, w in zip(before, watched))


def test_bert_hoisted_and_other_length() -> None:
    """BERT's K/V chains (Linear -> view -> transpose) are hoisted; the rewritten graph was
    captured at N=13 and still runs (and equals the original in exact mode) at N=9."""
    e = zoo.build("bert")
    new = fr.convert(e.model, kernel="performer", dk=DK, example_inputs=e.example_inputs)
    assert all(s.hoisted for s in new.flurka_report.rewritten)
    exact = fr.convert(e.model, kernel="softmax", dk=None, example_inputs=e.example_inputs)
    short = {k: v[:, :9] for k, v in e.example_inputs.items()}
    with torch.no_grad():
        torch.testing.assert_close(exact(**short).last_hidden_state,
                                   e.model(**short).last_hidden_state, atol=ATOL, rtol=RTOL)
        assert torch.isfinite(new(**short).last_hidden_state).all()


def test_gpt2_lm_keeps_logits_loss_and_generate() -> None:
    e = zoo.build("gpt2_lm")
    new = fr.convert(e.model, kernel="softmax", dk=None, example_inputs=e.example_inputs)
    with torch.no_grad():
        ref, out = e.model(**e.example_inputs), new(**e.example_inputs)
    assert isinstance(new, type(e.model)) and out.loss is not None
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=RTOL)
    ids = e.example_inputs["input_ids"][:1, :5]
    kw = dict(max_new_tokens=3, do_sample=False, use_cache=False)
    with torch.no_grad():
        assert torch.equal(new.generate(ids, **kw), e.model.generate(ids, **kw))
        with pytest.raises(RuntimeError, match="use_cache=False"):
            new.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)


def test_dummy_inputs_used_when_no_example_inputs() -> None:
    """HF models carry ``dummy_inputs``: plan() works without example_inputs."""
    e = zoo.build("bert")
    rep = fr.plan(e.model, kernel="performer", dk=4)
    assert [s.status for s in rep.sites] == ["rewritten"] * 2
    assert rep.sites[0].seq_len == e.model.dummy_inputs["input_ids"].shape[1]
    assert all(s.hoisted for s in rep.sites)  # plan says what convert would do
