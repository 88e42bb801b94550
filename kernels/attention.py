"""``FlurkaAttention``: the module a rewritten attention site calls.

It owns the new parameters (E, F along the sequence, the feature map's weights or random
features) and computes, for q (B, H, N, dh) and k, v (B, Hkv, M, d):

    kernel="softmax", dk=None   exact attention (the wiring oracle)
    kernel="softmax", dk=int    Linformer: softmax over dk down-sampled keys
    kernel=phi,       dk=None   kernel attention (prefix sums when causal)
    kernel=phi,       dk=int    FLuRKA: low-rank, then kernel

Hoisted form (docs/design.md §3.3): the rewriter down-samples the *layer input* with ``project_kv``,
runs the K/V projections on dk rows, and calls ``forward(..., source_len=M)``.

``window=w`` (any mode but exact): the sliding-window hybrid of ``kernels/window.py``, exact
softmax over the w nearest keys, the mode's kernel (or the dk down-sampled keys) for the rest,
one normaliser, a learnable per-head weight ``kernel_log_weight`` (theta, alpha = exp(theta));
``backend="triton"`` runs its exact band in Triton (``triton_window_ops``), "auto" the reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from flurka_rewrite.kernels.dispatch import (
    BACKENDS,
    attention_core_dispatch,
    window_attention_dispatch,
    fused_lowrank_dispatch,
)
from flurka_rewrite.kernels.feature_maps import PerformerFeatures, build_feature_map
from flurka_rewrite.kernels.registry import (
    SOFTMAX, NameView, check_kernel, feature_map_class, kernel_names,
)
from flurka_rewrite.kernels.recurrent import (
    KernelState, KVCache, causal_continue, empty_state, softmax_continue,
)
from flurka_rewrite.kernels.reference import (
    is_exporting,
    lowrank_bands,
    lowrank_keep,
    lowrank_project,
    softmax_attention,
)
from flurka_rewrite.kernels.window import initial_log_weight
from flurka_rewrite.kernels.window_decode import WindowState, window_continue

# The registered feature maps, then "softmax"; recomputed on use (kernels/registry.py).
KERNELS = NameView(kernel_names)
E_INITS = ("pool", "gaussian")
# An additive mask value at or below this counts as "masked" when reducing a mask to the
# key-padding form (HF uses finfo.min, older BERT code -10000, SDPA users -inf).
MASKED_BELOW = -1000.0


def init_lowrank(dk: int, max_len: int, kind: str, generator: torch.Generator) -> Tensor:
    """(dk, max_len) sequence projection. "gaussian": N(0, 1/dk). "pool": row r averages the
    contiguous block [r*L/dk, (r+1)*L/dk) of positions (dk > L: rows repeat positions)."""
    if kind == "gaussian":
        return torch.randn(dk, max_len, generator=generator) / math.sqrt(dk)
    if kind == "pool":
        E = torch.zeros(dk, max_len)
        for r in range(dk):
            lo = (r * max_len) // dk
            hi = max(lo + 1, ((r + 1) * max_len) // dk)
            E[r, lo:hi] = 1.0 / (hi - lo)
        return E
    raise ValueError(f"unknown e_init {kind!r}; expected one of {', '.join(E_INITS)}")


def check_window(window: int | None, kernel: str, dk: int | None, backend: str) -> None:
    """Refuse a window that cannot be built: not a positive int, on exact attention (no
    kernel part), or with a custom-attention kernel without a windowed form (EVA has one:
    kernels/eva_window.py). Any backend: "triton" runs the exact band in Triton
    (kernels/triton_window_ops.py), "auto" the reference (EVA: the reference only)."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int or None; got {window!r}")
    if kernel == SOFTMAX and dk is None:
        raise ValueError("window needs a kernel part: kernel='softmax' with dk=None is exact "
                         "attention over every key already; use window=None, a feature map "
                         "or a dk")
    cls = feature_map_class(kernel) if kernel in kernel_names() else None
    if cls is not None and not cls.has_window_form():
        raise ValueError(f"window= does not combine with kernel {kernel!r}: it computes its own "
                         "attention and has no windowed form; use window=None")


class FlurkaAttention(nn.Module):
    """FLuRKA attention for one site. See the module docstring for the modes."""

    def __init__(
        self,
        *,
        kernel: str,
        heads: int,
        head_dim: int,
        kv_heads: int | None = None,
        dk: int | None = None,
        max_seq_len: int | None = None,
        num_features: int | None = None,
        scale: float | None = None,
        causal: bool = False,
        dropout: float = 0.0,
        e_init: str = "pool",
        seed: int = 0,
        redraw_interval: int | None = 1000,
        backend: str = "auto",
        eps: float = 1e-6,
        chunk_size: int = 64,
        window: int | None = None,
        eva_chunk: int | None = None,
    ) -> None:
        super().__init__()
        kv_heads = kv_heads or heads
        check_kernel(kernel)
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if dk is not None:
            if causal:
                raise ValueError("dk must be None on a causal site: low-rank projection along "
                                 "the sequence mixes future tokens into every key")
            if not isinstance(dk, int) or dk < 1:
                raise ValueError(f"dk must be a positive int or None; got {dk!r}")
            if not max_seq_len or max_seq_len < 1:
                raise ValueError("a low-rank layer (dk set) needs max_seq_len, the longest key "
                                 "sequence it will see")
        check_window(window, kernel, dk, backend)
        if window is not None and eva_chunk is not None:
            raise ValueError("eva_chunk sets EVA's own exact local chunk, which window= replaces "
                             "(the window is the exact local part); pass one of them")
        self.window = window
        self.kernel, self.heads, self.kv_heads, self.head_dim = kernel, heads, kv_heads, head_dim
        self.dk, self.max_seq_len, self.causal = dk, max_seq_len, causal
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        self.dropout, self.e_init, self.seed, self.backend = dropout, e_init, seed, backend
        self.eps, self.chunk_size = eps, chunk_size
        g = torch.Generator().manual_seed(seed)
        if dk is not None:
            self.E = nn.Parameter(init_lowrank(dk, max_seq_len, e_init, g))
            self.F = nn.Parameter(init_lowrank(dk, max_seq_len, e_init, g))
            # Fixed support: a pool E stays block-structured while it trains.
            self.register_buffer("E_support", (self.E.detach() != 0).float(), persistent=True)
            # A dense (gaussian) E needs no masking: skip the (dk, M_max) product per call.
            self._dense = bool(self.E_support.all())
            # Block structure of a pool E: project band by band (same result, fewer FLOPs).
            self._bands = lowrank_bands(self.E_support)
        else:
            self.E = self.F = None
            self._dense, self._bands = True, None
        self._keep_cache: dict[tuple[int, torch.device], Tensor | None] = {}
        self.feature_map = (
            None if kernel == SOFTMAX else build_feature_map(
                kernel, head_dim=head_dim, kv_heads=kv_heads, num_features=num_features,
                scale=self.scale, seed=seed, redraw_interval=redraw_interval,
                eva_chunk=eva_chunk)
        )
        # theta_h, the log of the kernel part's weight per query head (kernels/window.py)
        self.kernel_log_weight = None if window is None else nn.Parameter(
            torch.full((heads,), initial_log_weight(self.feature_map)))
        if self.feature_map is not None and self.feature_map.custom_attention:  # EVA
            if backend == "triton":
                raise ValueError(f"kernel {kernel!r} has no Triton kernel (it computes its own "
                                 "attention in PyTorch); use backend='torch' or 'auto'")
            if dk is not None:  # local = the down-sampled rows near the query (kernels/eva.py)
                self.feature_map.key_spacing = (dk, max_seq_len)

    @property
    def num_features(self) -> int | None:
        """m, the number of features of the kernel (None for softmax)."""
        return None if self.feature_map is None else self.feature_map.num_features

    def extra_repr(self) -> str:
        return (f"kernel={self.kernel}, dk={self.dk}, heads={self.heads}, "
                f"kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, m={self.num_features}, causal={self.causal}, "
                f"max_seq_len={self.max_seq_len}"
                + ("" if getattr(self, "window", None) is None else f", window={self.window}"))

    # -- masks ---------------------------------------------------------------------------
    def key_keep(self, attn_mask: Tensor | None, kv_len: int) -> Tensor | None:
        """Reduce an SDPA-style mask (bool True=attend, or additive float), broadcastable to
        (B, H, N, M), to a key-padding mask (B, M) bool, True = real key. Kernel and low-rank
        attention can represent key padding (and causality) only; a mask that varies across
        queries in another way raises."""
        if attn_mask is None:
            return None
        keep = attn_mask if attn_mask.dtype == torch.bool else attn_mask > MASKED_BELOW
        if keep.dim() < 2 or keep.shape[-1] != kv_len:
            raise ValueError(f"attention mask of shape {tuple(attn_mask.shape)} does not end in "
                             f"the key length {kv_len}")
        while keep.dim() < 4:
            keep = keep[None]
        keep = keep.all(dim=1)  # (B, N or 1, M): a key masked for one head is masked
        if self.causal:
            row = keep[:, -1]  # the last query sees every earlier key: its row is the padding
        else:
            row = keep[:, 0]
            if keep.shape[1] > 1 and not is_exporting() and not torch.equal(
                    keep, row[:, None].expand_as(keep)):
                raise ValueError(
                    "this attention mask varies across queries, which kernel/low-rank attention "
                    "cannot represent (only key padding and causality); use kernel='softmax', "
                    "dk=None for this site or exclude it with filter_fn")
        return row

    # -- hoisted down-sampling -----------------------------------------------------------
    def _proj(self, which: str) -> Tensor:
        """E ("k") or F ("v") restricted to its fixed support: (dk, M_max)."""
        if which not in ("k", "v"):
            raise ValueError(f"which must be 'k' or 'v'; got {which!r}")
        P = self.E if which == "k" else self.F
        if P is None:
            raise RuntimeError("project_kv needs a low-rank layer (dk set); this one has dk=None")
        return P if self._dense else P * self.E_support

    def project_kv(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, which: str,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Hoisted K or V projection: E (X W^T + 1 b^T) computed as (E X) W^T + (E 1) b^T.

        x (B, M, dm), weight (out, dm), bias (out,) -> (B, dk, out). Padded rows of X (and of
        the ones vector) are zeroed first."""
        out = F.linear(self.down_project(x, which, key_padding_mask), weight)
        if bias is not None:
            out = out + self.row_sums(x, which, key_padding_mask) * bias
        return out

    def down_project(self, x: Tensor, which: str, key_padding_mask: Tensor | None = None
                     ) -> Tensor:
        """E X ("k") or F X ("v"): x (B, M, dm) -> (B, dk, dm), padded rows zeroed first."""
        return lowrank_project(x, self._proj(which), key_padding_mask, bands=self._bands)

    def row_sums(self, x: Tensor, which: str, key_padding_mask: Tensor | None = None
                 ) -> Tensor:
        """E 1, the row sums of E (or F) over the real positions of x's sequence: (B, dk, 1)."""
        ones = x.new_ones(x.shape[0], x.shape[-2], 1)
        return lowrank_project(ones, self._proj(which), key_padding_mask)

    def fix_bias(self, y: Tensor, x: Tensor, bias: Tensor | None, which: str,
                 key_padding_mask: Tensor | None = None) -> Tensor:
        """A projection module applied to E X adds b once per row; E (X W^T + 1 b^T) needs
        (E 1) b^T: y (B, dk, out) + (E 1 - 1) b^T (the hoisted path through a module call,
        so that a module swapped in later, e.g. PEFT's LoRA, takes effect)."""
        if bias is None:
            return y
        return y + (self.row_sums(x, which, key_padding_mask) - 1) * bias

    def _lowrank_keep(self, M: int, keep: Tensor | None, batch: int) -> Tensor | None:
        """``lowrank_keep`` on the fixed support; without padding it depends on M only, so it
        is cached per (M, device) (a (dk, M) pass per call otherwise)."""
        if keep is not None or is_exporting():
            return lowrank_keep(self.E_support, self.E_support, M, keep, batch)
        key = (M, self.E_support.device)
        if key not in self._keep_cache:
            self._keep_cache[key] = lowrank_keep(self.E_support, self.E_support, M, None, 1)
        rows = self._keep_cache[key]
        return None if rows is None else rows.expand(batch, -1)

    # -- decoding with a recurrent state (kernels/recurrent.py) --------------------------
    def decode_refusal(self) -> str | None:
        """Why this site cannot continue from a recurrent state (None when it can)."""
        fm = self.feature_map
        return ("it is not causal" if not self.causal else
                "it has a low-rank projection" if self.dk is not None else
                f"kernel {self.kernel!r} has no recurrent form"
                if fm is not None and fm.custom_attention else
                f"its stabilised kernel {self.kernel!r} has no fixed key shift for a window"
                if getattr(self, "window", None) is not None and fm is not None
                and fm.causal_stabilized and not isinstance(fm, PerformerFeatures) else None)

    def decode(self, q: Tensor, k: Tensor, v: Tensor,
               state: KernelState | KVCache | WindowState | None,
               attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None,
               *, keep: Tensor | None = None
               ) -> tuple[Tensor, KernelState | KVCache | WindowState]:
        """Causal attention of n new tokens continuing from ``state`` (None before the first
        token): (out (B, H, n, dv), the new state: a fixed-size ``KernelState`` for a kernel
        site, a ``WindowState`` (bounded by the window) for a windowed one, a ``KVCache`` for
        an exact softmax one). ``attn_mask`` (over the n new keys
        only) and ``key_padding_mask`` / ``keep`` ((B, n) bool, True = real key) may only
        mark padded keys, which are left out of the state as the whole-sequence forward
        leaves them out."""
        why = self.decode_refusal()
        if why is not None:
            raise ValueError(f"decode: this FlurkaAttention cannot continue from a state: {why}")
        for extra in (self.key_keep(attn_mask, k.shape[-2]) if attn_mask is not None else None,
                      key_padding_mask):
            if extra is not None:
                keep = extra.bool() if keep is None else keep & extra.bool()
        if self.feature_map is None:
            return softmax_continue(q, k, v, state, scale=self.scale, key_keep=keep)
        fm = self.feature_map
        if getattr(self, "window", None) is not None:  # kernels/window_decode.py
            return window_continue(q, k, v, state, feature_map=fm,
                                   log_weight=self.kernel_log_weight, scale=self.scale,
                                   window=self.window, key_keep=keep,
                                   chunk_size=self.chunk_size)
        kmask = None if keep is None else keep[:, None, :, None]
        phi_k, log_scale = fm.causal_key_features(k, kmask)
        phi_q = fm(q, is_query=True)
        if state is None:
            state = empty_state(k.shape[0], k.shape[1], phi_k.shape[-1], v.shape[-1], q.device)
        out, state = causal_continue(phi_q, phi_k, v, state, key_log_scale=log_scale,
                                     key_keep=keep, eps=self.eps, chunk_size=self.chunk_size)
        return out.to(q.dtype), state

    # -- forward -------------------------------------------------------------------------
    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        source_len: int | None = None,
        window_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """q (B, H, N, dh), k (B, Hkv, M, dh), v (B, Hkv, M, dv) -> (B, H, N, dv).

        attn_mask: SDPA-style mask; exact mode uses it as is, other modes reduce it to key
        padding. key_padding_mask: (B, M) bool, True = real token. source_len: set when k, v
        were already down-sampled by ``project_kv`` from a sequence of that length.
        window_kv: with a window and ``source_len``, the original (B, Hkv, M, d) keys and
        values the window's exact part reads."""
        hook = getattr(self, "decode_hook", None)  # set while decoding (flurka_rewrite/decoding.py)
        if hook is not None:
            return hook(self, q, k, v, attn_mask, key_padding_mask)
        if self.feature_map is not None and self.training:
            step = getattr(self.feature_map, "step", None)
            if step is not None:
                step()
        M = source_len if source_len is not None else k.shape[-2]
        if self.kernel == SOFTMAX and self.dk is None:
            return softmax_attention(
                q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                causal=self.causal, scale=self.scale,
                dropout_p=self.dropout if self.training else 0.0)
        keep = self.key_keep(attn_mask, M)
        if key_padding_mask is not None:
            keep = key_padding_mask.bool() if keep is None else keep & key_padding_mask.bool()
        full = (k, v) if source_len is None else window_kv  # the window's keys and values
        full_keep = keep
        if self.dk is not None and source_len is None and getattr(self, "window", None) is None:
            fused = fused_lowrank_dispatch(self, q, k, v, keep)  # Triton: projection fused
            if fused is not None:
                return fused
        if self.dk is not None:
            if source_len is None:
                k = lowrank_project(k, self._proj("k"), keep, bands=self._bands)
                v = lowrank_project(v, self._proj("v"), keep, bands=self._bands)
            # Empty rows (support only on padding or past M) become masked keys.
            keep = self._lowrank_keep(M, keep, q.shape[0])
        if getattr(self, "window", None) is not None:
            if full is None:
                raise ValueError("a windowed layer called with source_len (hoisted K/V) needs "
                                 "window_kv=(k, v), the keys at full length")
            low = self.dk is not None
            return window_attention_dispatch(
                q, full[0], full[1], backend=self.backend, window=self.window,
                feature_map=self.feature_map, log_weight=self.kernel_log_weight,
                scale=self.scale, causal=self.causal,
                key_padding_mask=full_keep, kernel_k=k if low else None,
                kernel_v=v if low else None, kernel_keep=keep if low else None)
        return attention_core_dispatch(
            q, k, v, feature_map=self.feature_map, key_padding_mask=keep, causal=self.causal,
            scale=self.scale, eps=self.eps, chunk_size=self.chunk_size, backend=self.backend)
