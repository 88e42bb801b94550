"""Build, verify and install the rewrite of every planned unit (after ``decide.decide``).

Per unit: one FlurkaAttention per legal site; the rewritten graph is built on a copy and
checked by translation validation (passes/verify.py) on every recorded check call; only a unit
that passes is installed on the user's module (passes/install.py). A site that fails is
skipped with the reason, and its module stays exactly as it was. Nothing is installed before
every unit has been checked, so each check runs against the original model.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.nn as nn

from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.passes.config import RewriteConfig

from .graph_nx import digraph_from_fx, site_region, to_digraph
from .install import choose_variant, install
from .mha import FlurkaMultiheadAttention
from .units import Unit
from .rewrite import build_attention, rel_error
from .site import Outcome, Site
from .verify import check_sites, rewritten_copy

NOT_VERIFIED = ("not verified: planned without example inputs; pass example_inputs to "
                "check the rewrite against the original")


def attention_for(s: Site, cfg: RewriteConfig) -> FlurkaAttention:
    """The FlurkaAttention of one decided site (records m and the parameters added)."""
    attn = build_attention(s, kernel=s.kernel, dk=s.dk, num_features=s.num_features,
                           max_seq_len=s.max_seq_len, seed=cfg.seed + 7919 * s.index,
                           e_init=cfg.e_init, backend=cfg.backend, window=s.window)
    o = outcome(s)
    o.num_features = attn.num_features
    o.params_added = sum(p.numel() for p in attn.parameters())
    return attn


def outcome(s: Site) -> Outcome:
    """The site's ``Outcome`` record, written here only (passes/site.py)."""
    if s.outcome is None:
        s.outcome = Outcome()
    return s.outcome


def apply_all(units: Sequence[Unit], cfg: RewriteConfig, verify: bool) -> None:
    """Rewrite every unit with legal sites; with ``verify``, install only what passes. With
    ``keep_exact`` / ``max_rel_error``, the sites picked from the measured errors
    (``keep_exact_sites``) stay the original attention and their units are built again
    without them."""
    jobs = {u.path: _build(u, cfg, verify) for u in units}
    if cfg.keep_exact is not None or cfg.max_rel_error is not None:
        if not verify:
            raise ValueError("keep_exact / max_rel_error choose sites by the error measured "
                             "on the example inputs: pass example_inputs")
        kept = keep_exact_sites([s for u in units for s in u.sites], cfg)
        for u in units:
            if any(s.index in kept for s in u.sites):
                for s in u.sites:
                    if s.index in kept:  # the original stays: only the measured error is kept
                        s.skip(kept[s.index])
                        s.outcome = Outcome(rel_error=s.rel_error)
                jobs[u.path] = _build(u, cfg, verify)
    for job in jobs.values():
        if job is not None:
            job()


def _build(u: Unit, cfg: RewriteConfig, verify: bool) -> Callable[[], None] | None:
    """Build (and verify) the rewrite of one unit's legal sites; the install is returned."""
    legal = [s for s in u.sites if s.ok]
    if not legal:
        return None
    attns = {s.index: attention_for(s, cfg) for s in legal}
    if u.kind == "mha":
        return _mha(u, legal[0], attns, cfg, verify, cfg.exact)
    return _graph(u, legal, attns, cfg, verify, cfg.exact)


def keep_exact_sites(sites: Sequence[Site], cfg: RewriteConfig) -> dict[int, str]:
    """Hybrid by layer: site index -> the reason it stays exact. ``keep_exact=K``: the K
    rewritten sites with the largest measured ``rel_error``; ``max_rel_error``: every
    rewritten site above it (both: the union)."""
    done = sorted((s for s in sites if s.ok and s.rel_error is not None),
                  key=lambda s: (-s.rel_error, s.index))
    kept: dict[int, str] = {}
    for s in done[:cfg.keep_exact or 0]:
        kept[s.index] = (f"kept exact: rel_error {s.rel_error:.3g} is among the "
                         f"{cfg.keep_exact} largest (keep_exact={cfg.keep_exact})")
    if cfg.max_rel_error is not None:
        for s in done:
            if s.rel_error > cfg.max_rel_error and s.index not in kept:
                kept[s.index] = (f"kept exact: rel_error {s.rel_error:.3g} is above "
                                 f"max_rel_error={cfg.max_rel_error:g}")
    return kept


def _fail(sites: Sequence[Site], fails: dict[int, str]) -> None:
    for s in sites:
        if s.index in fails:
            s.skip(fails[s.index])
            outcome(s).verified = False


def _mha(u: Unit, s: Site, attns: dict, cfg: RewriteConfig, verify: bool,
         exact: bool) -> Callable[[], None] | None:
    def build(sites: Sequence[Site], att: dict[int, nn.Module]) -> nn.Module:
        return FlurkaMultiheadAttention(u.module, att[s.index], bool(s.hoisted)).eval()

    if verify:
        ref_module = _FirstOutput(u.module)
        fails = check_sites(ref_module, lambda ss, a: _FirstOutput(build(ss, a)), [s], attns,
                            u.checks, exact)
        if fails:
            _fail([s], fails)
            return None
        outcome(s).verified = True
    new = FlurkaMultiheadAttention(u.module, attns[s.index], bool(s.hoisted))
    o = outcome(s)
    o.hoisted = new.hoist
    o.rel_error = u.mha_rel_error(new) if u.call != ((), {}) else None

    def job() -> None:
        parent_path, _, name = u.path.rpartition(".")
        parent = u.root.get_submodule(parent_path) if parent_path else u.root
        setattr(parent, name, new)
    return job


class _FirstOutput(nn.Module):
    """An MHA's attention output only: the weights (output 1) are checked unused by the
    planner, and the rewritten module returns None there."""

    def __init__(self, mha: nn.Module) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.mha(*args, **kwargs)[0]


def _graph(u: Unit, legal: list[Site], attns: dict, cfg: RewriteConfig, verify: bool,
           exact: bool) -> Callable[[], None] | None:
    alt = {s.index: s for s in u.given.sites} if u.given is not None else {}

    def build(sites: Sequence[Site], att: dict[int, nn.Module]) -> Any:
        main = rewritten_copy(u.gm, sites, att, cfg.hoist)[0]
        if u.given is None:
            return main
        given = rewritten_copy(u.given.gm, [alt[s.index] for s in sites], att, cfg.hoist)[0]
        return _Dispatch(u.module, main, given, u.when_given)

    if verify:
        fails = check_sites(u.module, build, legal, attns, u.checks + _given_checks(u), exact)
        _fail(legal, fails)
        legal = [s for s in legal if s.index not in fails]
        if not legal:
            return None
        for s in legal:
            outcome(s).verified = True
    before = {s.index: _picture_before(u, s) for s in legal}
    main, env, info = rewritten_copy(u.gm, legal, attns, cfg.hoist)
    given = None
    if u.given is not None:
        given = rewritten_copy(u.given.gm, [alt[s.index] for s in legal], attns, cfg.hoist)[0]
    for s in legal:
        o = outcome(s)
        o.rel_error = rel_error(s, u.values, attns[s.index]) if u.values else None
        o.hoisted, added = info[s.index]
        o.graphs = (before[s.index], _picture_after(main, s, env, added))

    def job() -> None:
        install(u.module, main, given, u.when_given)
    return job


def _given_checks(u: Unit) -> list:
    return [u.given.call] if u.given is not None else []


class _Dispatch(nn.Module):
    """Both graph variants of a unit, chosen per call as the installed module will."""

    def __init__(self, module: nn.Module, main: nn.Module, given: nn.Module,
                 when_given: tuple) -> None:
        super().__init__()
        self.main, self.given, self.when_given = main, given, when_given
        self._forward = module.forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        which = choose_variant(self._forward, self.when_given, args, kwargs)
        return (self.given if which else self.main)(*args, **kwargs)


def _inputs(s: Site) -> list:
    import torch.fx
    return [n for n in (s.q, s.k, s.v, s.mask) if isinstance(n, torch.fx.Node)]


def _picture_before(u: Unit, s: Site) -> Any:
    """networkx picture of the site's region before rewriting (report.graphs)."""
    try:
        g = to_digraph(u.gm.graph)
        names = site_region(g, _inputs(s), s.output) | {n.name for n in _inputs(s)}
        kinds = {n.name: "input" for n in _inputs(s)}
        kinds[s.output.name] = "output"
        nodes = [n for n in u.gm.graph.nodes if n.name in names]
        return digraph_from_fx(nodes, kinds={n.name: kinds.get(n.name, "site") for n in nodes})
    except Exception:  # noqa: BLE001 - pictures are informative only
        return None


def _picture_after(gm: Any, s: Site, env: dict, added: list) -> Any:
    """The nodes the site's rewrite added, with the site inputs they read."""
    try:
        present = set(gm.graph.nodes)
        new = [n for n in added if n in present]
        ins = [env[n] for n in _inputs(s) if env.get(n) in present]
        kinds = {n.name: "flurka" for n in new}
        kinds.update({n.name: "input" for n in ins})
        return digraph_from_fx(ins + new, kinds=kinds)
    except Exception:  # noqa: BLE001
        return None
