"""
Sampling throughput of the KV-cache engine: a batch of samples from one prompt, as eval.py
samples GSM8K/HumanEval answers.

    python bench/bench_sample.py                         # d4, batch 8, both generations, on CPU
    python bench/bench_sample.py --depth 20 --device cuda --generation 2026
    python bench/bench_sample.py --nanochat ~/nanochat-885a4f2 ~/nanochat  # beside nanochat's Engine

Reports generated tokens/s over all rows (prefill excluded from the rate, shown apart), the
best of --repeat runs per generation, the generations' runs interleaved. --nanochat takes clones
of nanochat (one per generation, told apart by its GPTConfig): its own GPT gets our model's
config and weights, and its Engine is timed on the same prompt, batch and tokens, between ours.
"""

import argparse
import importlib
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from common import autocast, synchronize
from engine import Engine
from model import GPT, GPTConfig
from tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer


def synthetic_encoding(vocab):
    """A tiktoken Encoding of exactly `vocab` ids (bytes, then byte pairs, then the specials),
    so the benchmark samples over a nanochat-sized vocabulary."""
    import tiktoken
    ranks = {bytes([i]): i for i in range(256)}
    for a in range(256):
        for b in range(256):
            if len(ranks) == vocab - len(SPECIAL_TOKENS):
                break
            ranks[bytes([a, b])] = len(ranks)
    special = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="bench", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def nanochat_engine(clones, model, tokenizer):
    """nanochat's Engine over its own GPT holding `model`'s weights, from the clone of model's generation."""
    for clone in clones:
        for name in [m for m in sys.modules if m.split(".")[0] == "nanochat"]:
            del sys.modules[name]  # each clone imports its own nanochat package
        sys.path.insert(0, os.path.abspath(os.path.expanduser(clone)))
        gpt, engine = importlib.import_module("nanochat.gpt"), importlib.import_module("nanochat.engine")
        sys.path.pop(0)
        fields = gpt.GPTConfig.__dataclass_fields__
        if ("window_pattern" in fields) == (model.config.window_pattern is not None):
            with torch.device(model.get_device()):
                theirs = gpt.GPT(gpt.GPTConfig(**{k: v for k, v in asdict(model.config).items() if k in fields}))
            theirs.init_weights()  # as nanochat's loader: its dtypes, then the weights
            theirs.load_state_dict(model.state_dict())
            with torch.no_grad(), autocast(model.get_device().type):  # the same function as ours?
                x = torch.arange(16, device=model.get_device())[None]
                print(f"{clone}: nanochat's logits within {(theirs(x).float() - model(x)).abs().max():.1e} of ours")
            return engine.Engine(theirs.eval(), tokenizer)
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--batch", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per row")
    p.add_argument("--generation", type=int, choices=(2025, 2026), nargs="*", default=[2025, 2026])
    p.add_argument("--repeat", type=int, default=3, help="runs per generation; the best is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nanochat", nargs="*", default=[], metavar="DIR", help="nanochat clones to time beside ours")
    args = p.parse_args()

    width = args.depth * 64
    heads = max(1, (width + 127) // 128)
    tokenizer = Tokenizer(synthetic_encoding(args.vocab))
    prompt = torch.randint(0, 255, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    engines = {}
    for generation in args.generation:
        torch.manual_seed(0)
        config = GPTConfig(sequence_len=2048, vocab_size=args.vocab, n_layer=args.depth, n_head=heads, n_kv_head=heads,
                           n_embd=width, window_pattern="SSSL" if generation == 2026 else None)
        with torch.device(args.device):
            model = GPT(config)
        model.init_weights(zero_out=False)
        model.eval()
        with torch.no_grad():  # no row may stop early: the special tokens' logits are pushed down
            model.lm_head.weight[args.vocab - len(SPECIAL_TOKENS):] = 0.0
        engines[str(generation)] = Engine(model, tokenizer, args.batch, args.prompt + args.tokens)  # one cache
        theirs = nanochat_engine(args.nanochat, model, tokenizer)
        if theirs is not None:
            engines[f"{generation} nanochat"] = theirs

    def run(name, engine, n):
        synchronize(args.device)
        t0 = time.time()
        # nanochat's 2025 scripts sample under bf16 autocast on CUDA; its 2026 model casts by itself
        with autocast(args.device) if name == "2025 nanochat" else nullcontext():
            if isinstance(engine, Engine):
                sequences, _ = engine.generate_batch(prompt, args.batch, max_tokens=n, temperature=1.0, top_k=50)
                steps = len(sequences[0]) - len(prompt)
            else:
                steps = sum(1 for _ in engine.generate(prompt, num_samples=args.batch, max_tokens=n, temperature=1.0,
                                                       top_k=50))
        synchronize(args.device)
        return steps, time.time() - t0

    best = {name: (0.0, 0.0) for name in engines}
    for name, engine in engines.items():
        run(name, engine, 4)  # warm up
    for _ in range(args.repeat):
        for name, engine in engines.items():
            _, t_prefill = run(name, engine, 1)  # prefill + one token
            steps, t_all = run(name, engine, args.tokens)
            rate = args.batch * (steps - 1) / (t_all - t_prefill)
            best[name] = max(best[name], (rate, t_prefill))
    print(f"d{args.depth} (n_embd {width}), V={args.vocab}, batch {args.batch}, prompt {args.prompt}, "
          f"{args.tokens} tokens per row on {args.device}, best of {args.repeat}")
    for name, (rate, t_prefill) in best.items():
        print(f"{name}: prefill {t_prefill * 1000:.0f} ms; sampling {rate:,.0f} tokens/s ({rate / args.batch:,.1f} per row)")


if __name__ == "__main__":
    main()
