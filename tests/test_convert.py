"""The public API of docs/design.md §5: convert / plan keywords, the input model untouched,
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


# ------------------------------------------------------------ no example inputs (symbolic_trace)
STATIC = ["matmul_div_add", "scale_q_masked_fill", "einsum_bnhd", "sdpa_padding",
          "sdpa_causal_gqa", "cross_attention", "mha_batch_first", "transformer_encoder"]


@pytest.mark.parametrize("name", STATIC)
def test_exact_without_example_inputs_matches_original(name: str) -> None:
    """Oracle: the original model, and the sites found with example inputs. 1e-5: fp32, the
    same softmax attention computed through SDPA instead of the model's own ops."""
    case = build(name)
    with torch.no_grad():
        ref = case.model(*case.inputs)
    new = fr.convert(case.model, kernel="softmax", dk=None)  # no example_inputs
    with_inputs = fr.plan(case.model, kernel="softmax", dk=None, example_inputs=case.inputs)
    rep = new.flurka_report
    assert len(rep.sites) == len(with_inputs.sites) == case.sites
    assert [s.status for s in rep.sites] == ["rewritten"] * case.rewritten, rep.to_json()
    assert all(s.rel_error is None and s.seq_len is None for s in rep.sites)
    assert [(s.heads, s.kv_heads, s.head_dim) for s in rep.sites] == \
           [(s.heads, s.kv_heads, s.head_dim) for s in with_inputs.sites]
    with torch.no_grad():
        torch.testing.assert_close(new(*case.inputs), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["bmm_3d", "repeat_kv_triu"])
def test_unknown_static_shapes_are_skipped_with_reason(name: str) -> None:
    """3-D (B*H, N, d) layouts and repeat_kv reshapes hide the head count from the graph."""
    rep = fr.plan(build(name).model, kernel="softmax", dk=None)
    assert [s.status for s in rep.sites] == ["skipped"]
    assert rep.sites[0].reason == "shapes unknown without example_inputs: pass example_inputs"


@pytest.mark.parametrize("name", ["sdpa_padding", "mha_batch_first"])
def test_low_rank_without_inputs_needs_max_seq_len(name: str) -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        fr.convert(build(name).model, kernel="performer", dk=5)


@pytest.mark.parametrize("name", ["einsum_bnhd", "mha_batch_first", "transformer_encoder"])
def test_low_rank_without_inputs_with_max_seq_len(name: str) -> None:
    """Without inputs the key length is max_seq_len=16 (the example's N=11 fits)."""
    case = build(name)
    new = fr.convert(case.model, kernel="performer", dk=5, num_features=12, max_seq_len=16)
    rep = new.flurka_report
    assert len(rep.rewritten) == case.rewritten and all(s.dk == 5 for s in rep.rewritten)
    with torch.no_grad():
        out = new(*case.inputs)
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, case.model(*case.inputs), atol=1e-3)  # rewrite in use


def test_masked_graph_site_without_inputs_is_exact_only() -> None:
    """The mask's kind (padding / causal / bias) is a property of its values."""
    rep = fr.plan(build("sdpa_padding").model, kernel="performer", dk=5, max_seq_len=16)
    assert rep.sites[0].status == "skipped" and "example_inputs" in rep.sites[0].reason


@pytest.mark.parametrize("name", ["permute_where_fp32", "causal_tril_buffer"])
def test_untraceable_model_without_inputs_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match="symbolic_trace.*pass example_inputs"):
        fr.convert(build(name).model, kernel="softmax", dk=None)


@pytest.mark.parametrize("kw,match", [
    ({"kernel": "favor"}, "unknown kernel"),
    ({"dk": 0}, "dk must be"),
    ({"backend": "cuda"}, "unknown backend"),
    ({"kernel": "rnn", "num_features": 8}, "num_features"),
    ({"seed": 2 ** 70}, "seed must be"),
    ({"seed": "x"}, "seed must be"),
    ({"max_seq_len": "64"}, "max_seq_len must be"),
    ({"hoist": "no"}, "hoist must be True or False"),
    ({"inplace": "no"}, "inplace must be True or False"),
], ids=["kernel", "dk", "backend", "num_features", "seed-big", "seed-str", "max_seq_len-str",
        "hoist-str", "inplace-str"])
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


def test_convert_warns_when_every_site_is_skipped() -> None:
    """dk=64 without max_seq_len is illegal for the one site (the report's reason, tested
    above), so convert returns the original attention: it must say so, not stay silent; a
    partial or full rewrite does not warn."""
    import warnings

    case = build("sdpa_padding")
    with pytest.warns(fr.AllSitesSkippedWarning, match="all 1 attention sites .* skipped"):
        new = fr.convert(case.model, kernel="rnn", dk=64, example_inputs=case.inputs)
    assert [s.status for s in new.flurka_report.sites] == ["skipped"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", fr.AllSitesSkippedWarning)
        fr.convert(case.model, kernel="rnn", dk=64, max_seq_len=128, example_inputs=case.inputs)


@pytest.mark.parametrize("with_inputs", [True, False], ids=["traced", "static"])
def test_plan_and_convert_agree_on_mha_hoisting(with_inputs: bool) -> None:
    """nn.MultiheadAttention sites: the report of plan() and of convert() say the same about
    hoisting (one rule, passes/site.py can_hoist), and it is what the installed module does,
    with example inputs and without them (planned by symbolic_trace)."""
    torch.manual_seed(0)

    class TwoMHA(torch.nn.Module):  # symbolic_trace keeps each MHA a leaf call
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.b = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.a(x, x, x, need_weights=False)[0]
            return x + self.b(x, x, x, need_weights=False)[0]

    model = TwoMHA().eval()
    opts = dict(kernel="relu", dk=4, max_seq_len=12)
    if with_inputs:
        opts["example_inputs"] = (torch.randn(2, 12, 16),)
    planned = fr.plan(model, **opts)
    new = fr.convert(model, **opts)
    hoisted = [s.hoisted for s in new.flurka_report.sites]
    assert [s.hoisted for s in planned.sites] == hoisted == [True, True]
    wrappers = [m for m in new.modules() if type(m).__name__ == "FlurkaMultiheadAttention"]
    assert [w.hoist for w in wrappers] == hoisted
