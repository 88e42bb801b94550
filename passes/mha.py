"""Module-level sites: ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``):
the site (``mha_site``, with or without a recorded call) and its replacement.

``FlurkaMultiheadAttention`` takes over the MHA's own parameters (same tensors, same names:
``in_proj_weight``, ``in_proj_bias``, ``out_proj``) and computes attention with a
``FlurkaAttention``; it accepts the MHA call signature and returns ``(output, None)``.
``_qkv_same_embed_dim = False`` keeps ``nn.TransformerEncoderLayer`` off its fused fast path,
which would read the projections directly and bypass this module.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from flurka_rewrite.kernels.attention import MASKED_BELOW, FlurkaAttention

from .legality import fill_mha
from .site import Found, Site


class FlurkaMultiheadAttention(nn.Module):
    """Drop-in replacement of one ``nn.MultiheadAttention`` (weights shared with it)."""

    def __init__(self, mha: nn.MultiheadAttention, attn: FlurkaAttention, hoist: bool) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim, self.batch_first = mha.head_dim, mha.batch_first
        self.kdim, self.vdim = mha.kdim, mha.vdim
        self._qkv_same_embed_dim = False  # disables the TransformerEncoderLayer fast path
        if mha._qkv_same_embed_dim:
            self.in_proj_weight = mha.in_proj_weight
        else:
            self.in_proj_weight = None
            self.q_proj_weight, self.k_proj_weight = mha.q_proj_weight, mha.k_proj_weight
            self.v_proj_weight = mha.v_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.flurka = attn
        self.hoist = hoist and attn.dk is not None

    def _weights(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.in_proj_weight is not None:
            return self.in_proj_weight.chunk(3)
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, None]:
        """Same arguments as ``nn.MultiheadAttention.forward``; the weights are not computed."""
        if not self.batch_first:  # (N, B, E) -> (B, N, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, N, _ = query.shape
        M = key.shape[1]
        H, dh = self.num_heads, self.head_dim
        wq, wk, wv = self._weights()
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.chunk(3)
        keep = None
        if key_padding_mask is not None:  # MHA: True / -inf = ignore -> True = real key
            keep = ~key_padding_mask if key_padding_mask.dtype == torch.bool \
                else key_padding_mask > MASKED_BELOW
        mask = None
        if attn_mask is not None:  # MHA bool True = not allowed; SDPA bool True = attend
            mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
            if mask.dim() == 3:  # (B*H, N, M) -> (B, H, N, M)
                mask = mask.view(B, H, N, M)
        q = F.linear(query, wq, bq).view(B, N, H, dh).transpose(1, 2)  # (B, H, N, dh)
        if self.hoist:
            fa = self.flurka
            k = fa.project_kv(key, wk, bk, "k", keep).view(B, -1, H, dh).transpose(1, 2)
            v = fa.project_kv(value, wv, bv, "v", keep).view(B, -1, H, dh).transpose(1, 2)
            out = fa(q, k, v, mask, key_padding_mask=keep, source_len=M)
        else:
            k = F.linear(key, wk, bk).view(B, M, H, dh).transpose(1, 2)  # (B, H, M, dh)
            v = F.linear(value, wv, bv).view(B, M, H, dh).transpose(1, 2)
            out = self.flurka(q, k, v, mask, key_padding_mask=keep)
        out = out.transpose(1, 2).reshape(B, N, self.embed_dim)  # (B, N, E)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


# -- the site ---------------------------------------------------------------------------------
MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
            "average_attn_weights", "is_causal")


def mha_site(path: str, mha: nn.MultiheadAttention, call: dict[str, Any] | None = None,
             weights_read: bool = False) -> Site:
    """The site of one ``nn.MultiheadAttention``: sizes from the module, and with the recorded
    ``call`` (its arguments by name) the sequence lengths and the mask kind; without a call
    the key padding mask is read at run time. ``weights_read``: the caller uses the attention
    weights (output [1]), so the site is skipped."""
    s = Site(Found(module_path=path, node_name="mha", pattern="mha",
                   scale=mha.head_dim ** -0.5, dropout_p=mha.dropout))
    fill_mha(s, mha, call)
    if mha.bias_k is not None or mha.add_zero_attn:
        s.skip("nn.MultiheadAttention with add_bias_kv / add_zero_attn is not supported")
    elif s.mask_kind in ("bias", "other"):
        s.skip("the attention mask is neither key padding nor causal")
    elif weights_read:
        s.skip("attention weights are used elsewhere (the caller reads the MHA's second "
               "output): rewriting would change them")
    return s


def weights_used(model: nn.Module, path: str) -> bool:
    """Whether the caller of an MHA reads its attention weights (output [1]); True when the
    caller cannot be traced and the weights were requested."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else None
    if parent is None:
        return False  # the MHA is the model itself: its caller is the user's code
    if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return False
    try:
        gm = torch.fx.symbolic_trace(parent)
    except Exception:  # noqa: BLE001
        return True
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == name:
            for u in n.users:
                if not (u.op == "call_function" and len(u.args) > 1 and u.args[1] == 0):
                    if u.users or u.op == "output":
                        return True
    return False


