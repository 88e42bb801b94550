"""Hugging Face ``generate()`` with ``use_cache=True`` on a converted causal LM.

A rewritten attention module that is given a KV cache (passes/install.py calls ``bind``
around its call) keeps, in place of its keys and values, the recurrent state of each of its
``FlurkaAttention`` sites (kernels/recurrent.py): S, z and the log scale c in fp32 for a
kernel site (and, with a window, the last w - 1 keys and values: kernels/window_decode.py), the
keys and values for an exact softmax site. The state lives in the cache
``generate`` creates, as the layer ``FlurkaStateLayer`` (a transformers ``CacheLayerMixin``)
at the module's ``layer_idx`` (or its attention child's, for a unit captured at the decoder
layer): the empty ``DynamicLayer`` there is replaced by one on the module's first call. So:

* the prefill runs the whole-sequence forward (the chunked causal kernel, as without a
  cache) and keeps its final state (``recurrent.causal_state``); every later call runs one
  recurrent step per token (``FlurkaAttention.decode``); ``get_seq_length`` counts the
  tokens consumed (padding included, as a ``DynamicLayer`` does), so positions and masks
  come out right;
* beam search and contrastive search reorder or repeat the state through the cache's own
  ``reorder_cache`` / ``batch_select_indices`` / ``batch_repeat_interleave``;
* sites that were not rewritten (skipped, or excluded with ``filter_fn``) run their original
  code, which calls ``cache.update`` on its own ``DynamicLayer``: both kinds share one cache;
* left padding: the module's mask (B, 1, n, T) marks padded keys; its last n columns are read
  for the n new keys, which then stay out of the state as the whole-sequence forward keeps
  them out.

A call that cannot be continued exactly is not bound: attention classes not verified here
(``VERIFIED``), caches whose layer at that index is not an empty ``DynamicLayer`` (static,
sliding-window, quantized caches; a cache filled by the original model), sites without a
recurrent form (non-causal, low-rank, EVA) and training mode. Such a module runs as before
(a plain forward with a fresh cache still works) and the next call with the same cache raises
the capture guard's ``RuntimeError`` ("... use_cache=False") with the reason. Rolling the
state back (``crop``: assisted decoding) raises too.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from flurka_rewrite.kernels.attention import MASKED_BELOW, FlurkaAttention
from flurka_rewrite.kernels.recurrent import KernelState, KVCache, causal_state
from flurka_rewrite.kernels.window_decode import WindowState, window_prefill_state
from flurka_rewrite.passes.install import signature

# Attention classes whose cached generation is checked against full recomputation
# (tests/test_generate_hf.py). Others keep the refusal: use_cache=False.
VERIFIED = frozenset({
    "GPT2Attention", "LlamaAttention", "MistralAttention", "Qwen2Attention",
    "Phi3Attention", "GPTNeoXAttention", "OPTAttention", "FalconAttention",
})

SiteState = KernelState | KVCache | WindowState


class FlurkaStateLayer(CacheLayerMixin):
    """The cache layer of a rewritten attention module: one recurrent state per
    ``FlurkaAttention`` site (by child name) and the number of tokens consumed. Its memory
    does not grow with the tokens for kernel sites (``numel``)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.states: dict[str, SiteState] = {}
        self.cumulative_length = 0
        self.device: torch.device | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        raise RuntimeError("this cache layer holds the recurrent state of a flurka-rewrite "
                           "site, not keys and values: cache.update was called for it (two "
                           "modules with the same layer_idx?)")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def numel(self) -> int:
        """Elements held by the states' tensors."""
        return sum(t.numel() for s in self.states.values() for t in s.tensors())

    def _map(self, fn: Any) -> None:
        self.states = {name: s.map(fn) for name, s in self.states.items()}

    def reset(self) -> None:
        self.states, self.cumulative_length, self.is_initialized = {}, 0, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.device is not None:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise RuntimeError("a flurka-rewrite recurrent state cannot be rolled back (crop): "
                               "it holds sums over the tokens, not the tokens; assisted or "
                               "speculative decoding needs use_cache=False")


def state_numel(cache: Any) -> int:
    """Elements held by the recurrent states of ``cache``'s rewritten layers."""
    return sum(layer.numel() for layer in getattr(cache, "layers", [])
               if isinstance(layer, FlurkaStateLayer))


class NotBound(Exception):
    """Why a module's call is not bound to the cache (it then runs as before conversion:
    the capture's guard accepts the cache once while empty, and names this reason when it
    refuses the next call)."""


def _attention_of(module: nn.Module) -> nn.Module:
    """The attention module that holds the ``layer_idx``: ``module`` itself, or, for a unit
    captured one level up (a decoder layer), its one descendant with a ``layer_idx``."""
    if isinstance(getattr(module, "layer_idx", None), int):
        return module
    holders = [m for m in module.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    if len({m.layer_idx for m in holders}) != 1:
        raise NotBound("the module has no single layer_idx to find its cache layer")
    return holders[0]


def _layer(idx: int, cache: Any) -> FlurkaStateLayer:
    """The ``FlurkaStateLayer`` at ``idx`` in ``cache``, put in place of an empty
    ``DynamicLayer`` on the first call."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        raise NotBound(f"the cache is a {type(cache).__name__}, not a Cache with one layer "
                       "per decoder layer (an encoder-decoder cache?)")
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while len(layers) <= idx and replicate is DynamicLayer:  # a DynamicCache without config
        layers.append(DynamicLayer())
    if idx >= len(layers):
        raise NotBound(f"the cache has {len(layers)} layers")
    layer = layers[idx]
    if isinstance(layer, FlurkaStateLayer):
        return layer
    if type(layer) is not DynamicLayer or layer.get_seq_length() > 0:
        raise NotBound(f"its cache layer is a {type(layer).__name__} holding "
                       f"{layer.get_seq_length()} tokens; a converted site keeps a recurrent "
                       "state and needs an empty DynamicLayer (the default DynamicCache of "
                       "generate(); not a static, sliding-window or quantized cache, nor one "
                       "the original model filled)")
    layers[idx] = FlurkaStateLayer()
    return layers[idx]


def _module_mask(module: nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
    """The ``attention_mask`` the module was called with (None when absent)."""
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    base = getattr(type(module), "_flurka_base", type(module))
    try:
        bound = signature(base.forward).bind(module, *args, **kwargs)
    except TypeError:
        return None
    return bound.arguments.get("attention_mask")


def new_key_keep(mask: Tensor | None, n: int, past: int) -> Tensor | None:
    """(B, n) bool, True = a real key, for the n new keys, from the model's mask over all
    past + n keys: bool (True = attend) or additive, (B, 1, n, T) or (B, T). None: no mask."""
    if mask is None:
        return None
    if mask.shape[-1] != past + n:
        raise RuntimeError(f"the attention mask covers {mask.shape[-1]} keys but the cache "
                           f"holds {past} tokens and {n} are new; masks must span the whole "
                           "sequence so far")
    cols = mask[..., -n:]
    keep = cols if cols.dtype == torch.bool else cols > MASKED_BELOW
    if keep.dim() == 4:
        return keep.all(dim=1)[:, -1]  # the last query sees every real new key
    if keep.dim() != 2:
        raise RuntimeError(f"unexpected attention mask of shape {tuple(mask.shape)}")
    return keep  # not reduced to None when all True: that would wait for the device


def bind(module: nn.Module, cache: Any, args: tuple, kwargs: dict
         ) -> contextlib.AbstractContextManager[None] | None:
    """The context one call of a rewritten module runs in, its sites continuing from the
    state kept in ``cache`` (the cache binder of passes/install.py, registered by
    flurka_rewrite/decoding.py; module docstring), or None when this call cannot be bound:
    the reason is kept on the cache for the guard's error on the next call."""
    base = getattr(type(module), "_flurka_base", type(module))
    sites = {name: m for name, m in module.named_modules() if isinstance(m, FlurkaAttention)}
    try:
        holder = _attention_of(module)
        kind = getattr(type(holder), "_flurka_base", type(holder)).__name__
        if kind not in VERIFIED:
            raise NotBound(f"cached generation is not verified for {kind} "
                           f"(verified: {', '.join(sorted(VERIFIED))})")
        if not sites:
            raise NotBound("the module holds no FlurkaAttention")
        for name, m in sites.items():
            why = m.decode_refusal()
            if why is not None:
                raise NotBound(f"its site {name} cannot continue from a state: {why}")
        if module.training:
            raise NotBound("the model is in training mode")
        layer = _layer(holder.layer_idx, cache)
    except NotBound as e:
        cache.__dict__["_flurka_why"] = f"{base.__name__}: {e}"
        return None
    return _bound(module, layer, sites, _module_mask(module, args, kwargs))


@contextlib.contextmanager
def _bound(module: nn.Module, layer: FlurkaStateLayer, sites: dict[str, FlurkaAttention],
           mask: Tensor | None) -> Iterator[None]:
    """While inside, each site of ``module`` continues from its state in ``layer``: a
    prefill (the layer is empty) runs the whole-sequence forward and keeps its final state,
    a later call continues from the state (``FlurkaAttention.decode``)."""
    past = layer.cumulative_length
    seen: list[int] = []
    called: set[str] = set()
    keeps: dict[int, Tensor | None] = {}

    def hook_for(name: str):
        def hook(attn: FlurkaAttention, q: Tensor, k: Tensor, v: Tensor, attn_mask: Any,
                 key_padding_mask: Any) -> Tensor:
            if name in called:
                raise RuntimeError(f"{type(module).__name__}: site {name} ran twice in one "
                                   "call; its state cannot tell the calls apart")
            called.add(name)
            n, state = k.shape[-2], layer.states.get(name)
            if n not in keeps:  # the same for every site of the module
                keeps[n] = new_key_keep(mask, n, past)
            keep = keeps[n]
            if past == 0:
                attn.decode_hook = None  # the whole-sequence forward, as without a cache
                try:
                    out = attn(q, k, v, attn_mask, key_padding_mask=key_padding_mask)
                finally:
                    attn.decode_hook = hook
                layer.states[name] = prefill_state(attn, k, v, keep)
            elif state is None:
                raise RuntimeError(f"{type(module).__name__}: site {name} has no state after "
                                   f"{past} tokens (it did not run in an earlier call)")
            else:
                out, layer.states[name] = attn.decode(q, k, v, state, keep=keep)
            layer.device, layer.is_initialized = q.device, True
            seen.append(n)
            return out
        return hook

    try:
        for name, m in sites.items():
            m.decode_hook = hook_for(name)
        yield
    finally:
        for m in sites.values():
            m.decode_hook = None
    if len(set(seen)) != 1:
        raise RuntimeError(f"{type(module).__name__}: its sites saw "
                           f"{sorted(set(seen)) or 'no'} new tokens in one call")
    layer.cumulative_length = past + seen[0]


def prefill_state(attn: FlurkaAttention, k: Tensor, v: Tensor, keep: Tensor | None
                  ) -> SiteState:
    """The state after a prefill of k, v (B, Hkv, n, d) whose outputs the whole-sequence
    forward computed (keep (B, n): the real keys)."""
    if attn.feature_map is None:
        return KVCache(k=k, v=v, keep=keep)
    if getattr(attn, "window", None) is not None:
        return window_prefill_state(attn.feature_map, k, v, keep, attn.window)
    phi_k, log_scale = attn.feature_map.causal_key_features(
        k, None if keep is None else keep[:, None, :, None])
    return causal_state(phi_k, v, key_log_scale=log_scale, key_keep=keep)
