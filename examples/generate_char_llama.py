"""A converted causal LM generating text with its fixed-size state, beside the original.

    python examples/generate_char_llama.py             # full run: ~10 minutes on one CPU core
    python examples/generate_char_llama.py --quick     # ~1 minute (the test's size)
    make demo-generate                                  # the full run, figures to out/

The steps:

1. **Model.** A character-level ``transformers.LlamaForCausalLM`` built from a config (4
   layers, width 128, 4 heads, 2 key/value heads, rotary positions, 0.8M parameters), trained
   from scratch on the text of examples/uptrain_char_lm.py (Python's ``pydoc_data`` topics, no
   download; the last 10% is held out).
2. **Convert.** ``fr.convert(model, kernel="performer", dk=None, window=32)``: every layer
   becomes exact softmax over the last 32 characters plus the performer over the older ones
   (docs/operator.md, "Sliding window"), then the converted model is fine-tuned on the same
   loss (the up-training examples' loop, docs/uptraining.md).
3. **Generate.** ``model.generate()`` with its default cache continues the same held-out
   prompts for both models (sampled at temperature 0.8 from the top 20 characters, the same
   seed for both). The original keeps a ``DynamicCache`` of every key and
   value; the converted model keeps, per layer, S and z of the performer part and the last 31
   keys and values (``FlurkaStateLayer``, kernels/window_decode.py). A check: the converted
   model's cached generation, sampled and greedy, gives the tokens of its generation without
   a cache (which recomputes the whole sequence at every step).
4. **Speed.** Per-token decode time and cache memory of both at long contexts (a held-out
   passage tiled to N characters, then single-token steps from the cache; interleaved,
   median of ``--tokens``), as benchmarks/decode_cpu.py measures them.

The figures (validation loss in nats/char, the texts, the timings) go to ``--out``
(``generate_demo.json`` and ``.md``). Times are CPU times on whatever machine runs it: the
ratios, measured side by side, are the figures to read.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, uptrain_char_lm
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # decode_cpu
import _common
import uptrain_char_lm as clm
from decode_cpu import cache_bytes, forward

import flurka_rewrite as fr


@dataclass
class Config:
    """Sizes and schedules; the defaults are the full run, ``QUICK`` is ``--quick``."""

    layers: int = 4
    d_model: int = 128
    heads: int = 4
    kv_heads: int = 2
    block: int = 128
    batch: int = 32
    train_steps: int = 800
    train_lr: float = 3e-3
    kernel: str = "performer"
    window: int = 32
    finetune_steps: int = 300
    finetune_lr: float = 3e-3
    eval_windows: int = 256
    prompts: int = 3
    prompt_chars: int = 96
    new_chars: int = 200
    contexts: tuple[int, ...] = (1024, 4096, 16384, 32768)
    tokens: int = 16
    max_chars: int | None = None
    seed: int = 0


QUICK = Config(layers=2, train_steps=60, finetune_steps=30, eval_windows=32, prompts=2,
               new_chars=40, contexts=(256, 1024), tokens=4, max_chars=60_000)


class Logits(nn.Module):
    """``lm(input_ids).logits`` without a cache: the up-training loop's model(x) -> logits."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.train(lm.training)  # a new module starts in training mode; keep lm's mode

    def forward(self, x: Tensor) -> Tensor:
        return self.lm(input_ids=x, use_cache=False).logits


def build(cfg: Config, vocab: int) -> nn.Module:
    """The softmax model: a small Llama from a config (random weights)."""
    import transformers as tf

    conf = tf.LlamaConfig(vocab_size=vocab, hidden_size=cfg.d_model,
                          num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                          num_key_value_heads=cfg.kv_heads, intermediate_size=3 * cfg.d_model,
                          max_position_embeddings=max(cfg.contexts) + cfg.tokens + 64,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(cfg.seed)
    return tf.LlamaForCausalLM(conf).eval()


def generate(lm: nn.Module, ids: Tensor, n: int, *, sample: bool, seed: int = 0,
             use_cache: bool = True) -> Tensor:
    """Continuation of ids (B, P) by n tokens (B, n): greedy, or sampled at temperature 0.8
    from the top 20 characters with torch's generator seeded to ``seed`` (the same draws for
    every model, so equal logits give equal texts)."""
    opts = dict(do_sample=True, temperature=0.8, top_k=20) if sample else dict(do_sample=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          use_cache=use_cache, pad_token_id=0, eos_token_id=None, **opts)
    return out[:, ids.shape[1]:]


def decode_speed(models: dict[str, nn.Module], ids: Tensor, tokens: int) -> dict[str, dict]:
    """Per-token decode ms (median of ``tokens`` interleaved steps after 2 untimed ones) and
    cache bytes after them, for each model continuing ``ids`` (1, N) from its own cache."""
    last, steps = {}, {name: [] for name in models}
    with torch.inference_mode():
        for name, lm in models.items():
            last[name] = forward(lm, ids)
        for i in range(2 + tokens):
            for name, lm in models.items():
                t0 = time.perf_counter()
                last[name] = forward(lm, *last[name])
                if i >= 2:
                    steps[name].append(time.perf_counter() - t0)
    return {name: {"decode_ms": 1e3 * statistics.median(steps[name]),
                   "cache_bytes": cache_bytes(last[name][1])[0]} for name in models}


def run(cfg: Config) -> dict[str, Any]:
    """Train, convert, fine-tune, generate, time; returns the figures."""
    t0 = time.perf_counter()
    data = clm.CharData(clm.load_text(cfg.max_chars), 0.1, cfg.block)
    val = data.val_windows(cfg.eval_windows)
    lm = build(cfg, data.vocab)
    common = dict(batch=cfg.batch, eval_every=max(1, cfg.train_steps // 4))
    clm.train(Logits(lm), data, val, steps=cfg.train_steps, lr=cfg.train_lr, seed=cfg.seed,
              label="softmax", **common)
    loss = {"softmax": clm.evaluate(Logits(lm), val, cfg.batch)}
    example = data.batch(2, torch.Generator().manual_seed(1))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report is printed below
        new = fr.convert(lm, kernel=cfg.kernel, dk=None, window=cfg.window,
                         example_inputs={"input_ids": example,
                                         "attention_mask": torch.ones_like(example)})
    loss["converted"] = clm.evaluate(Logits(new), val, cfg.batch)
    clm.train(Logits(new), data, val, steps=cfg.finetune_steps, lr=cfg.finetune_lr,
              seed=cfg.seed + 1, label="converted", **common)
    new.eval()
    loss["up-trained"] = clm.evaluate(Logits(new), val, cfg.batch)

    decode = lambda ids: "".join(data.chars[i] for i in ids.tolist())  # noqa: E731
    starts = torch.linspace(0, len(data.val) - cfg.prompt_chars - 1, cfg.prompts).long()
    prompts = torch.stack([data.val[s:s + cfg.prompt_chars] for s in starts.tolist()])
    texts = {"prompt": [decode(p) for p in prompts]}
    gen = {name: generate(m, prompts, cfg.new_chars, sample=True, seed=cfg.seed)
           for name, m in (("original", lm), ("converted", new))}
    texts |= {name: [decode(g) for g in out] for name, out in gen.items()}
    # the check: the state cache gives what recomputing the whole sequence gives
    same = {"sampled": gen["converted"],
            "greedy": generate(new, prompts, cfg.new_chars, sample=False)}
    same = {how: bool(torch.equal(out, generate(new, prompts, cfg.new_chars,
                                                 sample=how == "sampled", seed=cfg.seed,
                                                 use_cache=False)))
            for how, out in same.items()}

    speed = []
    passage = data.val[: max(cfg.contexts)]
    for n in cfg.contexts:
        ids = passage.repeat(n // len(passage) + 1)[:n][None]
        got = decode_speed({"original": lm, "converted": new}, ids, cfg.tokens)
        o, c = got["original"], got["converted"]
        speed.append({"context": n, "original_ms": o["decode_ms"], "converted_ms": c["decode_ms"],
                      "speedup": o["decode_ms"] / c["decode_ms"],
                      "original_cache_bytes": o["cache_bytes"],
                      "converted_cache_bytes": c["cache_bytes"]})
        print(f"  context {n}: original {o['decode_ms']:.2f} ms/token, converted "
              f"{c['decode_ms']:.2f} ms/token", flush=True)
    return {"config": asdict(cfg), "val_loss_nats_per_char": loss, "texts": texts,
            "cached_equals_uncached": all(same.values()), "cached_equals_uncached_by": same,
            "speed": speed,
            "params": sum(p.numel() for p in lm.parameters()),
            "report": str(new.flurka_report).splitlines()[:3],
            "wall_s": time.perf_counter() - t0}


def markdown(fig: dict[str, Any]) -> str:
    """The figures as a short Markdown page."""
    cfg, loss = fig["config"], fig["val_loss_nats_per_char"]
    lines = [f"# A converted character Llama generating ({cfg['kernel']}, window "
             f"{cfg['window']})", "",
             "| model | validation nats/char |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in loss.items()]
    lines += ["", f"Cached generation equals generation without a cache: "
              f"{fig['cached_equals_uncached']}", ""]
    for i, p in enumerate(fig["texts"]["prompt"]):
        lines += [f"## Prompt {i + 1}", "", "```", p, "```", ""]
        for name in ("original", "converted"):
            lines += [f"{name}:", "", "```", fig["texts"][name][i], "```", ""]
    lines += ["| context | original ms/token | converted ms/token | speed-up | original cache "
              "KiB | converted state KiB |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {s['context']} | {s['original_ms']:.2f} | {s['converted_ms']:.2f} | "
              f"{s['speedup']:.2f}x | {s['original_cache_bytes'] / 1024:.0f} | "
              f"{s['converted_cache_bytes'] / 1024:.0f} |" for s in fig["speed"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: --quick, --out DIR, --threads, --seed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (about a minute)")
    p.add_argument("--out", default="out", help="folder for generate_demo.json / .md")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = replace(QUICK if args.quick else Config(), seed=args.seed)
    fig = run(cfg)
    out = Path(args.out)
    _common.write_json(out / "generate_demo.json", fig)
    (out / "generate_demo.md").write_text(markdown(fig))
    print(markdown(fig))
    print(f"wrote {out / 'generate_demo.json'} and .md ({fig['wall_s']:.0f} s)", file=sys.stderr)
    return fig


if __name__ == "__main__":
    main()
