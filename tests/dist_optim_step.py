"""Helper for test_optim: three optimizer steps on a fixed global batch, on 1 or N processes.

    python tests/dist_optim_step.py OUT.pt
    torchrun --nproc_per_node=2 tests/dist_optim_step.py OUT.pt

Each step has two micro-batches per process. Step 0 syncs without arming GradSync (all
buckets at the step), steps 1 and 2 arm it before the last backward (overlapped buckets). In step 1 the
rows of rank 1 (of 2) have no target at all, so its lm_head produces no gradient.
"""

import sys

import torch

import common
from model import GPT, GPTConfig
from optim import GradSync, optimizer_step, setup_optimizers

out_path = sys.argv[1]
# float32 Newton-Schulz even on a CPU with bf16 units, so 1 and N processes agree to float tolerance
torch.cpu._is_avx512_bf16_supported = lambda: False
d = common.init_dist("cpu")
torch.manual_seed(0)
model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
model.init_weights(zero_out=False)
optimizers = setup_optimizers(model)
initial = {k: v.clone() for k, v in model.state_dict().items()}
owners = optimizers[1].owners()  # Muon's matrices: summed on the rank that updates them
grad_sync = GradSync(model, bucket_numel=3000, owners=owners)  # several buckets
grads = {}  # the summed gradients of step 0 this rank holds, as the optimizers see them
hook = optimizers[0].register_step_pre_hook(lambda *_: grads.update(
    {name: p.grad.clone() for name, p in model.named_parameters() if owners.get(p, d.rank) == d.rank}))
# what crosses the wire per step, in a ring's terms: an all_reduce sends its tensor twice, reduce and broadcast once
wire, weight = [], {"all_reduce": 2, "reduce": 1, "broadcast": 1}
for name in weight:
    def counted(tensor, *args, _name=name, _real=getattr(torch.distributed, name), **kwargs):
        wire[-1] += weight[_name] * tensor.numel() * tensor.element_size()
        return _real(tensor, *args, **kwargs)
    setattr(torch.distributed, name, counted)

g = torch.Generator().manual_seed(1)
for step in range(3):
    wire.append(0)
    inputs = torch.randint(0, 64, (8, 16), generator=g)
    targets = torch.randint(0, 64, (8, 16), generator=g)
    targets[torch.rand(8, 16, generator=g) < 0.3] = -1  # masked positions, unevenly spread
    if step == 1:
        targets[1::2] = -1  # the rows a second process gets: nothing to score there
    mine_x = inputs[d.rank::d.world_size]
    mine_y = targets[d.rank::d.world_size]
    num_tokens = (targets != -1).sum()
    micro_batches = ((mine_x[:2], mine_y[:2]), (mine_x[2:], mine_y[2:]))
    for i, (x, y) in enumerate(micro_batches):
        if step > 0 and i == len(micro_batches) - 1:
            grad_sync.arm()
        if i == 0:  # SFT's fused sum, then the per-token path
            loss = -model.token_logprobs(x, y, chunk_numel=64 * 5, reduction="sum") / num_tokens
        else:
            loss = -model.token_logprobs(x, y, chunk_numel=64 * 5).sum() / num_tokens
        loss.backward()
    if step == 2 and d.world_size > 1:  # armed: every bucket went out during the last backward
        assert len(grad_sync.sent) == len(grad_sync.buckets) > 1
    if step == 1:
        hook.remove()
    optimizer_step(model, optimizers, 1.0 - step / 4, grad_sync)

if d.master:
    torch.save({"grads": grads, "initial": initial, "params": model.state_dict(), "wire": wire,
                "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}, out_path)
common.cleanup_dist()
