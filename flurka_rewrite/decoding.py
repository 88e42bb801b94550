"""Token-by-token decoding of a converted causal model with an explicit, fixed-size state.

    state = fr.init_state(model)                          # before the prompt
    logits, state = fr.step(model, state, prompt, start=0)             # prefill
    logits, state = fr.step(model, state, next_ids, start=state.tokens)  # one token at a time

``step`` calls ``model(*args, **kwargs)`` once with the new tokens only; every causal
``FlurkaAttention`` of the model continues from its entry of ``state`` instead of attending
over the whole prefix (``FlurkaAttention.decode``, kernels/recurrent.py): a kernel site keeps
S (m x dv) and z (m), so a token costs the same at any position and the state does not grow;
an exact softmax site (``kernel="softmax"``) keeps its keys and values. Everything else in the
model runs as written, so the model must place the new tokens itself: it has to accept where
they start (``start=state.tokens`` above, for learned or rotary positions). Hugging Face
models generate through their own cache instead: ``bind_kv_cache`` (registered with
passes/install.py on import) hands a rewritten module given a KV cache to
flurka_rewrite/hf_generate.py, which keeps the same states in the cache.

Every attention site must be rewritten: a site that was skipped still runs its original code,
which would see only the new tokens, so ``init_state`` refuses such a model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch.nn as nn

from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.kernels.recurrent import KernelState, KVCache
from flurka_rewrite.kernels.window_decode import WindowState
from flurka_rewrite.passes.install import set_cache_binder


@dataclass
class DecodeState:
    """The recurrent state of a converted causal model: one entry per ``FlurkaAttention``
    (by module path; None before its first token) and the tokens consumed so far."""

    sites: dict[str, KernelState | KVCache | WindowState | None] = field(default_factory=dict)
    tokens: int = 0

    def numel(self) -> int:
        """Elements held by the state's tensors (constant for kernel sites)."""
        return sum(t.numel() for s in self.sites.values() if s is not None
                   for t in s.tensors())


def _sites(model: nn.Module) -> dict[str, FlurkaAttention]:
    return {p: m for p, m in model.named_modules() if isinstance(m, FlurkaAttention)}


def init_state(model: nn.Module) -> DecodeState:
    """An empty ``DecodeState`` for ``model`` (a causal model from ``convert``); raises when
    a site cannot decode with a state (skipped sites, non-causal, low-rank or EVA sites)."""
    sites = _sites(model)
    if not sites:
        raise ValueError("init_state: the model has no FlurkaAttention: pass the model "
                         "returned by flurka_rewrite.convert")
    report = getattr(model, "flurka_report", None)
    skipped = [r.path for r in getattr(report, "skipped", [])]
    if skipped:
        raise ValueError(f"init_state: {len(skipped)} attention site(s) were not rewritten "
                         f"({', '.join(skipped[:3])}); their original code would see only the "
                         "new tokens. Decode by running the whole sequence, or convert so that "
                         "every site is rewritten")
    for path, m in sites.items():
        why = m.decode_refusal()
        if why is not None:
            raise ValueError(f"init_state: {path} cannot decode with a state ({why}); only "
                             "causal kernel sites (with or without a window) and exact "
                             "softmax sites can")
    return DecodeState(sites={p: None for p in sites})


@contextlib.contextmanager
def _continuing(model: nn.Module, state: DecodeState) -> Iterator[list[int]]:
    """While inside, each FlurkaAttention reads and replaces its entry of ``state``."""
    sites = _sites(model)
    if set(sites) != set(state.sites):
        raise ValueError("step: this state belongs to another model (its sites differ); make "
                         "one with init_state(model)")
    seen: list[int] = []
    called: set[str] = set()

    def hook_for(path: str):
        def hook(attn: FlurkaAttention, q, k, v, attn_mask, key_padding_mask):
            if path in called:
                raise ValueError(f"step: {path} ran twice in one call (a shared layer); its "
                                 "state cannot tell the calls apart")
            called.add(path)
            out, state.sites[path] = attn.decode(q, k, v, state.sites[path], attn_mask,
                                                 key_padding_mask)
            seen.append(k.shape[-2])
            return out
        return hook

    try:
        for path, m in sites.items():
            m.decode_hook = hook_for(path)
        yield seen
    finally:
        for m in sites.values():
            m.decode_hook = None


def step(model: nn.Module, state: DecodeState, *args: Any, **kwargs: Any
         ) -> tuple[Any, DecodeState]:
    """Run ``model(*args, **kwargs)`` on new tokens only, every site continuing from
    ``state``: (the model's output, the state after them). ``state`` is updated in place and
    returned. The model must be given where the new tokens start (module docstring)."""
    if model.training:
        raise ValueError("step: call model.eval() first (decoding uses no dropout and no "
                         "feature redraws)")
    with _continuing(model, state) as seen:
        out = model(*args, **kwargs)
    if not seen:
        raise ValueError("step: the model ran no FlurkaAttention on these inputs")
    if len(set(seen)) != 1:
        raise ValueError("step: the sites saw different numbers of new tokens "
                         f"{sorted(set(seen))}")
    state.tokens += seen[0]
    return out, state


def bind_kv_cache(module: nn.Module, cache: Any, args: tuple, kwargs: dict
                  ) -> contextlib.AbstractContextManager[None]:
    """The cache binder of passes/install.py: a rewritten module called with a KV cache
    (Hugging Face ``generate``) continues its sites from states kept in that cache
    (flurka_rewrite/hf_generate.py, imported here so that transformers stays optional)."""
    try:
        from flurka_rewrite.hf_generate import bind
    except ImportError as e:  # a cache-like object without transformers
        raise RuntimeError(f"{type(module).__name__} was given a KV cache "
                           f"({type(cache).__name__}) but transformers cannot be imported "
                           f"({e}); call it without a cache") from e
    return bind(module, cache, args, kwargs)


set_cache_binder(bind_kv_cache)
