"""
The GPT of both nanochat generations (Nov 2025, commit 885a4f2, and 2026, commit 92d63d4) and its log-prob heads:
per-token log-probs without [B, T, V] logits, and the SFT/DPO losses with the lm_head's gradient fused into the forward.
The checkpoint's model_config tells them apart: window_pattern None is Nov 2025's model; a pattern of S/L switches on
2026's value embeddings, residual/x0 scalars, smear, backout, sliding windows, padded vocab, rotary base 100000 and the
x1.2 q/k scale. Depends on torch and the standard library only, so an export can ship this file as it is.

    from checkpoint import load_model
    model, tokenizer, meta = load_model("sft", device, phase="eval")
    logp = model.token_logprobs(inputs, targets)   # [B, T], 0 where the target is -1
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    """Rotate each head's halves (x1, x2) to (x1 c + x2 s, x2 c - x1 s): x is [B, T, H, D], cos/sin [1 or B, T, 1, D]
    tables (c, c) and (s, -s), so it takes 3 ops (nanochat's numbers, bit for bit)."""
    return x * cos + x.roll(x.size(3) // 2, 3) * sin

def window_mask(q_pos, k_pos, window):
    """Key j is visible to query i iff 0 <= i - j <= window (positions are absolute)."""
    d = q_pos[..., :, None] - k_pos[..., None, :]
    return d >= 0 if window is None else (d >= 0) & (d <= window)

class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, window, value_embed):
        super().__init__()
        self.layer_idx, self.window = layer_idx, window  # window None: unlimited (2025)
        self.always_mask = False  # compile_model: a short window masks at every length (no graph split on it)
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
        # rotary in the compute dtype (bf16 under CUDA autocast; the tables already are float32 on CPU), then QK norm
        cos, sin = (t.to(q.dtype) for t in cos_sin)
        q, k = (norm(apply_rotary(t, cos, sin)) * self.qk_scale for t in (q, k))
        if kv_cache is not None:  # k, v become every cached key and value the new tokens may see
            k, v, mask = kv_cache.insert(self.layer_idx, k, v, self.window)
        else:
            pos = torch.arange(T, device=x.device)
            short = self.window is not None and (self.always_mask or self.window < T - 1)
            mask = window_mask(pos, pos, self.window) if short else "causal"
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
    """Left window per layer (None: unlimited); 2026: S is sequence_len / 4 up to a multiple of 128, L (and the last
    layer) is sequence_len."""
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
        """nanochat's init, every weight float32 (AdamW needs the small updates that bf16 would round away);
        zero_out=False: random (not zero/tiny) residual projections and lm_head."""
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

    def forward(self, idx, kv_cache=None):
        """Softcapped float32 logits [B, T, V] (the stages score through token_logprobs/pair_loss instead)."""
        return self.logits(self.hidden_states(idx, kv_cache))

    def token_logprobs(self, idx, targets, chunk_numel=None, reduction="none"):
        """log p(target) per position, [B, T] float32, 0 where the target is -1 (reduction="sum": their sum). Only
        targets reach the lm_head, in chunks of about chunk_numel logits (default 16M on CPU, 128M on CUDA). With a
        gradient, "sum" takes it in the forward (fused CE, SFT); "none" keeps each chunk's logits for backward."""
        h, tgt, rows, chunk = self._scored(idx, targets, chunk_numel)
        if reduction == "sum" and h.requires_grad and rows.numel():
            return _FusedHead.apply(self, chunk, [[(0, rows.numel(), 1, 0)]], None, h, tgt, self.lm_head.weight)[0]
        w = head_weight(self.lm_head.weight[:self.config.vocab_size], h.device.type)
        pieces = [self._chunk_logprobs(h[i:i + chunk], tgt[i:i + chunk], w) for i in range(0, rows.numel(), chunk)]
        # nothing to score: the empty sum keeps the graph so a backward() is still well-defined
        logp = torch.cat(pieces) if pieces else h.sum(-1).float()
        if reduction == "sum":
            return logp.sum()
        return logp.new_zeros(targets.numel()).index_put((rows,), logp).view_as(targets)

    def pair_loss(self, idx, targets, loss_fn, chunk_numel=None, weights=None, chosen_coefs=None):
        """DPO's training path: idx/targets hold P pairs as rows [chosen..., rejected...]; returns (the sum over pairs
        of loss_fn(i, w_c chosen_i - w_r rejected_i) + chosen_coefs[i] chosen_i, chosen [P], rejected [P]), a row's
        value being its summed log p(target); weights [(w_c, w_r)] per pair, default 1; chosen_coefs default 0 (RPO's
        NLL term: -alpha / the answer's tokens). The gradient is taken in the forward, pair by pair."""
        h, tgt, _, chunk = self._scored(idx, targets, chunk_numel)
        ends = (targets != -1).sum(1).cumsum(0).tolist()
        spans, P = list(zip([0] + ends[:-1], ends)), idx.size(0) // 2
        pairs = [[(*chosen, w_c, coef), (*rejected, -w_r, 0)] for chosen, rejected, (w_c, w_r), coef
                 in zip(spans[:P], spans[P:], weights or [(1, 1)] * P, chosen_coefs or [0] * P)]
        total, sums = _FusedHead.apply(self, chunk, pairs, loss_fn, h, tgt, self.lm_head.weight)
        return total, sums[0::2], sums[1::2]

    def _scored(self, idx, targets, chunk_numel):
        """(hidden states and targets of the positions with a target, those flat positions, rows per lm_head chunk)"""
        chunk_numel = chunk_numel or 1 << (27 if idx.device.type == "cuda" else 24)
        flat_targets = targets.reshape(-1)
        rows = (flat_targets != -1).nonzero().squeeze(1)
        h = self.hidden_states(idx).flatten(0, 1).index_select(0, rows)
        return h, flat_targets.index_select(0, rows), rows, max(1, chunk_numel // self.lm_head.weight.size(0))

    def _chunk_logprobs(self, h, targets, w):
        """log p(target) per row of h through the lm_head rows w, in place where no gradient is wanted (the DPO
        reference, eval). Softcapped logits lie in [-15, 15], so their exp needs no max subtracted first."""
        t, grad = F.linear(h, w).float(), torch.is_grad_enabled()
        logits = t.div_(SOFTCAP).tanh_() * SOFTCAP if grad else t.div_(SOFTCAP).tanh_().mul_(SOFTCAP)
        return logits.gather(1, targets[:, None]).squeeze(1) - (logits.exp() if grad else logits.exp_()).sum(1).log()

    def _head_grads(self, h, targets, w, grad_h, grad_w, sign=1):
        """The sum of log p(target) over h's rows through the lm_head rows w; writes its gradient for h into grad_h
        and adds sign times w's to grad_w. By hand, in place, with no max in the log-sum-exp (as _chunk_logprobs)."""
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

def head_weight(w, device_type):
    """The lm_head rows w in autocast's dtype, cast once per call: a slice of the weight misses autocast's
    cache of cast weights, so each chunk would cast all V x C again (about a quarter of DPO's head time)."""
    return w.to(torch.get_autocast_dtype(device_type)) if torch.is_autocast_enabled(device_type) else w

class _FusedHead(torch.autograd.Function):
    """Summed log p(target) with the gradient taken in the forward, chunk by chunk while its logits exist. groups:
    [[(start, end, sign, linear), ...], ...] spans of h's rows; returns the sum over groups of loss_fn(group index, the
    signed sum of its spans' sums) + linear * each span's sum, and the spans' sums. loss_fn None: the plain sum
    (gradient 1 for every token: chunks add straight into the lm_head's gradient); else a group's go to a scratch
    buffer, scaled once its loss is known. Only a group's first span may have a linear term (its lm_head gradient is
    taken from the scratch while that holds the span alone)."""

    @staticmethod
    def forward(ctx, model, chunk, groups, loss_fn, h, targets, weight):
        w = head_weight(weight[:model.config.vocab_size], h.device.type)  # padded rows: no logits, zero gradient
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)
        scratch = grad_w[:w.size(0)] if loss_fn is None else torch.empty_like(w, dtype=grad_w.dtype)
        total, sums = torch.zeros((), device=h.device), []
        for g, spans in enumerate(groups):
            acc, part = scratch if loss_fn is None else scratch.zero_(), []
            for a, b, sign, linear in spans:
                part.append(sum((model._head_grads(h[i:j], targets[i:j], w, grad_h[i:j], acc, sign)
                                 for i in range(a, b, chunk) for j in [min(i + chunk, b)]), total.new_zeros(())))
                if linear:  # its lm_head gradient, linear times the span's: acc holds sign times it
                    grad_w[:w.size(0)].add_(acc, alpha=linear / sign)
            part = torch.stack(part)
            sums.append(part)
            value = sum(sign * s for (_, _, sign, _), s in zip(spans, part))
            if loss_fn is not None:
                with torch.enable_grad():
                    value.requires_grad_()
                    loss = loss_fn(g, value)
                    (scale,) = torch.autograd.grad(loss, value)
                value = sum((linear * s for (*_, linear), s in zip(spans, part) if linear), loss.detach())
                for a, b, sign, linear in spans:
                    grad_h[a:b].mul_(scale * sign + linear if linear else scale * sign)
                grad_w[:w.size(0)].addcmul_(acc, scale)  # one pass, no sync for the scale
            total += value
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

def compile_model(model, flag=True):
    """torch.compile the transformer if flag (--compile; None: on CUDA) with symbolic batch and length: a length that
    changes every step neither recompiles nor is padded, one graph per grad mode. 2026's short-window layers mask at
    every length (a mask equal to causal below the window): a branch on the length would double the graphs, and policy
    and reference in two grad modes reach dynamo's limit of 8. The lm_head stays eager."""
    if (model.get_device().type == "cuda") if flag is None else flag:
        for block in model.transformer.h:
            block.attn.always_mask = block.attn.window is not None and block.attn.window < model.config.sequence_len
        model.hidden_states = torch.compile(model.hidden_states, dynamic=True)
