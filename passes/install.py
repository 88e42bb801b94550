"""Install a rewritten graph on the user's own module.

The module keeps its identity, parameters and names; its class becomes a subclass of the
original class (same name) whose ``forward`` is the graph's generated code, so a
BertSelfAttention is still a BertSelfAttention. Instances pickle (``torch.save``) and deep-copy:
they reduce to (original class, code variants, dispatch keys, state) and are rebuilt by
``_rebuild``. An ``fx.GraphModule`` (e.g. a loaded torch.export program) gets the new graph.

Variants: a module captured twice, once with an optional tensor argument absent (``None``, e.g.
Hugging Face passes ``attention_mask=None`` for a batch without padding) and once with it given
(the padded probe), gets both graphs; ``forward`` runs the second one whenever any of the
``when_given`` arguments is not None. ``choose_variant`` is that rule, shared with verification.

KV caches: a call that passes a KV cache object (anything with ``get_seq_length``, e.g. a
Hugging Face ``DynamicCache``) runs inside the context the registered cache binder returns
(``set_cache_binder``; flurka_rewrite/hf_generate.py registers the one that continues every
rewritten site from a recurrent state kept in the cache). While it runs, the capture's guard
(``export_capture._guard``) accepts that cache; when the binder declines (returns None) or
none is registered, the guard accepts the cache once while empty and refuses a second call.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
import torch.nn as nn
from torch.fx import GraphModule

from .export_capture import BOUND_CACHE

# binder(module, cache, args, kwargs) -> a context manager to run the call in, or None when
# the call cannot be bound (see the module docstring); unset until the top-level package
# registers one.
CacheBinder = Callable[[nn.Module, Any, tuple, dict], "ContextManager[None] | None"]
_CACHE_BINDER: list[CacheBinder] = []


def set_cache_binder(binder: CacheBinder) -> None:
    """Register the function every rewritten module calls when it is given a KV cache."""
    _CACHE_BINDER[:] = [binder]


def _cache_in(args: tuple, kwargs: dict) -> Any:
    """The KV cache object among a call's arguments (duck-typed as the guard does), or None."""
    for a in (*args, *kwargs.values()):
        if a is not None and not isinstance(a, torch.Tensor) and hasattr(a, "get_seq_length"):
            return a
    return None


def _code(gm: GraphModule) -> tuple[str, str, dict[str, Any]]:
    """(imports, source, extra globals) of ``gm``'s forward, rooted at ``self``."""
    from torch.fx.graph_module import _format_import_statement
    from torch.package import sys_importer
    code = gm.graph.python_code(root_module="self")
    lines, extra = [], {}
    for name, obj in code.globals.items():  # import what can be imported, keep the rest
        try:
            lines.append(_format_import_statement(name, obj, sys_importer))
        except Exception:  # noqa: BLE001
            extra[name] = obj
    return "\n".join(sorted(set(lines))), code.src, extra


def _adopt(module: nn.Module, gm: GraphModule) -> None:
    """Give ``module`` the FlurkaAttention children and tensor constants ``gm`` refers to."""
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


def install(module: nn.Module, gm: GraphModule, given: GraphModule | None = None,
            when_given: Sequence[str] = ()) -> None:
    """Make ``gm``'s code the forward of ``module`` (class becomes a subclass of the original).
    With ``given``: that graph runs instead whenever an argument named in ``when_given`` is
    not None (see the module docstring)."""
    _adopt(module, gm)
    if given is not None:
        _adopt(module, given)
    if isinstance(module, GraphModule):  # an FX / torch.export module: replace its graph,
        if given is not None:
            raise ValueError("a GraphModule cannot hold two graph variants")
        module.graph = gm.graph  # so that code reading .graph (torch.export) sees the rewrite
        module.recompile()
        return
    variants = [_code(gm)] + ([_code(given)] if given is not None else [])
    base = getattr(type(module), "_flurka_base", type(module))
    module.__class__ = _rewritten_class(base, variants, tuple(when_given))


def _argument(bound: inspect.BoundArguments, name: str) -> Any:
    if name in bound.arguments:
        return bound.arguments[name]
    for pname, p in bound.signature.parameters.items():
        if p.kind == p.VAR_KEYWORD and pname in bound.arguments:
            return bound.arguments[pname].get(name)
    return None


@functools.lru_cache(maxsize=256)
def signature(fn: Callable[..., Any]) -> inspect.Signature:
    """``inspect.signature(fn)``, computed once per function (it is read on every call of a
    rewritten module; building it costs more than a decoding step's attention)."""
    return inspect.signature(fn)


def choose_variant(forward: Any, when_given: Sequence[str], args: tuple, kwargs: dict) -> int:
    """0 (the first graph) or 1 (the ``given`` graph) for a call of ``forward(*args,
    **kwargs)``: 1 when any argument named in ``when_given`` is not None."""
    if not when_given:
        return 0
    bound = signature(forward).bind(*args, **kwargs)
    return int(any(_argument(bound, n) is not None for n in when_given))


def _rewritten_class(base: type, variants: list[tuple[str, str, dict[str, Any]]],
                     when_given: tuple[str, ...]) -> type:
    """Subclass of ``base`` whose forward is the rewritten graph's code (picklable: the
    instance pickles as (base, variants, when_given, state), see ``_rebuild``)."""
    fns = []
    for imports, src, extra in variants:
        glb: dict[str, Any] = dict(extra)
        exec(compile(imports + "\n" + src, f"<flurka {base.__name__}>", "exec"), glb)
        fns.append(glb["forward"])
    if len(fns) == 1:
        run = fns[0]
    else:
        main, given = fns
        sig_fn = base.forward

        def run(self, *args, **kwargs):
            if choose_variant(sig_fn, when_given, (self, *args), kwargs):
                return given(self, *args, **kwargs)
            return main(self, *args, **kwargs)

    def forward(self, *args, **kwargs):
        cache = _cache_in(args, kwargs)
        ctx = None if cache is None or not _CACHE_BINDER else \
            _CACHE_BINDER[0](self, cache, args, kwargs)
        if ctx is None:
            return run(self, *args, **kwargs)
        token = BOUND_CACHE.set(cache)
        try:
            with ctx:
                return run(self, *args, **kwargs)
        finally:
            BOUND_CACHE.reset(token)

    def __reduce_ex__(self, protocol):
        return (_rebuild, (base, variants, when_given, self.__dict__))

    return type(base.__name__, (base,), {
        "forward": forward, "_flurka_base": base, "_flurka_code": variants[0][1],
        "_flurka_when_given": when_given,
        "__module__": base.__module__, "__reduce_ex__": __reduce_ex__})


def _rebuild(base: type, *rest: Any) -> nn.Module:
    """Unpickle a rewritten module (see ``_rewritten_class``). ``rest`` is (variants,
    when_given, state), or (imports, src, extra, state) as pickled by version 0.1.0."""
    if len(rest) == 4:  # 0.1.0: one variant
        imports, src, extra, state = rest
        variants, when_given = [(imports, src, extra)], ()
    else:
        variants, when_given, state = rest
    cls = _rewritten_class(base, variants, tuple(when_given))
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode, then give every module back its own
    train/eval mode; modules the block added (the rewrite's) take their parent's."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        known = {id(m) for m, _ in modes}
        for m in list(model.modules()):
            for child in m.children():
                if id(child) not in known:
                    child.train(m.training)
                    known.update(id(x) for x in child.modules())


def refuse_output_attentions(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a converted Hugging Face model: ``output_attentions=True`` raises,
    since rewritten sites compute no attention weights (Hugging Face records them with hooks
    on attention modules whose forward the rewrite replaced) and would silently be missing."""
    if kwargs.get("output_attentions") or getattr(getattr(module, "config", None),
                                                   "output_attentions", False) is True:
        raise ValueError(
            "output_attentions=True: the attention sites flurka-rewrite rewrote compute no "
            "attention weights, so they cannot be returned; call without output_attentions, "
            "or convert with filter_fn=... excluding the sites whose weights you need")
