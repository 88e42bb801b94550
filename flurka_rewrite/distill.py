"""``distill``: attention transfer, the first step of up-training a converted model.

Each rewritten site lives in an *owner* module of the student (the user's attention module, or
a ``FlurkaMultiheadAttention``), at the same path as the original module in the teacher. One
step:

    teacher(batch)            forward hooks keep each owner's inputs and output   (no grad)
    student_owner(inputs)     the same inputs, through the FLuRKA path
    loss = sum over owners of MSE(student_owner output, teacher_owner output)

so every site learns to reproduce the original site on the teacher's own hidden states
(teacher forcing: an early layer's error does not move a later layer's target). A module that
holds several sites (attention written in the model's root, or a whole-model graph from
``convert`` without example inputs) gives them one shared loss on its output. Only the
FLuRKA parameters train (E, F, ffk weights: the parameters of the ``FlurkaAttention`` modules);
every other parameter is frozen for the run and its ``requires_grad`` restored afterwards.
Full fine-tuning is then the user's ordinary training loop (see ``examples/``).

Performer random features: the student's ``FlurkaAttention`` modules run in training mode, so
W is redrawn every ``redraw_interval`` forward calls (default 1000, seeded: the same seed
gives the same sequence of W); E and F then learn to work for any draw rather than fitting
one. In eval mode W stays at its last draw, so an evaluated model is deterministic. The rest
of the student runs in eval mode during ``distill`` (dropout off: the target is deterministic).

Many processes: under ``torchrun`` the same call runs with DDP or FSDP2 (``strategy``), each
rank on its rows of every global batch, and can checkpoint and resume; see
``flurka_rewrite.distributed`` and docs/uptraining.md ("Many processes").
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from flurka_rewrite.distributed import (CHECKPOINT_FILE, all_reduce_sum, first_tensor,
                                        flurka_modules, flurka_state, global_rows,
                                        load_checkpoint, load_flurka_state, load_optimizer_state,
                                        local_rows, map_tensors, quiet_view_warning, resolve,
                                        restore_rng, save_checkpoint, shard, wrap)
from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.passes.capture import call_model
from flurka_rewrite.passes.mha import FlurkaMultiheadAttention


@dataclass
class DistillResult:
    """What ``distill`` did: the loss per step and, per owner module, the mean MSE over the
    last ``tail`` steps (absolute, and relative to the teacher output's mean square)."""

    steps: int
    losses: list[float]
    site_losses: dict[str, float]
    site_rel_losses: dict[str, float]
    site_paths: dict[str, list[str]] = field(default_factory=dict)  # owner -> report paths
    trained_params: int = 0
    strategy: str = "none"     # "none", "ddp" or "fsdp"
    world_size: int = 1
    resumed_at: int = 0        # the checkpoint step this run resumed from (0: a fresh run)

    def table(self) -> str:
        """Per-site losses as a text table, worst first."""
        rows = sorted(self.site_losses, key=lambda p: -self.site_rel_losses[p])
        w = max([len("module")] + [len(p) for p in rows])
        out = [f"{'module':<{w}}  {'mse':>10}  {'rel mse':>8}  sites"]
        for p in rows:
            out.append(f"{p:<{w}}  {self.site_losses[p]:>10.3e}  {self.site_rel_losses[p]:>8.4f}"
                       f"  {', '.join(self.site_paths.get(p, []))}")
        return "\n".join(out)

    def __str__(self) -> str:
        first, last = self.losses[0], self.losses[-1]
        return (f"distill: {self.steps} steps, {self.trained_params} trained parameters, "
                f"loss {first:.4g} -> {last:.4g}\n{self.table()}")


def owners(student: nn.Module) -> dict[str, list[str]]:
    """Paths of the student's modules that hold rewritten sites -> the FlurkaAttention child
    names they hold (``flurka_<i>``, or ``flurka`` in a ``FlurkaMultiheadAttention``)."""
    found: dict[str, list[str]] = {}
    for path, mod in student.named_modules():
        names = [n for n, c in mod.named_children()
                 if isinstance(c, FlurkaAttention) and n.startswith("flurka")]
        if names:
            found[path] = names
    return found


def _site_paths(student: nn.Module, holders: dict[str, list[str]]) -> dict[str, list[str]]:
    """Owner path -> the report paths of its sites (``flurka_<i>`` is report row i)."""
    report = getattr(student, "flurka_report", None)
    rows = list(report.sites) if report is not None else []
    out = {}
    for path, names in holders.items():
        paths = []
        for n in names:
            i = n.rpartition("_")[2]
            if n == "flurka":
                paths.append(f"{path}:mha")
            elif i.isdigit() and int(i) < len(rows):
                paths.append(rows[int(i)].path)
        out[path] = paths
    return out


def _batches(data: Iterable[Any], steps: int) -> Iterable[Any]:
    """``steps`` batches, cycling a re-iterable ``data``; a one-shot iterator that runs out
    raises (the student keeps what it learned so far)."""
    n = 0
    while True:
        it = iter(data)
        got = 0
        for batch in it:
            yield batch
            got, n = got + 1, n + 1
            if n == steps:
                return
        if got == 0:
            raise ValueError(
                f"data yielded no batch after {n} of {steps} steps; pass a re-iterable (a list "
                "of batches or a DataLoader) so distill can cycle it, or fewer steps")
        if it is data:  # an iterator: iter() returned itself and it is now exhausted
            raise ValueError(
                f"data (an iterator) ran out after {n} of {steps} steps; pass a re-iterable "
                "(a list of batches or a DataLoader) or steps <= the number of batches")


class _Objective(nn.Module):
    """The owner modules of the rewritten sites as one module (what DDP wraps and FSDP shards):
    ``forward(captured)`` runs each owner on the teacher's captured inputs and returns the sum of
    the per-site MSEs and, detached, [MSE per site..., teacher output mean square per site...]."""

    def __init__(self, student: nn.Module, paths: list[str]) -> None:
        super().__init__()
        self.paths = list(paths)
        self.owners = nn.ModuleList([student.get_submodule(p) for p in self.paths])

    def forward(self, captured: dict[str, list[tuple[tuple, dict, Tensor]]]
                ) -> tuple[Tensor, Tensor]:
        """(loss, stats) on the captured calls (see the class docstring)."""
        total = None
        mse: list[Tensor] = []
        ref: list[float] = []
        for path, owner in zip(self.paths, self.owners):
            calls = captured[path]
            site: Tensor | None = None
            ref_ms = 0.0
            for args, kwargs, target in calls:
                out = first_tensor(owner(*args, **kwargs))
                if out is None or out.shape != target.shape:
                    raise RuntimeError(
                        f"student module {_label(path)} returned "
                        f"{None if out is None else tuple(out.shape)}, the teacher "
                        f"{tuple(target.shape)}: the models do not match")
                err = F.mse_loss(out.float(), target.float())
                site = err if site is None else site + err
                ref_ms += float(target.float().pow(2).mean())
            site = site / len(calls)
            mse.append(site.detach().double())
            ref.append(ref_ms / len(calls))
            total = site if total is None else total + site
        stats = torch.cat([torch.stack(mse), torch.tensor(ref, dtype=torch.float64,
                                                          device=mse[0].device)])
        return total, stats


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    progress: bool = True,
    tail: int | None = None,
    strategy: str | None = "auto",
    shard_data: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> DistillResult:
    """Attention transfer: train the student's FLuRKA parameters so that each rewritten site
    reproduces the teacher's original site on the teacher's inputs (see the module docstring).

    ``student``: a model from ``convert`` (modified in place). ``teacher``: the original model
    (not converted, same module paths; never modified). ``data``: batches, each a tensor, a
    tuple of positional args or a dict of keyword args for ``teacher(...)``; cycled when shorter
    than ``steps``. AdamW with ``lr``/``weight_decay``, gradient norm clipped to ``grad_clip``.
    ``seed`` fixes any randomness inside the run (the caller's RNG state is restored).
    ``tail``: the per-site losses average the last ``tail`` steps (default: last 10%, >= 1).

    Many processes (``flurka_rewrite.distributed``, docs/uptraining.md): ``strategy`` "ddp" or
    "fsdp" (FSDP2 ``fully_shard``) under an initialised process group; "auto" picks "ddp" there
    and "none" otherwise. Every rank passes the same global batches and seed; with
    ``shard_data`` each rank keeps its rows of every batch (dim 0), else ``data`` is already
    this rank's own. ``checkpoint``: a directory where rank 0 writes ``distill.pt`` every
    ``checkpoint_every`` steps and at the end; ``resume`` continues from it (FLuRKA state,
    optimiser, step, losses, RNG) up to ``steps`` in all.
    Returns a ``DistillResult`` (loss per step, per-site losses; ``print`` it for a table)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int)
                                         or checkpoint_every < 1 or checkpoint is None):
        raise ValueError(f"checkpoint_every={checkpoint_every!r} needs checkpoint=DIR and a "
                         "positive int")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=DIR (the directory of the run to resume)")
    par = resolve(strategy)
    if teacher is student:
        raise ValueError("teacher is the student itself: pass the original model as teacher "
                         "(convert returns a copy unless inplace=True; keep the original)")
    holders = owners(student)
    if not holders:
        raise ValueError("the student has no rewritten attention sites (no FlurkaAttention "
                         "modules): pass the model returned by flurka_rewrite.convert")
    t_mods = dict(teacher.named_modules())
    missing = [p for p in holders if p not in t_mods]
    if missing:
        raise ValueError(f"the teacher has no module at {', '.join(missing)}: pass the original "
                         "model the student was converted from")
    if any(isinstance(m, FlurkaAttention) for m in teacher.modules()):
        raise ValueError("the teacher holds FlurkaAttention modules: pass the original "
                         "(unconverted) model as teacher")
    s_params = [p for m in student.modules() if isinstance(m, FlurkaAttention)
                for p in m.parameters(recurse=True)]
    ids = {id(p) for p in s_params}
    if not s_params:
        raise ValueError(
            "the rewritten sites have no trainable parameters (a performer/relu/rnn kernel with "
            "dk=None has none): convert with dk=<int> (trainable E, F) or kernel='ffk', or "
            "skip distill and fine-tune the whole model")
    device = s_params[0].device
    tail = tail or max(1, steps // 10)
    ckpt_path = os.path.join(os.fspath(checkpoint), CHECKPOINT_FILE) if checkpoint else None
    state = load_checkpoint(ckpt_path, par) if resume else None
    if state is not None and state["seed"] != seed:
        raise ValueError(f"the checkpoint in {checkpoint} was written with seed={state['seed']}; "
                         f"resume with the same seed (got seed={seed})")
    start = state["step"] if state is not None else 0
    if start > steps:
        raise ValueError(f"the checkpoint in {checkpoint} is at step {start}, past steps={steps}: "
                         "pass steps >= that to continue it")

    flags = {p: p.requires_grad for p in student.parameters()}
    modes = {m: m.training for m in student.modules()}
    t_training = teacher.training
    has_mha = any(isinstance(m, nn.MultiheadAttention) for m in teacher.modules())
    captured: dict[str, list[tuple[tuple, dict, Tensor]]] = {}

    def keep(path: str):
        def hook(mod, args, kwargs, out):
            t = first_tensor(out)
            if t is not None:
                captured.setdefault(path, []).append(
                    (map_tensors(args, Tensor.detach), map_tensors(dict(kwargs), Tensor.detach),
                     t.detach()))
        return hook

    handles = [t_mods[p].register_forward_hook(keep(p), with_kwargs=True) for p in holders]
    losses: list[float] = list(state["losses"][:start]) if state else []
    per_site: dict[str, list[tuple[float, float]]] = {p: [] for p in holders}
    if state:
        for p in holders:
            per_site[p] = [tuple(x) for x in state["per_site"][_label(p)][:start]]
    show = progress and par.rank == 0
    try:
        if state is not None:
            load_flurka_state(student, state["flurka"])
        for p in student.parameters():
            p.requires_grad_(id(p) in ids)
        student.eval()
        for m in student.modules():
            if isinstance(m, (FlurkaAttention, FlurkaMultiheadAttention)):
                m.train()
        teacher.eval()
        objective = _Objective(student, list(holders))
        s_paths = {id(m): p for p, m in student.named_modules()}
        names = {p: s_paths[id(m)] for p, m in flurka_modules(objective).items()}
        call, work = wrap(objective, par, device)
        trainable = [p for m in flurka_modules(work).values() for p in m.parameters()]
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
        if state is not None:
            load_optimizer_state(work, opt, state["optimizer"], par)

        def save(step: int) -> None:
            save_checkpoint(ckpt_path, work=work, names=names, opt=opt, par=par, device=device,
                            info={"step": step, "seed": seed, "losses": losses,
                                  "per_site": {_label(p): r for p, r in per_site.items()}})

        fork = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(seed)
            if state is not None:
                restore_rng(state, par, device)
            bar = _progress(steps, show)
            bar.update(start)
            k = len(holders)
            for step, batch in enumerate(islice(_batches(data, steps), start, None), start + 1):
                captured.clear()
                if par.distributed and shard_data:
                    batch, n_local, n_all = shard(batch, par)
                else:
                    n_local = local_rows(batch)
                    n_all = global_rows(n_local, par, device)
                # grad mode on only for an nn.MultiheadAttention teacher: keeps
                # nn.TransformerEncoderLayer off its fused path, which skips the MHA module
                with torch.set_grad_enabled(has_mha):
                    call_model(teacher, map_tensors(batch, lambda t: t.to(device)))
                absent = [p for p in holders if p not in captured]
                if absent:
                    raise RuntimeError(f"the teacher never called {', '.join(absent)} on this "
                                       "batch, so those sites have no target")
                with quiet_view_warning():
                    total, stats = call(captured)
                # each rank's MSE weighted by its share of the rows; DDP/FSDP average the
                # gradients over ranks, hence the world size: the global batch's gradient
                weight = n_local / n_all
                opt.zero_grad(set_to_none=True)
                (total * (par.world * weight) if par.distributed else total).backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
                opt.step()
                stats = all_reduce_sum(stats * weight, par).tolist()
                for i, path in enumerate(holders):
                    per_site[path].append((stats[i], stats[i] / max(stats[k + i], 1e-30)))
                losses.append(sum(stats[:k]))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
                if ckpt_path and checkpoint_every and step % checkpoint_every == 0 \
                        and step < steps:
                    save(step)
            bar.close()
            if ckpt_path:
                save(steps)
        if work is not objective:  # the trained FLuRKA state back into the student
            load_flurka_state(student, flurka_state(work, names))
    finally:
        for h in handles:
            h.remove()
        captured.clear()
        for p, f in flags.items():
            p.requires_grad_(f)
        for m, t in modes.items():
            m.train(t)
        teacher.train(t_training)
    tail_mean = lambda r, i: sum(x[i] for x in r[-tail:]) / len(r[-tail:])  # noqa: E731
    result = DistillResult(
        steps=len(losses), losses=losses,
        site_losses={_label(p): tail_mean(r, 0) for p, r in per_site.items()},
        site_rel_losses={_label(p): tail_mean(r, 1) for p, r in per_site.items()},
        site_paths={_label(p): v for p, v in _site_paths(student, holders).items()},
        trained_params=sum(p.numel() for p in s_params),
        strategy=par.strategy, world_size=par.world, resumed_at=start)
    if show:
        print(result.table())
    return result


def _label(path: str) -> str:
    return path or "<root>"


def _progress(total: int, enabled: bool):
    """A tqdm bar (disabled when ``enabled`` is False)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="distill", disable=not enabled, unit="step")


__all__ = ["DistillResult", "distill", "owners"]
