"""Capture units: a module whose forward computes attention, captured as a graph on a
recorded call, with its sites matched and checked (legality decided, nothing built).

A unit is the innermost module that calls softmax / SDPA. When a site's attention weights leave
the unit only through its output (Hugging Face eager attention returns them and the parent
layer drops them), or the module cannot be captured on its own call, its parent is captured
instead (``capture``, up to ``MAX_CLIMB`` levels), so each site is single-exit in the smallest
module where it is. ``add_probe`` captures a unit a second time when a padded probe gives it a
tensor where the example gave None (Hugging Face drops an all-ones mask).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule

from flurka_rewrite.kernels.reference import rel_error

from .capture import Discovery, capture_module, values_of
from .graph_nx import to_digraph
from .legality import check, fill, merge_probe
from .match import find_sites
from .site import Site
from .unmatched import uncaptured_site

MAX_CLIMB = 4  # attention module -> attention -> layer -> encoder


@dataclass
class Unit:
    """One captured module and its sites."""

    path: str
    module: nn.Module
    root: nn.Module
    kind: str  # "graph" | "mha"
    gm: GraphModule | None = None
    values: dict[str, Any] = field(default_factory=dict)
    sites: list[Site] = field(default_factory=list)
    how: str = ""
    call: tuple = ((), {})
    checks: list = field(default_factory=list)  # calls to verify on: the example's, the probe's
    leaves: set = field(default_factory=set)  # ids of inner units' modules (kept as calls)
    given: "Unit | None" = None  # the capture with ``when_given`` set (passes/install.py)
    when_given: tuple = ()

    def mha_rel_error(self, new: nn.Module) -> float | None:
        """|new - original| / |original| of an MHA replacement on the recorded call."""
        try:
            args, kwargs = self.call
            kwargs = {**kwargs, "need_weights": False}
            with torch.no_grad():
                ref = self.module(*args, **kwargs)[0]
                new.eval()
                out = new(*args, **kwargs)[0]
            return rel_error(out, ref)
        except Exception:  # noqa: BLE001 - informative only
            return None


def learned_nodes(gm: GraphModule) -> set[str]:
    names = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            try:
                t = gm.get_parameter(n.target)
                if t.requires_grad:
                    names.add(n.name)
            except AttributeError:
                pass
        elif n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, nn.Embedding):
                names.add(n.name)
    return names


def capture_at(model: nn.Module, path: str, call: tuple[tuple, dict], exact: bool,
                leaves: set[int], cache: dict) -> Unit:
    """Capture, match and check the module at ``path`` for one recorded call."""
    module = model.get_submodule(path) if path else model
    args, kwargs = call
    unit = Unit(path, module, model, "graph", call=(args, kwargs), leaves=leaves)
    try:
        cap = capture_module(path, module, args, kwargs, leaves, cache)
        values = values_of(cap)
    except Exception as e:  # noqa: BLE001 - report the site as found but not captured
        unit.sites = [uncaptured_site(path, e)]
        return unit
    unit.gm, unit.values, unit.how = cap.gm, values, cap.how
    g = to_digraph(cap.gm.graph)
    params = learned_nodes(cap.gm)
    sites = find_sites(cap.gm, values, path)
    for s in sites:
        fill(s, cap.gm, values)
        check(s, cap.gm, values, g, params, exact)
    if "static" in cap.how:
        for s in sites:
            s.notes_for_report.append(
                "captured with static shapes (torch.export could not keep the sizes dynamic): "
                "the rewritten module accepts only the example input sizes")
    unit.sites = sites
    return unit


def capture(model: nn.Module, path: str, disc: Discovery, exact: bool, leaves: set[int],
             cache: dict, depth: int = 0) -> Unit:
    """``_capture_at`` on the recorded call; when a site's weights leave the module only
    through its output, the parent module is captured instead (up to MAX_CLIMB levels)."""
    unit = capture_at(model, path, disc.inputs[path], exact, leaves, cache)
    climb = [s for s in unit.sites if s.escape_output_only]
    failed = unit.gm is None  # could not capture: the parent's call may (e.g. a size tuple)
    parent = _called_ancestor(path, disc)
    if (climb or failed) and depth < MAX_CLIMB and parent is not None:
        up = capture(model, parent, disc, exact, leaves, cache, depth + 1)
        if not failed or (up.gm is not None and up.sites):
            return up
    return unit


def _called_ancestor(path: str, disc: Discovery) -> str | None:
    """The nearest ancestor module that ran (a ModuleList holding the layers never does)."""
    while path:
        path = path.rpartition(".")[0]
        if path in disc.inputs:
            return path
    return None


def _given_only(module: nn.Module, a: tuple[tuple, dict], b: tuple[tuple, dict]) -> tuple:
    """Names of the arguments that are None in call ``a`` and a tensor in call ``b``."""
    try:
        sig = inspect.signature(module.forward)
        ba, bb = sig.bind(*a[0], **a[1]), sig.bind(*b[0], **b[1])
    except (TypeError, ValueError):
        return ()

    def flat(bound: inspect.BoundArguments) -> dict[str, Any]:
        out = {}
        for name, val in bound.arguments.items():
            p = sig.parameters[name]
            out.update(val if p.kind == p.VAR_KEYWORD else {name: val})
        return out
    fa, fb = flat(ba), flat(bb)
    return tuple(n for n, v in fb.items() if isinstance(v, torch.Tensor) and fa.get(n) is None)


def add_probe(model: nn.Module, units: list[Unit], probe: Discovery, exact: bool,
               cache: dict) -> None:
    """Verify every unit on the padded probe too; a unit that received None where the probe
    gives a tensor (Hugging Face drops an all-ones mask) is captured a second time on the
    probe's call, and the rewritten module chooses between the two graphs at run time."""
    for u in units:
        cb = probe.inputs.get(u.path)
        if cb is None:
            continue
        key = _given_only(u.module, u.call, cb) if u.kind == "graph" and u.gm is not None else ()
        if not key:
            u.checks.append(cb)
            continue
        alt = capture_at(model, u.path, cb, exact, u.leaves, cache)
        u.given, u.when_given = alt, key
        if len(alt.sites) != len(u.sites):
            for s in u.sites:
                s.skip(f"this module computes {len(alt.sites)} attention site(s) when "
                       f"{', '.join(key)} is given and {len(u.sites)} when it is not; "
                       "not rewritten")
            continue
        for s, a in zip(u.sites, alt.sites):
            a.index, a.calls = s.index, s.calls
            if not a.ok:
                s.skip(f"with {', '.join(key)} given (padded probe): {a.reason}")
            else:
                merge_probe(s, a)


_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout", "dropout_prob")
_CONFIG_DROPOUT = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def _prob(x: Any) -> float | None:
    if isinstance(x, nn.Dropout):
        return float(x.p)
    if isinstance(x, float) and 0.0 <= x < 1.0:
        return x
    return None


def train_dropout(model: nn.Module, path: str) -> float:
    """Training-time attention-dropout probability of the Hugging Face attention module at
    ``path``. HF passes ``dropout=0.0`` to its attention function in eval mode (the capture),
    so the graph does not show it: read the module's ``attention_dropout`` / ``attn_dropout`` /
    ``dropout`` attribute (float or ``nn.Dropout``), else the model config's
    ``attention_probs_dropout_prob`` / ``attention_dropout`` / ``attn_pdrop``; 0.0 if none."""
    mod = model.get_submodule(path) if path else model
    for name in _DROPOUT_ATTRS:
        p = _prob(getattr(mod, name, None))
        if p is not None:
            return p
    cfg = getattr(model, "config", None)
    for name in _CONFIG_DROPOUT:
        p = _prob(getattr(cfg, name, None))
        if p is not None:
            return p
    return 0.0
