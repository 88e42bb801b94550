"""A hostile or tampered ``recipe.json`` is refused by ``fr.load`` before anything is built.

Each attack edits a real save directory. Most edits are signed again (the recipe checksum
recomputed, as an attacker who knows the format would do), so that the field check itself
must answer: a ``RecipeError`` naming the field, fast, without a big allocation. Oracles: the
field name in the message; the wall clock and the process's peak memory for the cases that
would otherwise allocate gigabytes to terabytes (num_features 10**9, max_seq_len 10**12, a
Hugging Face hidden_size 2**20); the saved model's own outputs for the round trips.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time

import pytest
import torch
import torch.nn as nn

import flurka_rewrite as fr
from flurka_rewrite.recipe_check import CHECKSUM_FIELD, check_base_model, recipe_checksum
from flurka_rewrite.saving import FORMAT_VERSION, RECIPE_FILE, WEIGHTS_FILE, RecipeError
from test_save_load import TwoLayerNet, _flurka, _inputs, _run

P0 = "layers.0.flurka_0"  # the first FlurkaAttention of a converted TwoLayerNet
M0 = rf"modules\['{P0}'\]"


@pytest.fixture(scope="module")
def performer_save(tmp_path_factory):
    """A converted TwoLayerNet (performer, dk=5, m=24) saved, and the model."""
    ex = _inputs()
    model = fr.convert(TwoLayerNet().eval(), kernel="performer", dk=5, num_features=24,
                       example_inputs=ex)
    d = fr.save(model, tmp_path_factory.mktemp("perf") / "saved", example_inputs=ex)
    return d, model, ex


@pytest.fixture(scope="module")
def bert_save(tmp_path_factory):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=1,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=40)
    ex = {"input_ids": torch.randint(3, 120, (2, 13), generator=torch.Generator().manual_seed(0)),
          "attention_mask": torch.ones(2, 13, dtype=torch.long)}
    model = fr.convert(tf.BertModel._from_config(cfg, attn_implementation="eager").eval(),
                       kernel="performer", dk=8, example_inputs=ex)
    return fr.save(model, tmp_path_factory.mktemp("bert") / "bert", example_inputs=ex)


def _tampered(src: str, tmp_path, edit, sign: bool = True) -> str:
    d = str(tmp_path / "copy")
    shutil.copytree(src, d)
    path = os.path.join(d, RECIPE_FILE)
    with open(path) as f:
        recipe = json.load(f)
    edit(recipe)
    if sign and CHECKSUM_FIELD in recipe:
        recipe[CHECKSUM_FIELD] = recipe_checksum(recipe)
    with open(path, "w") as f:
        json.dump(recipe, f)
    return d


def _refused_fast(d: str, match: str, base_model: nn.Module | None = None) -> None:
    """load(d) raises a RecipeError matching ``match`` in well under a second and without
    raising the process's peak memory by more than 200 MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match=match) as info:
        fr.load(d, base_model=base_model)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000
    assert "save the model again" in str(info.value)


# -- the attacks that allocate ------------------------------------------------------------
def _set_everywhere(r: dict, key: str, value) -> None:
    """``key`` in the options, in every module and in every report site (a consistent lie)."""
    r["options"][key] = value
    for s in r["modules"].values():
        s[key] = value
    for s in r["report"]["sites"]:
        s[key] = value


@pytest.mark.parametrize("where", ["options", "everywhere"])
def test_num_features_1e9_is_refused_fast(performer_save, tmp_path, where):
    d = _tampered(performer_save[0], tmp_path, lambda r: (
        r["options"].update(num_features=10**9) if where == "options"
        else _set_everywhere(r, "num_features", 10**9)))
    field = r"options\.num_features" if where == "options" else rf"{M0}\.num_features"
    _refused_fast(d, field + r" must be an int in \[1, ", base_model=TwoLayerNet())


@pytest.mark.parametrize("where", ["options", "everywhere"])
def test_max_seq_len_1e12_is_refused_fast(performer_save, tmp_path, where):
    d = _tampered(performer_save[0], tmp_path, lambda r: (
        r["options"].update(max_seq_len=10**12) if where == "options"
        else _set_everywhere(r, "max_seq_len", 10**12)))
    field = r"options\.max_seq_len" if where == "options" else rf"{M0}\.max_seq_len"
    _refused_fast(d, field + r" must be an int", base_model=TwoLayerNet())


@pytest.mark.parametrize("field,value", [("hidden_size", 2**20),
                                         ("max_position_embeddings", 10**12),
                                         ("vocab_size", 10**12),
                                         ("num_hidden_layers", 10**9)])
def test_hf_config_size_is_checked_on_meta_against_the_weights(bert_save, tmp_path, field,
                                                                 value):
    """A Hugging Face config that would build a huge model is compared, built on the meta
    device, with the stored shapes; the message names the config field."""
    d = _tampered(bert_save, tmp_path, lambda r: r["base_model"]["config"].update({field: value}))
    _refused_fast(d, rf"base_model\.config\.{field}\b")


def test_meta_model_far_larger_than_the_weights_is_refused(bert_save):
    """Tensors the stored weights do not hold (non-persistent buffers, other names) count
    too: a model far larger than the weights is refused."""
    recipe = json.load(open(os.path.join(bert_save, RECIPE_FILE)))
    from safetensors.torch import load_file
    weights = load_file(os.path.join(bert_save, WEIGHTS_FILE))
    meta = nn.Module()
    meta.register_buffer("cache", torch.empty(2**30, device="meta"), persistent=False)
    with pytest.raises(RecipeError, match=r"base_model\.config builds a model of \d+ bytes"):
        check_base_model(meta, recipe, weights)


def test_low_rank_size_no_stored_weight_bounds_is_refused(tmp_path):
    """A save without low-rank layers (here kernel-only) whose options ask for a huge dk and
    max_seq_len: nothing stored bounds the E the conversion would build (2**34 elements)."""
    ex = _inputs()
    model = fr.convert(TwoLayerNet().eval(), kernel="rnn", dk=None, example_inputs=ex)
    src = fr.save(model, tmp_path / "rnn", example_inputs=ex)
    d = _tampered(src, tmp_path, lambda r: r["options"].update(dk=2**14, max_seq_len=2**20))
    _refused_fast(d, r"options\.max_seq_len is 1048576: with dk=16384 a low-rank layer",
                  base_model=TwoLayerNet())


def test_hf_max_position_embeddings_not_in_any_weight_is_bounded(tmp_path):
    """Llama's rotary embedding has no max_position_embeddings-sized tensor, so no stored
    shape bounds it; the low-rank size it would give a site the conversion makes low-rank
    (dk * max_position_embeddings, with no stored low-rank layer to compare) is bounded."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    ex = {"input_ids": torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))}
    model = fr.convert(tf.LlamaModel._from_config(cfg).eval(), kernel="performer", dk=16,
                       example_inputs=ex)
    src = fr.save(model, tmp_path / "llama", example_inputs=ex)
    d = _tampered(src, tmp_path,
                  lambda r: r["base_model"]["config"].update(max_position_embeddings=10**9))
    _refused_fast(d, r"base_model\.config\.max_position_embeddings is 1000000000: with dk=16")


# -- settings that would load and silently change outputs ---------------------------------
@pytest.mark.parametrize("key,value", [
    ("eps", 1e30), ("eps", 0.0), ("eps", float("nan")), ("eps", "1e-6"), ("eps", -1e-6),
    ("chunk_size", 10**9), ("chunk_size", 0), ("chunk_size", 64.0), ("dropout", 1.0),
    ("dropout", -0.1), ("backend", "cuda"), ("seed", -1), ("seed", 2**63), ("seed", True),
    ("scale", 1e30), ("causal", "no")])
def test_module_setting_out_of_range_is_refused(performer_save, tmp_path, key, value):
    d = _tampered(performer_save[0], tmp_path, lambda r: r["modules"][P0].update({key: value}))
    _refused_fast(d, rf"{M0}\.{key} must be", base_model=TwoLayerNet())


@pytest.mark.parametrize("key,value", [("scale", 100.0), ("W", [[0.0]]), ("num_features", 3),
                                       ("redraw_interval", -5), ("seed", "7")])
def test_feature_map_entry_restores_known_settings_only(performer_save, tmp_path, key, value):
    d = _tampered(performer_save[0], tmp_path,
                  lambda r: r["modules"][P0]["feature_map"].update({key: value}))
    _refused_fast(d, rf"{M0}\.feature_map\.{key} (is not a feature-map setting|must be)",
                  base_model=TwoLayerNet())


def test_unknown_module_setting_is_refused(performer_save, tmp_path):
    d = _tampered(performer_save[0], tmp_path, lambda r: r["modules"][P0].update(_dense=False))
    _refused_fast(d, rf"{M0}\._dense is not a FlurkaAttention setting", base_model=TwoLayerNet())


def test_feature_setting_the_rebuilt_map_lacks_is_refused(tmp_path):
    """relu maps have no seed: a recipe giving one is refused, not set as a new attribute."""
    ex = _inputs()
    model = fr.convert(TwoLayerNet().eval(), kernel="relu", dk=None, example_inputs=ex)
    src = fr.save(model, tmp_path / "relu", example_inputs=ex)
    d = _tampered(src, tmp_path, lambda r: r["modules"][P0]["feature_map"].update(seed=3))
    with pytest.raises(RecipeError, match=rf"{M0}\.feature_map\.seed is not a setting of its "
                                          "ReluFeatures"):
        fr.load(d, base_model=TwoLayerNet())


@pytest.mark.parametrize("key,value,field", [
    ("num_features", 25, "num_features"), ("head_dim", 11, "head_dim"), ("dk", 6, "dk"),
    ("max_seq_len", 12, "max_seq_len"), ("dk", None, "dk"), ("heads", 4, "kv_heads")])
def test_module_fixed_settings_must_match_the_stored_weights(performer_save, tmp_path, key,
                                                             value, field):
    d = _tampered(performer_save[0], tmp_path, lambda r: r["modules"][P0].update({key: value}))
    _refused_fast(d, rf"{M0}\.{field}", base_model=TwoLayerNet())


@pytest.mark.parametrize("key,value", [("dk", 6), ("num_features", 25), ("max_seq_len", 12),
                                       ("kernel", "relu"), ("e_init", "gaussian"),
                                       ("inplace", True), ("filter_fn", "x"), ("hoist", "no")])
def test_options_must_be_known_and_match_the_modules(performer_save, tmp_path, key, value):
    d = _tampered(performer_save[0], tmp_path, lambda r: r["options"].update({key: value}))
    _refused_fast(d, rf"options\.{key}", base_model=TwoLayerNet())


# -- weight aliases -----------------------------------------------------------------------
@pytest.mark.parametrize("alias,name,problem", [
    ("layers.0.q.weight", "layers.1.q.weight", "would overwrite it"),
    ("extra.weight", "nowhere.weight", "does not hold"),
    ("extra.weight", 5, "must be the name of a stored tensor")])
def test_alias_must_be_new_and_point_to_a_stored_tensor(performer_save, tmp_path, alias, name,
                                                        problem):
    d = _tampered(performer_save[0], tmp_path,
                  lambda r: r["weights"]["aliases"].update({alias: name}))
    _refused_fast(d, rf"weights\.aliases\['{alias}'\].*{problem}", base_model=TwoLayerNet())


# -- example-input spec -------------------------------------------------------------------
@pytest.mark.parametrize("edit,field", [
    (lambda i: i[0].update(shape=[-1, 11, 30]), r"items\[0\]\.shape"),
    (lambda i: i[0].update(shape=[2, 10**30, 30]), r"items\[0\]\.shape"),
    (lambda i: i[0].update(shape="2,11,30"), r"items\[0\]\.shape"),
    (lambda i: i[0].update(dtype="object"), r"items\[0\]\.dtype"),
    (lambda i: i[0].update(key=0), r"items\[0\]\.key"),
    (lambda i: i.__setitem__(1, {"key": "1", "value": {"a": 1}}), r"items\[1\]\.value"),
    (lambda i: i.__setitem__(1, {"key": "1", "value": [1, 2]}), r"items\[1\]\.value")])
def test_example_input_spec_is_checked(performer_save, tmp_path, edit, field):
    d = _tampered(performer_save[0], tmp_path, lambda r: edit(r["example_inputs"]["items"]))
    _refused_fast(d, rf"example_inputs\.{field}", base_model=TwoLayerNet())


# -- format version and checksum ----------------------------------------------------------
@pytest.mark.parametrize("version", [0, -7, True, 1.5, "2", None])
def test_format_version_must_be_a_known_int(performer_save, tmp_path, version):
    d = _tampered(performer_save[0], tmp_path, lambda r: r.update(format_version=version))
    _refused_fast(d, r"format_version must be an int in \[1, 2\]", base_model=TwoLayerNet())


def test_save_writes_the_recipe_checksum(performer_save):
    recipe = json.load(open(os.path.join(performer_save[0], RECIPE_FILE)))
    assert recipe["format_version"] == FORMAT_VERSION == 2
    body = {k: v for k, v in recipe.items() if k != "recipe_sha256"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert recipe["recipe_sha256"] == hashlib.sha256(canon).hexdigest()


@pytest.mark.parametrize("edit", [
    lambda r: r["modules"][P0].update(eps=1e-5),  # in range: only the checksum sees it
    lambda r: r["report"]["sites"][0].update(rel_error=0.0),
    lambda r: r.pop(CHECKSUM_FIELD),
    lambda r: r.update({CHECKSUM_FIELD: "0" * 64})])
def test_unsigned_edit_is_caught_by_the_checksum(performer_save, tmp_path, edit):
    d = _tampered(performer_save[0], tmp_path, edit, sign=False)
    _refused_fast(d, r"recipe.json does not match its checksum .*edited or corrupted|"
                     r"recipe_sha256 is missing", base_model=TwoLayerNet())


def test_version_1_save_without_checksum_still_loads(performer_save, tmp_path):
    src, model, ex = performer_save
    d = _tampered(src, tmp_path, lambda r: (r.pop(CHECKSUM_FIELD), r.update(format_version=1)))
    loaded = fr.load(d, base_model=TwoLayerNet())
    assert torch.equal(_run(loaded, ex), _run(model, ex))


def test_legit_save_round_trips_bit_for_bit(performer_save, bert_save):
    src, model, ex = performer_save
    loaded = fr.load(src, base_model=TwoLayerNet())
    assert torch.equal(_run(loaded, ex), _run(model, ex))
    for a, b in zip(_flurka(model), _flurka(loaded)):
        assert torch.equal(a.feature_map.W, b.feature_map.W) and a.eps == b.eps
    assert type(fr.load(bert_save)).__name__ == "BertModel"
