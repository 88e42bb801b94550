"""How long ``convert`` takes on a 12-layer BERT-base-sized model (random weights from config).

Issue 3 target: < 10 s on the 2-core CI CPU. Run: ``python benchmarks/convert_time.py``.
Prints the wall time of ``convert`` (cold process, then warm) and ``plan`` (performer, dk=64,
batch 2 x 128 tokens with padding), the number of sites, and the capture method of the first
site's module.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def bert_base(layers: int = 12, impl: str = "sdpa") -> torch.nn.Module:
    """BertModel with BERT-base sizes (hidden 768, 12 heads, 3072 FFN), random weights."""
    import transformers as tf
    cfg = tf.BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512)
    torch.manual_seed(0)
    return tf.BertModel._from_config(cfg, attn_implementation=impl).eval()


def main() -> None:
    """Time plan() and convert() and print the figures."""
    import flurka_rewrite as fr
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--impl", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--kernel", default="performer")
    ap.add_argument("--dk", default="64", help="an int, or none")
    ap.add_argument("--json", help="append the figures to this JSON-lines file")
    ap.add_argument("--label", default="", help="a name for this run in the JSON")
    args = ap.parse_args()
    model = bert_base(args.layers, args.impl)
    ids = torch.randint(5, 1000, (2, args.seq))
    mask = torch.ones_like(ids)
    mask[1, -10:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    dk = None if args.dk == "none" else int(args.dk)
    kw = dict(kernel=args.kernel, dk=dk, example_inputs=inputs)
    t0 = time.perf_counter()
    new = fr.convert(model, **kw)  # first in the process: includes torch.export's warm-up
    t1 = time.perf_counter()
    rep = fr.plan(model, **kw)
    t2 = time.perf_counter()
    new2 = fr.convert(model, **kw)
    t3 = time.perf_counter()
    n = len(new2.flurka_report.rewritten)
    print(f"BERT-base {args.layers} layers ({args.impl}), B=2 N={args.seq}: "
          f"convert {t1 - t0:.2f} s (cold process), plan {t2 - t1:.2f} s, "
          f"convert {t3 - t2:.2f} s (warm); "
          f"{len(rep.sites)} sites, {n} rewritten, hoisted={new.flurka_report.sites[0].hoisted}")
    if args.json:
        row = dict(label=args.label, layers=args.layers, impl=args.impl, seq=args.seq,
                   kernel=args.kernel, dk=dk, convert_cold_s=t1 - t0, plan_s=t2 - t1,
                   convert_warm_s=t3 - t2, sites=len(rep.sites), rewritten=n,
                   verified=[getattr(s, "verified", None) for s in new2.flurka_report.sites])
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
