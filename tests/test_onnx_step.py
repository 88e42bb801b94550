"""``export_onnx_step``: one decoding step as an ONNX graph with the state as inputs and
outputs (issue 16, the ONNX part).

Oracle: ``fr.step`` in PyTorch on the same tokens (itself checked against the full forward in
tests/test_decoding.py). After a prefill (in PyTorch, or in ONNX Runtime from the graph's
empty state), 32 single-token steps run in ONNX Runtime, each feeding ``present_state`` back
as ``past_state``; the logits must stay within 1e-4 of their scale (fp32: ONNX Runtime sums
in another order, ~1e-7 measured) of ``fr.step``'s at every step, also for a batch the
example did not have. Models: the nanoGPT-like model of tests/test_decoding.py (rnn,
performer, exact softmax: a KV cache with a dynamic past length; rnn and performer with a
window of 8: a fixed buffer of 7 keys beside the sums) and a converted GPT-2 built from a
config.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import flurka_rewrite as fr
from test_decoding import VOCAB, TinyGPT, _converted
from test_decoding_window import _converted_gpt

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

STEPS, PREFILL, TOL = 32, 8, 1e-4


def _session(path: str) -> "ort.InferenceSession":
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _run(sess, info, inputs: dict, feeds: dict) -> tuple[torch.Tensor, dict]:
    res = sess.run(None, {**inputs, **feeds})
    present = {n.replace("present_", "past_", 1): v
               for n, v in zip(info.output_names, res) if n.startswith("present_")}
    assert set(present) == set(feeds)
    return torch.from_numpy(res[0]), present


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("kernel,onnx_prefill", [("rnn", False), ("performer", True),
                                                 ("softmax", True), ("rnn@8", True),
                                                 ("performer@8", False)])
def test_step_graph_matches_fr_step_over_32_steps(kernel: str, onnx_prefill: bool,
                                                  tmp_path) -> None:
    """kernel@w: with window=w (state: the far sums and the last w - 1 keys)."""
    name, _, w = kernel.partition("@")
    model = _converted_gpt(name, int(w)) if w else _converted(kernel)
    ex = torch.randint(0, VOCAB, (2, 3))
    info = fr.export_onnx_step(model, (ex, torch.tensor(0)), tmp_path / "step.onnx")
    kv = kernel == "softmax"
    parts = ("key", "value") if kv else ("S", "z", "key", "value", "keep") if w else \
        ("S", "z", "c")
    assert info.input_names == ["idx", "start"] + [f"past_state.{i}.{p}" for i in range(2)
                                                   for p in parts]
    assert info.output_names == ["logits"] + [f"present_state.{i}.{p}" for i in range(2)
                                              for p in parts]
    assert info.axis_names["idx"] == {0: "batch_size", 1: "new_tokens"}
    assert info.axis_names["past_state.1." + parts[0]] == (
        {0: "batch_size", 2: "past_length"} if kv else {0: "batch_size"})
    sess = _session(info.path)
    ids = torch.randint(0, VOCAB, (3, PREFILL + STEPS), generator=torch.Generator().manual_seed(7))
    worst = 0.0
    with torch.no_grad():
        ref, state = fr.step(model, fr.init_state(model), ids[:, :PREFILL], start=0)
        if onnx_prefill:  # from the graph's empty state (c = -1e30, zero-length caches)
            got, feeds = _run(sess, info, {"idx": ids[:, :PREFILL].numpy(),
                                           "start": np.array(0)}, info.empty_state(3))
            worst = _rel(got, ref)
        else:
            feeds = info.state_feeds(state)
        for t in range(PREFILL, PREFILL + STEPS):
            ref, state = fr.step(model, state, ids[:, t:t + 1], start=state.tokens)
            got, feeds = _run(sess, info, {"idx": ids[:, t:t + 1].numpy(),
                                           "start": np.array(t)}, feeds)
            worst = max(worst, _rel(got, ref))
    print(f"{kernel}: max |onnx - fr.step| / scale over {STEPS} steps = {worst:.3g}")
    assert worst <= TOL, f"{kernel}: max |onnx - fr.step| / scale = {worst:.3g}"
    if kv:  # the cache grew by one key per token; kernel states keep their size
        assert feeds["past_state.0.key"].shape[2] == PREFILL + STEPS
    else:
        assert feeds["past_state.0.S"].shape == tuple(state.sites[info.sites[0][0]].S.shape)


def test_hugging_face_gpt2_step_graph(tmp_path) -> None:
    """A converted GPT-2: its cache is replaced by the explicit state (use_cache=False,
    position_ids place the new tokens)."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=32,
                                          n_layer=2, n_head=4, bos_token_id=0,
                                          eos_token_id=0)).eval()
    ids = torch.randint(0, VOCAB, (2, PREFILL + STEPS), generator=torch.Generator().manual_seed(8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fr.convert(hf, kernel="performer", dk=None,
                           example_inputs={"input_ids": ids[:, :16]}).eval()

    def pos(a: int, n: int) -> torch.Tensor:
        return torch.arange(a, a + n)[None].expand(2, -1)

    info = fr.export_onnx_step(model, {"input_ids": ids[:, :3], "position_ids": pos(4, 3)},
                               tmp_path / "gpt2_step.onnx")
    assert info.input_names[:2] == ["input_ids", "position_ids"]
    assert info.output_names[0] == "logits"
    sess = _session(info.path)
    worst = 0.0
    with torch.no_grad():
        full = model(ids, use_cache=False).logits  # the whole sequence: fr.step's oracle
        out, state = fr.step(model, fr.init_state(model), input_ids=ids[:, :PREFILL],
                             position_ids=pos(0, PREFILL), use_cache=False)
        feeds = info.state_feeds(state)
        for t in range(PREFILL, PREFILL + STEPS):
            ref, state = fr.step(model, state, input_ids=ids[:, t:t + 1],
                                 position_ids=pos(t, 1), use_cache=False)
            assert _rel(ref.logits[:, 0], full[:, t]) <= TOL
            got, feeds = _run(sess, info, {"input_ids": ids[:, t:t + 1].numpy(),
                                           "position_ids": pos(t, 1).numpy()}, feeds)
            worst = max(worst, _rel(got, ref.logits))
    print(f"gpt2: max |onnx - fr.step| / scale over {STEPS} steps = {worst:.3g}")
    assert worst <= TOL, f"gpt2: max |onnx - fr.step| / scale = {worst:.3g}"


def test_what_cannot_be_exported_is_refused(tmp_path) -> None:
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="no FlurkaAttention"):
        fr.export_onnx_step(TinyGPT().eval(), (ids, torch.tensor(0)), tmp_path / "a.onnx")
    model = _converted("rnn").train()
    with pytest.raises(ValueError, match="eval"):
        fr.export_onnx_step(model, (ids, torch.tensor(0)), tmp_path / "a.onnx")
    model.eval()
    model.config = type("Config", (), {"use_cache": True})()  # looks like a HF model
    with pytest.raises(ValueError, match="position_ids"):
        fr.export_onnx_step(model, {"idx": ids}, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()
