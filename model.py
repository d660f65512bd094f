"""
The nanochat model stack, rebuilt from scratch and kept bit-compatible with nanochat's
on-disk format (see NANOCHAT_FORMAT.md): the GPT, a chunked log-prob path, the
AdamW + Muon optimizers, the tokenizer and conversation rendering, checkpoints, a fresh
offline base, and sampling with a KV cache and the calculator tool.

    from model import load_model
    model, tokenizer, meta = load_model("sft", device, phase="eval")

Read top to bottom: model -> log-probs -> optimizers -> tokenizer -> checkpoints ->
fresh base -> sampling.
"""

import ast
import glob
import json
import math
import os
import pickle
import re
import time
from collections import deque
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import UserError, atomic_write, atomic_write_json, autocast, get_base_dir

# -----------------------------------------------------------------------------
# The GPT


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768


def norm(x):
    # parameter-free RMSNorm
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    """Rotate the two halves of each head: x is [B, T, H, D], cos/sin are [1, T, 1, D/2]."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q), norm(k)  # QK norm comes after rotary, as in nanochat
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_head != self.n_kv_head
        if Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:  # one new token attends to everything cached
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
        else:  # a chunk of new tokens: all of the prefix, causal within the chunk
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        return x + self.mlp(norm(x))


SOFTCAP = 15.0


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary tables cover 10x the training length so sampling can run past it
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, seq_len, base=10000, device=None):
        head_dim = self.config.n_embd // self.config.n_head
        channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channels / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        # nanochat keeps the tables in bf16 and rotates with them; so do we, to match its numbers
        cos, sin = freqs.cos().bfloat16(), freqs.sin().bfloat16()
        return cos[None, :, None, :], sin[None, :, None, :]

    def init_rotary(self):
        """Recompute the (non-persistent) rotary tables, e.g. after building on the meta device."""
        self.cos, self.sin = self._rotary_tables(self.rotary_seq_len, device=self.lm_head.weight.device)

    @torch.no_grad()
    def init_weights(self, zero_out=True):
        """nanochat's init: N(0, 1) embedding, fan-in scaled linears, and (zero_out) a zero
        lm_head and zero residual projections so every block starts as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                module.weight.normal_(0.0, std)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0)
        if zero_out:
            self.lm_head.weight.zero_()
            for block in self.transformer.h:
                block.mlp.c_proj.weight.zero_()
                block.attn.c_proj.weight.zero_()
        self.init_rotary()
        if self.lm_head.weight.device.type == "cuda":
            self.transformer.wte.to(dtype=torch.bfloat16)  # as nanochat: saves memory, stored so

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_flops_per_token(self):
        """Training FLOPs per token: 6 per non-embedding parameter plus attention."""
        n_params = sum(p.numel() for p in self.parameters())
        n_embed = self.transformer.wte.weight.numel()
        c = self.config
        head_dim = c.n_embd // c.n_head
        return 6 * (n_params - n_embed) + 12 * c.n_layer * c.n_head * head_dim * c.sequence_len

    def hidden_states(self, idx, kv_cache=None):
        """The final normalised residual stream [B, T, C], before the lm_head."""
        B, T = idx.size()
        T0 = 0 if kv_cache is None else kv_cache.pos
        assert T0 + T <= self.cos.size(1), f"sequence of {T0 + T} exceeds the rotary cache"
        cos_sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return norm(x)

    def logits(self, x):
        """lm_head + softcap, in float32 (the softcap is a tanh: precision matters there)."""
        logits = self.lm_head(x).float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """The plain path: logits [B, T, V], or the cross-entropy loss when targets are given
        (ignore_index -1; reduction "mean" or "none" -> [B*T])."""
        logits = self.logits(self.hidden_states(idx, kv_cache))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=-1, reduction=loss_reduction)

    # -------------------------------------------------------------------------
    # Per-token log-probs without materialising [B, T, V] float32 logits

    def token_logprobs(self, idx, targets, chunk_numel=None, reduction="none"):
        """log p(target) per position, [B, T] float32, 0 where the target is -1 (reduction
        "sum": their sum). Only positions with a target reach the lm_head, in chunks of about
        `chunk_numel` logits (16M on CPU, 128M on CUDA): memory holds one chunk, not B*T*V.
        "none" recomputes each chunk in backward (checkpointing): exact for any use (DPO's
        per-sequence sums). "sum" (SFT's loss) gives every token the same gradient, so each
        chunk's gradient is taken in the forward and backward only scales it: a fused linear
        cross-entropy, about as fast as full logits."""
        if chunk_numel is None:
            chunk_numel = 1 << (27 if idx.device.type == "cuda" else 24)
        h = self.hidden_states(idx)
        flat_targets = targets.reshape(-1)
        rows = (flat_targets != -1).nonzero().squeeze(1)
        h = h.reshape(-1, h.size(-1)).index_select(0, rows)
        tgt = flat_targets.index_select(0, rows)
        chunk = max(1, chunk_numel // self.lm_head.weight.size(0))
        grad = torch.is_grad_enabled() and h.requires_grad
        if reduction == "sum" and grad and rows.numel():
            params = [p for p in self.lm_head.parameters() if p.requires_grad]
            return _FusedLogprobSum.apply(self._chunk_logprobs, chunk, h, tgt, *params)
        pieces = []
        for start in range(0, rows.numel(), chunk):
            hs, ts = h[start:start + chunk], tgt[start:start + chunk]
            pieces.append(checkpoint(self._chunk_logprobs, hs, ts, use_reentrant=False) if grad
                          else self._chunk_logprobs(hs, ts))
        # nothing to score: the empty sum keeps the graph so a backward() is still well-defined
        logp = torch.cat(pieces) if pieces else h.sum(-1).float()
        if reduction == "sum":
            return logp.sum()
        out = torch.zeros(flat_targets.numel(), dtype=torch.float32, device=idx.device)
        return out.index_put((rows,), logp).view_as(targets)

    def _chunk_logprobs(self, h, targets):
        logits = self.logits(h)
        return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    # -------------------------------------------------------------------------
    # Optimizers

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0):
        """[AdamW for lm_head and wte, Muon for the block matrices], as nanochat sets them up.

        Under torch.distributed every rank holds the full optimizer state and steps on
        gradients that common.sync_gradients has already summed, so one class serves 1 or
        N processes.
        """
        scale = (self.config.n_embd / 768) ** -0.5  # AdamW lrs were tuned at width 768
        adam_groups = [
            dict(params=list(self.lm_head.parameters()), lr=unembedding_lr * scale),
            dict(params=list(self.transformer.wte.parameters()), lr=embedding_lr * scale),
        ]
        fused = self.get_device().type == "cuda"
        adamw = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay, fused=fused)
        muon = Muon(list(self.transformer.h.parameters()), lr=matrix_lr, momentum=0.95)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers


def newton_schulz5(G, steps=5):
    """Approximately orthogonalise G (the nearest semi-orthogonal matrix) with a quintic
    Newton-Schulz iteration, working on the wide orientation, in bf16 where its matmuls are
    fast: CUDA (as nanochat) and CPUs with AVX512-BF16 (2-3x faster than float32 there);
    float32 elsewhere (CPUs without bf16 units run bf16 matmuls 10-35x slower, MPS)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    cpu_bf16 = G.device.type == "cpu" and getattr(torch.cpu, "_is_avx512_bf16_supported", bool)()
    X = G.bfloat16() if G.device.type == "cuda" or cpu_bf16 else G.float()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz: Nesterov momentum, then each matrix's
    update replaced by its orthogonalised version, scaled up for tall matrices. Ranks share
    the work (as nanochat's DistMuon): rank r updates matrices r, r + world, ... and keeps
    their momentum; each updated matrix then goes from its owner to all ranks."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        works = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if i % world == rank and p.grad is not None:
                    g = p.grad
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.lerp_(g, 1 - group["momentum"])
                    g = g.lerp_(buf, group["momentum"]) if group["nesterov"] else buf
                    update = newton_schulz5(g, steps=group["ns_steps"])
                    p.add_(update, alpha=-group["lr"] * max(1, p.size(-2) / p.size(-1)) ** 0.5)
                if world > 1:
                    works.append(dist.broadcast(p, src=i % world, async_op=True))
        for work in works:
            work.wait()


# -----------------------------------------------------------------------------
# The fused log-prob sum; gradient sync and the optimizer step


class _FusedLogprobSum(torch.autograd.Function):
    """token_logprobs(reduction="sum"): each chunk's gradient (w.r.t. its rows of hidden states
    and the lm_head) is taken while its logits exist; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, logprobs_fn, chunk, h, targets, *params):
        total, grad_h, grad_params = 0.0, torch.empty_like(h), [None] * len(params)
        for i in range(0, h.size(0), chunk):
            hs = h[i:i + chunk].detach().requires_grad_()
            with torch.enable_grad():
                logp = logprobs_fn(hs, targets[i:i + chunk]).sum()
                grads = torch.autograd.grad(logp, [hs, *params])
            total = total + logp.detach()
            grad_h[i:i + chunk] = grads[0]
            grad_params = [g if acc is None else acc.add_(g) for acc, g in zip(grad_params, grads[1:])]
        ctx.grads = [grad_h, *grad_params]  # not saved tensors: backward scales them in place
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None
        assert grads is not None, "token_logprobs(reduction='sum'): backward runs once (no retain_graph)"
        grad_h, *grad_params = (g.mul_(grad_out) for g in grads)
        return None, None, grad_h, None, *grad_params


class GradSync:
    """Sums gradients over ranks in buckets of all_reduce calls, no DDP wrapper (world size 1:
    nothing). arm() before the last micro-batch's backward starts each bucket's all_reduce as
    soon as backward has filled it, overlapping the rest of backward; optimizer_step waits.
    Buckets go out in one order on every rank, a gradient a rank lacks (None: lm_head when it
    scored no token) as zeros, so all ranks' collectives match."""

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
        while self.armed and len(self.sent) < len(self.buckets) and all(id(q) in self.ready for q in self.buckets[len(self.sent)]):
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
    """Sum grads over ranks (via the step's armed GradSync, else now), set lrs, step, clear grads."""
    (grad_sync or GradSync(model)).wait()
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
        opt.step()
    model.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# Tokenizer: a tiktoken Encoding, loaded without trusting the pickle

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
]

# nanochat's split pattern (GPT-4's, with numbers split into groups of 1-2 digits)
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: it only records the state."""

    def __setstate__(self, state):
        self.state = state


class _TokenizerUnpickler(pickle.Unpickler):
    """Admits exactly one global, tiktoken's Encoding, and maps it to _EncodingState so no
    code of the pickle's choosing runs; anything else is refused."""

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only a tiktoken Encoding is allowed")


def _load_encoding(path):
    import tiktoken

    try:
        with open(path, "rb") as f:
            obj = _TokenizerUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f"{path}: no tokenizer here (train one with nanochat, or make a fresh base)") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise UserError(f"{path}: not a tokenizer pickle nanochat wrote ({e})") from None
    state = getattr(obj, "state", None)
    ok = (isinstance(obj, _EncodingState) and isinstance(state, dict)
          and isinstance(state.get("name"), str) and isinstance(state.get("pat_str"), str)
          and isinstance(state.get("mergeable_ranks"), dict) and isinstance(state.get("special_tokens"), dict)
          and all(isinstance(k, bytes) and isinstance(v, int) for k, v in state["mergeable_ranks"].items())
          and all(isinstance(k, str) and isinstance(v, int) for k, v in state["special_tokens"].items()))
    if not ok:
        raise UserError(f"{path}: not a tiktoken Encoding with name, pat_str, mergeable_ranks and special_tokens")
    return tiktoken.Encoding(name=state["name"], pat_str=state["pat_str"],
                             mergeable_ranks=state["mergeable_ranks"], special_tokens=state["special_tokens"])


class Tokenizer:
    """nanochat's tokenizer interface over a tiktoken Encoding."""

    def __init__(self, enc):
        self.enc = enc
        missing = [t for t in SPECIAL_TOKENS if t not in enc.special_tokens_set]
        if missing:
            raise UserError(f"tokenizer lacks special tokens {missing}")
        self.bos_token_id = self.encode_special("<|bos|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        return cls(_load_encoding(os.path.join(tokenizer_dir, "tokenizer.pkl")))

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def get_special_tokens(self):
        return set(self.enc.special_tokens_set)

    def encode_special(self, text):
        return self.enc.encode_single_token(text)

    def encode(self, text, prepend=None, append=None):
        """Text to ids with special-token strings treated as plain text; a list of texts
        gives a list of id lists. prepend/append: a special token (str) or an id."""
        def special(t):
            return t if isinstance(t, int) else self.encode_special(t)

        def one(ids):
            return ([special(prepend)] if prepend is not None else []) + ids + ([special(append)] if append is not None else [])

        if isinstance(text, str):
            return one(self.enc.encode_ordinary(text))
        return [one(ids) for ids in self.enc.encode_ordinary_batch(list(text))]

    def decode(self, ids):
        return self.enc.decode(ids)

    def render_conversation(self, conversation, max_tokens=2048):
        """Token ids and a training mask (1 = the assistant's tokens to learn) for one
        conversation {"messages": [...]}, truncated to max_tokens. Raises ValueError on a
        conversation that is not system?, user, assistant, user, ..."""
        messages = _check_messages(conversation)
        ids, mask = [], []

        def add(tokens, m):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self.encode_special
        add(self.bos_token_id, 0)
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add(sp("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(sp("<|user_end|>"), 0)
                continue
            add(sp("<|assistant_start|>"), 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            else:
                for part in content:
                    text_ids = self.encode(part["text"])
                    if part["type"] == "text":
                        add(text_ids, 1)
                    elif part["type"] == "python":  # the model writes the tool call: learn it
                        add(sp("<|python_start|>"), 1)
                        add(text_ids, 1)
                        add(sp("<|python_end|>"), 1)
                    else:  # python_output comes from the tool at run time: never learn it
                        add(sp("<|output_start|>"), 0)
                        add(text_ids, 0)
                        add(sp("<|output_end|>"), 0)
            add(sp("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """The prompt for sampling the last assistant message: it is dropped, the rest
        rendered, and <|assistant_start|> appended."""
        messages = conversation["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("render_for_completion needs a conversation that ends with an assistant message")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=1 << 62)
        return ids + [self.encode_special("<|assistant_start|>")]


PART_TYPES = ("text", "python", "python_output")


def _check_messages(conversation):
    """Validate a conversation and return its messages with a leading system message merged
    into the first user message (as nanochat does)."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not messages:
        raise ValueError("conversation has no messages")
    if messages[0].get("role") == "system":
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise ValueError("a system message must be followed by a user message")
        if not isinstance(messages[0].get("content"), str) or not isinstance(messages[1].get("content"), str):
            raise ValueError("system and user contents must be strings")
        merged = dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])
        messages = [merged] + list(messages[2:])
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise ValueError(f"message {i} has role {message.get('role')!r}, expected {expected!r} "
                             "(roles must alternate user, assistant, ...)")
        content = message.get("content")
        if expected == "user" and not isinstance(content, str):
            raise ValueError(f"message {i}: user content must be a string")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
                    raise ValueError(f"message {i}: unknown part type {part.get('type') if isinstance(part, dict) else part!r}")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"message {i}: part text must be a string")
        elif not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string or a list of parts")
    return messages


def byte_level_encoding():
    """A tokenizer with no merges: the 256 bytes plus the 9 special tokens (vocab 265)."""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    special = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="chimera-bytes", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def save_tokenizer(enc, tokenizer_dir):
    """tokenizer.pkl and token_bytes.pt as nanochat writes them."""
    atomic_write(os.path.join(tokenizer_dir, "tokenizer.pkl"), lambda f: pickle.dump(enc, f), binary=True)
    lengths = [0] * enc.n_vocab
    for token, rank in enc._mergeable_ranks.items():
        lengths[rank] = len(token)  # special tokens stay 0: they count for no bytes in bpb
    token_bytes = torch.tensor(lengths, dtype=torch.int32)
    atomic_write(os.path.join(tokenizer_dir, "token_bytes.pt"), lambda f: torch.save(token_bytes, f), binary=True)


def get_tokenizer(base_dir=None):
    return Tokenizer.from_directory(os.path.join(base_dir or get_base_dir(), "tokenizer"))


# -----------------------------------------------------------------------------
# Checkpoints: model_{step:06d}.pt + meta_{step:06d}.json (+ optim_{step:06d}.pt)

SOURCE_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "dpo": "chatdpo_checkpoints",
    "rl": "chatrl_checkpoints",
}


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data):
    """Write meta, then optimizer, then model, each through a temp file and a rename.

    The model file lands last, and the latest step is found by model files, so a process
    killed mid-save leaves nothing that looks like a newer checkpoint than the last whole one.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    atomic_write_json(os.path.join(checkpoint_dir, f"meta_{step:06d}.json"), meta_data)
    if optimizer_data is not None:
        path = os.path.join(checkpoint_dir, f"optim_{step:06d}.pt")
        atomic_write(path, lambda f: torch.save(optimizer_data, f), binary=True)
    path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    atomic_write(path, lambda f: torch.save(model_data, f), binary=True)


def find_largest_model(checkpoints_dir):
    """The model tag to use: the largest d<N>, else the newest directory."""
    if not os.path.isdir(checkpoints_dir):
        raise UserError(f"{checkpoints_dir}: no such checkpoint directory")
    tags = [d for d in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, d))]
    if not tags:
        raise UserError(f"{checkpoints_dir}: no model directories in it")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def find_last_step(checkpoint_dir):
    steps = [int(m.group(1)) for f in glob.glob(os.path.join(checkpoint_dir, "model_*.pt"))
             if (m := re.fullmatch(r"model_(\d+)\.pt", os.path.basename(f)))]
    if not steps:
        raise UserError(f"{checkpoint_dir}: no model_*.pt checkpoints in it")
    return max(steps)


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False):
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if not os.path.exists(model_path):
        raise UserError(f"{model_path}: no checkpoint for step {step}")
    model_data = torch.load(model_path, map_location=device, weights_only=True)
    optimizer_data = None
    if load_optimizer:
        optim_path = os.path.join(checkpoint_dir, f"optim_{step:06d}.pt")
        optimizer_data = torch.load(optim_path, map_location=device, weights_only=True)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{meta_path}: missing (the checkpoint has a model file but no meta)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path}: not valid JSON ({e})") from None
    return model_data, optimizer_data, meta


def build_model(checkpoint_dir, step, device, phase, tokenizer=None):
    """Load a checkpoint into a GPT on `device`; phase "train" or "eval"."""
    assert phase in ("train", "eval"), phase
    device = torch.device(device)
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device)
    # a compiled model's state dict carries _orig_mod.; bf16 is only kept on CUDA
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
    if device.type != "cuda":
        model_data = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_data.items()}
    if "model_config" not in meta:
        raise UserError(f"{checkpoint_dir}: meta_{step:06d}.json has no model_config")
    config = GPTConfig(**meta["model_config"])
    if tokenizer is not None and tokenizer.get_vocab_size() != config.vocab_size:
        raise UserError(f"{checkpoint_dir}: the model's vocab_size is {config.vocab_size} but the tokenizer "
                        f"has {tokenizer.get_vocab_size()} tokens (wrong tokenizer for this checkpoint?)")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_rotary()
    try:
        model.load_state_dict(model_data, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"{checkpoint_dir}: model_{step:06d}.pt does not match its model_config ({str(e).splitlines()[0]})") from None
    model.train() if phase == "train" else model.eval()
    return model, meta


def checkpoint_dir_for(source, model_tag=None, base_dir=None):
    if source not in SOURCE_DIRS:
        raise UserError(f"unknown checkpoint source {source!r}; expected one of {', '.join(SOURCE_DIRS)}")
    root = os.path.join(base_dir or get_base_dir(), SOURCE_DIRS[source])
    return os.path.join(root, model_tag or find_largest_model(root))


def load_model(source, device, phase, model_tag=None, step=None, base_dir=None):
    """(model, tokenizer, meta) from $NANOCHAT_BASE_DIR/<source's directory>/<tag>/, with the
    tag defaulting to the largest d<N> and the step to the latest."""
    checkpoint_dir = checkpoint_dir_for(source, model_tag, base_dir)
    if not os.path.isdir(checkpoint_dir):
        raise UserError(f"{checkpoint_dir}: no such checkpoint directory")
    step = find_last_step(checkpoint_dir) if step is None else step
    tokenizer = get_tokenizer(base_dir)
    model, meta = build_model(checkpoint_dir, step, device, phase, tokenizer)
    return model, tokenizer, meta


def model_config_dict(model):
    return asdict(model.config)


# -----------------------------------------------------------------------------
# A fresh base directory: byte-level tokenizer + random model, no download needed


def fresh_base(base_dir, depth=2, sequence_len=512, n_embd=None, n_head=None, seed=0, zero_out=True):
    """Write tokenizer/ and base_checkpoints/d{depth}/model_000000.pt into base_dir.

    Shapes follow nanochat's base training (width = 64 * depth, one head per 128 wide);
    n_embd/n_head override them for tests. zero_out=False gives non-zero logits from the
    start, which tests of the log-prob and DPO paths want.
    """
    enc = byte_level_encoding()
    save_tokenizer(enc, os.path.join(base_dir, "tokenizer"))
    n_embd = n_embd or depth * 64
    n_head = n_head or max(1, (n_embd + 127) // 128)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=enc.n_vocab, n_layer=depth,
                       n_head=n_head, n_kv_head=n_head, n_embd=n_embd)
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights(zero_out=zero_out)
    meta = {"step": 0, "model_config": asdict(config), "user_config": {"depth": depth, "fresh": True, "seed": seed}}
    checkpoint_dir = os.path.join(base_dir, "base_checkpoints", f"d{depth}")
    save_checkpoint(checkpoint_dir, 0, model.state_dict(), None, meta)
    return checkpoint_dir


# -----------------------------------------------------------------------------
# Sampling: KV cache, the calculator tool, and an Engine that streams tokens


class KVCache:
    """Keys and values per layer, [B, H_kv, max_len, D], filled left to right."""

    def __init__(self, batch_size, num_heads, head_dim, num_layers, max_len, device, dtype):
        shape = (num_layers, batch_size, num_heads, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.pos = 0

    def insert(self, layer, k, v):
        T = k.size(2)
        if self.pos + T > self.k.size(3):
            raise RuntimeError("KV cache is full")
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]

    def advance(self, T):
        self.pos += T

    def expand(self, batch_size, max_len):
        """A batch_size-row cache whose first rows all start from this one-row cache."""
        layers, _, heads, _, dim = self.k.shape
        new = KVCache(batch_size, heads, dim, layers, max_len, self.k.device, self.k.dtype)
        new.k[:, :, :, :self.pos] = self.k[:, :, :, :self.pos]
        new.v[:, :, :, :self.pos] = self.v[:, :, :, :self.pos]
        new.pos = self.pos
        return new


_CALC_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult,
               ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd)


def use_calculator(expr, max_len=200, time_limit=0.1):
    """Evaluate plain arithmetic (digits, + - * / // %, parentheses) safely: no names, no
    calls, no powers, bounded length, intermediate size and time. None if not arithmetic."""
    expr = expr.replace(",", "").strip()
    if not expr or len(expr) > max_len:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError):
        return None
    if not all(isinstance(node, _CALC_NODES) for node in ast.walk(tree)):
        return None
    deadline = time.monotonic() + time_limit

    def ev(node):
        if time.monotonic() > deadline:
            raise ArithmeticError("calculator time limit")
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float)) or isinstance(node.value, bool):
                raise ArithmeticError("not a number")
            return node.value
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        a, b = ev(node.left), ev(node.right)
        ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
               ast.Div: lambda: a / b, ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b}
        result = ops[type(node.op)]()
        if abs(result) > 1e30:
            raise ArithmeticError("too large")
        return result

    try:
        result = ev(tree)
    except (ArithmeticError, ZeroDivisionError, OverflowError):
        return None
    if isinstance(result, float) and result.is_integer():
        result = int(result)  # "24", as GSM8K's answers write it, not "24.0"
    elif isinstance(result, float):
        result = round(result, 6)
    return result


@torch.inference_mode()
def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """[B, V] logits -> [B, 1] ids; temperature 0 is greedy."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        vals, idx = torch.topk(logits, k, dim=-1)
        probs = F.softmax(vals / temperature, dim=-1)
        return idx.gather(1, torch.multinomial(probs, 1, generator=rng))
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=rng)


class _Row:
    def __init__(self):
        self.forced = deque()  # tokens the tool injects, emitted before sampling resumes
        self.in_python = False
        self.python_tokens = []
        self.done = False


class Engine:
    """Sample several continuations of one prompt at once with a KV cache, running the
    calculator between <|python_start|> and <|python_end|> and forcing its result back
    between <|output_start|> and <|output_end|>. A row stops after emitting
    <|assistant_end|> or <|bos|> (the stop token is yielded)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Yields (token_column, mask_column) per step: one token per row, mask 0 for tokens
        the tool forced. Finished rows keep receiving tokens that callers should ignore."""
        model, tok = self.model, self.tokenizer
        device = model.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        sp = tok.encode_special
        py_start, py_end = sp("<|python_start|>"), sp("<|python_end|>")
        out_start, out_end = sp("<|output_start|>"), sp("<|output_end|>")
        stops = {sp("<|assistant_end|>"), tok.get_bos_token_id()}
        c = model.config
        max_len = len(tokens) + (max_tokens if max_tokens is not None else c.sequence_len)
        max_len = min(max_len, model.cos.size(1))
        dtype = model.lm_head.weight.dtype if device.type != "cuda" else torch.bfloat16
        kv = KVCache(1, c.n_kv_head, c.n_embd // c.n_head, c.n_layer, max_len, device, dtype)
        with autocast(device):
            logits = model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=kv)[:, -1, :]
        kv = kv.expand(num_samples, max_len)  # prefill once, then share the prompt's cache
        logits = logits.expand(num_samples, -1)
        rows = [_Row() for _ in range(num_samples)]
        generated = 0
        while True:
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            column, masks = [], []
            for row, token in zip(rows, sampled):
                forced = bool(row.forced)
                token = row.forced.popleft() if forced else token
                column.append(token)
                masks.append(0 if forced else 1)
                self._track_tool(row, token, py_start, py_end, out_start, out_end)
                row.done = row.done or token in stops
            yield column, masks
            generated += 1
            if all(r.done for r in rows) or generated == max_tokens or kv.pos >= max_len:
                return
            ids = torch.tensor(column, dtype=torch.long, device=device)[:, None]
            with autocast(device):
                logits = model(ids, kv_cache=kv)[:, -1, :]

    def _track_tool(self, row, token, py_start, py_end, out_start, out_end):
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
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        stops = {self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, m) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if token in stops:
                    done[i] = True
                else:
                    sequences[i].append(token)
                    masks[i].append(m)
            if all(done):
                break
        return sequences, masks

