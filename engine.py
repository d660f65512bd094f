"""
Sampling from a GPT: the KV cache, the calculator tool, and the Engine that decodes rows together.

    engine = Engine(model, tokenizer)
    sequences, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=256, temperature=0.8)
"""

import ast
from collections import deque
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from common import autocast
from model import GPT, softcap, window_mask

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
