"""Install a rewritten graph on the user's own module.

The module keeps its identity, parameters and names; its class becomes a subclass of the
original class (same name) whose ``forward`` is the graph's generated code, so a
BertSelfAttention is still a BertSelfAttention. Instances pickle (``torch.save``) and deep-copy:
they reduce to (original class, imports, source, extra globals, state) and are rebuilt by
``_rebuild``. An ``fx.GraphModule`` (e.g. a loaded torch.export program) gets the new graph.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule


def install(module: nn.Module, gm: GraphModule) -> None:
    """Make ``gm``'s code the forward of ``module`` (class becomes a subclass of the original)."""
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
    if isinstance(module, GraphModule):  # an FX / torch.export module: replace its graph,
        module.graph = gm.graph  # so that code reading .graph (torch.export) sees the rewrite
        module.recompile()
        return
    from torch.fx.graph_module import _format_import_statement
    from torch.package import sys_importer
    code = gm.graph.python_code(root_module="self")
    lines, extra = [], {}
    for name, obj in code.globals.items():  # import what can be imported, keep the rest
        try:
            lines.append(_format_import_statement(name, obj, sys_importer))
        except Exception:  # noqa: BLE001
            extra[name] = obj
    base = getattr(type(module), "_flurka_base", type(module))
    module.__class__ = _rewritten_class(base, "\n".join(sorted(set(lines))), code.src, extra)


def _rewritten_class(base: type, imports: str, src: str, extra: dict[str, Any]) -> type:
    """Subclass of ``base`` whose forward is the rewritten graph's code (picklable: the
    instance pickles as (base, imports, src, extra globals, state), see ``_rebuild``)."""
    glb: dict[str, Any] = dict(extra)
    exec(compile(imports + "\n" + src, f"<flurka {base.__name__}>", "exec"), glb)  # noqa: S102

    def __reduce_ex__(self, protocol):  # noqa: N807
        return (_rebuild, (base, imports, src, extra, self.__dict__))

    return type(base.__name__, (base,), {
        "forward": glb["forward"], "_flurka_base": base, "_flurka_code": src,
        "__module__": base.__module__, "__reduce_ex__": __reduce_ex__})


def _rebuild(base: type, imports: str, src: str, extra: dict, state: dict) -> nn.Module:
    """Unpickle a rewritten module (see ``_rewritten_class``)."""
    cls = _rewritten_class(base, imports, src, extra)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj
