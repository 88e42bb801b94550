"""Token-by-token decoding with a fixed-size state (issue 16, the hand-written-model part).

Oracle: the same converted model run on the whole sequence (full recomputation). Decoding
with ``fr.step`` must give the same logits at every position, within 1e-4 of the logits'
scale (fp32: the state sums the same products in another order), and greedy generation the
same tokens; the state's memory must not grow with the number of tokens.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flurka_rewrite as fr
from flurka_rewrite.kernels.recurrent import causal_continue, causal_state, empty_state
from flurka_rewrite.kernels.reference import causal_kernel_attention

VOCAB, D, H, HKV, LAYERS, CTX = 40, 32, 4, 2, 2, 96


class Attention(nn.Module):
    """nanoGPT's causal self-attention, with grouped-query heads (HKV kv-heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(D, D)
        self.kv = nn.Linear(D, 2 * HKV * D // H)
        self.o = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        dh = D // H
        q = self.q(x).view(B, N, H, dh).transpose(1, 2)  # (B, H, N, dh)
        k, v = self.kv(x).view(B, N, 2 * HKV, dh).transpose(1, 2).chunk(2, 1)  # (B, Hkv, N, dh)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention()
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Learned positions; ``start`` places the given tokens in the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(CTX, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _converted(kernel: str) -> nn.Module:
    torch.manual_seed(0)
    model = TinyGPT().eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = fr.convert(model, kernel=kernel, dk=None, example_inputs=(ids,)).eval()
    assert len(new.flurka_report.rewritten) == LAYERS
    return new


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-4 * b.abs().max())


@pytest.mark.parametrize("kernel", ["rnn", "performer", "softmax"])
def test_step_matches_the_full_forward_at_every_position(kernel: str) -> None:
    model = _converted(kernel)
    ids = torch.randint(0, VOCAB, (3, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)  # (3, 70, VOCAB)
        state = fr.init_state(model)
        out, state = fr.step(model, state, ids[:, :20], start=0)  # prefill
        assert _close(out, full[:, :20]) and state.tokens == 20
        for t in range(20, 70):
            out, state = fr.step(model, state, ids[:, t:t + 1], start=state.tokens)
            assert _close(out[:, 0], full[:, t]), t
    assert state.tokens == 70


@pytest.mark.parametrize("kernel", ["rnn", "performer"])
def test_state_memory_does_not_grow(kernel: str) -> None:
    model = _converted(kernel)
    ids = torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(3))
    sizes = []
    with torch.no_grad():
        state = fr.init_state(model)
        for t in range(80):
            _, state = fr.step(model, state, ids[:, t:t + 1], start=t)
            sizes.append(state.numel())
    assert len(set(sizes)) == 1 and sizes[0] > 0  # the same elements at token 1 and 80


def test_softmax_sites_keep_a_growing_kv_cache() -> None:
    """The control: exact sites keep their keys and values, so their state grows."""
    model = _converted("softmax")
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        state = fr.init_state(model)
        _, state = fr.step(model, state, ids[:, :4], start=0)
        before = state.numel()
        _, state = fr.step(model, state, ids[:, 4:], start=4)
    assert state.numel() == 3 * before


def test_greedy_generation_equals_full_recomputation() -> None:
    model = _converted("performer")
    prompt = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        seq = prompt
        for _ in range(40):  # full recomputation, the oracle
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], 1)
        state = fr.init_state(model)
        logits, state = fr.step(model, state, prompt, start=0)
        gen = prompt
        for _ in range(40):
            nxt = logits[:, -1:].argmax(-1)
            gen = torch.cat([gen, nxt], 1)
            logits, state = fr.step(model, state, nxt, start=state.tokens)
    assert torch.equal(gen, seq)


def test_causal_continue_equals_the_chunked_forward_in_pieces() -> None:
    """Kernel level: any split of a sequence into pieces gives the whole-sequence result."""
    g = torch.Generator().manual_seed(5)
    B, Hq, Hk, N, m, dv = 2, 4, 2, 50, 8, 6
    pq, pk = torch.rand(B, Hq, N, m, generator=g), torch.rand(B, Hk, N, m, generator=g)
    v, ls = torch.randn(B, Hk, N, dv, generator=g), torch.randn(B, Hk, N, generator=g) * 3
    for log_scale in (None, ls):
        ref = causal_kernel_attention(pq, pk, v, key_log_scale=log_scale, chunk_size=16)
        state, outs = empty_state(B, Hk, m, dv, pq.device), []
        for a, b in ((0, 7), (7, 8), (8, 33), (33, 50)):
            o, state = causal_continue(pq[:, :, a:b], pk[:, :, a:b], v[:, :, a:b], state,
                                       key_log_scale=None if log_scale is None
                                       else log_scale[:, :, a:b], chunk_size=16)
            outs.append(o)
        torch.testing.assert_close(torch.cat(outs, 2), ref, rtol=1e-5, atol=1e-6)
        assert state.tokens == N and math.isfinite(float(state.S.abs().max()))


def test_padded_keys_and_the_prefill_state() -> None:
    """Left-padded keys stay out of the state as the whole-sequence forward keeps them out,
    and ``causal_state`` (a prefill's final state without its outputs) equals the state
    ``causal_continue`` ends with."""
    g = torch.Generator().manual_seed(6)
    B, Hq, Hk, N, m, dv = 3, 4, 2, 40, 8, 6
    pq, pk = torch.rand(B, Hq, N, m, generator=g), torch.rand(B, Hk, N, m, generator=g)
    v, ls = torch.randn(B, Hk, N, dv, generator=g), torch.randn(B, Hk, N, generator=g) * 3
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, :9], keep[2, :30] = False, False  # left padding
    for log_scale in (None, ls):
        ref = causal_kernel_attention(pq, pk, v, key_log_scale=log_scale, chunk_size=16,
                                      key_padding_mask=keep)
        cut = 31
        pre = causal_state(pk[:, :, :cut], v[:, :, :cut], key_keep=keep[:, :cut],
                           key_log_scale=None if log_scale is None else log_scale[:, :, :cut])
        o, whole = causal_continue(pq[:, :, :cut], pk[:, :, :cut], v[:, :, :cut],
                                   empty_state(B, Hk, m, dv, pq.device), key_keep=keep[:, :cut],
                                   key_log_scale=None if log_scale is None
                                   else log_scale[:, :, :cut], chunk_size=16)
        for a, b in ((pre.S, whole.S), (pre.z, whole.z), (pre.c, whole.c)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        rest, _ = causal_continue(pq[:, :, cut:], pk[:, :, cut:], v[:, :, cut:], pre,
                                  key_keep=keep[:, cut:], key_log_scale=None if log_scale is None
                                  else log_scale[:, :, cut:], chunk_size=16)
        real = keep[:, None, :, None].expand_as(ref)  # padded query rows are not compared
        torch.testing.assert_close(torch.cat([o, rest], 2)[real], ref[real],
                                   rtol=1e-5, atol=1e-6)


def test_models_that_cannot_decode_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="no FlurkaAttention"):
        fr.init_state(TinyGPT())
    model = _converted("rnn")
    state = fr.init_state(model)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        fr.step(model, state, torch.zeros(1, 1, dtype=torch.long))
    model.eval()
    with torch.no_grad():
        fr.step(model, state, torch.zeros(1, 3, dtype=torch.long), start=0)
        with pytest.raises(ValueError, match="another model"):
            fr.step(_converted("performer").blocks[0], state, torch.zeros(1, 1, D))
