"""
Serving throughput of chat.py: aggregate generated tokens/s of 1 and of 8 concurrent
streaming requests against the OpenAI-compatible server (loopback HTTP, server-sent events),
and their ratio: how much decoding the requests together buys over one at a time.

    python bench/bench_chat.py                    # d4, nanochat-sized vocabulary, on CPU
    python bench/bench_chat.py --depth 12 --tokens 256

A random model over a 65,536-token vocabulary whose special tokens never win, so every
reply runs to --tokens; each stream has its own prompt and seed (temperature 1, top_k 50).
"""

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import requests
import torch

import chat
from bench_sample import synthetic_encoding
from model import GPT, GPTConfig
from tokenizer import SPECIAL_TOKENS, Tokenizer


def stream(url, prompt, seed, tokens, out):
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 1.0,
            "top_k": 50, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {") and json.loads(line[6:]).get("usage"):
                out.append(json.loads(line[6:])["usage"]["completion_tokens"])


def run(url, streams, tokens):
    """Aggregate tokens/s of `streams` requests sent at once (prefills included)."""
    done, t0 = [], time.time()
    threads = [threading.Thread(target=stream, args=(url, f"Question {i}: " + "why? " * (8 + i), i, tokens, done))
               for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == streams and all(n == tokens for n in done), done
    return sum(done) / (time.time() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per stream")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting; the best is reported")
    args = p.parse_args()
    torch.manual_seed(0)
    width = args.depth * 64
    heads = max(1, (width + 127) // 128)
    model = GPT(GPTConfig(sequence_len=2048, vocab_size=args.vocab, n_layer=args.depth, n_head=heads,
                          n_kv_head=heads, n_embd=width))
    model.init_weights(zero_out=False)
    model.eval()
    with torch.no_grad():  # no reply may stop early
        model.lm_head.weight[args.vocab - len(SPECIAL_TOKENS):] = 0.0
    sched = chat.Scheduler(model, Tokenizer(synthetic_encoding(args.vocab)), max_batch=8)
    server = chat.make_server(sched, "bench", chat.Config(port=0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    sys.stdout = open(os.devnull, "w")  # the server's line per request
    try:
        run(url, 2, 8)  # warm up
        rates = {n: max(run(url, n, args.tokens) for _ in range(args.repeats)) for n in (1, 8)}
    finally:
        sys.stdout = sys.__stdout__
        server.shutdown()
        sched.close()
    print(f"d{args.depth} (n_embd {width}), V={args.vocab}, {args.tokens} tokens per stream, "
          f"{torch.get_num_threads()} torch threads")
    for n, rate in rates.items():
        print(f"{n} concurrent stream{'s' * (n > 1)}: {rate:,.1f} generated tokens/s in all ({rate / n:,.1f} per stream)")
    print(f"ratio 8 / 1: {rates[8] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
