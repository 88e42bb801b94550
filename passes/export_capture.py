"""torch.export capture of one module, turned into a plain FX graph rooted at the module.

Used when ``symbolic_trace`` fails (always for Hugging Face 5.x attention modules, see
docs/internal/hf_graphs.md). The module is exported on its recorded call through a wrapper
that takes one dict of tensor arguments (non-tensor arguments are baked in), with every tensor
dimension ``Dim.AUTO`` so the sequence length stays dynamic; when that fails the export is
static and the report says so. The exported graph is rebuilt so that parameters and buffers are
``get_attr`` of their own names, placeholders are the module's forward arguments, and each
non-tensor argument is checked at run time by ``_guard``. Identical layers (same class,
parameter shapes and call structure) share one export (``cache``).
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import operator
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.fx import Graph, GraphModule, Node
from torch.utils import _pytree as pytree

from .module_calls import fold_leaf_calls


def _auto_dims(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return {i: torch.export.Dim.AUTO for i in range(x.dim())} if x.dim() else None
    if isinstance(x, (tuple, list)):
        return type(x)(_auto_dims(a) for a in x)
    if isinstance(x, dict):
        return {k: _auto_dims(v) for k, v in x.items()}
    return None


_PRIMITIVE = (type(None), bool, int, float, str)
OPAQUE = "<flurka: an object, not checked>"  # _guard's expected value for non-primitives
_HARMLESS = {"use_cache", "return_dict"}  # flags that do not change what the site computes
# The KV cache a rewritten module's call is bound to (passes/install.py: its sites continue
# from a state kept in that cache), which the guard then accepts on every call.
BOUND_CACHE: contextvars.ContextVar[Any] = contextvars.ContextVar("flurka_bound_cache",
                                                                  default=None)


def _guard(value: Any, expected: Any, name: str, where: str) -> Any:
    """Runtime check that a non-tensor argument captured as a constant still fits the graph.

    Primitives must be equal (except flags in ``_HARMLESS``). A KV cache object is accepted
    on every call while the module's call is bound to it (``BOUND_CACHE``: the rewritten
    sites then continue from a state kept in it); otherwise once per module while empty
    (prefill): the graph neither reads nor fills it, so a second call with the same cache
    (incremental decoding) raises instead of silently attending to the new tokens only."""
    if value is not None and value is BOUND_CACHE.get():
        return value
    if hasattr(value, "get_seq_length"):
        seen = value.__dict__.setdefault("_flurka_seen", set())
        if where in seen:
            why = value.__dict__.get("_flurka_why", "the rewritten attention recomputes "
                                     "the whole sequence")
            raise RuntimeError(
                f"{where}: incremental decoding with a KV cache is not supported here "
                f"({why}); call the model or generate() with use_cache=False")
        seen.add(where)
        return value
    if name in _HARMLESS or (isinstance(expected, str) and expected == OPAQUE):
        return value
    if expected is None and isinstance(value, torch.Tensor) and torch.compiler.is_exporting():
        # Under torch.export (ONNX export of the converted model) Hugging Face builds an
        # all-ones mask where eager code passes None; a unit that can receive a real mask
        # there was captured with one too (passes/probe.py) and never reaches this guard.
        return value
    if expected is None and value is not None:
        raise RuntimeError(
            f"{where}: flurka-rewrite captured this module with {name}=None but it was called "
            f"with a {type(value).__name__} there, which the captured graph would ignore; "
            f"convert the model again with example inputs that pass {name}")
    if value is not expected and value != expected:
        raise RuntimeError(
            f"{where}: flurka-rewrite captured this module with {name}={expected!r} but it was "
            f"called with {name}={value!r}; convert the model again with example inputs that "
            f"use {name}={value!r}")
    return value


def export_graph(path: str, module: nn.Module, args: tuple, kwargs: dict,
                 cache: dict | None = None) -> tuple[GraphModule, dict[str, Any], str]:
    """(graph rooted at ``module``, placeholder values, how) from torch.export."""
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
        fixed = {k: v for k, v in consts.items() if isinstance(v, _PRIMITIVE)}
        wrapped = _KwargsOnly(module, sig, fixed)
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
    return gm, vals, how


class _KwargsOnly(nn.Module):
    """Export wrapper: one dict of tensor arguments (None / flags left at their defaults), so
    ``dynamic_shapes`` matches whatever mix of named and ``**kwargs`` arguments the module has."""

    def __init__(self, mod: nn.Module, sig: inspect.Signature, fixed: dict[str, Any]) -> None:
        super().__init__()
        self.mod, self.fixed = mod, fixed  # fixed: non-tensor arguments, baked in (guarded)
        names = list(sig.parameters)
        self.var_pos = next((n for n, p in sig.parameters.items()
                             if p.kind == p.VAR_POSITIONAL), None)
        self.before = names[:names.index(self.var_pos)] if self.var_pos else []

    def forward(self, kw: dict[str, Any]) -> Any:
        kw = {**kw, **self.fixed}
        if self.var_pos is None:
            return self.mod(**kw)
        pos = [kw.pop(n, None) for n in self.before] + list(kw.pop(self.var_pos, ()))
        return self.mod(*pos, **kw)


def _copy_graph(g0: Graph) -> Graph:
    g = Graph()
    g.output(g.graph_copy(g0, {}))
    return g


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the level of the named loggers for the block (torch.export's specialization
    notes, its load warnings, the ONNX exporter's progress): the project's one silencer."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _quiet() -> contextlib.AbstractContextManager:
    """Silence export's per-dimension specialization warnings while capturing."""
    return quiet_loggers("torch._export.non_strict_utils",
                         "torch.fx.experimental.symbolic_shapes", "torch.export")


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
        expected = val if isinstance(val, _PRIMITIVE) else OPAQUE
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
            g.output(_rebuilt(g, out))
        else:
            env[n] = g.node_copy(n, lambda x: env[x])
    fold_leaf_calls(g, module)  # self.query(x) stays a call of query (swapped modules work)
    consts_used = {n.target: getattr(module, n.target) for n in g.nodes
                   if n.op == "get_attr" and n.target.startswith("_flurka_const_")}
    return g, how, consts_used


def _rebuilt(g: Graph, out: Any) -> Any:
    """The module's output structure with graph nodes inside. Tuples, lists and plain dicts
    are written out by FX's code generation; any other container (a Hugging Face
    ``ModelOutput``) would be written as a plain dict, so it is built by a call to its class."""
    if isinstance(out, (tuple, list)):
        return type(out)(_rebuilt(g, x) for x in out) if type(out) in (tuple, list) else \
            g.call_function(type(out), tuple(_rebuilt(g, x) for x in out))
    if isinstance(out, dict):
        items = {k: _rebuilt(g, v) for k, v in out.items()}
        return items if type(out) is dict else g.call_function(type(out), (), items)
    return out


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
