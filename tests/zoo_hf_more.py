"""More Hugging Face model families for the compiler tests (tiny, offline, random weights).

Companion to `tests/zoo_hf.py` (same `ZooEntry` / `ExpectedSite`, same inputs: BATCH=2, N=13,
row 1 padded by PAD=3; seq2seq decoders N=9). 34 builders in `ZOO_MORE`: encoders (xlm-roberta,
megatron-bert, roformer, mpnet, deberta-v2, modernbert), decoders (gemma, gemma2, phi, phi3,
gpt-neox, gpt-j, falcon, bloom, starcoder2, qwen3, olmo, stablelm, cohere, granite), encoder-
decoders (mbart, pegasus, marian, blenderbot, whisper), vision (deit, beit, swin, dinov2,
clip-vision, siglip-vision), CLIP text, speech (wav2vec2, hubert).

`e = build_more("phi3"); e.model(**e.example_inputs)[e.output_key]`.

Differences from zoo_hf:
* Attention is made PEAKED: every builder calls `peak_attention(model, factor)`, which scales the
  query and key projections so the softmax rows are far from uniform (random init with std 0.02
  gives scores ~0.02 and near-uniform rows, which hides errors in masks, scales and position
  terms). `attention_peakedness(entry)` measures it (median over rows of the row max).
* Learned position-bias tables that HF zero-initialises (BEiT, Swin) and MPNet's relative bias are
  re-drawn (`_randomize`) so that a site ignoring them would change the output.
* Models without SDPA support (`_supports_sdpa = False`: deberta-v2, mpnet, megatron-bert,
  roformer, gemma2, bloom) are always built with eager attention; for them
  `entry.attn_implementation == "eager"` whatever was asked, and
  `entry.attn_implementations == ("eager",)`.
* `count_attention_calls_more` / `check_sites_more` also see `F.multi_head_attention_forward`
  (SigLIP's pooling head is an `nn.MultiheadAttention`, invisible to zoo_hf's counter), read Hkv
  from the key tensor (Falcon's multi-query K has 1 head and no `num_key_value_groups`) and check
  (H, N, M) from the softmax input under eager attention.

The expected sites were derived from the transformers 5.x modeling code
(`.venv/lib/python3.11/site-packages/transformers/models/<m>/modeling_<m>.py`) and checked by
counting softmax / SDPA calls per module (`check_sites_more`); `python tests/zoo_hf_more.py` checks
all builders (sites, finite outputs, peakedness, time).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
import transformers as tf

from zoo_hf import (BATCH, DEC_SEQ, GQA, IMPLS, LAYERS, SEED, SEQ, VOCAB,
                    BERT_LIKE, ExpectedSite, ZooEntry, _dec_sites, _enc_sites, _from_config,
                    _llama_like, _seq2seq_inputs, _text_inputs)

EAGER_ONLY = ("eager",)
# q/k scale: scores grow by factor**2. With std-0.02 inits a factor of 4-8 still leaves the rows
# near-uniform at N=13 (median row max 0.2-0.4), hence 12-32; see FACTORS (below ZOO_MORE).
PEAK = 12.0
FACTORS: dict[str, float] = {}

REL_BIAS_SKIP = ("learned relative position bias added to the scores (a parameter table indexed "
                 "by relative position); FLuRKA cannot represent it")
MPNET_SKIP = ("relative position bias (T5-style buckets, computed once in the encoder from a "
              "learned table and added to every layer's scores); FLuRKA cannot represent it")
DEBERTA_SKIP = ("disentangled relative-position attention: c2p/p2c scores (content x relative "
                "position embeddings) added to the scores as a position bias; FLuRKA cannot "
                "represent it")
ALIBI_SKIP = ("ALiBi: a per-head linear position bias added to the scores; FLuRKA cannot "
              "represent it")
SOFTCAP_SKIP = ("soft-capping: scores pass through cap * tanh(s / cap) before the softmax, so the "
                "weights are not exp(q.k); FLuRKA cannot represent it")
SWIN_SKIP = ("window attention with a learned relative position bias table added to the scores "
             "(+ the shifted-window -100 mask in odd blocks); FLuRKA cannot represent it")
BAND_SKIP = ("sliding-window mask: banded (|i - j| < w), neither padding nor causal; FLuRKA "
             "cannot represent it")
BAND_CAUSAL_SKIP = ("sliding-window causal mask: banded causal (0 <= i - j < w), not plain causal; "
                    "FLuRKA cannot represent it")
# Skips that hold for the approximate kernels only: a banded mask is neither padding nor causal, so
# a low-rank / kernel FLuRKA site cannot reproduce it, but exact mode (kernel="softmax", dk=None)
# may legitimately keep such a site as exact softmax attention with the mask (the compiler's
# legality policy skips "other" masks under non-exact kernels only). A test in exact mode should
# accept "rewritten" (equal outputs) for a site whose reason is in this tuple.
APPROX_ONLY_SKIPS = (BAND_SKIP, BAND_CAUSAL_SKIP)
RETURNS_WEIGHTS = ("the module always returns its attention probabilities as a second output, "
                   "but the model drops them unless output_attentions=True: rewritable")


# ------------------------------------------------------------------------------- peaked attention
SEPARATE_QK = ("q_proj", "k_proj", "query", "key", "q_lin", "k_lin", "query_proj", "key_proj",
               "q", "k", "to_q", "to_k", "wq", "wk", "q_attn")
FUSED_QKV = ("c_attn", "qkv", "qkv_proj", "query_key_value", "Wqkv", "in_proj", "W_pack")
QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_norm", "key_norm")


def _out_rows(mod: nn.Module) -> int:
    """Output features of a Linear (weight (out, in)) or GPT-2 Conv1D (weight (in, out))."""
    return mod.weight.shape[1] if type(mod).__name__ == "Conv1D" else mod.weight.shape[0]


def _qk_index(out: int, layout: str, v_size: int | None, head_dim: int | None) -> torch.Tensor:
    """Output features of a fused q/k/v projection that belong to q and k.

    layout "blocks": [q | k | v] contiguous (GPT-2 c_attn, Phi-3 qkv_proj, ModernBERT Wqkv, Falcon
    multi-query, nn.MultiheadAttention in_proj); v is the last `v_size` features (default out/3).
    layout "per_head": heads interleaved, [q_h | k_h | v_h] of `head_dim` each per head (GPT-NeoX
    `view(..., H, 3*dh).chunk(3)`, Bloom / Falcon(multi_query=False) `view(..., H, 3, dh)`)."""
    idx = torch.arange(out)
    if layout == "blocks":
        return idx[: out - (v_size if v_size is not None else out // 3)]
    if layout == "per_head":
        return idx[(idx // head_dim) % 3 != 2]
    raise ValueError(f"unknown fused layout {layout!r}")


@torch.no_grad()
def _scale_rows(mod: nn.Module, rows: torch.Tensor | None, factor: float) -> None:
    """Multiply output features `rows` (all if None) of a Linear/Conv1D, weight and bias."""
    conv1d = type(mod).__name__ == "Conv1D"
    rows = slice(None) if rows is None else rows
    if conv1d:
        mod.weight[:, rows] *= factor
    else:
        mod.weight[rows] *= factor
    if getattr(mod, "bias", None) is not None:
        mod.bias[rows] *= factor


@torch.no_grad()
def _scale_norm(mod: nn.Module, factor: float) -> None:
    """Scale a q/k norm's output: y = n(x) * w + b -> factor * y (weight and bias of every norm in
    `mod`, e.g. StableLM's per-head ModuleList). Gemma-style RMSNorm computes n(x) * (1 + w):
    w <- factor * (1 + w) - 1."""
    for sub in mod.modules():
        w = getattr(sub, "weight", None)
        if not isinstance(w, nn.Parameter):
            continue
        if "Gemma" in type(sub).__name__:
            w.copy_(factor * (1 + w) - 1)
        else:
            w.mul_(factor)
        if isinstance(getattr(sub, "bias", None), nn.Parameter):
            sub.bias.mul_(factor)


@torch.no_grad()
def peak_attention(model: nn.Module, factor: float = PEAK, layout: str = "blocks",
                   v_size: int | None = None, head_dim: int | None = None) -> list[str]:
    """Scale every query and key projection of `model` by `factor` (scores by factor**2).

    Matched by the module's LAST name component:
    * separate projections (whole weight and bias scaled): q_proj, k_proj, query, key, q_lin, k_lin,
      query_proj, key_proj, q, k, to_q, to_k, wq, wk, q_attn;
    * fused q/k/v projections (only the q and k output features scaled; see `_qk_index` for
      `layout` / `v_size` / `head_dim`): c_attn, qkv, qkv_proj, query_key_value, Wqkv, in_proj,
      W_pack;
    * nn.MultiheadAttention: in_proj_weight/in_proj_bias rows [0, 2E) (or q/k_proj_weight);
    * q/k norms after the projection (q_norm, k_norm, q_layernorm, k_layernorm, query_norm,
      key_norm): their output is scaled too, since a norm would undo the projection's scale
      (Qwen3, StableLM qk_layernorm, Cohere/OLMo-2 qk norms).
    Not covered: DeBERTa's pos_key_proj/pos_query_proj (relative-position projections), T5's
    relative bias, anything with another naming scheme. Returns the names scaled (for checking
    that the model's q/k projections were all found)."""
    done = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, nn.MultiheadAttention):
            e = mod.embed_dim
            if mod.in_proj_weight is not None:
                mod.in_proj_weight[: 2 * e] *= factor
                if mod.in_proj_bias is not None:
                    mod.in_proj_bias[: 2 * e] *= factor
            else:
                mod.q_proj_weight *= factor
                mod.k_proj_weight *= factor
                if mod.in_proj_bias is not None:
                    mod.in_proj_bias[: 2 * e] *= factor
            done.append(name)
        elif leaf in QK_NORMS:
            _scale_norm(mod, factor)
            done.append(name)
        elif not hasattr(mod, "weight") or not isinstance(mod.weight, torch.Tensor) \
                or mod.weight.dim() != 2:
            continue
        elif leaf in SEPARATE_QK:
            _scale_rows(mod, None, factor)
            done.append(name)
        elif leaf in FUSED_QKV:
            _scale_rows(mod, _qk_index(_out_rows(mod), layout, v_size, head_dim), factor)
            done.append(name)
    if not done:
        raise ValueError(f"peak_attention: no q/k projection found in {type(model).__name__}")
    return done


@torch.no_grad()
def _randomize(model: nn.Module, substr: str, std: float = 1.0) -> None:
    """Re-draw (seeded) every parameter whose name contains `substr` (HF zero-inits BEiT/Swin
    relative bias tables: a zero bias would hide a site that ignores it)."""
    g = torch.Generator().manual_seed(SEED + 1)
    for name, p in model.named_parameters():
        if substr in name:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _build(cls: type, cfg, impl: str, factor: float, **layout) -> nn.Module:
    """`_from_config` (eager if the class has no SDPA support), then `peak_attention`."""
    if not cls._supports_sdpa:
        impl = "eager"
    model = _from_config(cls, cfg, impl)
    peak_attention(model, factor, **layout)
    return model


def _impl(model: nn.Module) -> str:
    return model.config._attn_implementation


def _impls(cls: type) -> tuple[str, ...]:
    return IMPLS if cls._supports_sdpa else EAGER_ONLY


def _entry(name: str, model: nn.Module, inputs: dict, sites: tuple, **kw) -> ZooEntry:
    return ZooEntry(name, model, inputs, tuple(sites), _impl(model),
                    attn_implementations=_impls(type(model)), **kw)


def _pixels(size: int = 20, channels: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    return {"pixel_values": torch.randn(BATCH, channels, size, size, generator=g)}


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


# ----------------------------------------------------------------------------- encoder-decoder
def _bart_like_sites(enc_n: int = SEQ, dec_n: int = DEC_SEQ, **dims) -> tuple[ExpectedSite, ...]:
    """BART-family: encoder self, decoder causal self, decoder cross (`encoder_attn`)."""
    cross = tuple(ExpectedSite(f"decoder.layers.{i}.encoder_attn", cross=True, seq_len=dec_n,
                               kv_seq_len=enc_n, **dims) for i in range(LAYERS))
    return (_enc_sites("encoder.layers", LAYERS, "self_attn", seq_len=enc_n, kv_seq_len=enc_n,
                       **dims)
            + _dec_sites("decoder.layers", LAYERS, "self_attn", seq_len=dec_n, kv_seq_len=dec_n,
                         **dims)
            + cross)


BART_LIKE = dict(vocab_size=VOCAB, d_model=48, encoder_layers=LAYERS, decoder_layers=LAYERS,
                 encoder_attention_heads=3, decoder_attention_heads=3, encoder_ffn_dim=64,
                 decoder_ffn_dim=64, max_position_embeddings=40)


def mbart(attn_implementation: str = "sdpa") -> ZooEntry:
    """MBartModel (pre-LN BART, pad id 1): 6 sites (2 enc self, 2 dec causal self, 2 cross)."""
    cfg = tf.MBartConfig(**BART_LIKE, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = _build(tf.MBartModel, cfg, attn_implementation, FACTORS["mbart"])
    return _entry("mbart", model, _seq2seq_inputs(1), _bart_like_sites())


def pegasus(attn_implementation: str = "sdpa") -> ZooEntry:
    """PegasusModel (sinusoidal positions, pre-LN, pad 0): 6 sites (BART layout)."""
    cfg = tf.PegasusConfig(**BART_LIKE, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = _build(tf.PegasusModel, cfg, attn_implementation, FACTORS["pegasus"])
    return _entry("pegasus", model, _seq2seq_inputs(0), _bart_like_sites())


def marian(attn_implementation: str = "sdpa") -> ZooEntry:
    """MarianModel (sinusoidal positions, post-LN, scale_embedding, pad 0): 6 sites."""
    cfg = tf.MarianConfig(**BART_LIKE, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
                          forced_eos_token_id=2)
    model = _build(tf.MarianModel, cfg, attn_implementation, FACTORS["marian"])
    return _entry("marian", model, _seq2seq_inputs(0), _bart_like_sites())


def blenderbot(attn_implementation: str = "sdpa") -> ZooEntry:
    """BlenderbotModel (pre-LN, learned positions, pad 0): 6 sites (BART layout)."""
    cfg = tf.BlenderbotConfig(**BART_LIKE, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              decoder_start_token_id=1)
    model = _build(tf.BlenderbotModel, cfg, attn_implementation, FACTORS["blenderbot"])
    return _entry("blenderbot", model, _seq2seq_inputs(0), _bart_like_sites())


def whisper(attn_implementation: str = "sdpa") -> ZooEntry:
    """WhisperModel: input_features (B, 8 mel, 26) -> conv stride 2 -> encoder N 13 (no mask:
    Whisper's encoder ignores padding); decoder ids N 9 padded. 6 sites: 2 enc self
    `encoder.layers.{i}.self_attn`, 2 dec causal self, 2 cross `decoder.layers.{i}.encoder_attn`
    (k_proj has no bias)."""
    cfg = tf.WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=48, encoder_layers=LAYERS,
                           decoder_layers=LAYERS, encoder_attention_heads=3,
                           decoder_attention_heads=3, encoder_ffn_dim=64, decoder_ffn_dim=64,
                           max_source_positions=SEQ, max_target_positions=40, pad_token_id=0,
                           bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                           decoder_start_token_id=VOCAB - 2, suppress_tokens=None,
                           begin_suppress_tokens=None)
    model = _build(tf.WhisperModel, cfg, attn_implementation, FACTORS["whisper"])
    g = torch.Generator().manual_seed(SEED)
    dec = _text_inputs(0, DEC_SEQ)
    inputs = {"input_features": torch.randn(BATCH, 8, 2 * SEQ, generator=g),
              "decoder_input_ids": dec["input_ids"],
              "decoder_attention_mask": dec["attention_mask"]}
    return _entry("whisper", model, inputs, _bart_like_sites(),
                  notes="encoder has no attention mask (fixed-length features)")


# ----------------------------------------------------------------------------------- vision
VIT_LIKE = dict(image_size=20, patch_size=4, num_channels=3, hidden_size=48,
                num_hidden_layers=LAYERS, num_attention_heads=3, intermediate_size=64)


def deit(attn_implementation: str = "sdpa") -> ZooEntry:
    """DeiTModel, 20x20 patch 4: 25 patches + CLS + distillation token = N 27, no mask: 2 sites
    `layers.{i}.attention` (5.x ViT layout: no `encoder`, q_proj/k_proj/v_proj/o_proj)."""
    cfg = tf.DeiTConfig(**VIT_LIKE)
    model = _build(tf.DeiTModel, cfg, attn_implementation, FACTORS["deit"])
    return _entry("deit", model, _pixels(),
                  _enc_sites("layers", LAYERS, "attention", seq_len=27, kv_seq_len=27))


def beit(attn_implementation: str = "sdpa") -> ZooEntry:
    """BeitModel, use_relative_position_bias (one table per layer, computed in the layer and passed
    to the attention as its float attention_mask): 25 patches + CLS = N 26, 2 SKIPPED sites
    `layers.{i}.attention` (5.x layout).
    The zero-initialised bias tables are re-drawn with std 1."""
    cfg = tf.BeitConfig(**VIT_LIKE, use_relative_position_bias=True, use_mean_pooling=True)
    model = _build(tf.BeitModel, cfg, attn_implementation, FACTORS["beit"])
    _randomize(model, "relative_position_bias_table", 1.0)
    sites = tuple(ExpectedSite(f"layers.{i}.attention", rewritable=False,
                               reason=REL_BIAS_SKIP, seq_len=26, kv_seq_len=26)
                  for i in range(LAYERS))
    return _entry("beit", model, _pixels(), sites)


def swin(attn_implementation: str = "sdpa") -> ZooEntry:
    """SwinModel 16x16, patch 2 -> 8x8 tokens, window 4 (N = M = 16 per window), depths (2, 2),
    heads (3, 6), embed 24 (dh 8). Stage 0: 4 windows per image (batch 8), block 1 shifted (shift
    2, -100 mask); stage 1 (4x4 after merging): one window, no shift. 4 SKIPPED sites
    `encoder.layers.{s}.blocks.{b}.attention` (relative position bias table re-drawn, std 1)."""
    cfg = tf.SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=24, depths=[2, 2],
                        num_heads=[3, 6], window_size=4, mlp_ratio=2.0, drop_path_rate=0.0)
    model = _build(tf.SwinModel, cfg, attn_implementation, FACTORS["swin"])
    _randomize(model, "relative_position_bias_table", 1.0)
    sites = tuple(ExpectedSite(f"encoder.layers.{s}.blocks.{b}.attention", rewritable=False,
                               reason=SWIN_SKIP, heads=h, kv_heads=h, head_dim=8, seq_len=16,
                               kv_seq_len=16)
                  for s, h in ((0, 3), (1, 6)) for b in range(2))
    return _entry("swin", model, _pixels(16), sites,
                  notes="queries are windows: batch B*num_windows (8 in stage 0, 2 in stage 1)")


def dinov2(attn_implementation: str = "sdpa") -> ZooEntry:
    """Dinov2Model, 20x20 patch 4: 25 patches + CLS = N 26, layer scale, no mask: 2 sites
    `encoder.layer.{i}.attention` (Dinov2Attention, q_proj/k_proj/v_proj/o_proj)."""
    cfg = tf.Dinov2Config(image_size=20, patch_size=4, num_channels=3, hidden_size=48,
                          num_hidden_layers=LAYERS, num_attention_heads=3, mlp_ratio=2)
    model = _build(tf.Dinov2Model, cfg, attn_implementation, FACTORS["dinov2"])
    return _entry("dinov2", model, _pixels(),
                  _enc_sites("encoder.layer", LAYERS, "attention", seq_len=26, kv_seq_len=26))


def clip_vision(attn_implementation: str = "sdpa") -> ZooEntry:
    """CLIPVisionModel, 20x20 patch 4: 25 + CLS = N 26, pre-LN, no mask: 2 sites
    `encoder.layers.{i}.self_attn`."""
    cfg = tf.CLIPVisionConfig(image_size=20, patch_size=4, num_channels=3, hidden_size=48,
                              intermediate_size=64, num_hidden_layers=LAYERS,
                              num_attention_heads=3)
    model = _build(tf.CLIPVisionModel, cfg, attn_implementation, FACTORS["clip_vision"])
    return _entry("clip_vision", model, _pixels(),
                  _enc_sites("encoder.layers", LAYERS, "self_attn", seq_len=26,
                             kv_seq_len=26),
                  notes="CLIP's q/k init is larger (std ~0.07): smaller peak factor")


def siglip_vision(attn_implementation: str = "sdpa") -> ZooEntry:
    """SiglipVisionModel, 20x20 patch 4: 25 patches, NO CLS (N 25), 2 self-attention sites
    `encoder.layers.{i}.self_attn` + the pooling head's nn.MultiheadAttention
    `head.attention` (a learned probe query, N 1, over the 25 patches, M 25: cross,
    batch_first, in_proj fused)."""
    cfg = tf.SiglipVisionConfig(image_size=20, patch_size=4, num_channels=3, hidden_size=48,
                                intermediate_size=64, num_hidden_layers=LAYERS,
                                num_attention_heads=3, vision_use_head=True)
    model = _build(tf.SiglipVisionModel, cfg, attn_implementation, FACTORS["siglip_vision"])
    peak_attention(model.head, SIGLIP_HEAD_PEAK)
    sites = (_enc_sites("encoder.layers", LAYERS, "self_attn", seq_len=25,
                        kv_seq_len=25)
             + (ExpectedSite("head.attention", cross=True, seq_len=1,
                             kv_seq_len=25),))
    return _entry("siglip_vision", model, _pixels(), sites, output_key="pooler_output",
                  notes="head: nn.MultiheadAttention(probe, h, h); output_key pooler_output")


def clip_text(attn_implementation: str = "sdpa") -> ZooEntry:
    """CLIPTextModel: CAUSAL + padding mask in a text 'encoder' (pad 0, eos 2): 2 causal sites
    `encoder.layers.{i}.self_attn`."""
    cfg = tf.CLIPTextConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64,
                            num_hidden_layers=LAYERS, num_attention_heads=3,
                            max_position_embeddings=SEQ + 3, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2)
    model = _build(tf.CLIPTextModel, cfg, attn_implementation, FACTORS["clip_text"])
    return _entry("clip_text", model, _text_inputs(0),
                  _dec_sites("encoder.layers", LAYERS, "self_attn"),
                  notes="causal although it is called an encoder")


# ----------------------------------------------------------------------------------- speech
AUDIO_LEN = 140        # conv (k10, s5) -> 27 -> (k3, s2) -> 13 frames
AUDIO_VALID = 110      # row 1: 110 valid samples -> 10 valid frames (PAD=3 padded frames)


def _audio_inputs() -> dict[str, torch.Tensor]:
    """input_values (B, 140) -> 13 frames; row 1 zero-padded after 110 samples (-> 10 frames)."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(BATCH, AUDIO_LEN, generator=g)
    mask = torch.ones(BATCH, AUDIO_LEN, dtype=torch.long)
    mask[1, AUDIO_VALID:] = 0
    return {"input_values": x * mask, "attention_mask": mask}


AUDIO_CFG = dict(hidden_size=48, num_hidden_layers=LAYERS, num_attention_heads=3,
                 intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                 num_conv_pos_embeddings=5, num_conv_pos_embedding_groups=4, vocab_size=VOCAB)


def wav2vec2(attn_implementation: str = "sdpa") -> ZooEntry:
    """Wav2Vec2Model (post-LN encoder, group-norm feature extractor), input_values (B, 140) ->
    13 frames, row 1 padded to 10 frames via attention_mask: 2 sites
    `encoder.layers.{i}.attention`."""
    cfg = tf.Wav2Vec2Config(**AUDIO_CFG, feat_extract_norm="group", do_stable_layer_norm=False)
    model = _build(tf.Wav2Vec2Model, cfg, attn_implementation, FACTORS["wav2vec2"])
    return _entry("wav2vec2", model, _audio_inputs(),
                  _enc_sites("encoder.layers", LAYERS, "attention"))


def hubert(attn_implementation: str = "sdpa") -> ZooEntry:
    """HubertModel (pre-LN 'stable' encoder, layer-norm feature extractor), same audio layout:
    2 sites `encoder.layers.{i}.attention`."""
    cfg = tf.HubertConfig(**AUDIO_CFG, feat_extract_norm="layer", do_stable_layer_norm=True)
    model = _build(tf.HubertModel, cfg, attn_implementation, FACTORS["hubert"])
    return _entry("hubert", model, _audio_inputs(),
                  _enc_sites("encoder.layers", LAYERS, "attention"))


ZOO_MORE: dict[str, Callable[..., ZooEntry]] = {
    "xlm_roberta": xlm_roberta, "megatron_bert": megatron_bert, "roformer": roformer,
    "mpnet": mpnet, "deberta_v2": deberta_v2, "modernbert": modernbert,
    "gemma": gemma, "gemma2": gemma2, "phi": phi, "phi3": phi3, "gpt_neox": gpt_neox,
    "gptj": gptj, "falcon": falcon, "bloom": bloom, "starcoder2": starcoder2, "qwen3": qwen3,
    "olmo": olmo, "stablelm": stablelm, "cohere": cohere, "granite": granite,
    "mbart": mbart, "pegasus": pegasus, "marian": marian, "blenderbot": blenderbot,
    "whisper": whisper,
    "deit": deit, "beit": beit, "swin": swin, "dinov2": dinov2, "clip_vision": clip_vision,
    "siglip_vision": siglip_vision, "clip_text": clip_text,
    "wav2vec2": wav2vec2, "hubert": hubert,
}


# q/k scale per builder, tuned so that `attention_peakedness` (median row max) is ~0.55-0.9 at
# every site: std-0.02 inits need 12-16 (longer rows, 26-27 patches, more); models whose q/k pass
# through a norm (Qwen3 q_norm/k_norm, StableLM qk_layernorm) or with larger inits (CLIP, SigLIP)
# need 1.6-4.5.
FACTORS.update(dict.fromkeys(ZOO_MORE, PEAK))
FACTORS.update(xlm_roberta=16, megatron_bert=16, roformer=16, mpnet=14, deberta_v2=16,
               modernbert=14, gemma=14, gemma2=28, phi3=14, starcoder2=14, qwen3=1.75, olmo=14,
               stablelm=1.6, granite=10, mbart=14, pegasus=28, marian=32, blenderbot=14,
               whisper=20, deit=18, beit=16, swin=22, dinov2=16, clip_vision=4.5,
               siglip_vision=2.2, clip_text=3.5, wav2vec2=14, hubert=15)
SIGLIP_HEAD_PEAK = 3.0   # extra q/k scale of SigLIP's pooling head (probe query)


def build_more(name: str, attn_implementation: str = "sdpa") -> ZooEntry:
    """Build entry `name` ("sdpa" or "eager"; eager-only models ignore the request)."""
    if name not in ZOO_MORE:
        raise KeyError(f"unknown zoo model {name!r}; expected one of {', '.join(ZOO_MORE)}")
    if attn_implementation not in IMPLS:
        raise ValueError(f"unknown attn_implementation {attn_implementation!r}; "
                         f"expected one of {IMPLS}")
    return ZOO_MORE[name](attn_implementation)


# ------------------------------------------------------------------------- independent checks
_SDPA = torch.nn.functional.scaled_dot_product_attention
_MHA = torch.nn.functional.multi_head_attention_forward
_SOFTMAX = (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def _sdpa_weights(*args, **kwargs) -> torch.Tensor:
    """The softmax weights an SDPA call computes (GQA/MQA keys repeated)."""
    a = dict(zip(_SDPA_ARGS, args), **kwargs)
    q, k, mask = a["query"], a["key"], a.get("attn_mask")
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = a.get("scale") or q.shape[-1] ** -0.5
    s = (q @ k.transpose(-2, -1)) * scale
    n, m = s.shape[-2:]
    if a.get("is_causal"):
        s = s.masked_fill(~torch.ones(n, m, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return s.softmax(-1)


class _Recorder(torch.overrides.TorchFunctionMode):
    """Per open site: attention calls (softmax / SDPA / F.multi_head_attention_forward), the
    SDPA q/k shapes, the softmax input shape, and the row maxima of the attention weights."""

    def __init__(self) -> None:
        super().__init__()
        self.current: str | None = None
        self.counts: dict[str | None, int] = {}
        self.sdpa: dict[str | None, tuple] = {}
        self.softmax: dict[str | None, tuple] = {}
        self.rowmax: dict[str | None, list[torch.Tensor]] = {}

    def _rows(self, w: torch.Tensor) -> None:
        self.rowmax.setdefault(self.current, []).append(w.detach().amax(-1).flatten())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _SOFTMAX or func is _SDPA or func is _MHA:
            self.counts[self.current] = self.counts.get(self.current, 0) + 1
        if func is _SDPA:
            q, k = (args + (None,))[:2] if len(args) >= 2 else (kwargs["query"], kwargs["key"])
            self.sdpa[self.current] = (tuple(q.shape), tuple(k.shape))
            self._rows(_sdpa_weights(*args, **kwargs))
        elif func in _SOFTMAX:
            self.softmax[self.current] = tuple(args[0].shape)
            self._rows(out)
        elif func is _MHA:   # per-head weights (the module's own are averaged over heads)
            self._rows(func(*args, **{**kwargs, "need_weights": True,
                                      "average_attn_weights": False})[1])
        return out


def count_attention_calls_more(entry: ZooEntry) -> _Recorder:
    """Run the model once with hooks on the expected sites; see `_Recorder`. Key None: calls
    outside every expected site (there must be none)."""
    rec = _Recorder()
    handles = []
    for site in entry.sites:
        mod = entry.model.get_submodule(site.path)

        def enter(m, a, p=site.path):
            rec.current = p

        def leave(m, a, o):
            rec.current = None
        handles += [mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave)]
    try:
        with torch.no_grad(), rec:
            entry.model(**entry.example_inputs)
    finally:
        for h in handles:
            h.remove()
    return rec


def check_sites_more(entry: ZooEntry) -> None:
    """Assert `entry.sites`: calls per site, nothing outside the sites, and (H, Hkv, dh, N, M)
    from the SDPA call (sdpa) or (H, N, M) from the 4-D softmax input (eager)."""
    rec = count_attention_calls_more(entry)
    want = {s.path: s.calls for s in entry.sites}
    assert rec.counts == want, f"{entry.name}: attention calls {rec.counts} != {want}"
    for s in entry.sites:
        mod = entry.model.get_submodule(s.path)
        if isinstance(mod, nn.MultiheadAttention):
            continue
        if s.path in rec.sdpa:
            (_, h, n, dh), (_, hk, m, _) = rec.sdpa[s.path]
            if hk == h:
                hk = h // getattr(mod, "num_key_value_groups", 1)
            got, exp = (h, hk, dh, n, m), (s.heads, s.kv_heads, s.head_dim, s.seq_len,
                                           s.kv_seq_len)
        else:
            shp = rec.softmax[s.path]
            h = shp[1] if len(shp) == 4 else None
            got, exp = (h, shp[-2], shp[-1]), (s.heads, s.seq_len, s.kv_seq_len)
        assert got == exp, f"{entry.name}/{s.path}: {got} != expected {exp}"


def attention_peakedness(entry: ZooEntry) -> dict[str, float]:
    """Median over all softmax rows (all heads, batch rows, calls) of the row max, per site."""
    rec = count_attention_calls_more(entry)
    return {p: torch.cat(v).nanmedian().item() for p, v in rec.rowmax.items() if p is not None}


def _main() -> None:
    """Build every entry (both impls where supported), run it, check sites, peakedness, time."""
    torch.set_num_threads(1)
    total = 0.0
    for name in ZOO_MORE:
        for impl in IMPLS:
            t0 = time.perf_counter()
            e = build_more(name, impl)
            if impl not in e.attn_implementations:
                continue
            with torch.no_grad():
                out = e.model(**e.example_inputs)
            dt = time.perf_counter() - t0
            total += dt
            assert torch.isfinite(out[e.output_key]).all(), f"{name}/{impl}: non-finite output"
            check_sites_more(e)
            peak = attention_peakedness(e)
            print(f"{name:13s} {impl:5s} sites={e.expected_sites} "
                  f"{tuple(out[e.output_key].shape)} {dt * 1e3:7.1f} ms "
                  f"peak={min(peak.values()):.2f}..{max(peak.values()):.2f}")
    print(f"total {total:.2f} s")


if __name__ == "__main__":
    _main()
