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

The rewritten graph is installed on the user's module itself (``install``): its class becomes a
subclass of the original class with the graph's code as ``forward``, so a BertSelfAttention
is still a BertSelfAttention and the model keeps its parameters, names and class.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.fx import Graph, GraphModule, Interpreter, Node
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

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
    def __init__(self, stack: list[str], found: list[str]) -> None:
        super().__init__()
        self.stack, self.found = stack, found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _ATTN_FUNCS and self.stack:
            if self.stack[-1] not in self.found:
                self.found.append(self.stack[-1])
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
    try:
        # grad enabled: keeps nn.TransformerEncoderLayer off its fused fast path, which would
        # bypass the MultiheadAttention modules
        with torch.enable_grad(), _AttnCallMode(stack, found):
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


def _try_symbolic(path: str, module: nn.Module, args: tuple, kwargs: dict,
                  leaves: set[int]) -> Captured | None:
    try:
        graph = _LeafTracer(leaves).trace(module)
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


def _auto_dims(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return {i: torch.export.Dim.AUTO for i in range(x.dim())} if x.dim() else None
    if isinstance(x, (tuple, list)):
        return type(x)(_auto_dims(a) for a in x)
    if isinstance(x, dict):
        return {k: _auto_dims(v) for k, v in x.items()}
    return None


_PRIMITIVE = (type(None), bool, int, float, str)
_HARMLESS = {"use_cache", "return_dict"}  # flags that do not change what the site computes


def _guard(value: Any, expected: Any, name: str, where: str) -> Any:
    """Runtime check that a non-tensor argument captured as a constant still fits the graph.

    Primitives must be equal (except flags in ``_HARMLESS``). A KV cache object is accepted
    once per module while empty (prefill); the rewritten attention neither reads nor fills it,
    so a second call with the same cache (incremental decoding) raises instead of silently
    attending to the new tokens only."""
    if hasattr(value, "get_seq_length"):
        seen = value.__dict__.setdefault("_flurka_seen", set())
        if where in seen:
            raise RuntimeError(
                f"{where}: incremental decoding with a KV cache is not supported by the "
                "rewritten attention (it recomputes the whole sequence); call the model or "
                "generate() with use_cache=False")
        seen.add(where)
        return value
    if name in _HARMLESS or not isinstance(expected, _PRIMITIVE) or expected is None and \
            not isinstance(value, _PRIMITIVE):
        return value
    if value is not expected and value != expected:
        raise RuntimeError(
            f"{where}: flurka-rewrite captured this module with {name}={expected!r} but it was "
            f"called with {name}={value!r}; convert the model again with example inputs that "
            f"use {name}={value!r}")
    return value


def _try_export(path: str, module: nn.Module, args: tuple, kwargs: dict,
                cache: dict | None = None) -> Captured:
    sig = inspect.signature(module.forward)
    bound = sig.bind(*args, **kwargs)
    kw = {k: v for k, v in bound.arguments.items()}
    var_kw = next((n for n, p in sig.parameters.items() if p.kind == p.VAR_KEYWORD), None)
    var_pos = next((n for n, p in sig.parameters.items() if p.kind == p.VAR_POSITIONAL), None)
    extra = kw.pop(var_kw, {}) if var_kw else {}
    if var_pos and var_pos in kw:
        kw[var_pos] = tuple(kw[var_pos])
    consts = {k: v for k, v in {**kw, **extra}.items()
              if not any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v))}
    call_kw = {k: v for k, v in {**kw, **extra}.items() if k not in consts}
    key = _key(module, call_kw, consts)
    if cache is not None and key in cache:
        g0, how, consts_used = cache[key]
        g = _copy_graph(g0)
        for name, t in consts_used.items():
            if not hasattr(module, name):
                module.register_buffer(name, t, persistent=False)
    else:
        how = "export"
        wrapped = _KwargsOnly(module, sig)
        with _quiet():
            try:
                ep = torch.export.export(wrapped, (call_kw,), strict=False,
                                         dynamic_shapes=(_auto_dims(call_kw),))
            except Exception:  # noqa: BLE001 - retry with static shapes
                ep = torch.export.export(wrapped, (call_kw,), strict=False)
                how = "export (static shapes)"
        g, how, consts_used = _from_export(module, ep, consts, sig, var_kw, how,
                                           type(module).__name__)
        if cache is not None:
            cache[key] = (_copy_graph(g), how, consts_used)
    for n in g.nodes:  # name this module in its guards (the graph may be shared)
        if n.op == "call_function" and n.target is _guard:
            n.args = (*n.args[:3], path or type(module).__name__)
    gm = GraphModule(module, g)
    ph_names = [n for n, p in sig.parameters.items() if p.kind != p.VAR_KEYWORD]
    vals = _export_values(gm.graph, ph_names, var_kw, {**call_kw, **consts})
    return Captured(path, module, gm, vals, how)


class _KwargsOnly(nn.Module):
    """Export wrapper: one dict of tensor arguments (None / flags left at their defaults), so
    ``dynamic_shapes`` matches whatever mix of named and ``**kwargs`` arguments the module has."""

    def __init__(self, mod: nn.Module, sig: inspect.Signature) -> None:
        super().__init__()
        self.mod = mod
        names = list(sig.parameters)
        self.var_pos = next((n for n, p in sig.parameters.items()
                             if p.kind == p.VAR_POSITIONAL), None)
        self.before = names[:names.index(self.var_pos)] if self.var_pos else []

    def forward(self, kw: dict[str, Any]) -> Any:
        if self.var_pos is None:
            return self.mod(**kw)
        kw = dict(kw)
        pos = [kw.pop(n, None) for n in self.before] + list(kw.pop(self.var_pos, ()))
        return self.mod(*pos, **kw)


def _copy_graph(g0: Graph) -> Graph:
    g = Graph()
    g.output(g.graph_copy(g0, {}))
    return g


class _quiet:
    """Silence export's per-dimension specialization warnings while capturing."""

    def __enter__(self) -> None:
        import logging
        self.loggers = [logging.getLogger(n) for n in (
            "torch._export.non_strict_utils", "torch.fx.experimental.symbolic_shapes",
            "torch.export")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        for lg, lvl in zip(self.loggers, self.levels):
            lg.setLevel(lvl)


def _from_export(module: nn.Module, ep: Any, consts: dict, sig: inspect.Signature,
                 var_kw: str | None, how: str, where: str) -> tuple[Graph, str, dict]:
    src = ep.graph_module.graph
    sig_e = ep.graph_signature
    if any(s.kind.name not in ("USER_OUTPUT",) for s in sig_e.output_specs):
        raise RuntimeError("the module mutates buffers; not supported by the export capture")
    g = Graph()
    env: dict[Node, Any] = {}
    # placeholders: the module's own argument names, in signature order
    ph: dict[str, Node] = {}
    for name, p in sig.parameters.items():
        if p.kind == p.VAR_KEYWORD:
            ph[name] = g.placeholder("**" + name)
        elif p.kind == p.VAR_POSITIONAL:
            ph[name] = g.placeholder("*" + name)
        else:
            default = p.default if p.default is not inspect.Parameter.empty else inspect._empty
            node = g.placeholder(name, default_value=default)
            ph[name] = node

    def arg_node(key: str) -> Node:
        if key in ph and key != var_kw:
            return ph[key]
        return g.call_method("get", (ph[var_kw], key))

    for key, val in consts.items():  # guard every constant argument
        expected = val if isinstance(val, _PRIMITIVE) else None
        g.call_function(_guard, (arg_node(key), expected, key, where))
    # user inputs in export order
    n_user = len(sig_e.user_inputs)
    struct = pytree.tree_unflatten(list(range(n_user)), ep.call_spec.in_spec)
    leaf_paths = [p for p, _ in pytree.tree_flatten_with_path(struct)[0]]
    user_nodes: dict[str, Node] = {}
    for name, kp in zip(sig_e.user_inputs, leaf_paths):
        key = kp[2].key  # (args, 0, name, ...): the wrapper's one dict argument
        node = arg_node(key)
        for k in kp[3:]:
            idx = k.idx if hasattr(k, "idx") else k.key
            node = g.call_function(operator.getitem, (node, idx))
        user_nodes[name] = node
    consts_t = getattr(ep, "constants", {})
    for spec in sig_e.input_specs:
        kind = spec.kind.name
        target = spec.target[4:] if spec.target and spec.target.startswith("mod.") \
            else spec.target
        if kind in ("PARAMETER", "BUFFER"):
            user_nodes[spec.arg.name] = g.get_attr(target)
        elif kind == "CONSTANT_TENSOR":
            attr = "_flurka_const_" + target.replace(".", "_")
            if not hasattr(module, attr):
                module.register_buffer(attr, consts_t[spec.target], persistent=False)
            user_nodes[spec.arg.name] = g.get_attr(attr)
    for n in src.nodes:
        if n.op == "placeholder":
            env[n] = user_nodes.get(n.name)
        elif n.op == "output":
            flat = n.args[0]
            out = pytree.tree_unflatten([env.get(x) if isinstance(x, Node) else x for x in flat],
                                        ep.call_spec.out_spec)
            g.output(out)
        else:
            env[n] = g.node_copy(n, lambda x: env[x])
    consts_used = {n.target: getattr(module, n.target) for n in g.nodes
                   if n.op == "get_attr" and n.target.startswith("_flurka_const_")}
    return g, how, consts_used


def _export_values(g: Graph, ph_names: list[str], var_kw: str | None,
                   bound: dict[str, Any]) -> dict[str, Any]:
    vals = {}
    for n in g.nodes:
        if n.op == "placeholder":
            t = n.target.lstrip("*")
            vals[n.name] = ({k: v for k, v in bound.items() if k not in ph_names}
                            if t == var_kw else bound.get(t, n.args[0] if n.args else None))
    return vals


def _key(module: nn.Module, call_kw: dict, consts: dict) -> Any:
    """Structure of a module and its call: identical layers share one export."""
    def sig(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("T", v.dim(), v.dtype, tuple(s == 1 for s in v.shape))
        return repr(v)
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
    bufs = tuple((n, tuple(b.shape)) for n, b in module.named_buffers())
    return (type(module), params, bufs,
            tuple((k, pytree.tree_map(sig, v)) for k, v in sorted(call_kw.items())),
            tuple((k, repr(v)) for k, v in sorted(consts.items())))


def capture_module(path: str, module: nn.Module, args: tuple, kwargs: dict,
                   leaves: set[int] | None = None, cache: dict | None = None) -> Captured:
    """Graph of ``module`` for its recorded call (symbolic_trace, else torch.export).
    ``leaves``: ids of submodules symbolic_trace keeps as calls (already captured units)."""
    cap = _try_symbolic(path, module, args, kwargs, leaves or set())
    if cap is not None:
        return cap
    return _try_export(path, module, args, kwargs, cache)


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def placeholder(self, target: str, args: tuple, kwargs: dict) -> Any:
        if target.startswith("**"):
            return next(self.args_iter, {})
        if target.startswith("*"):
            return tuple(next(self.args_iter, ()))
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


def install(module: nn.Module, gm: GraphModule) -> None:
    """Make ``gm``'s code the forward of ``module`` (class becomes a subclass of the original)."""
    code = gm.graph.python_code(root_module="self")
    glb = dict(code.globals)
    exec(compile(code.src, f"<flurka {type(module).__name__}>", "exec"), glb)  # noqa: S102
    for name, child in gm.named_children():
        if name.startswith("flurka_") and not hasattr(module, name):
            module.add_module(name, child)
    for n in gm.graph.nodes:  # tensor constants the tracer added to the GraphModule
        if n.op == "get_attr" and "." not in n.target and not hasattr(module, n.target):
            val = getattr(gm, n.target)
            if isinstance(val, torch.Tensor):
                module.register_buffer(n.target, val, persistent=False)
            else:
                setattr(module, n.target, val)
    base = getattr(type(module), "_flurka_base", type(module))
    cls = type(base.__name__, (base,), {"forward": glb["forward"], "_flurka_base": base,
                                        "_flurka_code": code.src, "__module__": base.__module__})
    module.__class__ = cls
