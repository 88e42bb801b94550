"""``distill`` on many processes, with PyTorch's own stack: DDP or FSDP2 (``fully_shard``).

Under ``torchrun`` (after ``torch.distributed.init_process_group``) every rank runs the same
``distill`` call with the same data and seed:

* **Data**: each global batch is split along dim 0 into ``world_size`` contiguous shards
  (``tensor_split``: the first ``n % world_size`` ranks get one row more); rank r keeps shard r.
  The teacher runs only on that shard, so the teacher's forward is sharded too.
* **Loss**: each rank's per-site MSE is weighted by its share of the rows (n_r / n), so the
  sum over ranks is the MSE of the whole batch, and the loss that rank r back-propagates is
  scaled by ``world_size`` (DDP and FSDP average gradients): the gradient is the gradient of
  the single-process loss on the global batch. The logged losses are all-reduced.
* **Wrapping**: the owner modules are deep-copied into one ``Objective`` module (the student
  itself is never wrapped), which is wrapped in ``DistributedDataParallel`` or sharded with
  ``fully_shard`` (each owner module one unit: its frozen weights are sharded too); the
  trained FLuRKA state is copied back into the student at the end.
* **Checkpoints**: one file, written by rank 0 atomically (``passes.atomic``), with the full
  FLuRKA state, the optimiser state (``torch.distributed.checkpoint.state_dict``, keyed by
  parameter name, so it does not depend on the strategy or the number of ranks), the step, the
  loss history and every rank's RNG state.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from flurka_rewrite.kernels.attention import FlurkaAttention
from flurka_rewrite.passes.atomic import atomic_write, write_bytes

STRATEGIES = ("auto", "none", "ddp", "fsdp")
CHECKPOINT_FILE = "distill.pt"
_FORMAT = "flurka-rewrite distill checkpoint"


def first_tensor(x: Any) -> Tensor | None:
    """The first tensor in nested tuples / lists / dicts (None if there is none)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for y in x:
            t = first_tensor(y)
            if t is not None:
                return t
    return None


def map_tensors(x: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``fn`` applied to every tensor in nested tuples / lists / dicts."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(v, fn) for v in x)
    return x


@dataclass(frozen=True)
class Parallel:
    """How this process takes part: ``strategy`` ("none", "ddp" or "fsdp"), rank, world size."""

    strategy: str
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        """True when gradients and losses are reduced across ranks."""
        return self.strategy != "none"


def resolve(strategy: str | None) -> Parallel:
    """``strategy`` ("auto"/None, "none", "ddp", "fsdp") -> a ``Parallel``. "auto" is "ddp"
    when a process group of more than one rank is initialised, else "none"."""
    strategy = "auto" if strategy is None else strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    ready = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if ready else 1
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy in ("ddp", "fsdp") and not ready:
        raise ValueError(
            f"strategy={strategy!r} needs an initialised process group: launch with torchrun "
            "and call torch.distributed.init_process_group('gloo' on CPU, 'nccl' on GPUs) "
            "before distill, or pass strategy='none'")
    if strategy == "none":
        return Parallel("none")
    return Parallel(strategy, dist.get_rank(), world)


def shard(batch: Any, par: Parallel) -> tuple[Any, int, int]:
    """This rank's rows of a global ``batch`` (every tensor whose dim 0 is the batch size is
    split; others are kept whole), its row count and the global row count."""
    t = first_tensor(batch)
    if t is None or t.dim() == 0:
        raise ValueError("a batch holds no tensor with a batch dimension to split across ranks: "
                         "pass tensors with the batch along dim 0, or shard_data=False with "
                         "each rank's own batches")
    n = t.shape[0]
    if n < par.world:
        raise ValueError(f"a global batch of {n} rows cannot be split across {par.world} ranks: "
                         f"use batches of at least world_size = {par.world} rows")
    sizes = [len(c) for c in torch.arange(n).tensor_split(par.world)]
    start = sum(sizes[:par.rank])
    stop = start + sizes[par.rank]
    local = map_tensors(batch, lambda x: x[start:stop] if x.dim() and x.shape[0] == n else x)
    return local, sizes[par.rank], n


def local_rows(batch: Any) -> int:
    """Rows of a batch (dim 0 of its first tensor; 1 without one)."""
    t = first_tensor(batch)
    return int(t.shape[0]) if t is not None and t.dim() else 1


def global_rows(n: int, par: Parallel, device: torch.device) -> int:
    """Sum of ``n`` over the ranks (the global batch of pre-sharded data)."""
    if not par.distributed:
        return n
    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t)


def all_reduce_sum(x: Tensor, par: Parallel) -> Tensor:
    """Sum of ``x`` over the ranks (``x`` itself when not distributed)."""
    if par.distributed:
        x = x.clone()
        dist.all_reduce(x)
    return x


def flurka_modules(root: nn.Module, prefix: str = "") -> dict[str, FlurkaAttention]:
    """``FlurkaAttention`` modules of ``root`` by path (``prefix`` prepended)."""
    return {f"{prefix}{p}": m for p, m in root.named_modules() if isinstance(m, FlurkaAttention)}


def wrap(objective: nn.Module, par: Parallel, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(module to call, module that holds the parameters) for ``par``'s strategy. Distributed:
    a deep copy of ``objective``, its FLuRKA state broadcast from rank 0 first, then DDP or
    ``fully_shard`` (each owner module one unit, inner owners first, then the root)."""
    if not par.distributed:
        return objective, objective
    work = copy.deepcopy(objective)
    for m in flurka_modules(work).values():  # every rank starts from rank 0's FLuRKA state
        for t in list(m.parameters()) + list(m.buffers()):
            dist.broadcast(t.data, src=0)
    if par.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device] if device.type == "cuda" else None
        # buffers (performer W, redraw counters) change identically on every rank: synced at
        # init only, not before every forward
        return DDP(work, device_ids=ids, forward_sync_buffers=False), work
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (par.world,))
    # one unit per owner module, inner owners first: an owner's forward calls its
    # FlurkaAttention's methods directly (not only its forward), so the owner's unit is what
    # must gather the FLuRKA parameters
    owner_ids = {id(m) for m in work.owners}
    for m in reversed(list(work.modules())):
        if id(m) in owner_ids and any(True for _ in m.parameters()):
            fully_shard(m, mesh=mesh)
    fully_shard(work, mesh=mesh)
    return work, work


@contextlib.contextmanager
def quiet_view_warning():
    """Silence FSDP2's warning that a unit returned a view: ``distill`` does no in-place op on
    an owner's output (only ``mse_loss``), which is what the warning is about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view")
        yield


def _full(t: Tensor) -> Tensor:
    """A plain CPU tensor from a (possibly sharded DTensor) parameter or buffer."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu().clone()


def flurka_state(work: nn.Module, names: dict[str, str]) -> dict[str, Tensor]:
    """Full FLuRKA state of ``work`` keyed by student path (``names``: work path -> student
    path of each FlurkaAttention). A collective under FSDP: every rank must call it."""
    mods = flurka_modules(work)
    return {f"{names[p]}.{k}": _full(v) for p, s in names.items()
            for k, v in mods[p].state_dict().items()}


def load_flurka_state(student: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy a ``flurka_state`` into the student's FlurkaAttention modules (in place)."""
    mods = flurka_modules(student)
    want = {f"{p}.{k}" for p, m in mods.items() for k in m.state_dict()}
    if set(state) != want:
        diff = sorted(set(state) ^ want)[:4]
        raise ValueError(f"the checkpoint's FLuRKA tensors do not match the student's (e.g. "
                         f"{', '.join(diff)}): resume with the model converted the same way")
    with torch.no_grad():
        for p, m in mods.items():
            m.load_state_dict({k: state[f"{p}.{k}"] for k in m.state_dict()})


def _options(par: Parallel, **kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=par.distributed, **kw)


def optimizer_state(work: nn.Module, opt: torch.optim.Optimizer, par: Parallel) -> dict:
    """The optimiser's full state keyed by parameter name (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(work, opt, options=_options(par))


def load_optimizer_state(work: nn.Module, opt: torch.optim.Optimizer, osd: dict,
                         par: Parallel) -> None:
    """Load an ``optimizer_state`` (every rank holds the full dict)."""
    if par.distributed:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        set_optimizer_state_dict(work, opt, osd, options=_options(par))
        return
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    by_name = {n: index[id(p)] for n, p in work.named_parameters() if id(p) in index}
    groups = [{**g, "params": [by_name[n] for n in g["params"]]} for g in osd["param_groups"]]
    opt.load_state_dict({"state": {by_name[n]: s for n, s in osd["state"].items()},
                         "param_groups": groups})


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def save_checkpoint(path: str, *, work: nn.Module, names: dict[str, str],
                    opt: torch.optim.Optimizer, par: Parallel, device: torch.device,
                    info: dict[str, Any]) -> None:
    """Write the checkpoint (FLuRKA state, optimiser, RNG of every rank, ``info``: step, seed,
    losses) to ``path``: gathered on every rank, written once by rank 0, atomically."""
    rng = _rng_state(device)
    rngs = [rng]
    if par.distributed:
        rngs = [None] * par.world
        dist.all_gather_object(rngs, rng)
    state = {"format": _FORMAT, "version": 1, **info, "world_size": par.world,
             "strategy": par.strategy, "flurka": flurka_state(work, names),
             "optimizer": optimizer_state(work, opt, par), "rng": rngs}
    if par.rank == 0:
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(path, lambda tmp: write_bytes(tmp, buf.getvalue()))
    if par.distributed:
        dist.barrier()


def load_checkpoint(path: str, par: Parallel) -> dict[str, Any]:
    """Read a checkpoint on rank 0 and broadcast it to every rank."""
    box: list[Any] = [None]
    if par.rank == 0:
        if not os.path.exists(path):
            box[0] = FileNotFoundError(
                f"resume=True but there is no checkpoint at {path}: run once with "
                "checkpoint=DIR first, or drop resume")
        else:
            box[0] = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code
    if par.distributed:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    state = box[0]
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a distill checkpoint: pass the DIR that "
                         "distill(checkpoint=DIR) wrote")
    return state


def restore_rng(state: dict[str, Any], par: Parallel, device: torch.device) -> None:
    """Set this rank's RNG to the checkpoint's (rank 0's when the world size changed)."""
    rngs = state["rng"]
    rng = rngs[par.rank] if len(rngs) == par.world else rngs[0]
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


__all__ = ["CHECKPOINT_FILE", "Parallel", "STRATEGIES", "resolve", "shard", "wrap"]
