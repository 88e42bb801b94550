"""Extra Hugging Face zoo, models with two stacks or non-text inputs (`tests/zoo_hf_more.py`
assembles `ZOO_MORE`): encoder-decoders (mbart, pegasus, marian, blenderbot, whisper), vision
(deit, beit, swin, dinov2, clip-vision, siglip-vision), CLIP text, speech (wav2vec2, hubert).
"""
from __future__ import annotations

from typing import Callable

import torch
import transformers as tf

from zoo_hf import (BATCH, DEC_SEQ, LAYERS, SEED, SEQ, VOCAB, ExpectedSite, ZooEntry,
                    _dec_sites, _enc_sites, _seq2seq_inputs, _text_inputs)
from zoo_hf_more_base import (FACTORS, PEAK, REL_BIAS_SKIP, SWIN_SKIP, _build, _entry, _pixels,
                              _randomize, peak_attention)

SIGLIP_HEAD_PEAK = 3.0   # extra q/k scale of SigLIP's pooling head (probe query)


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


SEQ2SEQ_VISION_MORE: dict[str, Callable[..., ZooEntry]] = {
    "mbart": mbart, "pegasus": pegasus, "marian": marian, "blenderbot": blenderbot,
    "whisper": whisper,
    "deit": deit, "beit": beit, "swin": swin, "dinov2": dinov2, "clip_vision": clip_vision,
    "siglip_vision": siglip_vision, "clip_text": clip_text,
    "wav2vec2": wav2vec2, "hubert": hubert,
}
FACTORS.update(dict.fromkeys(SEQ2SEQ_VISION_MORE, PEAK))
FACTORS.update(mbart=14, pegasus=28, marian=32, blenderbot=14, whisper=20, deit=18, beit=16,
               swin=22, dinov2=16, clip_vision=4.5, siglip_vision=2.2, clip_text=3.5,
               wav2vec2=14, hubert=15)
