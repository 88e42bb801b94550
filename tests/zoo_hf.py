"""Hugging Face model zoo for the compiler tests: tiny models built offline from configs.

Each builder makes a seeded random-weight `.eval()` model from its transformers 5.x config class
(no downloads) and returns a `ZooEntry`: example inputs and one `ExpectedSite` per attention
*module* (path, causal, cross, rewritable or skipped and why, calls per forward, H/Hkv/dh/N/M).
`entry = build("llama", attn_implementation="eager"); entry.model(**entry.example_inputs)`.
ALBERT shares one module across its layers: one site, `calls=2`. `check_sites(entry)` verifies the
sites independently. Capture notes: docs/internal/hf_graphs.md. `python tests/zoo_hf.py` checks all.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
from torch import nn
import transformers as tf

SEED = 0
BATCH = 2
SEQ = 13          # encoder / decoder-only sequence length (not a power of two)
DEC_SEQ = 9       # BART / T5 decoder length, != SEQ so cross-attention has M != N
PAD = 3           # sequence 1 is padded at the end by this many tokens
VOCAB = 120
IMPLS = ("sdpa", "eager")

CAUSAL_SKIP_DK = "causal: kernel-only attention (prefix sums), dk not applied"
T5_SKIP = "additive relative position bias (T5) enters the scores; FLuRKA cannot represent it"
T5_CROSS_SKIP = "additive position_bias input on the scores (T5 cross-attention; zeros in practice)"


@dataclasses.dataclass(frozen=True)
class ExpectedSite:
    """One attention module the compiler must find.

    path: module path of the attention module whose forward computes softmax(QK^T)V.
    rewritable: True if the compiler should rewrite it; False -> skipped with `reason`.
    reason: why it is skipped (rewritable=False), or a note on how it is rewritten (e.g. causal).
    calls: how many times the module runs per forward (ALBERT shares one module).
    heads, kv_heads, head_dim, seq_len (N, queries), kv_seq_len (M, keys): the SiteReport values
    expected on the zoo's example inputs.
    """

    path: str
    causal: bool = False
    cross: bool = False
    rewritable: bool = True
    reason: str | None = None
    calls: int = 1
    heads: int = 3
    kv_heads: int = 3
    head_dim: int = 16
    seq_len: int = 13
    kv_seq_len: int = 13


@dataclasses.dataclass
class ZooEntry:
    """A tiny HF model, its example inputs and the sites the compiler must report."""

    name: str
    model: nn.Module
    example_inputs: dict[str, torch.Tensor]
    sites: tuple[ExpectedSite, ...]
    attn_implementation: str
    attn_implementations: tuple[str, ...] = IMPLS
    output_key: str = "last_hidden_state"   # output field to compare before/after conversion
    notes: str = ""

    @property
    def expected_sites(self) -> int:
        """Number of attention sites (modules) the report must list."""
        return len(self.sites)

    @property
    def causal_paths(self) -> list[str]:
        """Module paths of the causal sites."""
        return [s.path for s in self.sites if s.causal]

    @property
    def rewritable_paths(self) -> list[str]:
        """Module paths of the sites the compiler should rewrite."""
        return [s.path for s in self.sites if s.rewritable]

    @property
    def skipped_paths(self) -> list[str]:
        """Module paths of the sites the compiler must report as skipped."""
        return [s.path for s in self.sites if not s.rewritable]


# ----------------------------------------------------------------------------------- inputs
def _ids(n: int = SEQ, vocab: int = VOCAB, low: int = 3) -> torch.Tensor:
    """Random token ids (BATCH, n) avoiding the low special ids (pad/bos/eos)."""
    g = torch.Generator().manual_seed(SEED + n)
    return torch.randint(low, vocab, (BATCH, n), generator=g)


def _mask(n: int = SEQ) -> torch.Tensor:
    """Padding mask (BATCH, n): sequence 1 padded at the end by PAD tokens."""
    m = torch.ones(BATCH, n, dtype=torch.long)
    m[1, n - PAD:] = 0
    return m


def _text_inputs(pad_id: int = 0, n: int = SEQ) -> dict[str, torch.Tensor]:
    """input_ids with pad tokens where the mask is 0, and the mask."""
    ids, mask = _ids(n), _mask(n)
    ids = ids.masked_fill(mask == 0, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def _from_config(cls: type, config, impl: str) -> nn.Module:
    """Seeded random-weight model in eval mode with the chosen attention implementation."""
    torch.manual_seed(SEED)
    return cls._from_config(config, attn_implementation=impl).eval()


def _enc_sites(prefix: str, n: int, leaf: str, **dims) -> tuple[ExpectedSite, ...]:
    """Bidirectional self-attention sites `prefix.{i}.leaf`; dims override ExpectedSite sizes."""
    return tuple(ExpectedSite(f"{prefix}.{i}.{leaf}", **dims) for i in range(n))


def _dec_sites(prefix: str, n: int, leaf: str, **dims) -> tuple[ExpectedSite, ...]:
    """Causal self-attention sites `prefix.{i}.leaf` (rewritten kernel-only)."""
    return tuple(ExpectedSite(f"{prefix}.{i}.{leaf}", causal=True, reason=CAUSAL_SKIP_DK, **dims)
                 for i in range(n))


GQA = dict(heads=4, kv_heads=2, head_dim=12)     # Llama family: H=4, Hkv=2, dh=12


LAYERS = 2
BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=LAYERS, num_attention_heads=3,
                 intermediate_size=64, max_position_embeddings=40, type_vocab_size=2)


# ----------------------------------------------------------------------------------- encoders
def bert(attn_implementation: str = "sdpa") -> ZooEntry:
    """BertModel, H=3, dh=16: 2 bidirectional self-attention sites (BertSelfAttention)."""
    cfg = tf.BertConfig(**BERT_LIKE)
    inputs = _text_inputs(cfg.pad_token_id)
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    return ZooEntry("bert", _from_config(tf.BertModel, cfg, attn_implementation), inputs,
                    _enc_sites("encoder.layer", LAYERS, "attention.self"), attn_implementation)


def roberta(attn_implementation: str = "sdpa") -> ZooEntry:
    """RobertaModel (pad id 1, positions offset by pad+1): 2 self-attention sites."""
    cfg = tf.RobertaConfig(**{**BERT_LIKE, "max_position_embeddings": SEQ + 4}, pad_token_id=1)
    return ZooEntry("roberta", _from_config(tf.RobertaModel, cfg, attn_implementation),
                    _text_inputs(1), _enc_sites("encoder.layer", LAYERS, "attention.self"),
                    attn_implementation)


def distilbert(attn_implementation: str = "sdpa") -> ZooEntry:
    """DistilBertModel: 2 self-attention sites (DistilBertSelfAttention, `q_lin/k_lin/v_lin`)."""
    cfg = tf.DistilBertConfig(vocab_size=VOCAB, dim=48, n_layers=LAYERS, n_heads=3, hidden_dim=64,
                              max_position_embeddings=40)
    return ZooEntry("distilbert", _from_config(tf.DistilBertModel, cfg, attn_implementation),
                    _text_inputs(cfg.pad_token_id),
                    _enc_sites("transformer.layer", LAYERS, "attention"), attn_implementation)


def albert(attn_implementation: str = "sdpa") -> ZooEntry:
    """AlbertModel: ONE shared attention module run LAYERS times -> 1 site, calls=2."""
    cfg = tf.AlbertConfig(**BERT_LIKE, embedding_size=24, num_hidden_groups=1, inner_group_num=1)
    site = ExpectedSite("encoder.albert_layer_groups.0.albert_layers.0.attention", calls=LAYERS)
    return ZooEntry("albert", _from_config(tf.AlbertModel, cfg, attn_implementation),
                    _text_inputs(cfg.pad_token_id), (site,), attn_implementation,
                    notes="one module shared by all layers: one site called twice, one E/F")


def electra(attn_implementation: str = "sdpa") -> ZooEntry:
    """ElectraModel (discriminator; embedding 24 projected to 48): 2 self-attention sites."""
    cfg = tf.ElectraConfig(**BERT_LIKE, embedding_size=24)
    return ZooEntry("electra", _from_config(tf.ElectraModel, cfg, attn_implementation),
                    _text_inputs(cfg.pad_token_id),
                    _enc_sites("encoder.layer", LAYERS, "attention.self"), attn_implementation)


def vit(attn_implementation: str = "sdpa") -> ZooEntry:
    """ViTModel, 20x20 image, patch 4 -> 25 patches + CLS = N 26, no mask.

    2 sites `layers.{i}.attention` (5.x ViT: q_proj/k_proj/v_proj/o_proj)."""
    cfg = tf.ViTConfig(image_size=20, patch_size=4, num_channels=3, hidden_size=48,
                       num_hidden_layers=LAYERS, num_attention_heads=3, intermediate_size=64)
    g = torch.Generator().manual_seed(SEED)
    inputs = {"pixel_values": torch.randn(BATCH, 3, 20, 20, generator=g)}
    return ZooEntry("vit", _from_config(tf.ViTModel, cfg, attn_implementation), inputs,
                    _enc_sites("layers", LAYERS, "attention", seq_len=26, kv_seq_len=26),
                    attn_implementation)


# ----------------------------------------------------------------------------------- decoders
GPT2_CFG = dict(vocab_size=VOCAB, n_positions=40, n_embd=48, n_layer=LAYERS, n_head=3,
                bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)


def gpt2(attn_implementation: str = "sdpa") -> ZooEntry:
    """GPT2Model: 2 causal sites `h.{i}.attn`; q/k/v from ONE fused Conv1D `c_attn` then split."""
    cfg = tf.GPT2Config(**GPT2_CFG)
    return ZooEntry("gpt2", _from_config(tf.GPT2Model, cfg, attn_implementation),
                    _text_inputs(cfg.eos_token_id), _dec_sites("h", LAYERS, "attn"),
                    attn_implementation, notes="fused QKV: Conv1D c_attn, W (dm, 3dm), split")


def gpt2_lm(attn_implementation: str = "sdpa") -> ZooEntry:
    """GPT2LMHeadModel with labels (returns logits and loss): 2 causal `transformer.h.{i}.attn`."""
    cfg = tf.GPT2Config(**GPT2_CFG)
    inputs = _text_inputs(cfg.eos_token_id)
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return ZooEntry("gpt2_lm", _from_config(tf.GPT2LMHeadModel, cfg, attn_implementation), inputs,
                    _dec_sites("transformer.h", LAYERS, "attn"), attn_implementation,
                    output_key="logits", notes="also returns `loss` (labels given)")


def _llama_like(cfg_cls: type, **extra) -> object:
    """Llama-family config: H=4, Hkv=2 (GQA, 2 groups), dh=12, RoPE."""
    return cfg_cls(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=LAYERS,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                   max_position_embeddings=64, pad_token_id=0, **extra)


def llama(attn_implementation: str = "sdpa") -> ZooEntry:
    """LlamaForCausalLM, GQA 4/2 + RoPE: 2 causal sites `model.layers.{i}.self_attn`."""
    cfg = _llama_like(tf.LlamaConfig)
    return ZooEntry("llama", _from_config(tf.LlamaForCausalLM, cfg, attn_implementation),
                    _text_inputs(0), _dec_sites("model.layers", LAYERS, "self_attn", **GQA),
                    attn_implementation, output_key="logits",
                    notes="RoPE between k_proj and attention: K chain not position-independent")


def mistral(attn_implementation: str = "sdpa") -> ZooEntry:
    """MistralModel, GQA 4/2 + RoPE, sliding_window=None (plain causal): 2 causal sites."""
    cfg = _llama_like(tf.MistralConfig, sliding_window=None)
    return ZooEntry("mistral", _from_config(tf.MistralModel, cfg, attn_implementation),
                    _text_inputs(0), _dec_sites("layers", LAYERS, "self_attn", **GQA),
                    attn_implementation,
                    notes="sliding_window=None; a window < N makes the mask banded, not causal")


def qwen2(attn_implementation: str = "sdpa") -> ZooEntry:
    """Qwen2Model, GQA 4/2 + RoPE, q/k/v projections with bias: 2 causal sites."""
    cfg = _llama_like(tf.Qwen2Config)
    return ZooEntry("qwen2", _from_config(tf.Qwen2Model, cfg, attn_implementation),
                    _text_inputs(0), _dec_sites("layers", LAYERS, "self_attn", **GQA),
                    attn_implementation)


def opt(attn_implementation: str = "sdpa") -> ZooEntry:
    """OPTModel (learned positions offset 2): 2 causal sites `decoder.layers.{i}.self_attn`."""
    cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=LAYERS, ffn_dim=64,
                       num_attention_heads=3, max_position_embeddings=40, word_embed_proj_dim=48)
    return ZooEntry("opt", _from_config(tf.OPTModel, cfg, attn_implementation),
                    _text_inputs(cfg.pad_token_id),
                    _dec_sites("decoder.layers", LAYERS, "self_attn"), attn_implementation)


# ----------------------------------------------------------------------------- encoder-decoder
def _seq2seq_inputs(pad_id: int) -> dict[str, torch.Tensor]:
    """Encoder ids+mask (SEQ, padded) and decoder ids+mask (DEC_SEQ, also padded)."""
    enc = _text_inputs(pad_id, SEQ)
    dec = _text_inputs(pad_id, DEC_SEQ)
    return {**enc, "decoder_input_ids": dec["input_ids"],
            "decoder_attention_mask": dec["attention_mask"]}


def bart(attn_implementation: str = "sdpa") -> ZooEntry:
    """BartModel 2+2 layers: 2 encoder self + 2 decoder causal self + 2 cross = 6 sites."""
    cfg = tf.BartConfig(vocab_size=VOCAB, d_model=48, encoder_layers=LAYERS, decoder_layers=LAYERS,
                        encoder_attention_heads=3, decoder_attention_heads=3, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=40)
    cross = tuple(ExpectedSite(f"decoder.layers.{i}.encoder_attn", cross=True, seq_len=DEC_SEQ)
                  for i in range(LAYERS))
    sites = (_enc_sites("encoder.layers", LAYERS, "self_attn")
             + _dec_sites("decoder.layers", LAYERS, "self_attn",
                          seq_len=DEC_SEQ, kv_seq_len=DEC_SEQ)
             + cross)
    return ZooEntry("bart", _from_config(tf.BartModel, cfg, attn_implementation),
                    _seq2seq_inputs(cfg.pad_token_id), sites, attn_implementation,
                    notes="cross-attention: K/V from encoder output (M=13), Q from decoder (N=9)")


def t5(attn_implementation: str = "sdpa") -> ZooEntry:
    """T5Model 2+2 layers: 6 sites (2 enc self, 2 dec causal self, 2 cross), all skipped."""
    cfg = tf.T5Config(vocab_size=VOCAB, d_model=48, d_kv=16, d_ff=64, num_layers=LAYERS,
                      num_decoder_layers=LAYERS, num_heads=3, relative_attention_num_buckets=8,
                      relative_attention_max_distance=20)
    enc = tuple(ExpectedSite(f"encoder.block.{i}.layer.0.SelfAttention", rewritable=False,
                             reason=T5_SKIP) for i in range(LAYERS))
    dec = tuple(ExpectedSite(f"decoder.block.{i}.layer.0.SelfAttention", causal=True,
                             rewritable=False, reason=T5_SKIP, seq_len=DEC_SEQ, kv_seq_len=DEC_SEQ)
                for i in range(LAYERS))
    cross = tuple(ExpectedSite(f"decoder.block.{i}.layer.1.EncDecAttention", cross=True,
                               rewritable=False, reason=T5_CROSS_SKIP, seq_len=DEC_SEQ)
                  for i in range(LAYERS))
    return ZooEntry("t5", _from_config(tf.T5Model, cfg, attn_implementation),
                    _seq2seq_inputs(cfg.pad_token_id), enc + dec + cross, attn_implementation,
                    notes="cross sites get position_bias = zeros (no learned bias) but it is an "
                          "opaque input from block 1 on; skipping them is the conservative answer")


ZOO: dict[str, Callable[..., ZooEntry]] = {
    "bert": bert, "roberta": roberta, "distilbert": distilbert, "albert": albert,
    "electra": electra, "vit": vit, "gpt2": gpt2, "gpt2_lm": gpt2_lm, "llama": llama,
    "mistral": mistral, "qwen2": qwen2, "opt": opt, "bart": bart, "t5": t5,
}


def build(name: str, attn_implementation: str = "sdpa") -> ZooEntry:
    """Build zoo entry `name` with attention implementation "sdpa" or "eager"."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; expected one of {', '.join(ZOO)}")
    if attn_implementation not in IMPLS:
        raise ValueError(f"unknown attn_implementation {attn_implementation!r}; "
                         f"expected one of {IMPLS}")
    return ZOO[name](attn_implementation)


class _AttnCallCounter(torch.overrides.TorchFunctionMode):
    """Counts softmax and scaled_dot_product_attention calls, attributed to the open site."""

    FUNCS = {torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax,
             torch.nn.functional.scaled_dot_product_attention}

    def __init__(self) -> None:
        super().__init__()
        self.current: str | None = None
        self.counts: dict[str | None, int] = {}
        self.shapes: dict[str | None, tuple] = {}   # site -> (q.shape, k.shape) at SDPA

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FUNCS:
            self.counts[self.current] = self.counts.get(self.current, 0) + 1
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.shapes[self.current] = (tuple(args[0].shape), tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


def count_attention_calls(entry: ZooEntry) -> _AttnCallCounter:
    """Run the model once; count softmax/SDPA calls inside each expected site (None: outside).

    An independent check of `entry.sites`: every site must count exactly `calls` and nothing may
    be counted outside the sites (key None). With sdpa, `.shapes` holds each site's q/k shapes
    (B, H, N, dh) / (B, H or Hkv, M, dh)."""
    counter = _AttnCallCounter()
    handles = []
    for site in entry.sites:
        mod = entry.model.get_submodule(site.path)

        def enter(m, a, p=site.path):
            counter.current = p

        def leave(m, a, o):
            counter.current = None
        handles += [mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave)]
    try:
        with torch.no_grad(), counter:
            entry.model(**entry.example_inputs)
    finally:
        for h in handles:
            h.remove()
    return counter


def check_sites(entry: ZooEntry) -> None:
    """Assert `entry.sites` against the running model: call counts per site, nothing outside the
    sites, and (sdpa only) (H, Hkv, dh, N, M) read from the SDPA call."""
    counter = count_attention_calls(entry)
    want = {s.path: s.calls for s in entry.sites}
    assert counter.counts == want, f"{entry.name}: attention calls {counter.counts} != {want}"
    for s in entry.sites if entry.attn_implementation == "sdpa" else ():
        (_, h, n, dh), (_, _, m, _) = counter.shapes[s.path]
        groups = getattr(entry.model.get_submodule(s.path), "num_key_value_groups", 1)
        got = (h, h // groups, dh, n, m)
        exp = (s.heads, s.kv_heads, s.head_dim, s.seq_len, s.kv_seq_len)
        assert got == exp, f"{entry.name}/{s.path}: (H, Hkv, dh, N, M) = {got}, expected {exp}"


def _main() -> None:
    """Build every entry in both implementations, run one forward pass, check sites, time it."""
    torch.set_num_threads(1)   # 2 intra-op threads on a shared 2-core box are 10-30x slower
    total = 0.0
    for name in ZOO:
        for impl in IMPLS:
            t0 = time.perf_counter()
            e = build(name, impl)
            with torch.no_grad():
                out = e.model(**e.example_inputs)
            dt = time.perf_counter() - t0
            total += dt
            assert torch.isfinite(out[e.output_key]).all(), f"{name}/{impl}: non-finite output"
            check_sites(e)
            print(f"{name:10s} {impl:5s} sites={e.expected_sites} "
                  f"{tuple(out[e.output_key].shape)} {dt * 1e3:7.1f} ms")
    print(f"total {total:.2f} s")


if __name__ == "__main__":
    _main()
