"""The public API of DESIGN section 5: convert / plan keywords, the input model untouched,
inplace, the report's fields, and clear errors."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import flurka_rewrite as fr
from models_handwritten import build


def test_input_model_untouched() -> None:
    """state_dict, class, submodule classes and outputs are identical after convert."""
    case = build("transformer_encoder")
    sd = {k: v.clone() for k, v in case.model.state_dict().items()}
    classes = [type(m) for m in case.model.modules()]
    with torch.no_grad():
        ref = case.model(*case.inputs)
    fr.convert(case.model, kernel="performer", dk=5, example_inputs=case.inputs)
    fr.plan(case.model, kernel="performer", dk=5, example_inputs=case.inputs)
    assert [type(m) for m in case.model.modules()] == classes
    after = case.model.state_dict()
    assert sd.keys() == after.keys() and all(torch.equal(sd[k], after[k]) for k in sd)
    with torch.no_grad():
        torch.testing.assert_close(case.model(*case.inputs), ref, atol=0, rtol=0)


def test_inplace_modifies_and_returns_same_object() -> None:
    case = build("sdpa_padding")
    new = fr.convert(case.model, kernel="rnn", dk=5, example_inputs=case.inputs, inplace=True)
    assert new is case.model
    assert any(isinstance(m, fr.FlurkaAttention) for m in case.model.modules())


def test_class_kept_and_graph_installed_on_user_module() -> None:
    case = build("matmul_div_add")
    new = fr.convert(case.model, kernel="rnn", dk=5, example_inputs=case.inputs)
    assert type(new) is type(case.model)
    assert isinstance(new.attn, type(case.model.attn))  # same class (a subclass with the graph)
    assert new.attn.q is not case.model.attn.q  # a deep copy


def test_plan_matches_convert_decisions() -> None:
    case = build("transformer_encoder")
    rep = fr.plan(case.model, kernel="auto", dk="auto", example_inputs=case.inputs)
    new = fr.convert(case.model, kernel="auto", dk="auto", example_inputs=case.inputs)
    keys = ("path", "status", "kernel", "dk", "flops_before", "flops_after")
    assert [[getattr(s, k) for k in keys] for s in rep.sites] == \
           [[getattr(s, k) for k in keys] for s in new.flurka_report.sites]
    assert all(s.rel_error is None for s in rep.sites)  # plan builds nothing


def test_report_fields_filled() -> None:
    case = build("cross_attention")
    new = fr.convert(case.model, kernel="performer", dk=5, num_features=16,
                     example_inputs=case.inputs)
    s = new.flurka_report.sites[0]
    d = dataclasses.asdict(s)
    assert set(d) == {f.name for f in dataclasses.fields(fr.SiteReport)}
    for k in ("path", "pattern", "status", "kernel", "dk", "num_features", "seq_len",
              "kv_seq_len", "heads", "kv_heads", "head_dim", "causal", "mask", "hoisted",
              "flops_before", "flops_after", "params_added", "rel_error"):
        assert d[k] is not None, f"SiteReport.{k} not filled"
    assert (s.kernel, s.dk, s.num_features) == ("performer", 5, 16)
    back = fr.RewriteReport.from_dict(json.loads(new.flurka_report.to_json()))
    assert back.sites[0] == s
    assert new.flurka_report.model == "Wrap"
    assert new.flurka_report.config["kernel"] == "performer"


def test_missing_example_inputs_is_a_clear_error() -> None:
    case = build("sdpa_padding")
    with pytest.raises(ValueError, match="example_inputs"):
        fr.convert(case.model, kernel="rnn")


@pytest.mark.parametrize("kw,match", [
    ({"kernel": "favor"}, "unknown kernel"),
    ({"dk": 0}, "dk must be"),
    ({"backend": "cuda"}, "unknown backend"),
    ({"kernel": "rnn", "num_features": 8}, "num_features"),
], ids=["kernel", "dk", "backend", "num_features"])
def test_invalid_options_fail_loudly(kw: dict, match: str) -> None:
    case = build("sdpa_padding")
    with pytest.raises(ValueError, match=match):
        fr.convert(case.model, example_inputs=case.inputs, **kw)


def test_dk_larger_than_max_seq_len_is_skipped_with_reason() -> None:
    case = build("sdpa_padding")
    rep = fr.plan(case.model, kernel="rnn", dk=64, example_inputs=case.inputs)
    assert rep.sites[0].status == "skipped" and "max_seq_len" in rep.sites[0].reason
    rep = fr.plan(case.model, kernel="rnn", dk=64, max_seq_len=128, example_inputs=case.inputs)
    assert rep.sites[0].status == "rewritten" and rep.sites[0].dk == 64


def test_dict_example_inputs() -> None:
    case = build("mha_batch_first")
    x, kpm = case.inputs
    new = fr.convert(case.model, kernel="softmax", dk=None,
                     example_inputs={"x": x, "key_padding_mask": kpm})
    assert len(new.flurka_report.rewritten) == 1


def test_converted_model_pickles_and_deepcopies() -> None:
    """torch.save / torch.load and copy.deepcopy keep the rewritten forward (same outputs)."""
    import copy
    import io
    case = build("matmul_div_add")
    new = fr.convert(case.model, kernel="performer", dk=5, example_inputs=case.inputs)
    buf = io.BytesIO()
    torch.save(new, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        ref = new(*case.inputs)
        assert not torch.allclose(ref, case.model(*case.inputs))  # the rewrite is in use
        torch.testing.assert_close(loaded(*case.inputs), ref, atol=0, rtol=0)
        torch.testing.assert_close(copy.deepcopy(new)(*case.inputs), ref, atol=0, rtol=0)
