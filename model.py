"""
The nanochat model stack, from scratch, for both generations of nanochat's on-disk format
(Nov 2025, commit 885a4f2, and 2026, commit 92d63d4; told apart by what is on disk): the GPT,
chunked log-probs, AdamW + Muon, tokenizer, checkpoints, a fresh offline base, sampling (KV
cache, calculator tool), and what the training stages share (batches, schedule, run directory).

    from model import load_model
    model, tokenizer, meta = load_model("sft", device, phase="eval")
"""

import ast
import glob
import json
import math
import os
import pickle
import re
import sys
from collections import deque
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import tiktoken
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F

from common import UserError, atomic_write, atomic_write_json, autocast, get_base_dir

# -----------------------------------------------------------------------------
# The GPT, both generations: window_pattern None is Nov 2025's model; a pattern of S/L
# switches on 2026's value embeddings, residual/x0 scalars, smear, backout, sliding windows,
# padded vocab, rotary base 100000 and the x1.2 q/k scale.


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768
    window_pattern: str = None  # 2026 only: S (short) / L (long) window per layer, cycled

    @property
    def generation(self):
        return 2025 if self.window_pattern is None else 2026


SMEAR_CHANNELS, VE_GATE_CHANNELS = 24, 12  # 2026: the gates read this many leading channels
SOFTCAP = 15.0  # logits = SOFTCAP * tanh(logits / SOFTCAP), both generations


def norm(x):  # parameter-free RMSNorm
    return F.rms_norm(x, (x.size(-1),))


def softcap(logits):
    return SOFTCAP * torch.tanh(logits / SOFTCAP)


def apply_rotary(x, cos, sin):
    """Rotate the two halves (x1, x2) of each head to (x1 c + x2 s, x2 c - x1 s): x is [B, T, H, D], cos/sin
    are [1 or B, T, 1, D] tables (c, c) and (s, -s), so it takes 3 ops (nanochat's numbers, bit for bit)."""
    return x * cos + x.roll(x.size(3) // 2, 3) * sin


def window_mask(q_pos, k_pos, window):
    """Key j is visible to query i iff 0 <= i - j <= window (positions are absolute)."""
    d = q_pos[..., :, None] - k_pos[..., None, :]
    return d >= 0 if window is None else (d >= 0) & (d <= window)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, window, value_embed):
        super().__init__()
        self.layer_idx, self.window = layer_idx, window  # window None: unlimited (2025)
        self.head_dim, self.gqa = config.n_embd // config.n_head, config.n_head != config.n_kv_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        kv_dim = config.n_kv_head * self.head_dim
        self.c_q, self.c_k, self.c_v, self.c_proj = (nn.Linear(config.n_embd, n, bias=False)
                                                     for n in (config.n_embd, kv_dim, kv_dim, config.n_embd))
        self.qk_scale = 1.2 if config.window_pattern is not None else 1.0  # 2026 scales q and k up
        if value_embed:
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, config.n_kv_head, bias=False)

    def forward(self, x, ve, cos_sin, kv_cache):
        B, T, C = x.size()
        q, k, v = (c(x).view(B, T, -1, self.head_dim) for c in (self.c_q, self.c_k, self.c_v))
        if ve is not None:  # value embedding, mixed in by a per-head gate in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view_as(v)
        # rotary in the compute dtype (bf16 under CUDA autocast; the tables already are float32 on CPU)
        cos, sin = (t.to(q.dtype) for t in cos_sin)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * self.qk_scale, norm(k) * self.qk_scale  # QK norm comes after rotary, as in nanochat
        if kv_cache is not None:  # k, v become every cached key and value the new tokens may see
            k, v, mask = kv_cache.insert(self.layer_idx, k, v, self.window)
        else:
            pos = torch.arange(T, device=x.device)
            mask = "causal" if self.window is None or self.window >= T - 1 else window_mask(pos, pos, self.window)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        causal = isinstance(mask, str)  # mask: "causal", None (every key) or a boolean tensor
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                           enable_gqa=self.gqa)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx, window, value_embed):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, window, value_embed)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, kv_cache):
        x = x + self.attn(norm(x), ve, cos_sin, kv_cache)
        return x + self.mlp(norm(x))


def layer_windows(config):
    """Left attention window per layer (None: unlimited). 2026: S is a quarter of
    sequence_len rounded up to a multiple of 128, L is sequence_len, the last layer is L."""
    pattern, n, long = config.window_pattern, config.n_layer, config.sequence_len
    if pattern is None:
        return [None] * n
    short = 128 * -(-long // 512)
    return [short if pattern.upper()[i % len(pattern)] == "S" and i < n - 1 else long for i in range(n)]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config, self.gen2026 = config, config.window_pattern is not None
        L, C = config.n_layer, config.n_embd
        self.backout_layer = L // 2 if self.gen2026 else None  # 2026: its output is subtracted at the end
        # 2026 pads the vocab to a multiple of 64 and cuts the logits back to vocab_size
        self.padded_vocab = -(-config.vocab_size // 64) * 64 if self.gen2026 else config.vocab_size
        # 2026: value embeddings in every other layer, always including the last
        ve_layers = [i for i in range(L) if self.gen2026 and i % 2 == (L - 1) % 2]
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(self.padded_vocab, C), "h": nn.ModuleList(
            [Block(config, i, w, i in ve_layers) for i, w in enumerate(layer_windows(config))])})
        self.lm_head = nn.Linear(C, self.padded_vocab, bias=False)
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(self.padded_vocab, kv_dim) for i in ve_layers})
        if self.gen2026:
            self.resid_lambdas, self.x0_lambdas = nn.Parameter(torch.ones(L)), nn.Parameter(torch.zeros(L))
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda, self.backout_lambda = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)
        self.init_rotary()

    def init_rotary(self):
        """(Re)compute the rotary tables (not saved), 10x the training length so sampling can run past it."""
        device, D = self.lm_head.weight.device, self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / ((100000 if self.gen2026 else 10000) ** (torch.arange(0, D, 2, device=device).float() / D))
        freqs = torch.outer(torch.arange(self.config.sequence_len * 10, dtype=torch.float32, device=device), inv_freq)
        cos, sin = (torch.cat(h, 1)[None, :, None, :] for h in ((freqs.cos(),) * 2, (freqs.sin(), -freqs.sin())))
        # Nov 2025 nanochat rotates with bf16 tables: their values here, kept in float32 (no cast per layer on CPU)
        self.cos, self.sin = (cos, sin) if self.gen2026 else (cos.bfloat16().float(), sin.bfloat16().float())

    @torch.no_grad()
    def init_weights(self, zero_out=True):
        """nanochat's init; zero_out=False: random (not zero/tiny) residual projections and lm_head."""
        if not self.gen2026:  # N(0, 1) embedding, fan-in scaled linears, zero lm_head and residual projections
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    fan_out, fan_in = module.weight.shape
                    module.weight.normal_(0.0, 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in)))
                elif isinstance(module, nn.Embedding):
                    module.weight.normal_(0.0, 1.0)
            for w in [self.lm_head] + [m for b in self.transformer.h for m in (b.mlp.c_proj, b.attn.c_proj)]:
                w.weight.mul_(0.0 if zero_out else 1.0)
        else:
            L, s = self.config.n_layer, math.sqrt(3) / math.sqrt(self.config.n_embd)
            self.transformer.wte.weight.normal_(0.0, 0.8)
            self.lm_head.weight.normal_(0.0, 0.001) if zero_out else self.lm_head.weight.uniform_(-s, s)
            for block in self.transformer.h:
                for w in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                    w.weight.uniform_(-s, s)
                block.mlp.c_fc.weight.uniform_(-0.4 * s, 0.4 * s)
                for w in (block.attn.c_proj, block.mlp.c_proj):
                    w.weight.zero_() if zero_out else w.weight.uniform_(-s, s)
                if hasattr(block.attn, "ve_gate"):
                    block.attn.ve_gate.weight.uniform_(0.0, 0.02)
            for ve in self.value_embeds.values():
                ve.weight.uniform_(-s, s)
            frac = torch.arange(L, dtype=torch.float32) / max(L - 1, 1)
            self.resid_lambdas.copy_(1.15 - 0.10 * frac), self.x0_lambdas.copy_(0.20 - 0.15 * frac)
            self.smear_lambda.zero_(), self.backout_lambda.fill_(0.2), self.smear_gate.weight.uniform_(0.0, 0.02)
        self.init_rotary()
        if self.lm_head.weight.device.type == "cuda":  # as nanochat: saves memory, stored so
            self.transformer.wte.to(dtype=torch.bfloat16)
            self.value_embeds.to(dtype=torch.bfloat16)

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_flops_per_token(self):
        """Training FLOPs per token: 6 per non-embedding parameter plus attention (per window)."""
        c, n_params = self.config, sum(p.numel() for p in self.parameters())
        n_embed = self.transformer.wte.weight.numel() + sum(p.numel() for p in self.value_embeds.parameters())
        span = sum(min(w or c.sequence_len, c.sequence_len) for w in layer_windows(c))
        return 6 * (n_params - n_embed) + 12 * c.n_embd * span

    def hidden_states(self, idx, kv_cache=None):
        """The final normalised residual stream [B, T, C]; with a cache, after each row's cached tokens."""
        T = idx.size(1)
        assert kv_cache is not None or T <= self.cos.size(1), f"sequence of {T} exceeds the rotary cache"
        cos_sin = (self.cos[:, :T], self.sin[:, :T]) if kv_cache is None else kv_cache.begin(T, self.cos, self.sin)
        x = norm(self.transformer.wte(idx))
        if self.gen2026:  # smear: x[t] += smear_lambda * sigmoid(gate . x[t][:24]) * x[t-1], on the unsmeared
            # embeddings; a cached row's first new token smears with the row's last cached one
            prev = torch.zeros_like(x[:, :1]) if kv_cache is None else kv_cache.prev[:, None].to(x.dtype, copy=True)
            if kv_cache is not None:
                kv_cache.prev.copy_(x[:, -1])
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
            x0 = x = x + gate * torch.cat([prev, x[:, :-1]], dim=1)
        xb = None
        for i, block in enumerate(self.transformer.h):
            if self.gen2026:
                x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, kv_cache)
            xb = x if i == self.backout_layer else xb
        x = x if xb is None else x - self.backout_lambda.to(x.dtype) * xb
        if kv_cache is not None:
            kv_cache.advance(T)
        return norm(x)

    def logits(self, x):
        """lm_head (padded rows cut off) + softcap, in float32 (a tanh: precision matters)."""
        return softcap(self.lm_head(x)[..., :self.config.vocab_size].float())

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """Logits [B, T, V], or with targets the cross-entropy (ignore_index -1; "none" -> [B*T])."""
        logits = self.logits(self.hidden_states(idx, kv_cache))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=-1, reduction=loss_reduction)

    # Per-token log-probs without materialising [B, T, V] float32 logits

    def token_logprobs(self, idx, targets, chunk_numel=None, reduction="none"):
        """log p(target) per position, [B, T] float32, 0 where the target is -1 (reduction="sum": their
        sum). Only targets reach the lm_head, in chunks of about `chunk_numel` logits (default 16M on
        CPU, 128M on CUDA), never B*T*V. With a gradient, "sum" takes it per chunk in the forward (every
        token's is the same: fused CE, SFT); "none" keeps every chunk's logits for backward (no saving)."""
        h, tgt, rows, chunk = self._scored(idx, targets, chunk_numel)
        if reduction == "sum" and torch.is_grad_enabled() and h.requires_grad and rows.numel():
            return _FusedHead.apply(self, chunk, [[(0, rows.numel(), 1)]], None, h, tgt, self.lm_head.weight)[0]
        pieces = [self._chunk_logprobs(h[i:i + chunk], tgt[i:i + chunk]) for i in range(0, rows.numel(), chunk)]
        # nothing to score: the empty sum keeps the graph so a backward() is still well-defined
        logp = torch.cat(pieces) if pieces else h.sum(-1).float()
        if reduction == "sum":
            return logp.sum()
        return logp.new_zeros(targets.numel()).index_put((rows,), logp).view_as(targets)

    def pair_loss(self, idx, targets, loss_fn, chunk_numel=None):
        """DPO's training path. idx/targets hold P pairs as rows [chosen..., rejected...]; returns (sum
        over pairs of loss_fn(i, chosen_i - rejected_i), chosen [P], rejected [P]), a row's value being
        its summed log p(target) (no gradient). The loss's gradient is taken in the forward, pair by
        pair once the margin is known: no logits are kept for backward or recomputed."""
        h, tgt, _, chunk = self._scored(idx, targets, chunk_numel)
        ends = (targets != -1).sum(1).cumsum(0).tolist()
        spans, P = list(zip([0] + ends[:-1], ends)), idx.size(0) // 2
        pairs = [[(*chosen, 1), (*rejected, -1)] for chosen, rejected in zip(spans[:P], spans[P:])]
        total, sums = _FusedHead.apply(self, chunk, pairs, loss_fn, h, tgt, self.lm_head.weight)
        return total, sums[0::2], sums[1::2]

    def _scored(self, idx, targets, chunk_numel):
        """The final hidden states of the positions with a target, their targets, those positions in
        idx.view(-1), and the rows per lm_head chunk."""
        chunk_numel = chunk_numel or 1 << (27 if idx.device.type == "cuda" else 24)
        flat_targets = targets.reshape(-1)
        rows = (flat_targets != -1).nonzero().squeeze(1)
        h = self.hidden_states(idx).flatten(0, 1).index_select(0, rows)
        return h, flat_targets.index_select(0, rows), rows, max(1, chunk_numel // self.lm_head.weight.size(0))

    def _chunk_logprobs(self, h, targets):
        """log p(target) per row of h, in place where no gradient is wanted (the DPO reference, eval).
        Softcapped logits lie in [-15, 15], so their exp needs no max subtracted first."""
        t, grad = F.linear(h, self.lm_head.weight[:self.config.vocab_size]).float(), torch.is_grad_enabled()
        logits = t.div_(SOFTCAP).tanh_() * SOFTCAP if grad else t.div_(SOFTCAP).tanh_().mul_(SOFTCAP)
        return logits.gather(1, targets[:, None]).squeeze(1) - (logits.exp() if grad else logits.exp_()).sum(1).log()

    def _head_grads(self, h, targets, w, grad_h, grad_w, sign=1):
        """The sum of log p(target) over h's rows through the lm_head w (the real vocab's rows); writes
        its gradient for h into grad_h and adds sign times the one for w to grad_w. By hand, in place: softcapped
        logits lie in [-15, 15], so their exp cannot overflow and the log-sum-exp needs no max."""
        t = torch.tanh_(F.linear(h, w).float().div_(SOFTCAP))  # logits = SOFTCAP * t
        t_target = t.gather(1, targets[:, None])
        p = t.mul(SOFTCAP).exp_()
        s = p.sum(1, keepdim=True)
        logp = (SOFTCAP * t_target - s.log()).sum()
        # d logp / d(h w^T) = (one_hot - softmax) * (1 - t^2), the softmax being p / s
        dz = p.addcmul_(p, t.square_(), value=-1).div_(s.neg_())
        dz.scatter_add_(1, targets[:, None], 1 - t_target.square())
        grad_h.copy_(dz @ w)  # under autocast a bf16 product is added to the float32 gradient, else in place:
        autocast = torch.is_autocast_enabled(h.device.type)
        grad_w.add_(dz.T @ h, alpha=sign) if autocast else grad_w.addmm_(dz.T, h, alpha=sign)
        return logp

    # Optimizers

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5):
        """[AdamW (embeddings, lm_head, scalars), Muon (the blocks' matrices)] in the groups of the
        model's nanochat generation (weight_decay goes to Muon in 2026, to AdamW in 2025)."""
        a = (self.config.n_embd / 768) ** -0.5  # embedding lrs were tuned at width 768
        matrices = list(self.transformer.h.parameters())
        if self.gen2026:
            adam_groups = [dict(params=params, lr=lr, betas=betas, weight_decay=decay) for params, lr, betas, decay in [
                ([self.lm_head.weight], unembedding_lr * a, (0.8, 0.96), 0.01),
                ([self.transformer.wte.weight], embedding_lr * a, (0.8, 0.995), 0.001),
                (list(self.value_embeds.parameters()), embedding_lr * a * 0.5, (0.8, 0.995), 0.01),
                ([self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
                ([self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
                ([self.smear_gate.weight, self.smear_lambda, self.backout_lambda], 0.2, (0.8, 0.95), 0.0)]]
            muon_groups = [dict(params=[p for p in matrices if p.shape == shape], weight_decay=weight_decay)
                           for shape in sorted({tuple(p.shape) for p in matrices})]
        else:
            adam_groups = [dict(params=[self.lm_head.weight], lr=unembedding_lr * a, weight_decay=weight_decay),
                           dict(params=[self.transformer.wte.weight], lr=embedding_lr * a, weight_decay=weight_decay)]
            muon_groups = [dict(params=matrices)]
        adamw = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, fused=self.get_device().type == "cuda")
        muon = Muon(muon_groups, dict(lr=matrix_lr, momentum=0.95))  # torch's Optimizer(params, defaults)
        for group in adamw.param_groups + muon.param_groups:
            group["initial_lr"] = group["lr"]
        return [adamw, muon]


def newton_schulz5(G):
    """Approximately orthogonalise G with a quintic Newton-Schulz iteration on the wide
    orientation, in bf16 where its matmuls are fast: CUDA (as nanochat) and CPUs with
    AVX512-BF16; float32 elsewhere (CPUs without bf16 units run bf16 matmuls 10-35x slower)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    cpu_bf16 = G.device.type == "cpu" and getattr(torch.cpu, "_is_avx512_bf16_supported", bool)()
    X = G.bfloat16() if G.device.type == "cuda" or cpu_bf16 else G.float()
    tall = G.size(-2) > G.size(-1)
    X = X.mT if tall else X
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz: each matrix's Nesterov momentum update is
    orthogonalised (scaled up if tall). Distributed as nanochat's DistMuon: rank r updates (and
    keeps the momentum of) matrices r, r + world, ... and broadcasts them."""

    @torch.no_grad()
    def step(self):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        works = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if i % world == rank and p.grad is not None:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf = self.state[p]["momentum_buffer"]
                    buf.lerp_(p.grad, 1 - group["momentum"])
                    update = newton_schulz5(p.grad.lerp_(buf, group["momentum"]))  # Nesterov
                    p.add_(update, alpha=-group["lr"] * max(1, p.size(-2) / p.size(-1)) ** 0.5)
                if world > 1:
                    works.append(dist.broadcast(p, src=i % world, async_op=True))
        for work in works:
            work.wait()


# -----------------------------------------------------------------------------
# The fused log-prob sum; gradient sync and the optimizer step


class _FusedHead(torch.autograd.Function):
    """Summed log p(target) with the gradient taken in the forward, chunk by chunk while its logits
    exist. groups: [[(start, end, sign), ...], ...] spans of h's rows; the output is the sum over groups
    of loss_fn(group index, the signed sum of its spans' sums), and the spans' sums (no gradient).
    loss_fn None: the plain sum, whose gradient is 1 for every token, so chunks add straight into the
    lm_head's gradient; otherwise a group's go (signed) to a scratch buffer, scaled once its loss is known."""

    @staticmethod
    def forward(ctx, model, chunk, groups, loss_fn, h, targets, weight):
        w = weight[:model.config.vocab_size]  # padded rows: no logits, zero gradient
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)
        scratch = grad_w[:w.size(0)] if loss_fn is None else torch.empty_like(w, dtype=grad_w.dtype)
        total, sums = torch.zeros((), device=h.device), []
        for g, spans in enumerate(groups):
            acc = scratch if loss_fn is None else scratch.zero_()
            part = torch.stack([sum((model._head_grads(h[i:j], targets[i:j], w, grad_h[i:j], acc, sign)
                                     for i in range(a, b, chunk) for j in [min(i + chunk, b)]), total.new_zeros(()))
                                for a, b, sign in spans])
            sums.append(part)
            value = sum(sign * s for (_, _, sign), s in zip(spans, part))
            if loss_fn is None:
                total += value
                continue
            with torch.enable_grad():
                value.requires_grad_()
                loss = loss_fn(g, value)
                (scale,) = torch.autograd.grad(loss, value)
            total += loss.detach()
            for a, b, sign in spans:
                grad_h[a:b].mul_(scale * sign)
            grad_w[:w.size(0)].addcmul_(acc, scale)  # one pass, no sync for the scale
        ctx.grads = [grad_h, grad_w]  # not saved tensors: backward scales them in place
        sums = torch.cat(sums).detach()
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, _):
        grads, ctx.grads = ctx.grads, None
        assert grads is not None, "a fused log-prob sum runs backward once (no retain_graph)"
        grad_h, grad_w = (g.mul_(grad_total) for g in grads)
        return None, None, None, None, grad_h, None, grad_w if ctx.needs_input_grad[6] else None


class GradSync:
    """Sums gradients over ranks in buckets of all_reduce (world size 1: nothing). arm() before the
    last micro-batch's backward sends each bucket as soon as backward fills it; optimizer_step waits.
    Buckets go in one order, a missing gradient (lm_head with no token) as zeros: collectives match."""

    def __init__(self, model, bucket_numel=1 << 24):
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.buckets, self.hooked = [[]], False
        for p in reversed([p for p in model.parameters() if p.requires_grad]):  # about backward's order
            if sum(q.numel() for q in self.buckets[-1]) >= bucket_numel:
                self.buckets.append([])
            self.buckets[-1].append(p)
        self.ready, self.sent, self.armed = set(), [], False

    def arm(self):
        if self.world > 1 and not self.hooked:
            for p in sum(self.buckets, []):
                p.register_post_accumulate_grad_hook(self._grad_ready)
        self.armed = self.hooked = self.world > 1

    def _grad_ready(self, p):  # only the armed backward counts: earlier ones are not final
        self.ready.update([id(p)] if self.armed else [])
        while self.armed and len(self.sent) < len(self.buckets) and \
                all(id(q) in self.ready for q in self.buckets[len(self.sent)]):
            self._send()

    def _send(self):
        flat = torch.cat([p.new_zeros(p.numel()) if p.grad is None else p.grad.reshape(-1).float()
                          for p in self.buckets[len(self.sent)]])
        self.sent.append((flat, dist.all_reduce(flat, async_op=True)))

    def wait(self):
        """Finish the sync (all of it, when not armed): every gradient is then the sum."""
        while self.world > 1 and len(self.sent) < len(self.buckets):
            self._send()
        for bucket, (flat, work) in zip(self.buckets, self.sent):
            work.wait()
            for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.grad = g.view_as(p).to(p.dtype)
        self.ready, self.sent, self.armed = set(), [], False


def optimizer_step(model, optimizers, lr_multiplier, grad_sync=None):
    """Sum grads over ranks (the step's armed GradSync, else all now), set lrs, step, clear grads."""
    (grad_sync or GradSync(model)).wait()
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
        opt.step()
    model.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# Tokenizer: a tiktoken Encoding, loaded without trusting the pickle

SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

# nanochat's split pattern (GPT-4's, with numbers split into groups of 1-2 digits)
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


class _TokenizerUnpickler(pickle.Unpickler):
    """Admits only tiktoken's Encoding, as a SimpleNamespace holding its state: no pickled code runs."""

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return SimpleNamespace
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only a tiktoken Encoding is allowed")


class Tokenizer:
    """nanochat's tokenizer interface over a tiktoken Encoding."""

    def __init__(self, enc):
        self.enc = enc
        if missing := [t for t in SPECIAL_TOKENS if t not in enc.special_tokens_set]:
            raise UserError(f"tokenizer lacks special tokens {missing}")
        # nanochat's names for the Encoding's methods; encode reads special-token strings as plain text
        self.encode_special, self.encode, self.decode = enc.encode_single_token, enc.encode_ordinary, enc.decode
        self.bos_token_id = self.encode_special("<|bos|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        try:
            with open(path, "rb") as f:
                obj = _TokenizerUnpickler(f).load()
        except FileNotFoundError:
            raise UserError(f"{path}: no tokenizer here (train one with nanochat, or make a fresh base)") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise UserError(f"{path}: not a tokenizer pickle nanochat wrote ({e})") from None
        state = vars(obj) if isinstance(obj, SimpleNamespace) else {}
        if not (isinstance(state.get("name"), str) and isinstance(state.get("pat_str"), str) and all(
                isinstance(d, dict) and all(isinstance(k, key_type) and isinstance(v, int) for k, v in d.items())
                for d, key_type in ((state.get("mergeable_ranks"), bytes), (state.get("special_tokens"), str)))):
            raise UserError(f"{path}: not a tiktoken Encoding with name, pat_str, mergeable_ranks and special_tokens")
        return cls(tiktoken.Encoding(**{k: state[k] for k in ("name", "pat_str", "mergeable_ranks", "special_tokens")}))

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def render_conversation(self, conversation, max_tokens=2048):
        """Token ids and a training mask (1 = the assistant's tokens to learn) of a conversation
        {"messages": [...]}, truncated to max_tokens; ValueError if not system?, user, assistant, ..."""
        messages = _check_messages(conversation)
        ids, mask = [], []

        def add(tokens, m):
            ids.extend(tokens), mask.extend([m] * len(tokens))

        sp = self.encode_special
        add([self.bos_token_id], 0)
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add([sp("<|user_start|>")] + self.encode(content) + [sp("<|user_end|>")], 0)
                continue
            add([sp("<|assistant_start|>")], 0)
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                text_ids = self.encode(part["text"])
                if part["type"] == "text":
                    add(text_ids, 1)
                elif part["type"] == "python":  # the model writes the tool call: learn it
                    add([sp("<|python_start|>")] + text_ids + [sp("<|python_end|>")], 1)
                else:  # python_output comes from the tool at run time: never learn it
                    add([sp("<|output_start|>")] + text_ids + [sp("<|output_end|>")], 0)
            add([sp("<|assistant_end|>")], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """The prompt to sample the last assistant message: the rest, then <|assistant_start|>."""
        messages = conversation["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("render_for_completion needs a conversation that ends with an assistant message")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=1 << 62)
        return ids + [self.encode_special("<|assistant_start|>")]


def _check_messages(conversation):
    """The one conversation check (tasks.py's too): system?, then user (text) and assistant (text or
    parts) alternating, else ValueError naming the message; a system message is merged into the next."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('conversation has no messages (expected {"messages": [...]})')
    if not all(isinstance(m, dict) for m in messages):
        raise ValueError("every message must be an object {\"role\", \"content\"}")
    offset = 0
    if messages[0].get("role") == "system":
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise ValueError("a system message must be followed by a user message")
        if not isinstance(messages[0].get("content"), str) or not isinstance(messages[1].get("content"), str):
            raise ValueError("system and user contents must be strings")
        merged = dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])
        messages, offset = [merged] + list(messages[2:]), 1
    for i, message in enumerate(messages):
        expected, at = ("user" if i % 2 == 0 else "assistant"), i + offset
        if message.get("role") != expected:
            raise ValueError(f"message {at} has role {message.get('role')!r}, expected {expected!r} "
                             "(optional system, then user, assistant, ... alternating)")
        content = message.get("content")
        if expected == "user" and not isinstance(content, str):
            raise ValueError(f"message {at}: user content must be a string")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output"):
                    kind = part.get("type") if isinstance(part, dict) else part
                    raise ValueError(f"message {at}: unknown part type {kind!r}")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"message {at}: part text must be a string")
        elif not isinstance(content, str):
            raise ValueError(f"message {at}: content must be a string or a list of parts")
    return messages


def byte_level_encoding():
    """A tokenizer with no merges: the 256 bytes plus the 9 special tokens (vocab 265)."""
    return tiktoken.Encoding(name="chimera-bytes", pat_str=SPLIT_PATTERN,
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)})


def get_tokenizer(base_dir=None):
    return Tokenizer.from_directory(os.path.join(base_dir or get_base_dir(), "tokenizer"))


# -----------------------------------------------------------------------------
# Checkpoints: model_{step:06d}.pt + meta_{step:06d}.json (+ optim_{step:06d}.pt)

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
               "dpo": "chatdpo_checkpoints", "rl": "chatrl_checkpoints"}


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data):
    """Meta, optimizer, then model, each through a temp file and a rename: the latest step is
    found by model files, so a save killed midway never looks like a newer whole checkpoint."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    atomic_write_json(os.path.join(checkpoint_dir, f"meta_{step:06d}.json"), meta_data)
    for name, data in (("optim", optimizer_data), ("model", model_data)):
        if data is not None:
            path = os.path.join(checkpoint_dir, f"{name}_{step:06d}.pt")
            atomic_write(path, lambda f: torch.save(data, f), binary=True)


def find_largest_model(checkpoints_dir):
    """The default model tag: the largest chimera_d<N>, else the largest d<N>, else the newest."""
    if not os.path.isdir(checkpoints_dir):
        raise UserError(f"{checkpoints_dir}: no such checkpoint directory")
    tags = [d for d in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, d))]
    if not tags:
        raise UserError(f"{checkpoints_dir}: no model directories in it")
    for pattern in (r"chimera_d(\d+)", r"d(\d+)"):
        depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(pattern, t))]
        if depths:
            return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def find_last_step(checkpoint_dir):
    steps = [int(m.group(1)) for f in glob.glob(os.path.join(checkpoint_dir, "model_*.pt"))
             if (m := re.fullmatch(r"model_(\d+)\.pt", os.path.basename(f)))]
    if not steps:
        raise UserError(f"{checkpoint_dir}: no model_*.pt checkpoints in it")
    return max(steps)


def load_checkpoint(checkpoint_dir, step, device):
    """(state dict, meta) of a step; a compiled model's _orig_mod. prefix dropped, bf16 on CUDA only."""
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if not os.path.exists(model_path):
        raise UserError(f"{model_path}: no checkpoint for step {step}")
    model_data = torch.load(model_path, map_location=device, weights_only=True)
    if not isinstance(model_data, dict) or not all(isinstance(v, torch.Tensor) for v in model_data.values()):
        raise UserError(f"{model_path}: not a state dict of tensors")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{meta_path}: missing (the checkpoint has a model file but no meta)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path}: not valid JSON ({e})") from None
    bf16 = device.type == "cuda"
    return {k.removeprefix("_orig_mod."): v if bf16 or v.dtype != torch.bfloat16 else v.float()
            for k, v in model_data.items()}, meta


CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
KEYS_2026 = ("resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda")


def config_from_checkpoint(model_config, model_data, where):
    """The GPTConfig of a checkpoint; 2026 has window_pattern and its extra tensors, Nov 2025
    neither, and a mix is refused. Applies nanochat 92d63d4's two loading patches to 2026's."""
    model_config = model_config if isinstance(model_config, dict) else {}
    missing = [k for k in CONFIG_KEYS if k not in model_config]
    extra = sorted(set(model_config) - set(CONFIG_KEYS) - {"window_pattern"})
    if missing or extra:  # neither generation's
        problem = f"lacks {', '.join(missing)}" if missing else f"has unknown keys {', '.join(extra)}"
        raise UserError(f"{where}: the meta's model_config {problem}: "
                        "neither nanochat generation (Nov 2025, 2026) writes that")
    new_keys = [k for k in model_data
                if k in KEYS_2026 or k.startswith("value_embeds.") or k.endswith(".ve_gate.weight")]
    pattern = model_config.get("window_pattern")
    if pattern is not None and not new_keys:
        raise UserError(f"{where}: model_config is nanochat 2026's (it has window_pattern) but the state dict is Nov "
                        f"2025's (no {', '.join(KEYS_2026)}, value_embeds): meta and weights do not belong together")
    if new_keys and pattern is None:  # an intermediate 2026 commit: nanochat reads it as all-long windows
        print(f"note: {where}: 2026 weights, no window_pattern: using \"L\" as nanochat does", file=sys.stderr)
        pattern = "L"
    if pattern is not None and not (isinstance(pattern, str) and re.fullmatch(r"[SLsl]+", pattern)):
        raise UserError(f"{where}: model_config window_pattern {pattern!r} is not a string of S and L")
    if new_keys:  # nanochat 92d63d4 adds these two when absent (checkpoints from before them)
        n_layer, device = model_config["n_layer"], model_data[new_keys[0]].device
        model_data.setdefault("resid_lambdas", torch.ones(n_layer, device=device))
        model_data.setdefault("x0_lambdas", torch.zeros(n_layer, device=device))
    return GPTConfig(**dict(model_config, window_pattern=pattern))


def checkpoint_dir_for(source, model_tag=None, base_dir=None):
    if source not in SOURCE_DIRS:
        raise UserError(f"unknown checkpoint source {source!r}; expected one of {', '.join(SOURCE_DIRS)}")
    root = os.path.join(base_dir or get_base_dir(), SOURCE_DIRS[source])
    return os.path.join(root, model_tag or find_largest_model(root))


def load_model(source, device, phase, model_tag=None, step=None, base_dir=None):
    """(model, tokenizer, meta) from $NANOCHAT_BASE_DIR/<source's directory>/<tag>/ (tag: by default
    find_largest_model's, step: the latest), phase "train" or "eval"."""
    assert phase in ("train", "eval"), phase
    checkpoint_dir, device = checkpoint_dir_for(source, model_tag, base_dir), torch.device(device)
    if not os.path.isdir(checkpoint_dir):
        raise UserError(f"{checkpoint_dir}: no such checkpoint directory")
    step = find_last_step(checkpoint_dir) if step is None else step
    tokenizer = get_tokenizer(base_dir)
    model_data, meta = load_checkpoint(checkpoint_dir, step, device)
    where = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    config = config_from_checkpoint(meta.get("model_config"), model_data, where)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UserError(f"{checkpoint_dir}: the model's vocab_size is {config.vocab_size} but the tokenizer "
                        f"has {tokenizer.get_vocab_size()} tokens (wrong tokenizer for this checkpoint?)")
    with torch.device("meta"):
        model = GPT(config)
    # every key the model has, none it lacks, each of its shape; else one line naming them
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"{what} {', '.join(keys[:4])}{f' and {len(keys) - 4} more' if len(keys) > 4 else ''}"
                for what, keys in (("missing", [k for k in expected if k not in model_data]),
                                   ("unexpected", [k for k in model_data if k not in expected])) if keys]
    problems += [f"{k} is {list(model_data[k].shape)}, expected {list(s)}"
                 for k, s in expected.items() if k in model_data and tuple(model_data[k].shape) != s][:2]
    if problems:
        raise UserError(f"{where} does not match its model_config (nanochat {'2026' if model.gen2026 else 'Nov 2025'} "
                        f"model): {'; '.join(problems)}")
    model.to_empty(device=device)
    model.init_rotary()
    model.load_state_dict(model_data, strict=True, assign=True)
    model.train() if phase == "train" else model.eval()
    return model, tokenizer, meta


# -----------------------------------------------------------------------------
# A fresh base directory: byte-level tokenizer + random model, no download needed


def fresh_base(base_dir, depth=2, sequence_len=512, n_embd=None, n_head=None, seed=0, zero_out=True, generation=2025):
    """Write tokenizer/ and base_checkpoints/d{depth}/model_000000.pt (width 64 * depth, a head per
    128, 2026: windows SSSL; n_embd/n_head override) into base_dir; zero_out=False: non-zero logits."""
    assert generation in (2025, 2026), generation
    enc, tokenizer_dir = byte_level_encoding(), os.path.join(base_dir, "tokenizer")
    # tokenizer.pkl and token_bytes.pt as nanochat writes them: a byte is 1 byte, a special token 0 (in bpb)
    atomic_write(os.path.join(tokenizer_dir, "tokenizer.pkl"), lambda f: pickle.dump(enc, f), binary=True)
    token_bytes = torch.tensor([1] * 256 + [0] * len(SPECIAL_TOKENS), dtype=torch.int32)
    atomic_write(os.path.join(tokenizer_dir, "token_bytes.pt"), lambda f: torch.save(token_bytes, f), binary=True)
    n_embd = n_embd or depth * 64
    n_head = n_head or max(1, (n_embd + 127) // 128)
    config = GPTConfig(sequence_len, enc.n_vocab, depth, n_head, n_head, n_embd, "SSSL" if generation == 2026 else None)
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights(zero_out=zero_out)
    # model_config as nanochat of this generation writes it (Nov 2025: no window_pattern)
    meta = {"step": 0, "model_config": {k: v for k, v in asdict(config).items() if v is not None},
            "chimera": {"stage": "base"}, "user_config": {"depth": depth, "fresh": True, "seed": seed}}
    checkpoint_dir = os.path.join(base_dir, "base_checkpoints", f"d{depth}")
    save_checkpoint(checkpoint_dir, 0, model.state_dict(), None, meta)
    return checkpoint_dir


# -----------------------------------------------------------------------------
# Sampling: KV cache, the calculator tool, and an Engine that streams tokens


class KVCache:
    """Keys and values [layers, B, max_len, H_kv, D]; each row is a sequence of its own length `pos`
    (CPU LongTensor [B]) and last normalised embedding `prev` (2026's smear): requests decode together.

        cache = KVCache.for_model(model, batch_size, max_len)
        model(prompt[None], kv_cache=cache.row(i))  # prefill one row (a view of the cache)
        model(ids, kv_cache=cache)                  # ids [B, T]: T more tokens for every row
        cache.reset(i)                              # row i empty again
    """

    def __init__(self, k, v, pos, prev):
        self.k, self.v, self.pos, self.prev = k, v, pos, prev

    @classmethod
    def for_model(cls, model, batch_size, max_len):
        c, device = model.config, model.get_device()
        dtype = model.lm_head.weight.dtype if device.type != "cuda" else torch.bfloat16
        shape = (c.n_layer, batch_size, max_len, c.n_kv_head, c.n_embd // c.n_head)  # SDPA reads it ~10% faster
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(batch_size, dtype=torch.long), torch.zeros(batch_size, c.n_embd, device=device))

    def row(self, i):
        return KVCache(self.k[:, i:i + 1], self.v[:, i:i + 1], self.pos[i:i + 1], self.prev[i:i + 1])

    def reset(self, i):
        self.pos[i], self.prev[i] = 0, 0

    def copy_row_to_all(self, i):
        """Every row becomes a copy of row i (one prompt prefilled once, sampled many times)."""
        n = int(self.pos[i])
        self.k[:, :, :n], self.v[:, :, :n] = self.k[:, i:i + 1, :n], self.v[:, i:i + 1, :n]
        self.pos[:], self.prev[:] = n, self.prev[i:i + 1]

    def begin(self, T, cos, sin):
        """Plan a forward of T new tokens per row; its rotary tables (sliced if rows are level)."""
        start = self.pos.tolist()
        self.masks, self.p0, self.q_pos, self.end = {}, start[0], None, max(start) + T
        if self.end > self.k.size(2) or self.end > cos.size(1):
            raise RuntimeError(f"KV cache is full ({min(self.k.size(2), cos.size(1))} positions)")
        if min(start) == max(start):
            return cos[:, self.p0:self.end], sin[:, self.p0:self.end]
        self.q_pos = (self.pos[:, None] + torch.arange(T)).to(cos.device)
        return cos[0, self.q_pos], sin[0, self.q_pos]  # [B, T, 1, D/2]

    def insert(self, layer, k, v, window):
        """Store the new k, v [B, T, H, D]; the keys, values (alike) and mask to attend with (per window)."""
        T, p0, end, device = k.size(1), self.p0, self.end, k.device
        if self.q_pos is None:
            self.k[layer, :, p0:end], self.v[layer, :, p0:end] = k, v
            lo = 0 if window is None else max(0, p0 - window)  # the oldest key any new token sees
            if window not in self.masks:  # one new token sees every key from lo on
                self.masks[window] = None if T == 1 else "causal" if p0 == 0 and (window or T) >= T - 1 else \
                    window_mask(torch.arange(p0, end, device=device), torch.arange(lo, end, device=device), window)
            return self.k[layer, :, lo:end], self.v[layer, :, lo:end], self.masks[window]
        rows = torch.arange(k.size(0), device=device)[:, None]
        self.k[layer, rows, self.q_pos], self.v[layer, rows, self.q_pos] = k, v
        if window not in self.masks:
            self.masks[window] = window_mask(self.q_pos, torch.arange(end, device=device), window)[:, None]
        return self.k[layer, :, :end], self.v[layer, :, :end], self.masks[window]

    def advance(self, T):
        self.pos += T  # in place: a row view moves its parent's row


_CALC_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult,
               ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd)


def use_calculator(expr, max_len=200):
    """Plain arithmetic (numbers, + - * / // %, parentheses: no powers, names or calls, checked on
    the syntax tree; length bounded, so neither result nor time explodes), else None."""
    expr = expr.replace(",", "").strip()
    try:
        tree = ast.parse(expr, mode="eval")
        nodes = list(ast.walk(tree))
        if len(expr) > max_len or not all(isinstance(n, _CALC_NODES) for n in nodes) or \
                any(isinstance(n, ast.Constant) and type(n.value) not in (int, float) for n in nodes):
            return None
        result = eval(compile(tree, "<calculator>", "eval"), {"__builtins__": {}})
    except (SyntaxError, ValueError, ArithmeticError):
        return None
    if not abs(result) <= 1e30:  # also NaN
        return None
    if isinstance(result, float):  # "24", as GSM8K's answers write it, not "24.0"
        result = int(result) if result.is_integer() else round(result, 6)
    return result


@torch.inference_mode()
def sample_next_token(logits, rng, temperature=1.0, top_k=None, capped=True):
    """[B, V] logits -> [B, 1] ids (temperature 0: greedy). capped=False: raw logits, softcapped here
    after top-k (the cap keeps their order), which saves a tanh over the vocab."""
    idx = None
    if top_k is not None and top_k > 0 and temperature != 0.0:
        logits, idx = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
    logits = logits if capped else softcap(logits)
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    choice = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=rng)
    return choice if idx is None else idx.gather(1, choice)


class Engine:
    """Samples continuations of one prompt, forcing the calculator's result on <|python_start|>...
    <|python_end|> as <|output_start|>...<|output_end|>; a row stops after <|assistant_end|> or <|bos|>."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Yields a (tokens, masks) column per step (mask 0: tool-forced); finished rows get junk tokens."""
        model, tok, device = self.model, self.tokenizer, self.model.get_device()
        rng = torch.Generator(device=device).manual_seed(seed)
        py_start, py_end, out_start, out_end = (tok.encode_special(f"<|{t}|>") for t in
                                                ("python_start", "python_end", "output_start", "output_end"))
        max_new = model.config.sequence_len if max_tokens is None else max_tokens
        max_len = min(len(tokens) + max_new, model.cos.size(1))
        cache = KVCache.for_model(model, num_samples, max_len)
        capped = not isinstance(model, GPT)  # a GPT: only the last position meets the lm_head, uncapped

        def last_logits(ids, cache):
            with autocast(device):
                if capped:
                    return model(ids, kv_cache=cache)[:, -1, :]
                return model.lm_head(model.hidden_states(ids, cache)[:, -1])[:, :model.config.vocab_size].float()

        # prefill once, then every row starts from the prompt's cache
        logits = last_logits(torch.tensor([tokens], dtype=torch.long, device=device), cache.row(0))
        logits = logits.expand(num_samples, -1)
        cache.copy_row_to_all(0)
        # per row: tokens the tool forces (emitted before sampling resumes), the tool call being read
        rows = [SimpleNamespace(forced=deque(), in_python=False, python_tokens=[], done=False)
                for _ in range(num_samples)]
        generated = 0
        while True:
            ids = sample_next_token(logits, rng, temperature, top_k, capped)
            column, masks = ids[:, 0].tolist(), [1] * num_samples
            for i, row in enumerate(rows):
                if row.forced:
                    column[i], masks[i] = row.forced.popleft(), 0
                self.track_tool(row, column[i], py_start, py_end, out_start, out_end)
                row.done = row.done or column[i] in self.stops
            yield column, masks
            generated += 1
            if all(r.done for r in rows) or generated == max_tokens or len(tokens) + generated >= max_len:
                return
            if 0 in masks:  # a tool-forced token replaces the sampled one
                ids = torch.tensor(column, dtype=torch.long, device=device)[:, None]
            logits = last_logits(ids, cache)

    def track_tool(self, row, token, py_start, py_end, out_start, out_end):
        if token == py_start:
            row.in_python, row.python_tokens = True, []
        elif token == py_end and row.in_python:
            row.in_python = False
            result = use_calculator(self.tokenizer.decode(row.python_tokens)) if row.python_tokens else None
            if result is not None:
                row.forced.extend([out_start] + self.tokenizer.encode(str(result)) + [out_end])
        elif row.in_python:
            row.python_tokens.append(token)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Whole sequences (prompt + completion, stop token excluded) and their masks."""
        sequences, masks = [list(tokens) for _ in range(num_samples)], [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):  # ends when every row is done
            for i, (token, m) in enumerate(zip(column, mask_column)):
                done[i] = done[i] or token in self.stops
                if not done[i]:
                    sequences[i].append(token), masks[i].append(m)
        return sequences, masks


# -----------------------------------------------------------------------------
# Training: batches and schedule shared by SFT and DPO

WINDOW_STEPS = 16  # steps whose rows are sorted by length together (see Schedule)


def collate(rows, pad_id, device):
    """Pad rendered conversations [(ids, mask)] into inputs and targets [B, W] (-1: not learned), W the
    longest row - 1."""
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        ids, mask = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.bool)
        inputs[i, :len(ids) - 1] = ids[:-1]
        targets[i, :len(ids) - 1] = ids[1:].masked_fill(~mask[1:], -1)
    return inputs.to(device), targets.to(device)


def compile_model(model, flag=True):
    """torch.compile the transformer if flag (--compile; None: on CUDA) with symbolic batch and length:
    a length that changes every step neither recompiles nor is padded. The lm_head stays eager."""
    if (model.get_device().type == "cuda") if flag is None else flag:
        model.hidden_states = torch.compile(model.hidden_states, dynamic=True)


class Schedule:
    """A run's steps: rows in order, cycling, `per_step` to a step. Each window of WINDOW_STEPS steps
    sorts its rows by length into micro-batches (little padding), shuffled over its steps and dealt
    round-robin to the ranks (the same global batch for any number of processes); lr falls 1 -> 0."""

    def __init__(self, lengths, per_step, batch_size, world_size, num_epochs, num_iterations):
        if per_step % (batch_size * world_size):
            raise UserError(f"--target_examples_per_step={per_step} must be a multiple of device_batch_size"
                            f"*world_size = {batch_size}*{world_size} = {batch_size * world_size}")
        self.lengths, self.per_step, self.batch_size, self.world_size = lengths, per_step, batch_size, world_size
        self.num_iterations = num_iterations if num_iterations > 0 else max(1, len(lengths) * num_epochs // per_step)
        self.window, self.cached = max(1, min(WINDOW_STEPS, len(lengths) // per_step)), (None, None)

    def micro_batches(self, step, rank):
        """This rank's micro-batches at `step`, each a list of row indices."""
        w, size, bs = step // self.window, self.window * self.per_step, self.batch_size
        if self.cached[0] != w:
            rows = sorted(((w * size + i) % len(self.lengths) for i in range(size)), key=self.lengths.__getitem__)
            order = torch.randperm(size // bs, generator=torch.Generator().manual_seed(w)).tolist()
            self.cached = (w, [rows[i * bs:(i + 1) * bs] for i in order])
        per = self.per_step // bs
        return self.cached[1][(step % self.window) * per:][:per][rank::self.world_size]

    def lr_multiplier(self, step):
        return 1.0 - step / self.num_iterations


class RunDir:
    """A stage's output directory holds one run: a new run removes the earlier Chimera run's
    files (and a killed save's .tmp files) and refuses checkpoints Chimera did not write."""

    def __init__(self, stage, tag, master, start):
        self.path, self.stage, self.master = os.path.join(get_base_dir(), SOURCE_DIRS[stage], tag), stage, master
        self.start = checkpoint_dir_for(*start)
        if os.path.abspath(self.path) == os.path.abspath(self.start):  # clearing it would lose it
            raise UserError(f"{self.path} holds the checkpoint this run starts from; pass another --out_tag")
        old = [f for pattern in ("model_*.pt", "optim_*.pt", "meta_*.json", "metrics.jsonl", ".*.tmp")
               for f in glob.glob(os.path.join(self.path, pattern))]
        metas = {re.sub(r"(model|optim)_(\d+)\.pt$", r"meta_\2.json", f) for f in old if f.endswith(("pt", "json"))}
        for meta in metas:
            try:
                marked = "chimera" in json.load(open(meta, encoding="utf-8"))
            except (OSError, ValueError):
                marked = False
            if not marked:
                raise UserError(f"{self.path}: {os.path.basename(meta)} is not a Chimera checkpoint; "
                                "use another --out_tag")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has looked before rank 0 removes
        for f in old if master else []:
            os.remove(f)
        os.makedirs(self.path, exist_ok=True)

    def log(self, record):
        if self.master:
            with open(os.path.join(self.path, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, step, model, meta):
        """model_/meta_{step:06d} marked as this stage's, with the start's tag; non-finite weights are never saved."""
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise UserError(f"step {step}: the weights are not finite (NaN or inf); nothing saved")
        if self.master:
            save_checkpoint(self.path, step, model.state_dict(), None,
                            {**meta, "source_tag": os.path.basename(self.start), "chimera": {"stage": self.stage}})

