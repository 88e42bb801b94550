"""Hugging Face ``generate()`` with ``use_cache=True`` on converted causal LMs (issue 16).

Oracle: the same converted model generating with ``use_cache=False`` (every step recomputes
the whole sequence with the chunked causal kernel). With the cache, each layer continues
from its recurrent state (flurka_rewrite/hf_generate.py): the tokens must be the same and
the scores agree within 1e-4 of their scale (fp32) at every step; left padding, beam search,
sampling, hybrid models (a layer left softmax, with its own KV cache) likewise; the state's
memory must not grow with the tokens generated.
"""
from __future__ import annotations

import functools
import pickle
import warnings

import pytest
import torch
import transformers as tf

import flurka_rewrite as fr
from flurka_rewrite.hf_generate import FlurkaStateLayer, state_numel

TOL = 1e-4
VOCAB = 100
SMALL = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=1, pad_token_id=0)
LLAMA_LIKE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, **SMALL)
CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, **SMALL),
    "llama": lambda: tf.LlamaConfig(**LLAMA_LIKE),
    "mistral": lambda: tf.MistralConfig(**LLAMA_LIKE, sliding_window=None),
    "qwen2": lambda: tf.Qwen2Config(**LLAMA_LIKE),
    "phi3": lambda: tf.Phi3Config(**LLAMA_LIKE),
    "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64, **SMALL),
    "opt": lambda: tf.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                ffn_dim=64, word_embed_proj_dim=32, **SMALL),
    "falcon": lambda: tf.FalconConfig(hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, new_decoder_architecture=False,
                                      multi_query=False, alibi=False, **SMALL),
}


@functools.lru_cache(maxsize=None)
def converted(family: str, kernel: str = "performer", skip: str | None = None,
              impl: str = "sdpa") -> tf.PreTrainedModel:
    """A tiny random ``*ForCausalLM`` of ``family``, converted (``skip``: a module path
    left softmax by filter_fn; ``impl``: the attention implementation)."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[family](),
                                                attn_implementation=impl).eval()
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    keep = None if skip is None else (lambda path, site: not path.startswith(skip))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = fr.convert(model, kernel=kernel, dk=None, filter_fn=keep,
                         example_inputs={"input_ids": ids,
                                         "attention_mask": torch.ones_like(ids)}).eval()
    rewritten = new.flurka_report.rewritten
    assert len(rewritten) == (2 if skip is None else 1), new.flurka_report
    return new


def generate_both(model: tf.PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None = None,
                  **kw) -> tuple:
    """(with the cache, without): generate outputs with scores."""
    kw = dict(max_new_tokens=64, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0, eos_token_id=None) | kw
    if mask is not None:
        kw["attention_mask"] = mask
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(123)  # the same draws for sampling
        with torch.no_grad():
            outs.append(model.generate(ids, use_cache=use_cache, **kw))
    return tuple(outs)


def assert_same(cached, full, steps: int = 64) -> None:
    assert torch.equal(cached.sequences, full.sequences)
    assert len(cached.scores) == len(full.scores) == steps
    for i, (a, b) in enumerate(zip(cached.scores, full.scores)):
        finite = torch.isfinite(b)  # beam search scores hold -inf for pruned entries
        assert torch.equal(finite, torch.isfinite(a)), i
        scale = b[finite].abs().max()
        assert float((a[finite] - b[finite]).abs().max() / scale) < TOL, i


def prompts(lengths: tuple[int, ...], seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of the given lengths: (ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, L in enumerate(lengths):
        ids[i, n - L:] = torch.randint(2, VOCAB, (L,), generator=g)
        mask[i, n - L:] = 1
    return ids, mask


@pytest.mark.parametrize("family,kernel", [("gpt2", "performer"), ("llama", "performer"),
                                           ("llama", "rnn")])
def test_greedy_matches_full_recomputation(family: str, kernel: str) -> None:
    model = converted(family, kernel)
    ids, _ = prompts((7,))
    cached, full = generate_both(model, ids)
    assert_same(cached, full)
    layers = cached.cache.layers
    assert all(isinstance(layer, FlurkaStateLayer) for layer in layers)
    assert cached.cache.get_seq_length() == 7 + 63


@pytest.mark.parametrize("family,impl", [("gpt2", "sdpa"), ("llama", "sdpa"),
                                         ("llama", "eager")])
def test_left_padded_batch(family: str, impl: str) -> None:
    ids, mask = prompts((9, 4, 6))
    cached, full = generate_both(converted(family, impl=impl), ids, mask)
    assert_same(cached, full)


def test_beam_search_and_sampling() -> None:
    model = converted("llama")
    ids, mask = prompts((8, 5))
    beams = generate_both(model, ids, mask, max_new_tokens=24, num_beams=3,
                          num_return_sequences=2, output_scores=False)
    assert torch.equal(beams[0].sequences, beams[1].sequences)
    assert beams[0].sequences.shape[0] == 4
    sampled = generate_both(model, ids, mask, max_new_tokens=24, do_sample=True, top_k=20,
                            num_return_sequences=3)
    assert_same(*sampled, steps=24)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hybrid_model_keeps_a_kv_cache_for_its_softmax_layer(family: str) -> None:
    skip = "transformer.h.1." if family == "gpt2" else "model.layers.1."
    model = converted(family, skip=skip)
    ids, mask = prompts((9, 4, 6))
    cached, full = generate_both(model, ids, mask, max_new_tokens=32)
    assert_same(cached, full, steps=32)
    kinds = [type(layer).__name__ for layer in cached.cache.layers]
    assert kinds == ["FlurkaStateLayer", "DynamicLayer"]
    assert cached.cache.layers[1].get_seq_length() == 9 + 31


def state_sizes(model: tf.PreTrainedModel, new_tokens: tuple[int, ...]) -> list[int]:
    """Elements of the recurrent states after generating each number of new tokens."""
    ids, _ = prompts((6, 6))
    sizes = []
    for n in new_tokens:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0,
                                 eos_token_id=None, return_dict_in_generate=True)
        sizes.append(state_numel(out.cache))
    return sizes


def test_state_memory_does_not_grow() -> None:
    sizes = state_sizes(converted("llama"), (2, 50))
    assert sizes[0] == sizes[1] > 0


@pytest.mark.parametrize("family", ["mistral", "qwen2", "phi3", "gpt_neox", "opt", "falcon"])
def test_more_families(family: str) -> None:
    ids, mask = prompts((7, 3))
    cached, full = generate_both(converted(family), ids, mask, max_new_tokens=16)
    assert_same(cached, full, steps=16)


def test_a_reloaded_model_generates_with_its_cache() -> None:
    model = converted("gpt2")
    again = pickle.loads(pickle.dumps(model))  # rewritten classes rebuild (passes/install.py)
    ids, mask = prompts((7, 4))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
              attention_mask=mask)
    with torch.no_grad():
        assert torch.equal(again.generate(ids, **kw), model.generate(ids, **kw))


def test_training_mode_is_not_bound() -> None:
    model = converted("gpt2")
    ids, _ = prompts((5,))
    model.train()
    try:
        cache = tf.DynamicCache(config=model.config)
        model(ids, cache=cache, use_cache=True)  # a training forward with a cache runs
        assert not any(isinstance(layer, FlurkaStateLayer) for layer in cache.layers)
        with pytest.raises(RuntimeError, match="training mode.*use_cache=False"):
            model(ids[:, :1], cache=cache, use_cache=True)
    finally:
        model.eval()


def test_exact_conversion_generates_as_the_original_with_its_cache() -> None:
    model = converted("gpt2", "softmax")
    torch.manual_seed(0)
    original = tf.AutoModelForCausalLM.from_config(CONFIGS["gpt2"]()).eval()
    ids, mask = prompts((7, 4))
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None,
              attention_mask=mask)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), original.generate(ids, **kw))


def test_prefill_is_the_whole_sequence_forward() -> None:
    """A forward with a fresh cache (use_cache defaults to True) gives the uncached logits:
    the prefill runs the whole-sequence kernel and only adds the final state."""
    model = converted("llama")
    ids, mask = prompts((9, 4, 6))
    with torch.no_grad():
        cached = model(ids, attention_mask=mask)
        full = model(ids, attention_mask=mask, use_cache=False)
    assert torch.equal(cached.logits, full.logits)
    assert cached.cache.get_seq_length() == 9


def test_refusals_are_loud() -> None:
    model = converted("llama")
    ids, _ = prompts((5,))
    with torch.no_grad(), pytest.raises(RuntimeError, match="StaticLayer.*use_cache=False"):
        model.generate(ids, max_new_tokens=3, cache_implementation="static", pad_token_id=0)
    cache = tf.DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        assert cache.get_seq_length() == 5
        with pytest.raises(RuntimeError, match="rolled back"):
            cache.crop(-1)
        model(out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
    assert cache.get_seq_length() == 6
