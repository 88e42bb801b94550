"""examples/uptrain_char_lm.py at a tiny size: figures, report, causality, up-training helps."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import flurka_rewrite as fr

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "uptrain_char_lm.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("uptrain_char_lm", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


ex = _load_example()

# A tiny run: 2 layers of width 32 over 30k characters, 150 + 20 + 40 steps (seconds on one
# core). The softmax model only gets to about 2.7 nats/char, but the pipeline is the full one;
# kernel="ffk" so that attention transfer (fr.distill) runs too.
TINY = ex.Config(kernel="ffk", max_chars=30_000, block=32, batch=16, d_model=32, heads=2, layers=2,
                 train_steps=150, train_lr=1e-2, distill_steps=20, finetune_steps=40,
                 eval_windows=64, eval_every=20)


@pytest.fixture(scope="module")
def figures():
    torch.manual_seed(0)
    return ex.run(TINY)


def test_figures_exist_and_are_finite(figures):
    for key in ("val_loss_softmax", "val_loss_converted_before", "val_loss_converted_after",
                "val_loss_converted_after_distill", "val_loss_softmax_control"):
        assert math.isfinite(figures[key]), key
    json.dumps(figures)  # --json writes exactly this dict
    assert figures["config"]["kernel"] == "ffk"
    c = figures["curves"]
    assert len(c["softmax_train"]) == TINY.train_steps
    assert len(c["distill"]) == TINY.distill_steps
    assert len(c["finetune_train"]) == TINY.finetune_steps
    assert len(c["softmax_control_train"]) == TINY.finetune_steps
    assert [len(p) for p in ex.panels(figures).values()] == [1, 1, 2]  # softmax, distill, ft


def test_softmax_model_learned_something(figures):
    # Uniform guessing over the vocabulary costs ln(vocab) nats per character.
    assert figures["val_loss_softmax"] < math.log(figures["vocab"]) - 0.5


def test_report_rewrites_every_causal_site_without_dk(figures):
    sites = figures["report"]["sites"]
    assert len(sites) == TINY.layers  # one SDPA call per block
    for s in sites:
        assert s["status"] == "rewritten", s
        assert s["causal"] is True
        assert s["dk"] is None  # low-rank E, F would mix future tokens into every key
        assert s["kernel"] == "ffk"


def test_uptraining_lowers_the_converted_models_val_loss(figures):
    d = figures["curves"]["distill"]
    assert sum(d[-5:]) < sum(d[:5])  # attention transfer fits the teacher's attention better
    assert figures["val_loss_converted_after"] < figures["val_loss_converted_before"]


@pytest.mark.parametrize("kernel", ["performer", "ffk", "rnn"])
def test_converted_model_is_causal(kernel):
    """Independent oracle: replacing the characters from position `cut` on must leave the
    logits at positions < cut unchanged, and must change the logits from cut on (so the
    perturbation reaches the model). Tolerance 1e-5: fp32 rounding in the prefix sums only."""
    torch.manual_seed(0)
    vocab, block, cut = 20, 24, 11
    model = ex.CharGPT(vocab, block, d_model=32, heads=2, layers=2)
    x = torch.randint(vocab, (3, block))
    conv = fr.convert(model, kernel=kernel, dk=None, example_inputs=(x,))
    conv.eval()
    y = x.clone()
    y[:, cut:] = torch.randint(vocab, (3, block - cut))
    y[:, cut] = (x[:, cut] + 1) % vocab  # position cut certainly differs
    with torch.no_grad():
        a, b = conv(x), conv(y)
    assert (a[:, :cut] - b[:, :cut]).abs().max() <= 1e-5
    assert (a[:, cut:] - b[:, cut:]).abs().max() > 1e-3
    assert any(isinstance(m, fr.FlurkaAttention) and m.causal for m in conv.modules())


def test_smooth_is_a_trailing_mean():
    assert ex.smooth([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]


def test_main_writes_json_and_plot(tmp_path, monkeypatch, figures):
    """The command line: --kernel reaches the config, --json writes the figures, --plot a PNG
    (run() is replaced by one returning the tiny run's figures; the real run is tested above)."""
    seen = {}

    def fake_run(cfg):
        seen["cfg"] = cfg
        return figures

    monkeypatch.setattr(ex, "run", fake_run)
    out, png = tmp_path / "f.json", tmp_path / "f.png"
    ex.main(["--quick", "--kernel", "rnn", "--json", str(out), "--plot", str(png)])
    assert seen["cfg"].kernel == "rnn" and seen["cfg"].train_steps == ex.QUICK.train_steps
    assert json.loads(out.read_text())["val_loss_softmax"] == figures["val_loss_softmax"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
