"""``save`` / ``load``: a converted (and trained) model comes back with the same weights and
bit-identical outputs; bad directories fail with one clear error.

Oracle: the saved model itself. ``load`` rebuilds the base model, converts it again and loads
the weights, so its outputs must equal the saved model's exactly (``torch.equal``: same
graph, same weights, same kernels; any drift means a tensor was lost or re-initialised).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flurka_rewrite as fr
from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.recipe_check import CHECKSUM_FIELD, recipe_checksum
from flurka_rewrite.saving import RECIPE_FILE, WEIGHTS_FILE, RecipeError

B, N, D, H = 2, 11, 30, 3
DH = D // H


class PadAttention(nn.Module):
    """SDPA self-attention with a bool key-padding mask (True = real token)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, H, DH).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.o(out.transpose(1, 2).reshape(b, n, D))  # (B, N, D)


class TwoLayerNet(nn.Module):
    """Two attention layers with residuals: a non-Hugging-Face model load() cannot rebuild."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(PadAttention() for _ in range(2))
        self.norm = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.norm(x + layer(x, keep))
        return x


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, N - 3:] = False
    return torch.randn(B, N, D, generator=g), keep


def _flurka(model: nn.Module) -> list[FlurkaAttention]:
    return [m for m in model.modules() if isinstance(m, FlurkaAttention)]


def _train(model: nn.Module, inputs, steps: int = 1, pick=lambda out: out) -> None:
    """``steps`` SGD steps on a made-up loss (a fixed random projection of the output: a
    squared norm would have no gradient through the final LayerNorm); eval mode after."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        out = pick(model(**inputs) if isinstance(inputs, dict) else model(*inputs))
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        loss = (out * target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _run(model: nn.Module, inputs):
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


@pytest.fixture(scope="module")
def performer_net():
    """A converted TwoLayerNet (performer, dk=5, hoisted), trained 5 steps with W redrawn
    every 2 training calls, and its example inputs."""
    ex = _inputs()
    model = fr.convert(TwoLayerNet().eval(), kernel="performer", dk=5, num_features=24,
                       example_inputs=ex)
    assert len(model.flurka_report.rewritten) == 2, str(model.flurka_report)
    for attn in _flurka(model):
        attn.feature_map.redraw_interval = 2
    _train(model, ex, steps=5)
    return model, ex


def test_performer_model_round_trips_exactly(performer_net, tmp_path):
    model, ex = performer_net
    fresh = fr.convert(TwoLayerNet().eval(), kernel="performer", dk=5, num_features=24,
                       example_inputs=ex)
    for a, f in zip(_flurka(model), _flurka(fresh)):  # training changed E and redrew W
        assert not torch.equal(a.E, f.E) and not torch.equal(a.feature_map.W, f.feature_map.W)
        assert int(a.feature_map.draws) == 2 and int(a.feature_map.calls) == 5
    fr.save(model, tmp_path / "saved", example_inputs=ex)
    loaded = fr.load(tmp_path / "saved", base_model=TwoLayerNet())
    assert not loaded.training
    assert torch.equal(_run(loaded, ex), _run(model, ex))
    for a, b in zip(_flurka(model), _flurka(loaded)):
        for name in ("W", "calls", "draws"):
            assert torch.equal(getattr(a.feature_map, name), getattr(b.feature_map, name)), name
        assert torch.equal(a.E, b.E) and torch.equal(a.F, b.F)
        assert b.feature_map.redraw_interval == 2
    # training goes on in step: calls 6 and 7 (the 7th redraws W) in both
    model.train(), loaded.train()
    for _ in range(2):
        _run(model, ex), _run(loaded, ex)
    model.eval(), loaded.eval()
    for a, b in zip(_flurka(model), _flurka(loaded)):
        assert int(b.feature_map.draws) == 3
        assert torch.equal(a.feature_map.W, b.feature_map.W)


def test_state_dict_loads_into_a_fresh_conversion(performer_net):
    model, ex = performer_net
    fresh = fr.convert(TwoLayerNet().eval(), kernel="performer", dk=5, num_features=24,
                       example_inputs=ex, seed=123)  # another seed: other E, F, W
    assert not torch.equal(_run(fresh, ex), _run(model, ex))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(_run(fresh, ex), _run(model, ex))


def test_non_hf_model_needs_base_model(performer_net, tmp_path):
    model, ex = performer_net
    fr.save(model, tmp_path / "saved", example_inputs=ex)
    with pytest.raises(ValueError, match=r"base_model=TwoLayerNet\("):
        fr.load(tmp_path / "saved")
    with pytest.raises(ValueError, match="converted from a TwoLayerNet"):
        fr.load(tmp_path / "saved", base_model=nn.Linear(3, 3))


def test_filter_fn_and_dtype_round_trip(tmp_path):
    """A site excluded by filter_fn stays excluded; a bf16 model loads as bf16."""
    ex = _inputs()
    model = fr.convert(TwoLayerNet().eval(), kernel="rnn", dk=4, example_inputs=ex,
                       filter_fn=lambda path, site: not path.startswith("layers.1"))
    statuses = [s.status for s in model.flurka_report.sites]
    assert statuses == ["rewritten", "skipped"], str(model.flurka_report)
    model = model.to(torch.bfloat16)
    ex16 = (ex[0].bfloat16(), ex[1])
    fr.save(model, tmp_path / "saved", example_inputs=ex)
    loaded = fr.load(tmp_path / "saved", base_model=TwoLayerNet())
    assert [s.status for s in loaded.flurka_report.sites] == statuses
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(_run(loaded, ex16), _run(model, ex16))


def test_hf_bert_trained_one_step_reloads_from_config(tmp_path):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=1,
                        num_attention_heads=3, intermediate_size=64, max_position_embeddings=40)
    g = torch.Generator().manual_seed(0)
    ex = {"input_ids": torch.randint(3, 120, (B, 13), generator=g),
          "attention_mask": torch.ones(B, 13, dtype=torch.long)}
    ex["attention_mask"][1, 10:] = 0
    model = fr.convert(tf.BertModel._from_config(cfg, attn_implementation="eager").eval(),
                       kernel="performer", dk=8, example_inputs=ex)
    assert len(model.flurka_report.rewritten) == 1, str(model.flurka_report)
    E0 = _flurka(model)[0].E.detach().clone()
    _train(model, ex, pick=lambda out: out.last_hidden_state)
    assert not torch.equal(_flurka(model)[0].E, E0), "one training step should change E"
    fr.save(model, tmp_path / "bert", example_inputs=ex)
    loaded = fr.load(tmp_path / "bert")  # no base_model: rebuilt from the saved config
    assert type(loaded).__name__ == "BertModel"
    assert loaded.config._attn_implementation == "eager"
    assert torch.equal(_run(loaded, ex).last_hidden_state, _run(model, ex).last_hidden_state)
    # the state_dict of a converted HF model loads into a fresh conversion of it
    fresh = fr.convert(tf.BertModel._from_config(cfg, attn_implementation="eager").eval(),
                       kernel="performer", dk=8, example_inputs=ex)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(_run(fresh, ex).last_hidden_state, _run(model, ex).last_hidden_state)


def test_hf_gpt2_tied_weights_round_trip(tmp_path):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=120, n_positions=40, n_embd=48, n_layer=1, n_head=3)
    ex = {"input_ids": torch.randint(3, 120, (B, 13), generator=torch.Generator().manual_seed(1))}
    model = fr.convert(tf.GPT2LMHeadModel._from_config(cfg).eval(), kernel="relu", dk=None,
                       example_inputs=ex)
    assert model.lm_head.weight is model.transformer.wte.weight
    _train(model, ex, pick=lambda out: out.logits)
    fr.save(model, tmp_path / "gpt2", example_inputs=ex)
    recipe = json.loads((tmp_path / "gpt2" / RECIPE_FILE).read_text())
    assert recipe["weights"]["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded = fr.load(tmp_path / "gpt2")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight, "tie lost"
    assert torch.equal(_run(loaded, ex).logits, _run(model, ex).logits)


# -- bad directories and atomic writes ---------------------------------------------------
@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, performer_net):
    model, ex = performer_net
    return fr.save(model, tmp_path_factory.mktemp("ok") / "saved", example_inputs=ex)


def _copy(src: str, dst) -> str:
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def _tamper_recipe(d: str, edit) -> None:
    """Edit recipe.json and sign it again, as a tool that rewrites it on purpose would, so
    that the check under test answers, not the recipe checksum (an unsigned edit is caught
    by the checksum: tests/test_recipe_safety.py)."""
    path = os.path.join(d, RECIPE_FILE)
    with open(path) as f:
        recipe = json.load(f)
    edit(recipe)
    if CHECKSUM_FIELD in recipe:
        recipe[CHECKSUM_FIELD] = recipe_checksum(recipe)
    with open(path, "w") as f:
        json.dump(recipe, f)


CORRUPTIONS = {
    "missing-recipe": (lambda d: os.remove(os.path.join(d, RECIPE_FILE)),
                       FileNotFoundError, "has no recipe.json"),
    "truncated-recipe": (lambda d: open(os.path.join(d, RECIPE_FILE), "r+").truncate(40),
                         RecipeError, "not valid JSON"),
    "recipe-lacks-key": (lambda d: _tamper_recipe(d, lambda r: r.pop("options")),
                         RecipeError, "lacks options"),
    "not-a-recipe": (lambda d: _tamper_recipe(d, lambda r: r.update(format="other")),
                     RecipeError, "not a flurka-rewrite recipe"),
    "newer-format": (lambda d: _tamper_recipe(d, lambda r: r.update(format_version=99)),
                     RecipeError, "upgrade flurka-rewrite"),
    "weights-flipped-byte": (lambda d: _flip_last_byte(os.path.join(d, WEIGHTS_FILE)),
                             RecipeError, "checksum"),
    "weights-missing": (lambda d: os.remove(os.path.join(d, WEIGHTS_FILE)),
                        FileNotFoundError, "incomplete"),
    "decision-changed": (lambda d: _tamper_recipe(
        d, lambda r: r["report"]["sites"][0].update(kernel="relu")),
        RecipeError, "does not get the decisions.*kernel saved 'relu', now 'performer'"),
}


def _flip_last_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_directory_gives_clear_error(case, saved_dir, tmp_path):
    damage, error, match = CORRUPTIONS[case]
    d = _copy(saved_dir, tmp_path / "copy")
    damage(d)
    with pytest.raises(error, match=match):
        fr.load(d, base_model=TwoLayerNet())


def test_save_refuses_what_it_cannot_record(performer_net, tmp_path):
    model, ex = performer_net
    with pytest.raises(ValueError, match="no .flurka_report"):
        fr.save(TwoLayerNet(), tmp_path / "a", example_inputs=ex)
    recorded = model.__dict__.pop("flurka_example_inputs", None)  # convert records them
    try:
        with pytest.raises(ValueError, match="example_inputs="):
            fr.save(model, tmp_path / "b")
    finally:
        if recorded is not None:
            model.flurka_example_inputs = recorded
    assert not os.listdir(tmp_path)
    assert recorded is not None, "convert must record its example inputs for save"


def test_save_is_atomic_and_never_clobbers(performer_net, saved_dir, tmp_path, monkeypatch):
    model, ex = performer_net
    target = _copy(saved_dir, tmp_path / "saved")
    before = sorted(os.listdir(target))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        fr.save(model, target, example_inputs=ex)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a directory written by"):
        fr.save(model, other, example_inputs=ex, overwrite=True)

    import flurka_rewrite.saving as saving
    real = saving.write_bytes

    def fail_on_second(path, data):
        if "example_inputs" in str(path):
            raise OSError("disk full (simulated)")
        real(path, data)
    monkeypatch.setattr(saving, "write_bytes", fail_on_second)
    with pytest.raises(OSError, match="simulated"):
        fr.save(model, target, example_inputs=ex, overwrite=True)
    with pytest.raises(OSError, match="simulated"):
        fr.save(model, tmp_path / "new", example_inputs=ex)
    monkeypatch.setattr(saving, "write_bytes", real)
    assert sorted(os.listdir(target)) == before, "a failed save touched the old directory"
    assert sorted(os.listdir(tmp_path)) == ["notes", "saved"], "a temporary dir was left behind"
    assert (other / "keep.txt").read_text() == "mine"
    fr.save(model, target, example_inputs=ex, overwrite=True)  # replaces an earlier save
    loaded = fr.load(target, base_model=TwoLayerNet())
    assert torch.equal(_run(loaded, ex), _run(model, ex))


@pytest.mark.parametrize("field,name", [("class", "pipeline"), ("config_class", "pipeline"),
                                        ("class", "BertConfig")])
def test_recipe_naming_a_non_model_callable_is_refused(tmp_path, monkeypatch, field, name):
    """A tampered recipe.json that names any other transformers attribute (a function such as
    ``pipeline``, or a config class as the model) is refused before anything is called."""
    tf = pytest.importorskip("transformers")
    cfg = tf.BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=20)
    ex = {"input_ids": torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(0))}
    model = fr.convert(tf.BertModel._from_config(cfg).eval(), kernel="performer", dk=None,
                       example_inputs=ex)
    fr.save(model, tmp_path / "bert", example_inputs=ex)
    called = []
    monkeypatch.setattr(tf, "pipeline", lambda *a, **k: called.append(a))
    _tamper_recipe(str(tmp_path / "bert"), lambda r: r["base_model"].update({field: name}))
    with pytest.raises(RecipeError, match="refusing to call them"):
        fr.load(tmp_path / "bert")
    assert called == []
