"""examples/generate_char_llama.py at a tiny size (issue 16's demo): a converted Llama with a
window generates from its state cache the tokens it generates without a cache, its state
does not grow with the context while the original's KV cache does, and the page is written.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import generate_char_llama as ex  # noqa: E402

TINY = replace(ex.QUICK, train_steps=40, finetune_steps=20, eval_windows=16, new_chars=24,
               contexts=(128, 512), tokens=2, max_chars=30_000)


@pytest.fixture(scope="module")
def figures() -> dict:
    return ex.run(TINY)


def test_cached_generation_is_the_uncached_one(figures: dict) -> None:
    assert figures["cached_equals_uncached"] is True
    assert all(len(t) == TINY.new_chars for t in figures["texts"]["converted"])
    assert len(figures["texts"]["prompt"]) == TINY.prompts


def test_state_is_fixed_and_the_kv_cache_grows(figures: dict) -> None:
    short, long = figures["speed"]
    assert short["converted_cache_bytes"] == long["converted_cache_bytes"] > 0
    assert long["original_cache_bytes"] > 3 * short["original_cache_bytes"]
    assert all(s["original_ms"] > 0 and s["converted_ms"] > 0 for s in figures["speed"])


def test_losses_are_finite_and_fine_tuning_helps(figures: dict) -> None:
    loss = figures["val_loss_nats_per_char"]
    assert all(math.isfinite(v) for v in loss.values())
    assert loss["up-trained"] < loss["converted"]


def test_main_writes_the_page(tmp_path, monkeypatch, figures: dict) -> None:
    monkeypatch.setattr(ex, "run", lambda cfg: figures)
    ex.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "generate_demo.json").read_text())
    assert saved["cached_equals_uncached"] is True
    page = (tmp_path / "generate_demo.md").read_text()
    assert "speed-up" in page and figures["texts"]["converted"][0] in page
