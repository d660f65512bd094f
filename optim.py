"""
The optimizers of nanochat's SFT: AdamW for the embeddings, lm_head and scalars, Muon for the blocks' matrices (in
the parameter groups of the model's generation), gradient sync over ranks in buckets that overlap backward, the step.

    optimizers = setup_optimizers(model, unembedding_lr, embedding_lr, matrix_lr, weight_decay)
    grad_sync = GradSync(model, owners=optimizers[1].owners())
    grad_sync.arm(); loss.backward()          # the last micro-batch's backward sends the buckets
    optimizer_step(model, optimizers, lr_multiplier, grad_sync)
"""

import torch
import torch.distributed as dist

from common import UserError, synchronize

def setup_optimizers(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5):
    """[AdamW (embeddings, lm_head, scalars), Muon (the blocks' matrices)] in the groups and with the Muon rule of the
    model's nanochat generation (weight_decay goes to Muon in 2026, to AdamW in 2025)."""
    a = (model.config.n_embd / 768) ** -0.5  # embedding lrs were tuned at width 768
    matrices = list(model.transformer.h.parameters())
    if model.gen2026:
        adam_groups = [dict(params=params, lr=lr, betas=betas, weight_decay=decay) for params, lr, betas, decay in [
            ([model.lm_head.weight], unembedding_lr * a, (0.8, 0.96), 0.01),
            ([model.transformer.wte.weight], embedding_lr * a, (0.8, 0.995), 0.001),
            (list(model.value_embeds.parameters()), embedding_lr * a * 0.5, (0.8, 0.995), 0.01),
            ([model.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
            ([model.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
            ([model.smear_gate.weight, model.smear_lambda, model.backout_lambda], 0.2, (0.8, 0.95), 0.0)]]
        muon_groups = [dict(params=[p for p in matrices if p.shape == shape], weight_decay=weight_decay)
                       for shape in sorted({tuple(p.shape) for p in matrices})]
    else:
        adam_groups = [dict(params=[model.lm_head.weight], lr=unembedding_lr * a, weight_decay=weight_decay),
                       dict(params=[model.transformer.wte.weight], lr=embedding_lr * a, weight_decay=weight_decay)]
        muon_groups = [dict(params=matrices)]
    adamw = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, fused=model.get_device().type == "cuda")
    muon = Muon(muon_groups, dict(lr=matrix_lr, momentum=0.95, rule="2026" if model.gen2026 else "2025", beta2=0.9,
                                  weight_decay=0.0))
    for group in adamw.param_groups + muon.param_groups:
        group["initial_lr"] = group["lr"]
    return [adamw, muon]

def use_bf16(G):
    """Orthogonalise in bf16 where its matmuls are fast: CUDA (as nanochat) and CPUs with AVX512-BF16;
    float32 elsewhere (CPUs without bf16 units run bf16 matmuls 10-35x slower)."""
    cpu_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", bool)
    return G.device.type == "cuda" or (G.device.type == "cpu" and cpu_bf16())

def newton_schulz5(G):
    """Approximately orthogonalise G with a quintic Newton-Schulz iteration on the wide orientation (2025)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if use_bf16(G) else G.float()
    tall = G.size(-2) > G.size(-1)
    X = X.mT if tall else X
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X

# nanochat 92d63d4's Polar Express coefficients (Amsel et al. 2025, arXiv 2505.16932: 5 steps, safety 2e-2)
POLAR_EXPRESS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]

def polar_express(G):
    """2026's orthogonalisation: rows equilibrated to their mean norm (MuonEq), 5 Polar Express steps,
    the Frobenius norm snapped to sqrt(min(rows, cols)) (Muon+); the op order is nanochat's."""
    X = G.bfloat16() if use_bf16(G) else G
    target = X.float().norm(dim=(-2, -1), keepdim=True) / (X.size(-2) ** 0.5)
    X = X * (target / X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(X.dtype)
    X, tall = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6), G.size(-2) > G.size(-1)
    for a, b, c in POLAR_EXPRESS:
        A = X.mT @ X if tall else X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + (X @ B if tall else B @ X)
    g = X.to(G.dtype)
    return g * (min(g.shape[-2:]) ** 0.5 / g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)).to(g.dtype)

def muon_2026(p, g, state, group):
    """nanochat 92d63d4's Muon on one matrix, given its Nesterov update g: Polar Express, NorMuon's variance
    reduction (a factored second moment per row or column), then cautious weight decay (only where the update
    and the weight agree in sign). Hyperparameters as float32 0-d tensors, as nanochat's fused kernel has them."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)
    red = -1 if p.size(-2) >= p.size(-1) else -2
    if "second_momentum_buffer" not in state:
        state["second_momentum_buffer"] = p.new_zeros((p.size(-2), 1) if red == -1 else (1, p.size(-1)))
    g = polar_express(g)
    v_mean, n = g.float().square().mean(dim=red, keepdim=True), g.size(red)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    v = state["second_momentum_buffer"].lerp_(v_mean.to(p.dtype), 1 - f32(group["beta2"]).to(g.dtype))
    step = v.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * n) * step.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    lr, wd = f32(group["lr"] * max(1.0, p.size(-2) / p.size(-1)) ** 0.5), f32(group["weight_decay"])
    p.sub_(lr * g + lr * wd * p * ((g * p) >= 0))

class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz: each matrix's Nesterov momentum update is orthogonalised (scaled up if
    tall); group rule "2025" as nanochat 885a4f2 (Newton-Schulz, no weight decay), "2026" as 92d63d4 (muon_2026). As
    nanochat's DistMuon, rank r updates (and keeps the state of) matrices r, r + world, ... and broadcasts them."""

    @torch.no_grad()
    def step(self):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        works = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if i % world == rank and p.grad is not None:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    momentum = group["momentum"]  # 2026: a float32 0-d tensor, as nanochat's kernel takes it
                    momentum = torch.tensor(momentum, dtype=torch.float32) if group["rule"] == "2026" else momentum
                    buf = state["momentum_buffer"].lerp_(p.grad, 1 - momentum)
                    g = p.grad.lerp_(buf, momentum)  # Nesterov
                    if group["rule"] == "2026":
                        muon_2026(p, g, state, group)
                    else:
                        p.add_(newton_schulz5(g), alpha=-group["lr"] * max(1, p.size(-2) / p.size(-1)) ** 0.5)
                if world > 1:
                    works.append(dist.broadcast(p, src=i % world, async_op=True))
        for work in works:
            work.wait()

    def owners(self):
        """{matrix: the rank that updates it}: only that rank needs its summed gradient (GradSync reduces it there)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        return {p: i % world for group in self.param_groups for i, p in enumerate(group["params"])}

def warm_start(optimizers, shards, where, keep=()):
    """Continue from nanochat 92d63d4's optimizer shards (optim_<step>_rank<r>.pt, any number of ranks), as its
    chat_sft --load-optimizer does: the pretraining's hyperparameters (but this run's lrs, and those named in `keep`),
    AdamW's moments (the row slices of large tensors rejoined) and each Muon group's stacked buffers, split back per
    matrix."""
    ours, theirs = optimizers[0].param_groups + optimizers[1].param_groups, shards[0]["param_groups"]
    if [len(g["params"]) for g in ours] != [len(g.get("params", ())) for g in theirs]:
        raise UserError(f"{where}: its optimizer groups do not match this model's (another model's optimizer?)")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for group, saved in zip(ours, theirs):
        group.update({k: saved[k] for k in ("betas", "eps", "weight_decay", "momentum", "beta2") if k in saved
                      and k not in keep})
        states = [[s["state"].get(i, {}) for s in shards] for i in saved["params"]]
        if saved.get("kind") == "muon":  # on the group's first matrix, stacked [chunk per rank, ...]
            stacks = {k: torch.cat([s[k] for s in states[0] if k in s]) for k in ("momentum_buffer",
                                                                                  "second_momentum_buffer")}
            for k, p in enumerate(group["params"]):
                if k % world == rank:  # the matrices this rank updates
                    optimizers[1].state[p] = {name: t[k].to(p).clone() for name, t in stacks.items()}
            continue
        for p, parts in zip(group["params"], states):
            sliced = len(parts) > 1 and p.numel() >= 1024  # a large tensor's moments: row slices, one per rank
            moments = {k: (torch.cat([s[k] for s in parts]) if sliced else parts[0][k]).to(p).clone().view_as(p)
                       for k in ("exp_avg", "exp_avg_sq")}
            step = torch.tensor(float(parts[0]["step"]), device=p.device if group.get("fused") else "cpu")
            optimizers[0].state[p] = {"step": step, **moments}

def ready_order(model):
    """Parameters in about the order backward finishes their gradients: lm_head, the blocks from the last (each with its
    value embedding), then what the first or every layer uses (wte, 2026's scalars and smear: ready at the end)."""
    blocks = [list(b.parameters()) + list(model.value_embeds[str(i)].parameters() if str(i) in model.value_embeds
                                          else []) for i, b in enumerate(model.transformer.h)]
    first = [model.lm_head.weight] + [p for ps in reversed(blocks) for p in ps]
    seen = set(map(id, first))
    return [p for p in first + [p for p in model.parameters() if id(p) not in seen] if p.requires_grad]

class GradSync:
    """Sums gradients over ranks in buckets of all_reduce (world size 1: nothing); a matrix in owners (Muon's {param:
    rank}) is summed on its owner only, which updates and broadcasts it (the model crosses the wire twice a step, not
    three times). Under several processes each p.grad is a view of its bucket: syncing adds no copy. arm() before the
    last micro-batch's backward sends each bucket once backward fills it (buckets follow ready_order); wait() finishes.
    Every rank sends every bucket in one order (a gradient it did not produce as its zeros): the collectives match."""

    def __init__(self, model, bucket_numel=1 << 24, owners=None):
        self.world, self.model, owners = (dist.get_world_size() if dist.is_initialized() else 1), model, owners or {}
        self.buckets, self.flats = [[]], []
        for p in ready_order(model) if self.world > 1 else []:
            last = self.buckets[-1]
            if last and (p in owners or last[0] in owners or sum(q.numel() for q in last) >= bucket_numel
                         or p.dtype != last[0].dtype):
                self.buckets.append([])
            self.buckets[-1].append(p)
        self.owners = [owners.get(bucket[0]) if bucket else None for bucket in self.buckets]
        for bucket in self.buckets if self.world > 1 else []:
            flat = torch.zeros(sum(p.numel() for p in bucket), dtype=bucket[0].dtype, device=bucket[0].device)
            for p, view in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.grad = view.view_as(p).copy_(p.grad) if p.grad is not None else view.view_as(p)
                p.register_post_accumulate_grad_hook(self._grad_ready)
            self.flats.append(flat)
        self.ready, self.sent, self.armed = set(), [], False

    def arm(self):
        self.armed = self.world > 1

    def _grad_ready(self, p):  # only the armed backward counts: earlier ones are not final
        if self.armed:
            self.ready.add(id(p))
            while len(self.sent) < len(self.buckets) and all(id(q) in self.ready for q in self.buckets[len(self.sent)]):
                self._send()

    def _send(self):
        flat, owner = self.flats[len(self.sent)], self.owners[len(self.sent)]
        self.sent.append(dist.all_reduce(flat, async_op=True) if owner is None else
                         dist.reduce(flat, dst=owner, async_op=True))

    def wait(self):
        """Finish the sync (all of it, when not armed): every gradient is then the sum."""
        while self.world > 1 and len(self.sent) < len(self.buckets):
            self._send()
        for work in self.sent:
            work.wait()
        self.ready, self.sent, self.armed = set(), [], False

    def zero_grad(self):
        """Clear the gradients for the next step: the buckets are zeroed and kept (the gradients are their views)."""
        for flat in self.flats:
            flat.zero_()
        if not self.flats:
            self.model.zero_grad(set_to_none=True)

def optimizer_step(model, optimizers, lr_multiplier, grad_sync):
    """Sum grads over ranks (grad_sync, armed or not), set lrs, step, clear grads, and wait for the device: the
    step's work is done when it returns (its time is real)."""
    grad_sync.wait()
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
        opt.step()
    grad_sync.zero_grad()
    synchronize(model.get_device())
