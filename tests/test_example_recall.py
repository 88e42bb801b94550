"""examples/recall_mqar.py in --quick mode: the task, the JSON figures, the exact-conversion
oracle, recall above chance."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "recall_mqar.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("recall_mqar", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


ex = _load_example()

# softmax: the exact conversion (oracle); performer: no FLuRKA parameters (fine-tune only);
# rnn@4: a windowed variant (distill trains the per-head mixing factor); ffk: a trainable
# kernel; eva@4: EVA with the window as its local set; softmax@4: refused by convert (a
# window beside exact attention has no kernel part).
VARIANTS = ["softmax", "performer", "rnn@4", "ffk", "eva@4", "softmax@4"]


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    out = tmp_path_factory.mktemp("mqar") / "recall.json"
    threads = torch.get_num_threads()
    try:
        ex.main(["--quick", "--variants", ",".join(VARIANTS), "--json", str(out)])
    finally:
        torch.set_num_threads(threads)  # main() sets 1 thread
    return json.loads(out.read_text())


def test_batches_follow_the_mqar_format():
    """Independent check of the generator: at each query position the target is the token that
    followed the same key in the key-value part; keys are distinct; other positions ignored."""
    cfg = ex.QUICK
    x, y = ex.make_batch(cfg, 50, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (50, cfg.seq_len)
    half, p2 = cfg.vocab // 2, 2 * cfg.pairs
    for row, tgt in zip(x.tolist(), y.tolist()):
        keys, vals = row[0:p2:2], row[1:p2:2]
        assert len(set(keys)) == cfg.pairs and all(k < half for k in keys)
        assert all(half <= v < cfg.vocab for v in vals)
        pair = dict(zip(keys, vals))
        for i, t in enumerate(tgt):
            if i >= p2 and (i - p2) % 2 == 0:
                assert t == pair[row[i]] == row[i + 1]
            else:
                assert t == ex.IGNORE


def test_json_fields(figures):
    for key in ("config", "seq_len", "params", "chance", "acc_softmax",
                "seconds_softmax_training", "softmax_train_loss", "variants"):
        assert key in figures, key
    assert figures["config"]["pairs"] == ex.QUICK.pairs
    assert sorted(figures["variants"]) == sorted(VARIANTS)  # the JSON sorts its keys
    for name in VARIANTS[:-1]:
        r = figures["variants"][name]
        assert r["status"] == "converted", name
        for key in ("acc_before", "acc_distilled", "acc_after", "end_to_end_error",
                    "sites_rewritten", "flurka_params", "seconds", "curves"):
            assert key in r, (name, key)
        assert 0.0 <= r["acc_before"] <= 1.0 and 0.0 <= r["acc_after"] <= 1.0
        assert len(r["curves"]["finetune"]) == ex.QUICK.finetune_steps
    assert "rnn@4" in ex.table(figures)


def test_softmax_model_recalls_well_above_chance(figures):
    assert figures["chance"] == pytest.approx(1 / (ex.QUICK.vocab // 2))
    assert figures["acc_softmax"] >= 3 * figures["chance"]


def test_exact_conversion_keeps_the_accuracy_exactly(figures):
    r = figures["variants"]["softmax"]
    assert r["sites_rewritten"] == ex.QUICK.layers
    assert r["acc_before"] == figures["acc_softmax"]
    assert r["end_to_end_error"] == pytest.approx(0.0, abs=1e-6)


def test_distill_runs_only_where_there_are_flurka_parameters(figures):
    v = figures["variants"]
    assert v["performer"]["flurka_params"] == 0 and v["performer"]["acc_distilled"] is None
    for name in ("rnn@4", "ffk"):
        assert v[name]["flurka_params"] > 0 and v[name]["acc_distilled"] is not None
        assert len(v[name]["curves"]["distill"]) == ex.QUICK.distill_steps
    assert v["rnn@4"]["window"] == 4


def test_a_refused_variant_is_recorded_and_eva_with_a_window_runs(figures):
    r = figures["variants"]["softmax@4"]
    assert r["status"] == "refused" and "window" in r["reason"]
    e = figures["variants"]["eva@4"]
    assert e["status"] == "converted" and e["window"] == 4 and e["flurka_params"] > 0


def test_variant_names():
    assert ex.parse_variant("rnn") == ("rnn", None)
    assert ex.parse_variant("ffk@16") == ("ffk", 16)
    assert ex.default_variants(("relu",), 8) == ["relu", "relu@8"]
    with pytest.raises(ValueError, match="unknown kernel"):
        ex.parse_variant("cosformer")
