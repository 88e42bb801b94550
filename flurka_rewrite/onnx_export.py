"""``export_onnx``: a converted model as an ONNX file, on the pure-PyTorch reference path.

    info = fr.export_onnx(new_model, example_inputs, "model.onnx", dynamic_seq=True)

How: the model is wrapped so that its tensor inputs are positional and its outputs a flat
tuple of tensors, exported with ``torch.onnx.export(dynamo=True)`` (``torch.export``, then
ONNX Script), checked with ``onnx.checker`` and written atomically. During the export every
``FlurkaAttention`` runs with ``backend="torch"`` (never a Triton kernel) and in eval mode;
both are restored afterwards. Inside ``torch.export`` the reference code takes its
export branches (``kernels.reference.is_exporting``): E and F are applied to the input
zero-padded to ``max_seq_len`` instead of being sliced with Python ints, so one graph holds
for every sequence length up to ``max_seq_len``.

Why not the TorchScript exporter (``dynamo=False``): it records sizes read through
``torch.ops.aten.sym_size`` (as in modules captured by ``torch.export``, e.g. Hugging Face
attention) as constants, so a second sequence length fails in ONNX Runtime.

Dynamic axes (``Dim.AUTO``, so a model that needs a fixed size keeps it instead of failing):
axis 0 of every tensor input (batch) when ``dynamic_batch``; when ``dynamic_seq``, axis 1 of
2-D inputs (token ids, masks) and of 3-D float inputs (embeddings), and the trailing axes of
3-/4-D masks whose size is one of those sequence lengths. Images keep their size.
``OnnxExport.dynamic_axes`` says which axes really stayed dynamic. Their ONNX names are
``batch_size`` and ``sequence_length``, shared by the inputs that share the size
(``onnx_axes.py``; ``OnnxExport.axis_names``).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils import _pytree as pytree

from flurka_rewrite.passes.atomic import atomic_write
from flurka_rewrite.passes.export_capture import quiet_loggers
from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.onnx_axes import name_dynamic_axes

# ONNX's own limit for one protobuf file; bigger models store their weights beside it.
_PROTOBUF_LIMIT = 2 * 1024**3 - 1


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote.

    dynamic_axes: input name -> axes left symbolic in the ONNX graph (empty: all static).
    max_seq_len: longest sequence the low-rank (dk) layers accept; None when no layer has
        one. ONNX has no runtime assertion: a longer input gives wrong results, not an error.
    """

    path: str
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, list[int]] = field(default_factory=dict)
    max_seq_len: int | None = None
    opset: int | None = None
    # input name -> {axis: its name in the ONNX graph}: "batch_size", "sequence_length"
    axis_names: dict[str, dict[int, str]] = field(default_factory=dict)


# -- inputs and outputs ------------------------------------------------------------------
def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(f"example_inputs must be a tensor, a tuple of positional arguments or a dict "
                    f"of keyword arguments; got {type(example_inputs).__name__}")


def _key_name(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _input_names(model: nn.Module, args: tuple, paths: list) -> list[str]:
    """'input_ids' for keyword inputs, the forward's parameter name for positional ones
    (``input_<i>`` when unknown); nested structures add '.<key>'."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = []
    for path in paths:  # path[0]: 0 = args, 1 = kwargs
        first = _key_name(path[1])
        if _key_name(path[0]) == "0":
            i = int(first)
            first = params[i] if i < len(params) else f"input_{i}"
        names.append(".".join([first] + [_key_name(k) for k in path[2:]]))
    return names


def flat_outputs(out: Any, prefix: str = "") -> list[tuple[str, Tensor]]:
    """(name, tensor) for every tensor in a model output: a tensor ("output"), a tuple
    ("output_0", ...), a dict or Hugging Face ModelOutput (its keys), nested ('a.0')."""
    if isinstance(out, Tensor):
        return [(prefix or "output", out)]
    if isinstance(out, Mapping):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(str(i) if prefix else f"output_{i}", v) for i, v in enumerate(out)]
    else:  # other containers (e.g. a KV cache): their tensor leaves, if pytree knows them
        items = [(str(i), v) for i, v in enumerate(pytree.tree_leaves(out))
                 if isinstance(v, Tensor)]
    result = []
    for k, v in items:
        result += flat_outputs(v, f"{prefix}.{k}" if prefix else k) if v is not None else []
    return result


class _FlatCall(nn.Module):
    """forward(*tensors) -> tuple of tensors: the model called on the example structure with
    its tensor leaves replaced by the positional inputs; non-tensor leaves are constants."""

    def __init__(self, model: nn.Module, leaves: list, spec: Any, tensor_pos: list[int]) -> None:
        super().__init__()
        self.model = model
        self._leaves, self._spec, self._pos = leaves, spec, tensor_pos

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        leaves = list(self._leaves)
        for i, t in zip(self._pos, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        return tuple(t for _, t in flat_outputs(self.model(*args, **kwargs)))


def _dynamic_spec(tensors: list[Tensor], dynamic_seq: bool, dynamic_batch: bool
                  ) -> tuple[dict[int, Any] | None, ...]:
    """Dim.AUTO per axis following the rules of the module docstring."""
    auto = torch.export.Dim.AUTO
    seq_lens = {t.shape[1] for t in tensors
                if t.dim() == 2 or (t.dim() == 3 and t.is_floating_point())}
    seq_lens.discard(1)
    specs = []
    for t in tensors:
        axes: dict[int, Any] = {}
        if dynamic_batch and t.dim() >= 1:
            axes[0] = auto
        if dynamic_seq:
            if t.dim() == 2 or (t.dim() == 3 and t.is_floating_point()):
                axes[1] = auto
            elif t.dim() in (3, 4) and not t.is_floating_point() or (
                    t.dim() == 4 and t.shape[1] == 1):  # masks (B, [1,] N, M)
                for ax in range(t.dim() - 2, t.dim()):
                    if t.shape[ax] in seq_lens:
                        axes[ax] = auto
        specs.append(axes or None)
    return tuple(specs)


# -- export mode -------------------------------------------------------------------------
@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``backend="torch"`` on every ``FlurkaAttention`` inside; the training
    flags and backends are restored on exit."""
    flags = [(m, m.training) for m in model.modules()]
    backends = [(m, m.backend) for m in model.modules() if isinstance(m, FlurkaAttention)]
    try:
        model.eval()
        for m, _ in backends:
            m.backend = "torch"
        yield
    finally:
        for m, training in flags:
            m.training = training
        for m, backend in backends:
            m.backend = backend


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's progress lines, per-dimension notes and deprecation warnings are not
    the user's business; errors still raise."""
    with quiet_loggers("torch.onnx", "torch.export", "torch._export",
                       "torch.fx.experimental.symbolic_shapes", "torch._dynamo", "onnxscript"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield


def _fp32(model: nn.Module, args: tuple, kwargs: dict) -> tuple[nn.Module, tuple, dict]:
    """The model and inputs in fp32 (a copy of the model when it holds other float dtypes)."""
    floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if any(t.dtype != torch.float32 for t in floats):
        model = copy.deepcopy(model).float()

    def cast(x: Any) -> Any:
        return x.float() if isinstance(x, Tensor) and x.is_floating_point() else x
    return model, pytree.tree_map(cast, args), pytree.tree_map(cast, kwargs)


def _max_seq_len(model: nn.Module) -> int | None:
    lens = [m.max_seq_len for m in model.modules()
            if isinstance(m, FlurkaAttention) and m.dk is not None and m.max_seq_len]
    return min(lens) if lens else None


def _graph_dynamic_axes(onnx_model: Any) -> dict[str, list[int]]:
    axes = {}
    for inp in onnx_model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        sym = [i for i, d in enumerate(dims) if not d.HasField("dim_value")]
        if sym:
            axes[inp.name] = sym
    return axes


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    dynamic_seq: bool = True,
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> OnnxExport:
    """Export ``model`` (a converted model, or any module) to ONNX at ``path`` in fp32.

    example_inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments
    (non-tensor values are baked in as constants). dynamic_seq / dynamic_batch: keep the
    sequence / batch axes symbolic where the model allows (see the module docstring).
    Every FlurkaAttention runs its pure-PyTorch reference (never Triton) during the export.
    The file is checked with ``onnx.checker`` and replaces ``path`` only when complete.
    Returns an ``OnnxExport`` (names, dynamic axes, the longest sequence accepted)."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError("export_onnx needs the onnx and onnxscript packages: "
                          "pip install onnx onnxscript") from e
    path = os.fspath(path)
    args, kwargs = _split_inputs(example_inputs)
    config = getattr(model, "config", None)
    if kwargs and getattr(config, "use_cache", False) and "use_cache" not in kwargs and \
            "use_cache" in _parameters(model):
        kwargs["use_cache"] = False  # Hugging Face decoders: no KV cache object in the graph
    model_fp32, args, kwargs = _fp32(model, args, kwargs)
    flat, spec = pytree.tree_flatten_with_path((args, kwargs))
    leaves = [leaf for _, leaf in flat]
    pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    if not pos:
        raise ValueError("example_inputs hold no tensor: export_onnx needs at least one "
                         "tensor input to trace the model")
    tensors = [leaves[i] for i in pos]
    input_names = _input_names(model, args, [flat[i][0] for i in pos])
    wrapper = _FlatCall(model_fp32, leaves, pytree.tree_structure((args, kwargs)), pos)
    with reference_mode(model_fp32):
        with torch.no_grad():
            out = model_fp32(*args, **kwargs)
        output_names = [name for name, _ in flat_outputs(out)]
        if not output_names:
            raise ValueError(f"{type(model).__name__} returned no tensor; nothing to export")
        dyn = _dynamic_spec(tensors, dynamic_seq, dynamic_batch)
        program = _torch_onnx_export(wrapper, tuple(tensors), dyn, input_names, output_names,
                                     opset)
    axis_names = name_dynamic_axes(program.model, {n: (tuple(t.shape), d) for n, t, d in
                                                   zip(input_names, tensors, dyn)})
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    big = program.model_proto.ByteSize() > _PROTOBUF_LIMIT if _small_enough(model_fp32) else True
    if big:  # weights in a side file named after ``path``: write in place, check by path
        program.save(path, external_data=True)
        onnx.checker.check_model(path, full_check=True)
        proto = onnx.load(path, load_external_data=False)
    else:
        def save_checked(tmp: str) -> None:
            program.save(tmp, external_data=False)
            onnx.checker.check_model(tmp, full_check=True)

        atomic_write(path, save_checked)
        proto = onnx.load(path)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return OnnxExport(path=path, input_names=input_names, output_names=output_names,
                      dynamic_axes=_graph_dynamic_axes(proto), max_seq_len=_max_seq_len(model),
                      opset=opset_used, axis_names=axis_names)


def _parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _small_enough(model: nn.Module) -> bool:
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return size < _PROTOBUF_LIMIT // 2


def _torch_onnx_export(wrapper: nn.Module, tensors: tuple, dyn: tuple, input_names: list[str],
                       output_names: list[str], opset: int | None) -> Any:
    """torch.onnx.export (dynamo); when the dynamic shapes cannot be kept, static shapes."""
    common = dict(dynamo=True, input_names=input_names, output_names=output_names,
                  opset_version=opset, verbose=False, optimize=True)
    failure = None
    if any(d is not None for d in dyn):
        try:
            with _quiet():
                return torch.onnx.export(wrapper, tensors, dynamic_shapes=(dyn,), **common)
        except Exception as e:  # noqa: BLE001 - retry with the example shapes
            failure = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    if failure:
        warnings.warn(f"export_onnx: the dynamic axes could not be kept ({failure}); exporting "
                      "with the example input shapes instead", stacklevel=3)
    with _quiet():
        return torch.onnx.export(wrapper, tensors, **common)
