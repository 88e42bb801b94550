"""Decoding windowed causal sites (``window=w``) from a bounded state (issue 16).

Oracle: the whole-sequence sliding-window hybrid (kernels/window.py, itself tested against a
dense fp64 evaluation in test_window.py). Continuing from a ``WindowState`` (the far keys'
S and z, the last w - 1 keys and values) must give its outputs at every position: within
1e-5 of their scale for the operator (fp32, the same products summed in another order;
measured up to 7e-7), within 1e-4 for a whole model's logits, as test_decoding.py; and the
state must not grow (its buffer has w - 1 slots from the first token).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from test_decoding import VOCAB, TinyGPT
from test_generate_hf import CONFIGS, assert_same, generate_both, prompts, state_sizes

import flurka_rewrite as fr
from flurka_rewrite.hf_generate import FlurkaStateLayer
from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.kernels.window_decode import WindowState, window_prefill_state

B, H, HKV, N, DH = 2, 4, 2, 37, 16


def _site(kernel: str, window: int) -> FlurkaAttention:
    torch.manual_seed(0)
    a = FlurkaAttention(kernel=kernel, heads=H, kv_heads=HKV, head_dim=DH, causal=True,
                        window=window).eval()
    with torch.no_grad():  # a trained-looking mixing weight, not the initial one
        a.kernel_log_weight.normal_()
    return a


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(B, h, N, DH, generator=g) * 2 for h in (H, HKV))
    v = torch.randn(B, HKV, N, DH, generator=g)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, :5] = False  # left padding in the second row
    return q, k, v, keep


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return bool((a - b).abs().max() <= tol * b.abs().max())


@pytest.mark.parametrize("kernel", ["performer", "rnn", "relu", "ffk"])
@pytest.mark.parametrize("window", [1, 3, 8, 40])  # 40 > N: every key in the window
def test_continuing_in_pieces_equals_the_whole_sequence(kernel: str, window: int) -> None:
    a = _site(kernel, window)
    q, k, v, keep = _inputs()
    with torch.no_grad():
        full = a(q, k, v, key_padding_mask=keep)
        outs, state, t = [], None, 0
        for n in (10, 1, 1, 1, 7, 1, 64):  # a prefill, single steps, a chunk, the rest
            sl = slice(t, min(t + n, N))
            o, state = a.decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, keep=keep[:, sl])
            outs.append(o)
            t = sl.stop
        assert _close(torch.cat(outs, 2), full, 1e-5)
        assert isinstance(state, WindowState) and state.tokens == N
        assert state.k.shape[-2] == window - 1  # the buffer: the last w - 1 keys
        # the state a prefill leaves (hf_generate: outputs from the whole-sequence forward)
        pre = window_prefill_state(a.feature_map, k[:, :, :20], v[:, :, :20], keep[:, :20],
                                   window)
        rest, _ = a.decode(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], pre, keep=keep[:, 20:])
        assert _close(rest, full[:, :, 20:], 1e-5)


def test_a_broken_far_state_is_caught() -> None:
    """The oracle bites: dropping the keys that leave the window changes the outputs."""
    a = _site("rnn", 3)
    q, k, v, keep = _inputs()
    with torch.no_grad():
        full = a(q, k, v, key_padding_mask=keep)
        _, state = a.decode(q[:, :, :20], k[:, :, :20], v[:, :, :20], None, keep=keep[:, :20])
        state.S.zero_()
        state.z.zero_()
        rest, _ = a.decode(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], state, keep=keep[:, 20:])
    assert not _close(rest, full[:, :, 20:], 1e-2)


def _converted_gpt(kernel: str, window: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = TinyGPT().eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fr.convert(model, kernel=kernel, dk=None, window=window,
                          example_inputs=(ids,)).eval()


@pytest.mark.parametrize("kernel", ["rnn", "performer"])
def test_step_matches_the_full_forward_and_the_state_stops_growing(kernel: str) -> None:
    model = _converted_gpt(kernel, 8)
    ids = torch.randint(0, VOCAB, (3, 60), generator=torch.Generator().manual_seed(2))
    sizes = []
    with torch.no_grad():
        full = model(ids)
        state = fr.init_state(model)
        out, state = fr.step(model, state, ids[:, :5], start=0)  # a prefill shorter than w
        assert (out - full[:, :5]).abs().max() <= 1e-4 * full[:, :5].abs().max()
        for t in range(5, 60):
            out, state = fr.step(model, state, ids[:, t:t + 1], start=state.tokens)
            assert (out[:, 0] - full[:, t]).abs().max() <= 1e-4 * full[:, t].abs().max(), t
            sizes.append(state.numel())
    assert len(set(sizes)) == 1 and sizes[0] > 0  # a fixed buffer: the same elements


def _hf(family: str, kernel: str, window: int):
    import transformers as tf
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    ids = torch.randint(2, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fr.convert(model, kernel=kernel, dk=None, window=window,
                          example_inputs={"input_ids": ids,
                                          "attention_mask": torch.ones_like(ids)}).eval()


@pytest.mark.parametrize("family,kernel", [("llama", "performer"), ("gpt2", "rnn")])
def test_hf_generate_with_a_window_matches_full_recomputation(family: str, kernel: str) -> None:
    model = _hf(family, kernel, 8)
    ids, mask = prompts((9, 4, 6))  # left-padded; 64 new tokens run far past the window
    cached, full = generate_both(model, ids, mask)
    assert_same(cached, full)
    assert all(isinstance(layer, FlurkaStateLayer) for layer in cached.cache.layers)
    beam = generate_both(model, ids[:1, -5:], max_new_tokens=12, num_beams=3)
    assert_same(*beam, steps=12)


def test_hf_window_state_is_bounded() -> None:
    sizes = state_sizes(_hf("llama", "rnn", 8), (2, 50))  # 8 and 56 tokens: past the window
    assert sizes[0] == sizes[1] > 0
