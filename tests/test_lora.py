"""PEFT LoRA on converted models takes effect (issue 17).

Oracle: PEFT's own ``merge_and_unload`` folds each adapter into its base weight (W + s B A).
A converted model whose rewritten code calls the projection modules gives, with the adapters
live, the output of the same converted model with the adapters merged. Before the fix the
rewritten code read the base weights directly: the adapters changed the output by exactly 0
and ``lora_A.grad`` was None. Tolerance: 1e-4 of the output's scale, fp32 (the merged product
x (W + sBA)^T and the adapter path x W^T + s (x A^T) B^T round differently; measured <= 3e-6).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import flurka_rewrite as fr
from flurka_rewrite.passes.export_capture import export_graph
from models_handwritten import B, D, _QKV

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

N_TOK = 64


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=100)
    return transformers.BertModel(cfg).eval()


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(cfg).eval()


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=100)
    return transformers.LlamaModel(cfg).eval()


def _ids() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(3, 100, (2, N_TOK), generator=g)}


CASES = {  # name: (model, LoRA targets, conversion options, hoisted K/V expected)
    "bert-hoisted": (_bert, ["query", "key", "value", "attention.output.dense"],
                     dict(kernel="performer", dk=16), True),
    "bert-exact": (_bert, ["query", "key", "value"], dict(kernel="softmax", dk=None), False),
    "gpt2-conv1d": (_gpt2, ["attn.c_attn", "attn.c_proj"], dict(kernel="performer", dk=16), False),
    "llama-gqa": (_llama, ["q_proj", "k_proj", "v_proj", "o_proj"],
                  dict(kernel="rnn", dk=16), False),
}


def _out(model: nn.Module, x: dict) -> torch.Tensor:
    return model(**x).last_hidden_state


def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", list(CASES))
def test_lora_adapters_take_effect_and_get_gradients(name: str) -> None:
    build, targets, opts, hoisted = CASES[name]
    torch.manual_seed(0)
    x = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = fr.convert(build(), example_inputs=x, **opts)
    rows = student.flurka_report.sites
    assert rows and all(r.status == "rewritten" for r in rows)
    assert all(bool(r.hoisted) == hoisted for r in rows)
    pm = fr.add_lora(student, peft.LoraConfig(r=4, target_modules=targets))
    base = _out(pm, x).detach()
    _perturb(pm)
    out = _out(pm, x)
    assert (out - base).abs().max() > 1e-2  # the adapters change what the model computes
    out.square().mean().backward()
    lora_a = {n: p for n, p in pm.named_parameters() if "lora_A" in n}
    assert len(lora_a) == len(targets) * 2  # two layers
    for n, p in lora_a.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    merged = pm.merge_and_unload()
    with torch.no_grad():
        ref = _out(merged, x)
    assert (out.detach() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_flurka_parameters_train_beside_the_adapters() -> None:
    torch.manual_seed(0)
    x = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = fr.convert(_bert(), example_inputs=x, kernel="performer", dk=16)
        frozen = fr.convert(_bert(), example_inputs=x, kernel="performer", dk=16)
    flurka = fr.flurka_parameters(student)
    assert len(flurka) == 4  # E and F of two sites
    pm = fr.add_lora(student, peft.LoraConfig(r=4, target_modules=["query"]))
    assert all(p.requires_grad for p in flurka)
    _out(pm, x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flurka)
    pm2 = fr.add_lora(frozen, peft.LoraConfig(r=4, target_modules=["query"]),
                      train_flurka=False)
    assert not any(p.requires_grad for p in fr.flurka_parameters(pm2))
    with pytest.raises(ValueError, match="no FlurkaAttention"):
        fr.add_lora(_bert(), peft.LoraConfig(r=4, target_modules=["query"]))


class _Adapted(nn.Module):
    """A LoRA-like swap: base(x) + x delta, with the base's weight and bias visible."""

    def __init__(self, base: nn.Linear, delta: torch.Tensor) -> None:
        super().__init__()
        self.base, self.delta = base, nn.Parameter(delta)

    @property
    def bias(self) -> torch.Tensor:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.delta


class _Plain4D(_QKV):
    """(B, H, N, dh) attention, no mask: symbolic_trace captures it, K/V chains hoist."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.heads_(p(x), self.h) for p in (self.q, self.k, self.v))
        return self.merge(torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1) @ v)


def test_traced_model_hoisted_projection_calls_the_module() -> None:
    """A symbolic_trace capture (nn.Linear stays a module call) with hoisted K/V: the rewritten
    forward runs ``self.k(E x)``, so a module swapped in afterwards is used."""
    torch.manual_seed(0)
    model = _Plain4D().eval()
    x = torch.randn(B, 40, D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = fr.convert(model, example_inputs=(x,), kernel="performer", dk=8)
    assert student.flurka_report.sites[0].hoisted
    before = student(x).detach()
    delta = torch.randn(D, D, generator=torch.Generator().manual_seed(3)) * 0.1
    merged = copy.deepcopy(student)
    with torch.no_grad():
        merged.k.weight += delta.T  # the adapter folded into the weight: the oracle
        student.k = _Adapted(student.k, delta)
        out = student(x)
    assert (out - before).abs().max() > 1e-2
    assert (out - merged(x)).abs().max() <= 1e-4 * out.abs().max()  # fp32 rounding only


def test_export_capture_keeps_leaf_module_calls() -> None:
    """The exported graph of a BERT attention calls query/key/value as modules (no inlined
    aten.linear on their weights) and computes the same values."""
    att = _bert().encoder.layer[0].attention.self
    h = torch.randn(2, 8, 32)
    gm, _, _ = export_graph("att", att, (h,), {})
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"query", "key", "value"} <= called
    assert not any(n.op == "call_function" and "linear" in str(n.target)
                   for n in gm.graph.nodes)
    assert torch.equal(gm(h)[0], att(h)[0])


def test_peft_save_pretrained_warns_that_flurka_parameters_are_not_in_it(tmp_path) -> None:
    """PEFT writes the adapters only (checked in the saved file): with trained FLuRKA
    parameters that loses them, so add_lora's model warns; frozen ones lose nothing."""
    x = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = fr.convert(_bert(), example_inputs=x, kernel="performer", dk=16)
        frozen = fr.convert(_bert(), example_inputs=x, kernel="performer", dk=16)
    pm = fr.add_lora(student, peft.LoraConfig(r=4, target_modules=["query"]))
    with pytest.warns(fr.FlurkaParametersNotSavedWarning, match="merge_and_unload"):
        pm.save_pretrained(str(tmp_path / "a"))
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert saved and not any(".E" in k or ".F" in k for k in saved)
    pm2 = fr.add_lora(frozen, peft.LoraConfig(r=4, target_modules=["query"]),
                      train_flurka=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fr.FlurkaParametersNotSavedWarning)
        pm2.save_pretrained(str(tmp_path / "b"))
