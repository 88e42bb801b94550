"""Shared helpers of the extra Hugging Face zoo (`tests/zoo_hf_more.py`): the skip reasons, the
q/k scale factors, `peak_attention` (peaked softmax rows) and the builders' common steps
(`_build`, `_entry`, `_pixels`). The builders are in `zoo_hf_more_text.py` and
`zoo_hf_more_seq2seq_vision.py`.
"""
from __future__ import annotations

import torch
from torch import nn

from zoo_hf import IMPLS, SEED, BATCH, ZooEntry, _from_config

EAGER_ONLY = ("eager",)
# q/k scale: scores grow by factor**2. With std-0.02 inits a factor of 4-8 still leaves the rows
# near-uniform at N=13 (median row max 0.2-0.4), hence 12-32.
PEAK = 12.0
# q/k scale per builder, tuned so that `attention_peakedness` (median row max) is ~0.55-0.9 at
# every site: std-0.02 inits need 12-16 (longer rows, 26-27 patches, more); models whose q/k pass
# through a norm (Qwen3 q_norm/k_norm, StableLM qk_layernorm) or with larger inits (CLIP, SigLIP)
# need 1.6-4.5. Filled by the builder modules (PEAK unless tuned).
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
