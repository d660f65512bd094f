"""Helper for test_model: one optimizer step on a fixed global batch, on 1 or N processes.

    python tests/dist_optim_step.py OUT.pt
    torchrun --nproc_per_node=2 tests/dist_optim_step.py OUT.pt
"""

import sys

import torch

import common
from model import GPT, GPTConfig

out_path = sys.argv[1]
d = common.init_dist("cpu")
torch.manual_seed(0)
model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
model.init_weights(zero_out=False)
optimizers = model.setup_optimizers()
initial = {k: v.clone() for k, v in model.state_dict().items()}

g = torch.Generator().manual_seed(1)
inputs = torch.randint(0, 64, (8, 16), generator=g)
targets = torch.randint(0, 64, (8, 16), generator=g)
targets[torch.rand(8, 16, generator=g) < 0.3] = -1  # masked positions, unevenly spread

for step in range(2):
    mine_x = common.shard(inputs, d.rank, d.world_size)
    mine_y = common.shard(targets, d.rank, d.world_size)
    (total,) = common.all_reduce_sum([(targets != -1).sum().item() / d.world_size], d.device)
    # two micro-batches per rank: grad accumulation and the cross-rank sum must agree
    for x, y in ((mine_x[:2], mine_y[:2]), (mine_x[2:], mine_y[2:])):
        loss = -model.token_logprobs(x, y, chunk_numel=64 * 5).sum() / (targets != -1).sum()
        loss.backward()
    common.sync_gradients(model)
    if step == 0:
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    common.optimizer_step(model, optimizers, common.linear_decay(step, 4), sync=False)

if d.master:
    torch.save({"grads": grads, "initial": initial, "params": model.state_dict()}, out_path)
common.cleanup_dist()
