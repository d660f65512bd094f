"""
Sampling throughput of onpolicy.py (answer tokens/s): its batched sampling (--batch_size rows decoded together, a
prompt's --samples answers from one prefill) against the same prompts sampled one at a time (a prompt's answers
together, prompts in turn) and one answer at a time.

    python bench/bench_onpolicy.py                        # d4, V=65536, 16 demo prompts x 4 answers of 64 tokens, CPU
    python bench/bench_onpolicy.py --depth 20 --prompts 256 --tokens 256 --batch 128 --device cuda

A random model (its special tokens pushed down, so no answer ends early: every way makes the same tokens) over the
demo data's prompts, rendered as onpolicy.py renders them; the best of --repeat runs per way, the ways interleaved.
On the shared 2-core CPU of its writing (defaults, --repeat 3, about 9 minutes): 1,523 answer tokens/s batched, 665 a
prompt at a time (0.44x), 265 an answer at a time (0.17x).
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import onpolicy  # noqa: E402
from bench_sample import synthetic_encoding  # noqa: E402
from common import synchronize  # noqa: E402
from engine import Engine  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=4, help="answers per prompt")
    p.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    p.add_argument("--batch", type=int, default=32, help="onpolicy.py's --batch_size")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    tokenizer = Tokenizer(synthetic_encoding(args.vocab))
    texts = [json.loads(line)["prompt"] for line in open(os.path.join(ROOT, "data", "demo_dpo.jsonl"))]
    prompts = [onpolicy.Prompt(i, text, onpolicy.draw(0, text), None) for i, text in enumerate(texts[:args.prompts])]
    rendered = {q.id: tokenizer.render_for_completion({"messages": [{"role": "user", "content": q.text},
                                                                     {"role": "assistant", "content": ""}]})
                for q in prompts}
    width, max_len = args.depth * 64, max(map(len, rendered.values())) + args.tokens + 1
    torch.manual_seed(0)
    heads = max(1, (width + 127) // 128)
    with torch.device(args.device):
        model = GPT(GPTConfig(2048, args.vocab, args.depth, heads, heads, width))
    model.init_weights(zero_out=False)
    model.eval()
    with torch.no_grad():
        model.lm_head.weight[args.vocab - len(SPECIAL_TOKENS):] = 0.0
    config = onpolicy.Config(samples=args.samples, max_new_tokens=args.tokens, batch_size=args.batch)
    one = onpolicy.Config(samples=1, max_new_tokens=args.tokens, batch_size=1)
    engines = {n: Engine(model, tokenizer, n, max_len) for n in (args.batch, args.samples, 1)}
    ways = {  # each gives [[Answer]]: the answers' token counts are what it made
        f"onpolicy.sample, {args.batch} rows together": lambda: onpolicy.sample(engines[args.batch], rendered, prompts,
                                                                                config),
        "one prompt at a time (its answers together)": lambda: [
            a for q in prompts for a in onpolicy.sample(engines[args.samples], rendered, [q], config)],
        "one answer at a time": lambda: [onpolicy.sample(engines[1], rendered, [q._replace(seed=q.seed + k)], one)[0]
                                         for q in prompts for k in range(args.samples)],
    }
    for way in ways.values():
        way()  # warm up
    best = dict.fromkeys(ways, 0.0)
    for _ in range(args.repeat):
        for name, way in ways.items():
            synchronize(args.device)
            t0 = time.time()
            tokens = sum(a.tokens for answers in way() for a in answers)
            synchronize(args.device)
            best[name] = max(best[name], tokens / (time.time() - t0))
    print(f"d{args.depth} (n_embd {width}), V={args.vocab}, {len(prompts)} prompts x {args.samples} answers x "
          f"{args.tokens} tokens on {args.device} ({torch.get_num_threads()} threads), best of {args.repeat}")
    for name, rate in best.items():
        print(f"{name}: {rate:,.0f} answer tokens/s ({rate / best[next(iter(best))]:.2f}x the stage's)")


if __name__ == "__main__":
    main()
