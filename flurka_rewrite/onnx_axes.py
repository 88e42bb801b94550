"""Named dynamic axes for ``export_onnx``: the exporter names a symbolic input size after
its internal symbol (``s0``, ``s17``), and may give two inputs' batch axes two symbols when
the model would broadcast one of them. Here every dynamic batch axis becomes ``batch_size``
and every dynamic sequence axis ``sequence_length``: one name for the axes of one role whose
sizes agree on the example inputs (``input_ids`` and ``attention_mask`` share both), renamed
through every shape expression of the graph. A decoder's inputs (``decoder_*``) have
``decoder_sequence_length``; an axis whose example size differs from the others of its role
(a cross-attention mask's keys) gets a numbered name, ``sequence_length_2``.
"""
from __future__ import annotations

import re
from typing import Any, Iterator

BATCH, SEQUENCE = "batch_size", "sequence_length"


def _values(model: Any) -> Iterator[Any]:
    """Every value of an ``onnx_ir`` model: graph inputs, node outputs (subgraphs too),
    graph outputs, functions."""
    import onnx_ir as ir

    yield from model.graph.inputs
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        yield from node.outputs
    yield from model.graph.outputs
    for function in model.functions.values():
        yield from function.inputs
        for node in ir.traversal.RecursiveGraphIterator(function):
            yield from node.outputs


def _rename(expr: str, mapping: dict[str, str]) -> str:
    for old in sorted(mapping, key=len, reverse=True):  # "s11" before "s1"
        expr = re.sub(rf"(?<!\w){re.escape(old)}(?!\w)", mapping[old], expr)
    return expr


def name_dynamic_axes(model: Any, inputs: dict[str, tuple[tuple[int, ...], Any]]
                      ) -> dict[str, dict[int, str]]:
    """Rename, in place, the symbolic sizes of the ``onnx_ir`` model's inputs: ``inputs``
    maps an input name to (its example shape, the axes asked dynamic: a dict or None).
    Returns input name -> {axis: name} of the symbolic axes."""
    import onnx_ir as ir

    mapping: dict[str, str] = {}
    names_of: dict[tuple[str, int], str] = {}  # (role, example size) -> name
    count: dict[str, int] = {}
    for value in model.graph.inputs:
        shape, axes = inputs.get(value.name, ((), None))
        if value.shape is None:
            continue
        for axis in sorted(axes or {}):
            dim = value.shape[axis] if axis < len(value.shape) else None
            if not isinstance(dim, ir.SymbolicDim) or not isinstance(dim.value, str) or \
                    dim.value in mapping:
                continue
            role = BATCH if axis == 0 else (
                f"decoder_{SEQUENCE}" if value.name.startswith("decoder_") else SEQUENCE)
            key = (role, shape[axis])
            if key not in names_of:
                count[role] = count.get(role, 0) + 1
                names_of[key] = role if count[role] == 1 else f"{role}_{count[role]}"
            mapping[dim.value] = names_of[key]
    return rename_axes(model, mapping)


def rename_axes(model: Any, mapping: dict[str, str]) -> dict[str, dict[int, str]]:
    """Rename the symbolic dims of every value of ``model`` (an onnx_ir model) by ``mapping``;
    returns each input's named axes {input: {axis: name}}."""
    import onnx_ir as ir
    for value in _values(model):
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(_rename(d.value, mapping))
                if isinstance(d, ir.SymbolicDim) and isinstance(d.value, str) else d
                for d in value.shape]
        if any(a is not b for a, b in zip(dims, value.shape)):
            value.shape = ir.Shape(dims)
    names: dict[str, dict[int, str]] = {}
    for value in model.graph.inputs:
        axes = {i: d.value for i, d in enumerate(value.shape or ())
                if isinstance(d, ir.SymbolicDim) and isinstance(d.value, str)}
        if axes:
            names[value.name] = axes
    return names
