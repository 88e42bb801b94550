"""Planning, the compiler's analysis: find every attention site of a model and decide
whether it can be rewritten (legality), with or without example inputs. Nothing is built.

    analyse(model, example_inputs, cfg, probe_inputs)   -> list[Unit]  (sites inside)
        example_inputs given: every module that computes softmax / SDPA is captured on the
            call the model makes to it (passes/units.py), ``nn.MultiheadAttention`` modules
            become module-level sites (passes/mha.py); ``probe_inputs`` (passes/probe.py)
            adds a padded call to verify on
        example_inputs None: ``symbolic_trace`` of the whole model, sizes read statically
            (passes/static_plan.py)

The decision per legal site (kernel, dk, features) is ``passes/decide.py``.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from .capture import discover
from .config import RewriteConfig
from .legality import set_train_dropout
from .mha import MHA_ARGS, mha_site, weights_used
from .static_plan import analyse_static
from .units import Unit, add_probe, capture, train_dropout


def analyse(model: nn.Module, example_inputs: Any, cfg: RewriteConfig,
            probe_inputs: Any = None) -> list[Unit]:
    """Capture, match and check every site of ``model`` (legality decided, nothing built);
    sites are numbered in call order (``Site.index``)."""
    if example_inputs is None:
        return analyse_static(model, cfg)
    disc = discover(model, example_inputs)
    exact = cfg.exact
    units: dict[str, Unit] = {}
    cache: dict = {}  # identical layers share one torch.export

    def inside(p: str, anc: str) -> bool:
        return anc == "" or p.startswith(anc + ".")

    for path in sorted(disc.holders, key=lambda p: -(p.count(".") + bool(p))):
        if any(inside(path, u) and units[u].how.startswith("export") for u in units):
            continue  # already inlined in a captured ancestor
        leaves = {id(units[p].module) for p in units if inside(p, path)}
        u = capture(model, path, disc, exact, leaves, cache)
        if not u.sites:
            continue  # softmax here is not attention (e.g. a classifier head)
        if u.how.startswith("export") or u.path != path:
            units = {p: v for p, v in units.items() if not inside(p, u.path)}
        units[u.path] = u
    for path in disc.mha:
        if not any(path.startswith(u + ".") and units[u].how.startswith("export") for u in units):
            units[path] = _mha_unit(model, path, disc.inputs[path])
    if getattr(model, "config", None) is not None:  # Hugging Face: p is 0.0 in eval capture
        for u in units.values():
            if u.kind == "graph":
                for s in u.sites:
                    if s.dropout_p == 0.0:
                        set_train_dropout(s, train_dropout(model, s.module_path))
    order = list(disc.inputs)
    out = sorted(units.values(), key=lambda u: order.index(u.path) if u.path in order else 0)
    i = 0
    mha_paths = set(disc.mha)
    for u in out:
        if u.kind == "graph":  # sites inside an MHA are handled at module level
            u.sites = [s for s in u.sites if not any(
                s.module_path == p or s.module_path.startswith(p + ".") for p in mha_paths)]
        for s in u.sites:
            s.index, s.calls = i, disc.calls.get(s.module_path, 1)
            i += 1
        u.checks = [u.call]
    if probe_inputs is not None:
        add_probe(model, out, discover(model, probe_inputs), exact, cache)
    return out


def _mha_unit(model: nn.Module, path: str, call: tuple[tuple, dict]) -> Unit:
    mha = model.get_submodule(path)
    args, kwargs = call
    named = {**dict(zip(MHA_ARGS, args)), **kwargs}
    read = bool(named.get("need_weights", True)) and weights_used(model, path)
    return Unit(path, mha, model, "mha", call=(args, kwargs),
                sites=[mha_site(path, mha, named, weights_read=read)])
