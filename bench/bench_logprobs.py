"""
Time and peak memory of forward+backward through the log-prob path: the plain full-logits
path (model(x, y, loss_reduction="none")) vs model.token_logprobs, chunked with recompute
(reduction="none"), fused (reduction="sum", SFT's path) and model.pair_loss (DPO's path: the
rows' halves paired as chosen/rejected, the sigmoid loss; an even batch only).

Times: the modes run interleaved in one process (one warm-up each, then --reps rounds),
median per mode, so a busy machine slows them alike. Peak memory: each mode in its own
process (a warm-up run, then the measured one), so peak RSS is its own.

    python bench/bench_logprobs.py                                  # 4x1024 V=32768, 1x2048 and 2x2048 V=65536, C=768, CPU
    python bench/bench_logprobs.py --batch 2 --seq 256 --vocab 512  # one quick shape
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

from common import synchronize
from model import GPT, GPTConfig


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(field="VmRSS"):
    """Current (VmRSS) or peak since the last reset (VmHWM) resident memory, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


SHAPES = [(4, 1024, 32768), (1, 2048, 65536), (2, 2048, 65536)]  # (batch, seq, vocab); 2x2048: DPO's pair


def build(batch, seq, vocab, a):
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=a.layers, n_head=a.width // 128,
                       n_kv_head=a.width // 128, n_embd=a.width)
    model = GPT(config).to(a.device)
    model.init_weights(zero_out=False)
    x = torch.randint(0, vocab, (batch, seq), device=a.device)
    y = torch.randint(0, vocab, (batch, seq), device=a.device)
    return model, x, y


def run(mode, model, x, y):
    """One forward+backward from cleared gradients; returns its seconds."""
    model.zero_grad(set_to_none=True)
    synchronize(x.device)
    t0 = time.perf_counter()
    if mode == "plain":
        total = (-model(x, y, loss_reduction="none")).sum()
    elif mode == "chunked":
        total = model.token_logprobs(x, y).sum()
    elif mode == "dpo":
        total = model.pair_loss(x, y, lambda i, margin: -F.logsigmoid(0.1 * margin))[0]
    else:
        total = model.token_logprobs(x, y, reduction="sum")
    total.backward()
    synchronize(x.device)
    return time.perf_counter() - t0


def peak_mb(mode, model, x, y):
    """Peak memory of one warm run beyond the model, its batch and nothing else."""
    run(mode, model, x, y)
    model.zero_grad(set_to_none=True)
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        assert reset_peak_rss(), "needs Linux /proc/self/clear_refs"
        base = rss_mb() * 2**20
    run(mode, model, x, y)
    peak = torch.cuda.max_memory_allocated() if cuda else rss_mb("VmHWM") * 2**20
    return (peak - base) / 2**20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=None, help="one shape instead of the two default ones")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--reps", type=int, default=3, help="timed rounds after one warm-up")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default="plain,chunked,fused,dpo", help="some of plain,chunked,fused,dpo")
    p.add_argument("--probe", default=None, help="internal: print one mode's peak memory")
    a = p.parse_args()
    shapes = SHAPES if a.batch is None else [(a.batch, a.seq, a.vocab)]
    modes = a.modes.split(",")
    if a.probe:
        print(json.dumps({"peak_mb": peak_mb(a.probe, *build(*shapes[0], a))}))
        return
    for batch, seq, vocab in shapes:
        print(f"B={batch} T={seq} V={vocab} C={a.width} layers={a.layers} device={a.device} "
              f"({torch.get_num_threads()} threads): full fp32 logits alone are {batch * seq * vocab * 4 / 2**20:.0f} MB")
        model, x, y = build(batch, seq, vocab, a)
        shape_modes = [mode for mode in modes if mode != "dpo" or batch % 2 == 0]
        times = {mode: [] for mode in shape_modes}
        for rep in range(a.reps + 1):
            for mode in shape_modes:
                dt = run(mode, model, x, y)
                if rep > 0:
                    times[mode].append(dt)
        del model, x, y
        peaks = {}
        for mode in shape_modes:
            # large blocks through mmap: freed memory leaves RSS at once, so peak RSS = peak live
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            args = ["--batch", str(batch), "--seq", str(seq), "--vocab", str(vocab), "--width", str(a.width),
                    "--layers", str(a.layers), "--device", a.device, "--probe", mode]
            out = subprocess.run([sys.executable, __file__] + args, capture_output=True, text=True,
                                 check=True, env=env).stdout
            peaks[mode] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
        for mode in shape_modes:
            med = statistics.median(times[mode])
            line = (f"  {mode:>8}: fwd+bwd median {med:6.2f} s (runs {', '.join(f'{t:.2f}' for t in times[mode])}), "
                    f"peak +{peaks[mode]:.0f} MB (parameter gradients included)")
            if "plain" in times and mode != "plain":
                line += (f"; / plain: time {med / statistics.median(times['plain']):.2f}x, "
                         f"peak {peaks[mode] / max(peaks['plain'], 1e-9):.2f}x")
            print(line, flush=True)


if __name__ == "__main__":
    main()
