"""
Training-step benchmarks on one model and one batch of preference pairs:

- SFT tokens/s (the chosen and rejected answers trained on as plain conversations),
- DPO step time / SFT step time over the same tokens, with the live frozen reference and
  with cached reference log-probs (goals: <= 1.40 and <= 1.08),
- peak memory of a DPO step through the fused log-prob path vs full [B, T, V] logits,
- Muon's step alone (momentum + Newton-Schulz of every block matrix).

    python bench/bench_train.py                      # d4 on CPU
    python bench/bench_train.py --depth 2 --width 768  # d12's width, 2 layers
    python bench/bench_train.py --depth 20 --device cuda --batch 8 --seq 2048   # d20 on a GPU
    python bench/bench_train.py --depth 20 --device cuda --batch 8 --seq 2048 --compile 1

Step times are medians over --steps timed steps after --warmup steps, the three kinds
of step interleaved.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

import dpo
from bench_logprobs import reset_peak_rss, rss_mb
from common import autocast, synchronize
from dataloader import collate
from model import GPT, GPTConfig, compile_model
from optim import GradSync, optimizer_step, setup_optimizers

H100_BF16_FLOPS = 989e12  # dense bf16 peak, for MFU


def build(args):
    torch.manual_seed(0)
    width = args.width or args.depth * 64
    heads = max(1, (width + 127) // 128)
    config = GPTConfig(sequence_len=args.seq, vocab_size=args.vocab, n_layer=args.depth, n_head=heads,
                       n_kv_head=heads, n_embd=width)
    with torch.device(args.device):
        model = GPT(config)
    model.init_weights(zero_out=False)
    return model


def make_pairs(args):
    """args.batch pairs of rendered conversations: a prompt of seq/4 tokens with user mask
    0, then an answer filling the rest with mask 1 (random ids: cost does not depend on them)."""
    g = torch.Generator().manual_seed(1)
    prompt = args.seq // 4
    pairs = []
    for _ in range(args.batch):
        rows = []
        for _ in range(2):
            ids = torch.randint(0, args.vocab - 16, (args.seq + 1,), generator=g).tolist()
            rows.append((ids, [0] * prompt + [1] * (args.seq + 1 - prompt)))
        pairs.append(tuple(rows))
    return pairs


def timed(fns, args):
    """Median seconds of each named function, run interleaved so a busy machine slows all alike."""
    times = {name: [] for name in fns}
    for i in range(args.warmup + args.steps):
        for name, fn in fns.items():
            synchronize(args.device)
            t0 = time.time()
            fn()
            synchronize(args.device)
            if i >= args.warmup:
                times[name].append(time.time() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def sft_step(model, optimizers, inputs, targets):
    with autocast(inputs.device):
        total = model.token_logprobs(inputs, targets, reduction="sum")
    (-total / (targets != -1).sum()).backward()
    optimizer_step(model, optimizers, 1.0, GradSync(model))


def dpo_step(model, optimizers, inputs, targets, reference=None, table=None, full_logits=False):
    n = inputs.size(0) // 2
    with autocast(inputs.device):
        if table is not None:
            ref = table
        else:
            with torch.no_grad():
                ref = reference.token_logprobs(inputs, targets).sum(dim=-1)
        if full_logits:  # the path fusing replaces: [B, T, V] float32 logits, then log_softmax
            logp = F.log_softmax(model(inputs), dim=-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
            logps = (logp * (targets != -1)).sum(-1)
            loss = dpo.DPOLoss(beta=0.1)(logps[:n] - logps[n:], ref[:n] - ref[n:]).sum()
        else:  # dpo.py's path
            loss = model.pair_loss(inputs, targets, lambda i, m: dpo.DPOLoss(beta=0.1)(m, ref[i] - ref[n + i]))[0]
    (loss / n).backward()
    optimizer_step(model, optimizers, 1.0, GradSync(model))


def memory_probe(args):
    """One DPO step in this process; prints its peak memory beyond the model and batch."""
    model = build(args)
    optimizers = setup_optimizers(model)
    pairs = make_pairs(args)
    inputs, targets = collate([p[0] for p in pairs] + [p[1] for p in pairs], 0, args.device)
    reference = dpo.freeze(model)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        assert reset_peak_rss(), "needs Linux /proc/self/clear_refs"
        base = rss_mb() * 2**20
    dpo_step(model, optimizers, inputs, targets, reference=reference, full_logits=args.probe == "full")
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else rss_mb("VmHWM") * 2**20
    print(json.dumps({"peak_extra_mb": (peak - base) / 2**20}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=0, help="n_embd (default 64 * depth, as nanochat)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="pairs per step (2x conversations)")
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", type=int, default=0, help="torch.compile the policy and the reference (as --compile=1)")
    p.add_argument("--memory", type=int, default=1, help="also probe a DPO step's peak memory (0: skip)")
    p.add_argument("--probe", default=None, help="internal: fused|full memory probe")
    args = p.parse_args()
    if args.probe:
        return memory_probe(args)

    model = build(args)
    optimizers = setup_optimizers(model)
    reference = dpo.freeze(model)
    for m in (model, reference) if args.compile else ():
        compile_model(m)
    pairs = make_pairs(args)
    # chosen rows then rejected rows, as dpo.py batches them
    inputs, targets = collate([p[0] for p in pairs] + [p[1] for p in pairs], 0, args.device)
    with torch.no_grad(), autocast(args.device):
        table = reference.token_logprobs(inputs, targets).sum(dim=-1)
    tokens = inputs.numel()
    print(f"d{args.depth} (n_embd {model.config.n_embd}), V={args.vocab}, {2 * args.batch} x {args.seq} tokens "
          f"per step on {args.device} ({torch.get_num_threads()} threads{', compiled' if args.compile else ''})")

    t = timed({"sft": lambda: sft_step(model, optimizers, inputs, targets),
               "live": lambda: dpo_step(model, optimizers, inputs, targets, reference=reference),
               "cached": lambda: dpo_step(model, optimizers, inputs, targets, table=table)}, args)
    t_sft, t_live, t_cached = t["sft"], t["live"], t["cached"]
    flops = model.num_flops_per_token() * tokens
    print(f"SFT step         {t_sft * 1000:8.1f} ms  {tokens / t_sft:10,.0f} tok/s")
    print(f"DPO step, live   {t_live * 1000:8.1f} ms  {tokens / t_live:10,.0f} tok/s  ratio to SFT {t_live / t_sft:.3f}")
    print(f"DPO step, cached {t_cached * 1000:8.1f} ms  {tokens / t_cached:10,.0f} tok/s  ratio to SFT {t_cached / t_sft:.3f}")
    for p in model.transformer.h.parameters():
        p.grad = torch.randn_like(p)
    t_muon = timed({"muon": optimizers[1].step}, args)["muon"]
    print(f"Muon step        {t_muon * 1000:8.1f} ms")
    if args.device == "cuda":
        print(f"MFU (bf16 peak {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s): SFT {flops / t_sft / H100_BF16_FLOPS:.1%}, "
              f"DPO cached {flops / t_cached / H100_BF16_FLOPS:.1%}")

    if not args.memory:
        return
    peaks = {}
    for probe in ("fused", "full"):
        # large blocks through mmap so that freed memory leaves RSS at once: peak RSS = peak live
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run([sys.executable, __file__, "--probe", probe] + sys.argv[1:], env=env,
                             capture_output=True, text=True, check=True).stdout
        peaks[probe] = json.loads(out.strip().splitlines()[-1])["peak_extra_mb"]
    print(f"DPO step peak memory beyond the model: fused {peaks['fused']:.0f} MB, "
          f"full logits {peaks['full']:.0f} MB ({peaks['fused'] / peaks['full']:.2f}x)")


if __name__ == "__main__":
    main()
