"""
Peak memory and time of one forward+backward through the log-prob path: the plain
full-logits path (model(x, y, loss_reduction="none")) vs model.token_logprobs (chunked,
checkpointed). Each mode runs in its own process so peak RSS is its own.

    python bench/bench_logprobs.py                       # V=65536, T=2048, C=768 on CPU
    python bench/bench_logprobs.py --vocab 512 --seq 256 # something quick
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def measure(mode, vocab, seq, width, layers, device):
    import torch
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=layers, n_head=width // 128,
                       n_kv_head=width // 128, n_embd=width)
    model = GPT(config).to(device)
    model.init_weights(zero_out=False)
    x = torch.randint(0, vocab, (1, seq), device=device)
    y = torch.randint(0, vocab, (1, seq), device=device)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        assert reset_peak_rss(), "needs Linux /proc/self/clear_refs"
        base = rss_mb() * 2**20
    t0 = time.time()
    if mode == "plain":
        logp = -model(x, y, loss_reduction="none")
    else:
        logp = model.token_logprobs(x, y)
    logp.sum().backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = rss_mb("VmHWM") * 2**20
    grads_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"mode": mode, "peak_extra_mb": (peak - base) / 2**20, "seconds": time.time() - t0, "grads_mb": grads_mb}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", default=None, help="internal: run one mode in this process")
    a = p.parse_args()
    if a.mode:
        print(json.dumps(measure(a.mode, a.vocab, a.seq, a.width, a.layers, a.device)))
        return
    print(f"V={a.vocab} T={a.seq} C={a.width} layers={a.layers} device={a.device}; "
          f"full fp32 logits alone would be {a.seq * a.vocab * 4 / 2**20:.0f} MB")
    results = {}
    for mode in ("plain", "chunked"):
        # large blocks through mmap: freed memory leaves RSS at once, so peak RSS = peak live
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run([sys.executable, __file__, "--mode", mode] + sys.argv[1:],
                             capture_output=True, text=True, check=True, env=env).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:>8}: peak +{r['peak_extra_mb']:.0f} MB over the model (of which {r['grads_mb']:.0f} MB are "
              f"the parameter gradients), fwd+bwd {r['seconds']:.2f} s")
    ratio = results["chunked"]["peak_extra_mb"] / max(results["plain"]["peak_extra_mb"], 1e-9)
    print(f"chunked / plain peak: {ratio:.2f}")


if __name__ == "__main__":
    main()
