"""More Hugging Face model families for the compiler tests (tiny, offline, random weights).

Companion to `tests/zoo_hf.py` (same `ZooEntry` / `ExpectedSite`, same inputs: BATCH=2, N=13,
row 1 padded by PAD=3; seq2seq decoders N=9). 34 builders in `ZOO_MORE`: encoders (xlm-roberta,
megatron-bert, roformer, mpnet, deberta-v2, modernbert), decoders (gemma, gemma2, phi, phi3,
gpt-neox, gpt-j, falcon, bloom, starcoder2, qwen3, olmo, stablelm, cohere, granite), encoder-
decoders (mbart, pegasus, marian, blenderbot, whisper), vision (deit, beit, swin, dinov2,
clip-vision, siglip-vision), CLIP text, speech (wav2vec2, hubert).

`e = build_more("phi3"); e.model(**e.example_inputs)[e.output_key]`.

Files: this module is the import surface (`ZOO_MORE`, `build_more`, the skip reasons, the
independent checks); the builders are in `zoo_hf_more_text.py` (encoders, decoders) and
`zoo_hf_more_seq2seq_vision.py` (encoder-decoders, vision, CLIP text, speech), the shared
helpers (skip reasons, `FACTORS`, `peak_attention`, `_build`) in `zoo_hf_more_base.py`.

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

from zoo_hf import IMPLS, ZooEntry
from zoo_hf_more_base import (ALIBI_SKIP, APPROX_ONLY_SKIPS, BAND_CAUSAL_SKIP, BAND_SKIP,
                              DEBERTA_SKIP, EAGER_ONLY, FACTORS, MPNET_SKIP, PEAK, REL_BIAS_SKIP,
                              RETURNS_WEIGHTS, SOFTCAP_SKIP, SWIN_SKIP, peak_attention)
from zoo_hf_more_text import TEXT_MORE  # first: FACTORS and ZOO_MORE keep the table's order
from zoo_hf_more_seq2seq_vision import SEQ2SEQ_VISION_MORE, SIGLIP_HEAD_PEAK

__all__ = ["ALIBI_SKIP", "APPROX_ONLY_SKIPS", "BAND_CAUSAL_SKIP", "BAND_SKIP", "DEBERTA_SKIP",
           "EAGER_ONLY", "FACTORS", "MPNET_SKIP", "PEAK", "REL_BIAS_SKIP", "RETURNS_WEIGHTS",
           "SIGLIP_HEAD_PEAK", "SOFTCAP_SKIP", "SWIN_SKIP", "ZOO_MORE", "attention_peakedness",
           "build_more", "check_sites_more", "count_attention_calls_more", "peak_attention"]

ZOO_MORE: dict[str, Callable[..., ZooEntry]] = {**TEXT_MORE, **SEQ2SEQ_VISION_MORE}


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
