"""examples/uptrain_vit_digits.py end to end at a tiny size (a few seconds on one CPU thread).

The accuracies of a 1-epoch, 1-layer model mean nothing; this checks that every stage runs and
is wired: the conversion rewrote every attention module, distillation lowered its own loss,
the figures are JSON and the plot is written."""
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import uptrain_vit_digits as ex

TINY = replace(ex.FULL, dim=16, depth=2, heads=2, train_epochs=1, distill_steps=12,
               finetune_epochs=1)


@pytest.fixture(scope="module")
def run_tiny(tmp_path_factory):
    png = tmp_path_factory.mktemp("vit") / "curves.png"
    figures = ex.run(replace(TINY, plot=str(png)))
    return figures, png


def test_accuracies_are_fractions(run_tiny):
    figures, _ = run_tiny
    for key in ("softmax_acc", "converted_acc_before", "converted_acc_distilled",
                "converted_acc_after"):
        assert isinstance(figures[key], float), key
        assert 0.0 <= figures[key] <= 1.0, (key, figures[key])
    # accuracy is hits / 450: a whole number of test images
    assert figures["n_test"] == 450 and figures["n_train"] == 1347
    assert math.isclose(figures["softmax_acc"] * 450, round(figures["softmax_acc"] * 450))
    assert figures["gap_points"] == pytest.approx(
        100 * (figures["converted_acc_after"] - figures["softmax_acc"]), abs=1e-9)


def test_every_attention_module_was_rewritten(run_tiny):
    figures, _ = run_tiny
    # counted in the converted module tree, independently of the report
    assert figures["flurka_modules"] == TINY.depth
    sites = figures["report"]["sites"]
    assert [s["status"] for s in sites] == ["rewritten"] * TINY.depth
    assert all(s["kernel"] == TINY.kernel and s["dk"] == TINY.dk for s in sites)
    assert figures["sites_rewritten"] == TINY.depth


def test_distillation_lowered_its_loss(run_tiny):
    figures, _ = run_tiny
    losses = figures["distill_loss"]
    assert len(losses) == TINY.distill_steps
    assert losses[-1] < losses[0], losses


def test_curves_and_json(run_tiny):
    figures, png = run_tiny
    steps_per_epoch = 1347 // TINY.batch  # full batches only
    assert len(figures["train_loss"]) == TINY.train_epochs * steps_per_epoch
    assert len(figures["finetune_loss"]) == TINY.finetune_epochs * steps_per_epoch
    assert json.loads(json.dumps(figures))["softmax_acc"] == figures["softmax_acc"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_shapes():
    model = ex.ViT(dim=16, depth=1, heads=2)
    assert model(torch.zeros(3, 8, 8)).shape == (3, 10)
