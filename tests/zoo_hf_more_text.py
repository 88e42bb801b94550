"""Extra Hugging Face zoo, text models with one stack (`tests/zoo_hf_more.py` assembles
`ZOO_MORE`): encoders (xlm-roberta, megatron-bert, roformer, mpnet, deberta-v2, modernbert) and
decoders (gemma, gemma2, phi, phi3, gpt-neox, gpt-j, falcon, bloom, starcoder2, qwen3, olmo,
stablelm, cohere, granite).
"""
from __future__ import annotations

from typing import Callable

import torch
import transformers as tf

from zoo_hf import (GQA, LAYERS, SEQ, VOCAB, BERT_LIKE, ExpectedSite, ZooEntry, _dec_sites,
                    _enc_sites, _llama_like, _text_inputs)
from zoo_hf_more_base import (ALIBI_SKIP, BAND_CAUSAL_SKIP, BAND_SKIP, DEBERTA_SKIP, FACTORS,
                              MPNET_SKIP, PEAK, RETURNS_WEIGHTS, SOFTCAP_SKIP, _build, _entry,
                              _randomize)


# ----------------------------------------------------------------------------------- encoders
def xlm_roberta(attn_implementation: str = "sdpa") -> ZooEntry:
    """XLMRobertaModel (pad id 1, positions offset by pad+1): 2 sites
    `encoder.layer.{i}.attention.self`."""
    cfg = tf.XLMRobertaConfig(**{**BERT_LIKE, "max_position_embeddings": SEQ + 4}, pad_token_id=1)
    model = _build(tf.XLMRobertaModel, cfg, attn_implementation, FACTORS["xlm_roberta"])
    return _entry("xlm_roberta", model, _text_inputs(1),
                  _enc_sites("encoder.layer", LAYERS, "attention.self"))


def megatron_bert(attn_implementation: str = "sdpa") -> ZooEntry:
    """MegatronBertModel (pre-LN BERT: `attention.ln` before `attention.self`). EAGER ONLY (no
    SDPA support). 2 sites `encoder.layer.{i}.attention.self`, rewritable: the module returns
    `(context, attention_probs)` unconditionally, but the parents only forward the probabilities
    to the model output when output_attentions=True (dead otherwise)."""
    cfg = tf.MegatronBertConfig(**BERT_LIKE)
    model = _build(tf.MegatronBertModel, cfg, attn_implementation, FACTORS["megatron_bert"])
    inputs = _text_inputs(cfg.pad_token_id)
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    return _entry("megatron_bert", model, inputs,
                  _enc_sites("encoder.layer", LAYERS, "attention.self", reason=RETURNS_WEIGHTS))


def roformer(attn_implementation: str = "sdpa") -> ZooEntry:
    """RoFormerModel: bidirectional self-attention with rotary q/k (sinusoidal_pos from the
    encoder). EAGER ONLY. 2 sites `encoder.layer.{i}.attention.self` (rewritable; RoPE after the
    K projection: K chain not position-independent, so not hoistable). Like MegatronBERT the
    module always returns its attention probabilities (dead at model level)."""
    cfg = tf.RoFormerConfig(**BERT_LIKE)
    model = _build(tf.RoFormerModel, cfg, attn_implementation, FACTORS["roformer"])
    return _entry("roformer", model, _text_inputs(cfg.pad_token_id),
                  _enc_sites("encoder.layer", LAYERS, "attention.self", reason=RETURNS_WEIGHTS),
                  notes="rotary on q/k inside an encoder (bidirectional)")


def mpnet(attn_implementation: str = "sdpa") -> ZooEntry:
    """MPNetModel: relative position bias (MPNetEncoder.relative_attention_bias; its forward
    hard-codes 32 buckets, so the config must keep 32), computed once in the encoder and passed to
    every layer (`position_bias`, added to the scores) -> 2 SKIPPED sites
    `encoder.layer.{i}.attention.attn` (q/k/v/o Linear named q, k, v, o). EAGER ONLY."""
    cfg = tf.MPNetConfig(**{**BERT_LIKE, "max_position_embeddings": SEQ + 4},
                         relative_attention_num_buckets=32)
    model = _build(tf.MPNetModel, cfg, attn_implementation, FACTORS["mpnet"])
    _randomize(model, "relative_attention_bias", 1.0)
    sites = tuple(ExpectedSite(f"encoder.layer.{i}.attention.attn", rewritable=False,
                               reason=MPNET_SKIP) for i in range(LAYERS))
    return _entry("mpnet", model, _text_inputs(cfg.pad_token_id), sites,
                  notes="relative bias table re-drawn with std 1")


def deberta_v2(attn_implementation: str = "sdpa") -> ZooEntry:
    """DebertaV2Model as DeBERTa-v3 (relative_attention, pos_att_type p2c|c2p, share_att_key,
    position_buckets 8, norm_rel_ebd layer_norm): 2 SKIPPED sites
    `encoder.layer.{i}.attention.self` (DisentangledSelfAttention: bmm scores + c2p/p2c relative
    terms, masked_fill, softmax). EAGER ONLY (no attention-interface at all)."""
    cfg = tf.DebertaV2Config(**BERT_LIKE, relative_attention=True, pos_att_type=["p2c", "c2p"],
                             share_att_key=True, position_buckets=8, max_relative_positions=-1,
                             norm_rel_ebd="layer_norm", position_biased_input=False)
    model = _build(tf.DebertaV2Model, cfg, attn_implementation, FACTORS["deberta_v2"])
    sites = tuple(ExpectedSite(f"encoder.layer.{i}.attention.self", rewritable=False,
                               reason=DEBERTA_SKIP) for i in range(LAYERS))
    return _entry("deberta_v2", model, _text_inputs(cfg.pad_token_id), sites,
                  notes="share_att_key: the relative terms reuse query_proj/key_proj")


def modernbert(attn_implementation: str = "sdpa") -> ZooEntry:
    """ModernBertModel, fused `Wqkv` ([q|k|v] blocks), RoPE, layer_types [full, sliding] with
    local_attention=6 (window |i-j| <= 3 < N): site 0 `layers.0.attn` global (rewritable), site 1
    `layers.1.attn` sliding window -> SKIPPED (banded bidirectional mask) under approximate
    kernels; exact mode may keep it as exact attention (see APPROX_ONLY_SKIPS)."""
    cfg = tf.ModernBertConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64,
                              num_hidden_layers=LAYERS, num_attention_heads=3,
                              max_position_embeddings=64, layer_types=["full_attention",
                                                                       "sliding_attention"],
                              local_attention=6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              cls_token_id=1, sep_token_id=2)
    model = _build(tf.ModernBertModel, cfg, attn_implementation, FACTORS["modernbert"])
    sites = (ExpectedSite("layers.0.attn"),
             ExpectedSite("layers.1.attn", rewritable=False, reason=BAND_SKIP))
    return _entry("modernbert", model, _text_inputs(0), sites,
                  notes="sliding layer: local_attention=6 -> half window 3")


# ----------------------------------------------------------------------------------- decoders
def gemma(attn_implementation: str = "sdpa") -> ZooEntry:
    """GemmaModel, GQA 4/2 dh 12, RoPE, (1+w) RMSNorm, embeddings * sqrt(dm): 2 causal sites
    `layers.{i}.self_attn`."""
    cfg = _llama_like(tf.GemmaConfig)
    model = _build(tf.GemmaModel, cfg, attn_implementation, FACTORS["gemma"])
    return _entry("gemma", model, _text_inputs(0), _dec_sites("layers", LAYERS, "self_attn", **GQA))


def gemma2(attn_implementation: str = "sdpa") -> ZooEntry:
    """Gemma2Model, attn_logit_softcapping=50 (tanh soft-cap on the scores): 2 causal sites
    `layers.{i}.self_attn`, both SKIPPED (soft-capping). EAGER ONLY (`_supports_sdpa = False`:
    SDPA cannot soft-cap). layer_types alternate sliding/full but sliding_window 4096 > N, so the
    mask of layer 0 equals the causal mask; query_pre_attn_scalar 256 -> scale 1/16."""
    cfg = _llama_like(tf.Gemma2Config, attn_logit_softcapping=50.0, final_logit_softcapping=None,
                      sliding_window=4096)
    model = _build(tf.Gemma2Model, cfg, attn_implementation, FACTORS["gemma2"])
    sites = tuple(ExpectedSite(f"layers.{i}.self_attn", causal=True, rewritable=False,
                               reason=SOFTCAP_SKIP, **GQA) for i in range(LAYERS))
    return _entry("gemma2", model, _text_inputs(0), sites)


def phi(attn_implementation: str = "sdpa") -> ZooEntry:
    """PhiModel, H=3 dh 16, partial rotary 0.5 (8 of 16 dims), q/k/v + `dense`: 2 causal sites
    `layers.{i}.self_attn`."""
    cfg = tf.PhiConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64,
                       num_hidden_layers=LAYERS, num_attention_heads=3, max_position_embeddings=64,
                       partial_rotary_factor=0.5, pad_token_id=0)
    model = _build(tf.PhiModel, cfg, attn_implementation, FACTORS["phi"])
    return _entry("phi", model, _text_inputs(0), _dec_sites("layers", LAYERS, "self_attn"))


def phi3(attn_implementation: str = "sdpa") -> ZooEntry:
    """Phi3Model, GQA 4/2 dh 12, fused `qkv_proj` = [q 48 | k 24 | v 24]: 2 causal sites
    `layers.{i}.self_attn`."""
    cfg = _llama_like(tf.Phi3Config)
    model = _build(tf.Phi3Model, cfg, attn_implementation, FACTORS["phi3"], v_size=2 * 12)
    return _entry("phi3", model, _text_inputs(0), _dec_sites("layers", LAYERS, "self_attn", **GQA),
                  notes="fused QKV with GQA split sizes (48, 24, 24)")


def gpt_neox(attn_implementation: str = "sdpa") -> ZooEntry:
    """GPTNeoXModel, H=3 dh 16, fused `query_key_value` interleaved per head ([q|k|v] x H),
    partial rotary 0.25, parallel residual: 2 causal sites `layers.{i}.attention`."""
    cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=LAYERS,
                           num_attention_heads=3, intermediate_size=64, max_position_embeddings=64,
                           pad_token_id=0)
    model = _build(tf.GPTNeoXModel, cfg, attn_implementation, FACTORS["gpt_neox"],
                   layout="per_head", head_dim=16)
    return _entry("gpt_neox", model, _text_inputs(0), _dec_sites("layers", LAYERS, "attention"),
                  notes="fused QKV interleaved per head: view(B, N, H, 3*dh).chunk(3)")


def gptj(attn_implementation: str = "sdpa") -> ZooEntry:
    """GPTJModel, H=3 dh 16, rotary_dim 8 (interleaved rotary), parallel attn+MLP: 2 causal sites
    `h.{i}.attn`."""
    cfg = tf.GPTJConfig(vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=LAYERS, n_head=3,
                        rotary_dim=8, n_inner=64, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                        pad_token_id=0)
    model = _build(tf.GPTJModel, cfg, attn_implementation, FACTORS["gptj"])
    return _entry("gptj", model, _text_inputs(0), _dec_sites("h", LAYERS, "attn"))


def falcon(attn_implementation: str = "sdpa") -> ZooEntry:
    """FalconModel (7B layout: multi_query, parallel_attn, rotary, no ALiBi), H=4 dh 12, ONE K/V
    head (MQA: Hkv=1), fused `query_key_value` = [q 48 | k 12 | v 12]: 2 causal sites
    `h.{i}.self_attention` (own SDPA call, K broadcast over heads, no num_key_value_groups)."""
    cfg = tf.FalconConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=LAYERS,
                          num_attention_heads=4, multi_query=True, new_decoder_architecture=False,
                          parallel_attn=True, alibi=False, bias=False, max_position_embeddings=64,
                          pad_token_id=0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    model = _build(tf.FalconModel, cfg, attn_implementation, FACTORS["falcon"], v_size=12)
    return _entry("falcon", model, _text_inputs(0),
                  _dec_sites("h", LAYERS, "self_attention", heads=4, kv_heads=1, head_dim=12),
                  notes="multi-query: K/V (B, 1, N, dh)")


def bloom(attn_implementation: str = "sdpa") -> ZooEntry:
    """BloomModel: ALiBi (per-head slopes x key position, added via baddbmm) -> 2 causal sites
    `h.{i}.self_attention`, both SKIPPED. Fused `query_key_value` view(B, N, H, 3, dh).
    EAGER ONLY."""
    cfg = tf.BloomConfig(vocab_size=VOCAB, hidden_size=48, n_layer=LAYERS, n_head=3,
                         pad_token_id=0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    model = _build(tf.BloomModel, cfg, attn_implementation, FACTORS["bloom"],
                   layout="per_head", head_dim=16)
    sites = tuple(ExpectedSite(f"h.{i}.self_attention", causal=True, rewritable=False,
                               reason=ALIBI_SKIP) for i in range(LAYERS))
    return _entry("bloom", model, _text_inputs(0), sites)


def starcoder2(attn_implementation: str = "sdpa") -> ZooEntry:
    """Starcoder2Model, GQA 4/2 dh 12, biased projections, sliding_window=5 < N: the causal mask
    is BANDED (0 <= i-j < 5) -> 2 causal sites `layers.{i}.self_attn`, both SKIPPED under
    approximate kernels; exact mode may keep them as exact attention (see APPROX_ONLY_SKIPS)."""
    cfg = _llama_like(tf.Starcoder2Config, sliding_window=5, use_bias=True)
    model = _build(tf.Starcoder2Model, cfg, attn_implementation, FACTORS["starcoder2"])
    sites = tuple(ExpectedSite(f"layers.{i}.self_attn", causal=True, rewritable=False,
                               reason=BAND_CAUSAL_SKIP, **GQA) for i in range(LAYERS))
    return _entry("starcoder2", model, _text_inputs(0), sites,
                  notes="sliding window 5: a compiler treating it as plain causal is wrong")


def qwen3(attn_implementation: str = "sdpa") -> ZooEntry:
    """Qwen3Model, GQA 4/2 dh 12, per-head RMSNorm `q_norm`/`k_norm` after q_proj/k_proj, RoPE:
    2 causal sites `layers.{i}.self_attn`."""
    cfg = _llama_like(tf.Qwen3Config)
    model = _build(tf.Qwen3Model, cfg, attn_implementation, FACTORS["qwen3"])
    return _entry("qwen3", model, _text_inputs(0), _dec_sites("layers", LAYERS, "self_attn", **GQA))


def olmo(attn_implementation: str = "sdpa") -> ZooEntry:
    """OlmoModel, GQA 4/2 dh 12, parameter-free LayerNorm, clip_qkv=8 (q/k/v clamped to
    [-8, 8] after the projections): 2 causal sites `layers.{i}.self_attn`."""
    cfg = _llama_like(tf.OlmoConfig, clip_qkv=8.0)
    model = _build(tf.OlmoModel, cfg, attn_implementation, FACTORS["olmo"])
    return _entry("olmo", model, _text_inputs(0), _dec_sites("layers", LAYERS, "self_attn", **GQA),
                  notes="clip_qkv clamps q/k/v elementwise (a clamp in the K chain)")


def stablelm(attn_implementation: str = "sdpa") -> ZooEntry:
    """StableLmModel, GQA 4/2 dh 12, partial rotary 0.5, qkv bias, qk_layernorm (per-head
    LayerNorm ModuleList): 2 causal sites `layers.{i}.self_attn`."""
    cfg = _llama_like(tf.StableLmConfig, partial_rotary_factor=0.5, use_qkv_bias=True,
                      qk_layernorm=True)
    model = _build(tf.StableLmModel, cfg, attn_implementation, FACTORS["stablelm"])
    return _entry("stablelm", model, _text_inputs(0),
                  _dec_sites("layers", LAYERS, "self_attn", **GQA))


def cohere(attn_implementation: str = "sdpa") -> ZooEntry:
    """CohereModel, GQA 4/2 dh 12, interleaved rotary, parallel attn+MLP, LayerNorm: 2 causal
    sites `layers.{i}.self_attn`."""
    cfg = _llama_like(tf.CohereConfig)
    model = _build(tf.CohereModel, cfg, attn_implementation, FACTORS["cohere"])
    return _entry("cohere", model, _text_inputs(0),
                  _dec_sites("layers", LAYERS, "self_attn", **GQA))


def granite(attn_implementation: str = "sdpa") -> ZooEntry:
    """GraniteModel, GQA 4/2 dh 12, attention_multiplier 0.5 (the softmax scale, instead of
    1/sqrt(12)), embedding/residual multipliers: 2 causal sites `layers.{i}.self_attn`."""
    cfg = _llama_like(tf.GraniteConfig, attention_multiplier=0.5, embedding_multiplier=2.0,
                      residual_multiplier=0.5)
    model = _build(tf.GraniteModel, cfg, attn_implementation, FACTORS["granite"])
    return _entry("granite", model, _text_inputs(0),
                  _dec_sites("layers", LAYERS, "self_attn", **GQA),
                  notes="scale 0.5 != dh**-0.5")


TEXT_MORE: dict[str, Callable[..., ZooEntry]] = {
    "xlm_roberta": xlm_roberta, "megatron_bert": megatron_bert, "roformer": roformer,
    "mpnet": mpnet, "deberta_v2": deberta_v2, "modernbert": modernbert,
    "gemma": gemma, "gemma2": gemma2, "phi": phi, "phi3": phi3, "gpt_neox": gpt_neox,
    "gptj": gptj, "falcon": falcon, "bloom": bloom, "starcoder2": starcoder2, "qwen3": qwen3,
    "olmo": olmo, "stablelm": stablelm, "cohere": cohere, "granite": granite,
}
FACTORS.update(dict.fromkeys(TEXT_MORE, PEAK))
FACTORS.update(xlm_roberta=16, megatron_bert=16, roformer=16, mpnet=14, deberta_v2=16,
               modernbert=14, gemma=14, gemma2=28, phi3=14, starcoder2=14, qwen3=1.75, olmo=14,
               stablelm=1.6, granite=10)
