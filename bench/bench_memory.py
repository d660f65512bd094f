"""
Memory per rank of a DPO run before activations, by accounting on meta-device models (no memory is
allocated, so d32 is counted on a laptop): weights, the live reference, gradients, optimizer state and
the gradient-sync buffers, as the code was before the 8-GPU review and as it is now.

    python bench/bench_memory.py                  # d20 and d32, both generations, 8 ranks
    python bench/bench_memory.py --world 1 --depths 12 20

Before: the reference a float32 copy of the policy, every gradient copied into float32 buckets beside
itself while syncing, nanochat's bf16 embeddings (the bug that froze them). Now: float32 master weights,
a reference with bf16 matrices and value embeddings (no gradient), gradients that are views of their buckets.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from model import GPT, GPTConfig
from optim import setup_optimizers

GB = 1e9


def build(depth, generation, vocab):
    """nanochat's shape for a depth: width 64 per layer, a head per 128 channels, 2048 tokens."""
    n_embd = depth * 64
    config = GPTConfig(sequence_len=2048, vocab_size=vocab, n_layer=depth, n_head=n_embd // 128,
                       n_kv_head=n_embd // 128, n_embd=n_embd, window_pattern="SSSL" if generation == 2026 else None)
    with torch.device("meta"):
        return GPT(config)


def accounting(model, world):
    """{row: (before bytes, now bytes)} per rank."""
    params = list(model.parameters())
    embeds = {id(model.transformer.wte.weight)} | {id(p) for p in model.value_embeds.parameters()}
    numel = sum(p.numel() for p in params)
    fp32 = 4 * numel
    # before: embeddings stored bf16 (as nanochat's checkpoints hold them), everything else float32
    before_weights = sum((2 if id(p) in embeds else 4) * p.numel() for p in params)
    adamw, muon = setup_optimizers(model)
    adam_numel = sum(p.numel() for g in adamw.param_groups for p in g["params"])
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    muon_numel = sum(p.numel() for i, p in enumerate(muon_params) if i % world == 0)  # rank 0's momentum share
    optimizer = 4 * (2 * adam_numel + muon_numel)
    halved = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) + sum(
        p.numel() for p in model.value_embeds.parameters())
    reference = 2 * halved + 4 * (numel - halved)  # dpo.freeze on CUDA: matrices and value embeddings bf16
    return {
        "weights": (before_weights, fp32),
        "live reference": (before_weights, reference),  # a deepcopy of the policy / its matrices bf16, the rest fp32
        "gradients": (before_weights, fp32),
        "optimizer state": (optimizer, optimizer),
        "gradient-sync buffers": (fp32 if world > 1 else 0, 0),  # float32 buckets beside the grads / the grads
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 32])
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=65536)
    args = parser.parse_args()
    print(f"GB per rank, {args.world} ranks, vocab {args.vocab}, before activations (before -> now)\n")
    rows, columns = None, []
    for generation in (2025, 2026):
        for depth in args.depths:
            model = build(depth, generation, args.vocab)
            table = accounting(model, args.world)
            rows = rows or list(table)
            n = sum(p.numel() for p in model.parameters())
            columns.append((f"d{depth} {generation} ({n / 1e9:.2f} B params)", table))
    print("| | " + " | ".join(name for name, _ in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for row in rows + ["total"]:
        cells = []
        for _, table in columns:
            before, now = (sum(v[i] for v in table.values()) for i in (0, 1)) if row == "total" else table[row]
            cells.append(f"{before / GB:.1f} -> {now / GB:.1f}")
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
