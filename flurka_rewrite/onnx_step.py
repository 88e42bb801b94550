"""``export_onnx_step``: one decoding step of a converted causal model as an ONNX graph.

    state = fr.init_state(model)
    logits, state = fr.step(model, state, prompt, start=0)               # prefill (PyTorch)
    info = fr.export_onnx_step(model, (ids, torch.tensor(0)), "step.onnx")
    feeds = info.state_feeds(state)                                      # past_state.{i}.*
    # ONNX Runtime: {"idx": ids, "start": start, **feeds} -> logits, present_state.{i}.*

The graph's inputs are the model's own tensor inputs for the new tokens (token ids (batch, n)
and whatever places them, e.g. a 0-d ``start`` or ``position_ids``), then the per-site state
``past_state.{i}.S`` (B, Hkv, m, dv), ``.z`` (B, Hkv, m) and ``.c`` (B, Hkv) of a kernel site,
``.S``, ``.z``, ``.key`` (B, Hkv, w - 1, dh), ``.value`` and ``.keep`` (B, w - 1) bool of a
windowed site (kernels/window_decode.py: the far sums and the buffer of the last w - 1 keys),
or ``past_state.{i}.key`` (B, Hkv, past_length, dh) and ``.value`` of an exact softmax site;
its outputs are the model's outputs (``logits`` for a model returning one tensor) and
``present_state.{i}.*``, the state after the new tokens, to be fed back as the next
``past_state``. Site i is the i-th ``FlurkaAttention`` of ``model.named_modules()``
(``OnnxStepExport.sites``).

How: a wrapper module takes the state as plain tensors, builds the ``KernelState`` /
``KVCache`` objects from them inside its forward and runs the model under the decode hooks of
``fr.step`` (``decoding._continuing``), so no Python state object crosses the graph's boundary;
it is exported with ``torch.onnx.export(dynamo=True)`` like ``export_onnx``, with the
dynamic axes named ``batch_size``, ``new_tokens`` and ``past_length``.

The graph always continues from its inputs' state (it has no "first token" branch). The
empty state, before a prompt, is S = 0, z = 0, c = -1e30, zero-length keys and values, and
for a window w - 1 zero keys marked False in ``keep`` (``OnnxStepExport.empty_state``): the
log scale -1e30 gives the old (empty) sums a weight of exactly 0, so an ONNX prefill gives
what ``fr.step`` gives from ``init_state``.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils import _pytree as pytree

from flurka_rewrite.decoding import DecodeState, _continuing, _sites, init_state, step
from flurka_rewrite.kernels.recurrent import KernelState, KVCache
from flurka_rewrite.kernels.window_decode import WindowState
from flurka_rewrite.onnx_axes import rename_axes
from flurka_rewrite.onnx_export import (
    _fp32, _input_names, _quiet, _split_inputs, flat_outputs, reference_mode,
)
from flurka_rewrite.passes.atomic import atomic_write

KERNEL_PARTS, KV_PARTS = ("S", "z", "c"), ("key", "value")
PARTS = {"kernel": KERNEL_PARTS, "kv": KV_PARTS, "window": ("S", "z", "key", "value", "keep")}
EMPTY_LOG_SCALE = -1e30  # the log scale of an empty state (module docstring)
BATCH, NEW, PAST = "batch_size", "new_tokens", "past_length"


@dataclass
class OnnxStepExport:
    """What ``export_onnx_step`` wrote.

    input_names: the model's inputs, then ``past_state.{i}.*``; output_names: the model's
    outputs, then ``present_state.{i}.*``. sites: (module path, "kernel", "window" or "kv")
    of site i.
    shapes: state name (without the past_/present_ prefix) -> its shape for batch 1 and past
    length 0 (None where the batch or past length goes). axis_names: input -> {axis: name}
    of its symbolic axes (empty when the export had to fix them)."""

    path: str
    input_names: list[str]
    output_names: list[str]
    sites: list[tuple[str, str]]
    shapes: dict[str, tuple[int | None, ...]] = field(default_factory=dict)
    axis_names: dict[str, dict[int, str]] = field(default_factory=dict)
    opset: int | None = None

    def state_feeds(self, state: DecodeState) -> dict[str, Any]:
        """A PyTorch ``DecodeState`` (after ``fr.step``) as ONNX Runtime feeds (numpy, fp32)
        named ``past_state.{i}.*``; a site that has seen no token yet gets the empty state."""
        if len(state.sites) != len(self.sites) or list(state.sites) != [p for p, _ in
                                                                          self.sites]:
            raise ValueError("state_feeds: this state belongs to another model (its sites "
                             "differ from the exported graph's)")
        batch = next((t.shape[0] for s in state.sites.values() if s is not None
                      for t in s.tensors()), None)
        feeds: dict[str, Any] = {}
        empty = self.empty_state(batch or 1)
        for i, (path, kind) in enumerate(self.sites):
            s = state.sites[path]
            if s is None:
                feeds.update({f"past_state.{i}.{p}": empty[f"past_state.{i}.{p}"]
                              for p in PARTS[kind]})
            elif isinstance(s, WindowState):
                for p, t in zip(PARTS[kind], s.tensors()):
                    t = t.detach().cpu()
                    feeds[f"past_state.{i}.{p}"] = (t if p == "keep" else t.float()).numpy()
            elif isinstance(s, KernelState):
                c = s.c if s.tokens else torch.full_like(s.c, EMPTY_LOG_SCALE)
                for p, t in zip(KERNEL_PARTS, (s.S, s.z, c)):
                    feeds[f"past_state.{i}.{p}"] = t.detach().float().cpu().numpy()
            else:
                if s.keep is not None:
                    raise ValueError(f"state_feeds: {path} holds padded keys; the ONNX step "
                                     "has no key mask input")
                for p, t in zip(KV_PARTS, (s.k, s.v)):
                    feeds[f"past_state.{i}.{p}"] = t.detach().float().cpu().numpy()
        return feeds

    def empty_state(self, batch_size: int) -> dict[str, Any]:
        """The state before any token, as ONNX Runtime feeds (module docstring)."""
        import numpy as np

        feeds = {}
        for name, shape in self.shapes.items():
            dims = [batch_size if j == 0 else (0 if d is None else d)
                    for j, d in enumerate(shape)]
            if name.endswith(".keep"):  # the window's slots before the first token
                feeds[f"past_{name}"] = np.zeros(dims, dtype=bool)
                continue
            fill = EMPTY_LOG_SCALE if name.endswith(".c") else 0.0
            feeds[f"past_{name}"] = np.full(dims, fill, dtype=np.float32)
        return feeds


class _StepCall(nn.Module):
    """forward(*inputs, *state) -> (*outputs, *new state): the model called on the example
    structure with its tensor leaves replaced by the inputs, every site continuing from the
    state given as tensors (``PARTS`` of each site's kind)."""

    def __init__(self, model: nn.Module, leaves: list, spec: Any, pos: list[int],
                 sites: list[tuple[str, str]]) -> None:
        super().__init__()
        self.model = model
        self._leaves, self._spec, self._pos, self._sites = leaves, spec, pos, sites

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        leaves = list(self._leaves)
        for i, t in zip(self._pos, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        past = list(tensors[len(self._pos):])
        state = DecodeState()
        for path, kind in self._sites:
            if kind == "kernel":  # tokens=1: continue from the given c (no empty-state branch)
                S, z, c = past.pop(0), past.pop(0), past.pop(0)
                state.sites[path] = KernelState(S=S, z=z, c=c, tokens=1)
            elif kind == "window":
                state.sites[path] = WindowState(*(past.pop(0) for _ in range(5)), tokens=1)
            else:
                state.sites[path] = KVCache(k=past.pop(0), v=past.pop(0))
        with _continuing(self.model, state):
            out = self.model(*args, **kwargs)
        new = []
        for path, _ in self._sites:
            new += state.sites[path].tensors()
        return (*(t for _, t in flat_outputs(out)), *new)


def _example_state(model: nn.Module, args: tuple, kwargs: dict) -> DecodeState:
    """A state of the right shapes: the example inputs run as a prefill; exact sites' caches
    get one more key, so that the past length differs from the new tokens' (two symbols)."""
    a, k = copy.deepcopy((args, kwargs))
    state = step(model, init_state(model), *a, **k)[1]
    for path, s in state.sites.items():
        if isinstance(s, KVCache):
            state.sites[path] = KVCache(k=torch.cat([s.k, s.k[..., :1, :]], -2),
                                        v=torch.cat([s.v, s.v[..., :1, :]], -2))
    return state


def export_onnx_step(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    state: DecodeState | None = None,
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> OnnxStepExport:
    """Export one decoding step of ``model`` (a causal model from ``convert`` that ``fr.step``
    can run) to ONNX at ``path`` in fp32, with the state as inputs and outputs.

    example_inputs: the model's inputs for the new tokens, as for ``export_onnx`` (a tensor,
    a tuple of positional arguments or a dict of keyword arguments); what places the tokens
    must be a tensor input (a 0-d ``start``, ``position_ids``) so that it is a graph input,
    not a constant. Give 2 or more new tokens and a batch of 2 or more to keep those axes
    dynamic (a size of 1 is fixed by the exporter). state: an example ``DecodeState`` (for its
    shapes only); by default the example inputs run once as a prefill to make one.
    Hugging Face causal LMs are called with ``use_cache=False`` (their cache is replaced by the
    explicit state); they must be given ``position_ids``. Returns an ``OnnxStepExport``."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError("export_onnx_step needs the onnx and onnxscript packages: "
                          "pip install onnx onnxscript") from e
    if model.training:
        raise ValueError("export_onnx_step: call model.eval() first (decoding uses no dropout "
                         "and no feature redraws)")
    init_state(model)  # refuses models that cannot decode, with the reason
    path = os.fspath(path)
    args, kwargs = _split_inputs(example_inputs)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("export_onnx_step: encoder-decoder models are not supported (their "
                         "decoder's cache holds cross-attention); export a decoder-only "
                         "causal LM or a hand-written causal model")
    if config is not None and hasattr(config, "use_cache"):
        if "position_ids" not in kwargs:
            raise ValueError("export_onnx_step: a Hugging Face model must be given "
                             "position_ids (B, n) as a keyword input: without its cache it "
                             "would place the new tokens at position 0")
        kwargs.setdefault("use_cache", False)
    model_fp32, args, kwargs = _fp32(model, args, kwargs)
    flat, spec = pytree.tree_flatten_with_path((args, kwargs))
    leaves = [leaf for _, leaf in flat]
    pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    if not pos:
        raise ValueError("example_inputs hold no tensor: export_onnx_step needs the new "
                         "tokens as a tensor")
    tensors = [leaves[i] for i in pos]
    input_names = _input_names(model, args, [flat[i][0] for i in pos])
    sites = [(p, "kv" if m.feature_map is None else
              "kernel" if getattr(m, "window", None) is None else "window")
             for p, m in _sites(model_fp32).items()]
    with reference_mode(model_fp32), torch.no_grad():
        if state is None:
            state = _example_state(model_fp32, args, kwargs)
        if list(state.sites) != [p for p, _ in sites]:
            raise ValueError("export_onnx_step: this state belongs to another model")
        past, past_names, past_dyn = [], [], []
        shapes: dict[str, tuple[int | None, ...]] = {}
        for i, (p, kind) in enumerate(sites):
            s = state.sites[p]
            if s is None:
                raise ValueError(f"export_onnx_step: the example state has no entry for {p} "
                                 "yet; run a prefill with fr.step first, or pass state=None")
            for part, t in zip(PARTS[kind], s.tensors()):
                name = f"state.{i}.{part}"
                past.append(t if part == "keep" else t.float())
                past_names.append(f"past_{name}")
                axes: dict[int, Any] = {0: torch.export.Dim.AUTO} if dynamic_batch else {}
                if kind == "kv":
                    axes[2] = torch.export.Dim.AUTO
                past_dyn.append(axes or None)
                shapes[name] = tuple(None if (j == 0 or (kind == "kv" and j == 2)) else d
                                     for j, d in enumerate(t.shape))
        wrapper = _StepCall(model_fp32, leaves, pytree.tree_structure((args, kwargs)), pos,
                            sites)
        out = _model_outputs(model_fp32, args, kwargs, state)
        output_names = ["logits" if n == "output" else n for n in out]
        output_names += [n.replace("past_", "present_", 1) for n in past_names]
        dyn = [_input_axes(t, dynamic_batch) for t in tensors] + past_dyn
        common = dict(dynamo=True, input_names=input_names + past_names,
                      output_names=output_names, opset_version=opset, verbose=False,
                      optimize=True)
        with _quiet():
            program = torch.onnx.export(wrapper, (*tensors, *past),
                                        dynamic_shapes=(tuple(dyn),), **common)
    axis_names = _name_axes(program.model, input_names, tensors)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)

    def save_checked(tmp: str) -> None:
        program.save(tmp, external_data=False)
        onnx.checker.check_model(tmp, full_check=True)

    atomic_write(path, save_checked)
    proto = onnx.load(path, load_external_data=False)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                      None)
    return OnnxStepExport(path=path, input_names=input_names + past_names,
                          output_names=output_names, sites=sites, shapes=shapes,
                          axis_names=axis_names, opset=opset_used)


def _model_outputs(model: nn.Module, args: tuple, kwargs: dict, state: DecodeState
                   ) -> list[str]:
    """The names of the model's outputs on one step (run on a copy of the state)."""
    copy_state = DecodeState(sites={p: None if s is None else s.map(lambda t: t.clone())
                                    for p, s in state.sites.items()}, tokens=state.tokens)
    out, _ = step(model, copy_state, *args, **kwargs)
    return [name for name, _ in flat_outputs(out)]


def _input_axes(t: Tensor, dynamic_batch: bool) -> dict[int, Any] | None:
    """Batch (axis 0) and new tokens (axis 1 of 2-D inputs and 3-D float inputs)."""
    axes: dict[int, Any] = {}
    if dynamic_batch and t.dim() >= 1:
        axes[0] = torch.export.Dim.AUTO
    if t.dim() == 2 or (t.dim() == 3 and t.is_floating_point()):
        axes[1] = torch.export.Dim.AUTO
    return axes or None


def _name_axes(model: Any, input_names: list[str], tensors: list[Tensor]
               ) -> dict[str, dict[int, str]]:
    """Rename, in place, the graph's symbolic input sizes: axis 0 ``batch_size``, the new
    tokens' axis ``new_tokens``, a KV cache's axis 2 ``past_length``."""
    import onnx_ir as ir

    inputs = set(input_names)
    mapping: dict[str, str] = {}
    for value in model.graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if not isinstance(dim, ir.SymbolicDim) or not isinstance(dim.value, str) or \
                    dim.value in mapping:
                continue
            if axis == 0:
                mapping[dim.value] = BATCH
            elif value.name in inputs:
                mapping[dim.value] = NEW
            elif axis == 2 and value.name.split(".")[-1] in KV_PARTS:
                mapping[dim.value] = PAST
    return rename_axes(model, mapping)
