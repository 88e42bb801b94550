"""Capture: find the modules that hold attention and get an FX graph for each.

1. ``discover`` runs the model once on the example inputs with a pre-hook on every submodule
   (recording its real args/kwargs and call count) and a ``TorchFunctionMode`` that notes the
   innermost module active when softmax / scaled_dot_product_attention /
   multi_head_attention_forward is called. ``nn.MultiheadAttention`` modules are sites by
   themselves (module-level rewrite, ``passes/mha.py``).
2. ``capture_module`` gets a graph for one such module: ``torch.fx.symbolic_trace`` when it
   traces and runs on the recorded inputs, else ``torch.export`` on the recorded inputs (dynamic
   sizes via ``Dim.AUTO``; static when that fails). Export graphs are turned into a plain FX
   graph rooted at the module: parameters and buffers become ``get_attr`` of their own names,
   placeholders are the module's forward arguments, and non-tensor arguments captured as
   constants (None, flags) are guarded so a call that differs fails loudly.
3. ``values_of`` runs the graph once with an ``Interpreter`` and keeps every node's value (shapes,
   masks, numerical checks of the projection chains, rel_error).

The rewritten graph is installed on the user's module itself (``passes/install.py``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule, Interpreter, Node
from torch.overrides import TorchFunctionMode

from .export_capture import _guard, export_graph

_ATTN_FUNCS = {"softmax", "_softmax", "scaled_dot_product_attention",
               "multi_head_attention_forward"}


@dataclass
class Discovery:
    """What one forward run on the example inputs told us."""

    holders: list[str]  # innermost modules calling softmax/sdpa (graph order), MHAs excluded
    mha: list[str]  # nn.MultiheadAttention module paths that ran
    inputs: dict[str, tuple[tuple, dict]]  # path -> (args, kwargs) of the first call
    calls: dict[str, int] = field(default_factory=dict)


class _AttnCallMode(TorchFunctionMode):
    def __init__(self, stack: list[str], found: list[str], wrappers: set[str]) -> None:
        super().__init__()
        self.stack, self.found, self.wrappers = stack, found, wrappers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # OpOverloads (graphs from torch.export) are named "softmax.int": drop the overload
        if getattr(func, "__name__", "").split(".")[0] in _ATTN_FUNCS and self.stack:
            # an nn.Softmax module holds no q k^T: the attention is in the module calling it
            holder = next((p for p in reversed(self.stack) if p not in self.wrappers), None)
            if holder is not None and holder not in self.found:
                self.found.append(holder)
        return func(*args, **(kwargs or {}))


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` on a tuple of positional args, a dict of kwargs, or one tensor."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def discover(model: nn.Module, example_inputs: Any) -> Discovery:
    """Run ``model`` once and record where attention happens and each module's inputs."""
    stack: list[str] = []
    found: list[str] = []
    inputs: dict[str, tuple[tuple, dict]] = {}
    calls: dict[str, int] = {}
    handles = []
    for path, mod in model.named_modules():
        def pre(m, args, kwargs, path=path):
            stack.append(path)
            calls[path] = calls.get(path, 0) + 1
            inputs.setdefault(path, (args, dict(kwargs)))

        def post(m, args, kwargs, out, path=path):
            if stack and stack[-1] == path:
                stack.pop()
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True, always_call=True))
    # grad enabled only when there is an MHA: keeps nn.TransformerEncoderLayer off its fused
    # fast path, which would bypass the MultiheadAttention modules
    has_mha = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    wrappers = {p for p, m in model.named_modules() if isinstance(m, (nn.Softmax, nn.Softmax2d))}
    try:
        with torch.set_grad_enabled(has_mha), _AttnCallMode(stack, found, wrappers):
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    mods = dict(model.named_modules())
    mha = [p for p, m in mods.items() if isinstance(m, nn.MultiheadAttention) and p in inputs]
    holders = [p for p in found if not isinstance(mods[p], nn.MultiheadAttention)
               and not any(p.startswith(q + ".") for q in mha)]
    return Discovery(holders, mha, inputs, calls)


@dataclass
class Captured:
    """A graph for one module: ``gm`` (rooted at the module) and its placeholder values."""

    path: str
    module: nn.Module
    gm: GraphModule
    inputs: dict[str, Any]  # placeholder name -> value on the example inputs
    how: str  # "symbolic_trace" | "export" | "export (static shapes)"


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    b = inspect.signature(module.forward).bind(*args, **kwargs)
    b.apply_defaults()
    return b


def _placeholder_values(gm: GraphModule, bound: inspect.BoundArguments) -> dict[str, Any]:
    vals = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            name = n.target.lstrip("*")
            vals[n.name] = bound.arguments.get(name, n.args[0] if n.args else None)
    return vals


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, leaves: set[int]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.leaves or super().is_leaf_module(m, qualname)


def _opaque(graph: torch.fx.Graph) -> bool:
    """The traced graph calls a function the matcher cannot see into: a ``torch.fx.wrap`` leaf
    of user code (timm's ``maybe_add_mask``) or ``F.multi_head_attention_forward``. Such a
    module is captured with torch.export, which traces through them."""
    import types
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        t = n.target
        if t is torch.nn.functional.multi_head_attention_forward:
            return True
        if isinstance(t, types.FunctionType) and not (t.__module__ or "").startswith(
                ("torch", "flurka_rewrite", "math", "operator", "_operator")):
            return True
    return False


def _try_symbolic(path: str, module: nn.Module, args: tuple, kwargs: dict,
                  leaves: set[int]) -> Captured | None:
    try:
        graph = _LeafTracer(leaves).trace(module)
        if _opaque(graph):
            return None
        gm = GraphModule(module, graph, type(module).__name__)
        bound = _bind(module, args, kwargs)
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and bound.arguments.get(n)
               for n, p in bound.signature.parameters.items()):
            return None
        vals = _placeholder_values(gm, bound)
        cap = Captured(path, module, gm, vals, "symbolic_trace")
        values_of(cap)  # must run on the recorded inputs
        return cap
    except Exception:  # noqa: BLE001 - any failure means: use torch.export
        return None


def capture_module(path: str, module: nn.Module, args: tuple, kwargs: dict,
                   leaves: set[int] | None = None, cache: dict | None = None) -> Captured:
    """Graph of ``module`` for its recorded call (symbolic_trace, else torch.export).
    ``leaves``: ids of submodules symbolic_trace keeps as calls (already captured units)."""
    cap = _try_symbolic(path, module, args, kwargs, leaves or set())
    if cap is not None:
        return cap
    gm, vals, how = export_graph(path, module, args, kwargs, cache)
    return Captured(path, module, gm, vals, how)


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def placeholder(self, target: str, args: tuple, kwargs: dict) -> Any:
        if target.startswith("**"):
            return next(self.args_iter, {})
        if target.startswith("*"):
            return tuple(next(self.args_iter, ()) or ())
        return super().placeholder(target, args, kwargs)

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target is _guard:  # the recorded call is the one the graph was made from
            return args[0]
        return super().call_function(target, args, kwargs)

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def values_of(cap: Captured) -> dict[str, Any]:
    """Every node's value on the example inputs (node name -> value), under no_grad."""
    placeholders = [n for n in cap.gm.graph.nodes if n.op == "placeholder"]
    rec = _Recorder(cap.gm)
    args = [cap.inputs.get(n.name) for n in placeholders]
    with torch.no_grad():  # one value per placeholder (*args as a tuple, **kwargs as a dict)
        rec.run(*args)
    return rec.values
