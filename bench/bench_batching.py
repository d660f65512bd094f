"""
Real-token fraction of SFT and DPO micro-batches: the share of the positions the model
computes that are real tokens (not padding), with dataloader.Schedule's length-grouped order vs
the plain order (rows padded to the longest of a micro-batch as they come). --compile pads
nothing more (its lengths are symbolic).

    python bench/bench_batching.py                         # demo data + a synthetic long-tailed set
    python bench/bench_batching.py --per_step 32 --batch 4

Data: data/demo_sft.jsonl and data/demo_dpo.jsonl rendered with a byte-level tokenizer (the
offline demo's), and lognormal lengths clipped to 50-2,000 tokens (median 300).
"""

import argparse
import json
import math
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataloader  # noqa: E402
import tokenizer  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def fraction(lengths, micro_batches, rows_per_item=1):
    """lengths: tokens per item (a pair's longer side for DPO, where both rows pad to it)."""
    real = computed = 0
    for mb in micro_batches:
        width = max(lengths[i] for i in mb)
        real += sum(lengths[i] for i in mb) * rows_per_item
        computed += len(mb) * rows_per_item * width
    return real / computed


def measure(name, lengths, args, real_lengths=None):
    steps = max(1, len(lengths) // args.per_step)
    schedule = dataloader.Schedule(lengths, args.per_step, args.batch, 1, 1, steps)
    grouped = [mb for s in range(steps) for mb in schedule.micro_batches(s, 0)]
    plain = [list(range(i, i + args.batch)) for i in range(0, steps * args.per_step, args.batch)]
    plain = [[i % len(lengths) for i in mb] for mb in plain]
    out = {"set": name, "items": len(lengths), "median_len": sorted(lengths)[len(lengths) // 2],
           "plain": fraction(lengths, plain), "grouped": fraction(lengths, grouped)}
    if real_lengths is not None:  # DPO: both rows of a pair pad to the longer one
        out["grouped"] = sum(real_lengths[i] for mb in grouped for i in mb) / sum(
            2 * len(mb) * max(lengths[i] for i in mb) for mb in grouped)
        out["plain"] = sum(real_lengths[i] for mb in plain for i in mb) / sum(
            2 * len(mb) * max(lengths[i] for i in mb) for mb in plain)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per_step", type=int, default=32, help="rows (pairs) per optimizer step")
    p.add_argument("--batch", type=int, default=4, help="rows (pairs) per micro-batch")
    p.add_argument("--synthetic", type=int, default=20000, help="rows in the synthetic set")
    args = p.parse_args()
    tok = tokenizer.Tokenizer(tokenizer.byte_level_encoding())
    sft = [json.loads(line) for line in open(os.path.join(DATA, "demo_sft.jsonl"))]
    measure("demo_sft", [len(tok.render_conversation(r, 10**9)[0]) - 1 for r in sft], args)
    dpo = [json.loads(line) for line in open(os.path.join(DATA, "demo_dpo.jsonl"))]
    sides = [[len(tok.render_conversation({"messages": [{"role": "user", "content": r["prompt"]},
                                                        {"role": "assistant", "content": r[k]}]}, 10**9)[0]) - 1
              for k in ("chosen", "rejected")] for r in dpo]
    measure("demo_dpo", [max(s) for s in sides], args, real_lengths=[sum(s) for s in sides])
    rng = random.Random(0)
    synthetic = [min(2000, max(50, int(rng.lognormvariate(math.log(300), 0.9)))) for _ in range(args.synthetic)]
    measure("lognormal_50_2000", synthetic, args)


if __name__ == "__main__":
    main()
