"""Attention transfer (``fr.distill``) on several processes with DDP or FSDP2, under torchrun.

    torchrun --nproc_per_node 2 examples/distill_distributed.py --quick              # DDP, gloo
    torchrun --nproc_per_node 2 examples/distill_distributed.py --quick --strategy fsdp
    torchrun --nproc_per_node 2 examples/distill_distributed.py --quick --checkpoint out/ck \\
        --stop-at 20                                        # "interrupted" after 20 steps ...
    torchrun --nproc_per_node 2 examples/distill_distributed.py --quick --checkpoint out/ck \\
        --resume                                            # ... and continued from there
    python examples/distill_distributed.py --quick         # one process: the same figures

The model is the causal character-level GPT of ``uptrain_char_lm.py`` (Python's documentation
text, no download): every rank trains the same small softmax teacher (same seed; rank 0's
weights are then broadcast, so the ranks agree whatever happened), converts it to ``ffk``
kernel attention and runs ``fr.distill`` on the same global batches, each rank keeping its
rows of every batch. Rank 0 prints the loss table and writes the figures (JSON). On GPUs the
same script runs with the nccl backend, one GPU per rank (docs/uptraining.md, "Many
processes").
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, uptrain_char_lm
import _common
import uptrain_char_lm as lm

import flurka_rewrite as fr


@dataclass
class Config:
    """Sizes and schedule; ``QUICK`` is ``--quick``."""

    max_chars: int | None = 200_000
    block: int = 128
    d_model: int = 128
    heads: int = 4
    layers: int = 3
    teacher_steps: int = 400       # softmax training of the teacher (every rank, same seed)
    teacher_lr: float = 3e-3
    batch: int = 32                # the global batch of distill: split across the ranks
    distill_steps: int = 150
    distill_lr: float = 1e-2
    eval_windows: int = 128
    seed: int = 0


QUICK = Config(max_chars=60_000, block=64, d_model=64, heads=2, layers=2, teacher_steps=300,
               batch=16, distill_steps=60, eval_windows=64)


def init(backend: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device): a process group when launched by torchrun, else one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def run(cfg: Config, *, strategy: str = "auto", checkpoint: str | None = None,
        resume: bool = False, checkpoint_every: int | None = None, stop_at: int | None = None,
        device: torch.device | None = None) -> dict[str, Any]:
    """Teacher, conversion, distributed distill; returns the figures (the same on every rank)."""
    device = device or torch.device("cpu")
    rank = dist.get_rank() if dist.is_initialized() else 0
    quiet = contextlib.redirect_stdout(io.StringIO()) if rank else contextlib.nullcontext()
    torch.manual_seed(cfg.seed)
    data = lm.CharData(lm.load_text(cfg.max_chars), 0.1, cfg.block)
    val = data.val_windows(cfg.eval_windows)
    teacher = lm.CharGPT(data.vocab, cfg.block, cfg.d_model, cfg.heads, cfg.layers)
    t0 = time.perf_counter()
    with quiet:
        lm.train(teacher, data, val, steps=cfg.teacher_steps, lr=cfg.teacher_lr, batch=16,
                 eval_every=cfg.teacher_steps, seed=cfg.seed, label="softmax teacher")
    t_teacher = time.perf_counter() - t0
    if dist.is_initialized():  # the ranks must hold the same teacher
        for t in teacher.state_dict().values():
            dist.broadcast(t, src=0)
    teacher = teacher.to(device).eval()
    val = tuple(t.to(device) for t in val)
    example = data.batch(4, torch.Generator().manual_seed(cfg.seed))[0].to(device)
    student = fr.convert(teacher, kernel="ffk", dk=None, example_inputs=(example,),
                         seed=cfg.seed)
    val_teacher = lm.evaluate(teacher, val, 32)
    val_before = lm.evaluate(student, val, 32)

    g = torch.Generator().manual_seed(cfg.seed + 1)
    batches = [data.batch(cfg.batch, g)[0] for _ in range(cfg.distill_steps)]
    steps = min(stop_at or cfg.distill_steps, cfg.distill_steps)
    t0 = time.perf_counter()
    res = fr.distill(student, teacher, batches, steps=steps, lr=cfg.distill_lr, seed=cfg.seed,
                     progress=False, strategy=strategy, checkpoint=checkpoint,
                     checkpoint_every=checkpoint_every, resume=resume)
    t_distill = time.perf_counter() - t0
    val_after = lm.evaluate(student, val, 32)
    if rank == 0:
        print(res)
        print(f"\n  {'validation loss':<34}  nats/char  bits/char")
        for name, v in [("softmax teacher", val_teacher), ("ffk, before distill", val_before),
                        (f"ffk, after {res.steps} distill steps", val_after)]:
            print(f"  {name:<34}  {v:>9.4f}  {v / math.log(2):>9.3f}")
    return {
        "config": asdict(cfg), "strategy": res.strategy, "world_size": res.world_size,
        "global_batch": cfg.batch, "rows_per_rank": cfg.batch / res.world_size,
        "steps": res.steps, "resumed_at": res.resumed_at, "checkpoint": checkpoint,
        "distill_loss_first": res.losses[0], "distill_loss_last": res.losses[-1],
        "site_rel_losses": res.site_rel_losses, "trained_params": res.trained_params,
        "val_loss_teacher": val_teacher, "val_loss_before": val_before,
        "val_loss_after": val_after, "seconds_teacher": t_teacher,
        "seconds_distill": t_distill, "curves": {"distill": res.losses},
    }


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    p = _common.parser(__doc__.splitlines()[0], "none")
    p.add_argument("--strategy", default="auto", choices=["auto", "none", "ddp", "fsdp"],
                   help="auto: ddp under torchrun, none in one process")
    p.add_argument("--backend", default=None, help="process group backend (default: nccl on "
                   "GPUs, gloo on CPUs)")
    p.add_argument("--checkpoint", metavar="DIR", help="write DIR/distill.pt (rank 0)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint DIR")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after STEP steps (to try --resume)")
    args = p.parse_args(argv)
    args.threads = args.threads or 1  # one thread per rank unless told
    _common.setup(args)
    rank, world, device = init(args.backend)
    cfg = replace(QUICK if args.quick else Config(), seed=args.seed)
    if args.json is None:
        args.json = f"examples/results/distill_distributed{'_quick' if args.quick else ''}.json"
    try:
        figures = run(cfg, strategy=args.strategy, checkpoint=args.checkpoint,
                      resume=args.resume, checkpoint_every=args.checkpoint_every,
                      stop_at=args.stop_at, device=device)
        if rank == 0:
            figures["command"] = " ".join(["torchrun", f"--nproc_per_node {world}"] * (world > 1)
                                          + ["examples/distill_distributed.py"] + sys.argv[1:])
            _common.finish(args, figures, {"attention transfer (MSE)": figures["curves"]},
                           f"distill on {world} process(es), {figures['strategy']}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
