"""
Sampling from a GPT: the KV cache, the calculator tool, and the Engine, the one decoding loop (eval's samples,
the judge's probes and chat's server all run on it): rows of many prompts decode together.

    engine = Engine(model, tokenizer, max_batch=8)
    sequences, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=256, temperature=0.8)
    rows = engine.add(prompt_ids, Sampling(temperature=0.6, top_p=0.9, seed=1), n=2)  # or step by step:
    events = engine.step()  # a token for every active row: [Event(row, token, finish)]
"""

import ast
import operator
import string
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from common import autocast
from model import softcap, window_mask

class KVCache:
    """Keys and values [layers, B, max_len, H_kv, D]; each row is a sequence of its own length `pos`
    (CPU LongTensor [B]) and last normalised embedding `prev` (2026's smear): requests decode together.

        cache = KVCache.for_model(model, batch_size, max_len)
        model(prompt[None], kv_cache=cache.view(slice(i, i + 1)))  # prefill row i (a view of the cache)
        cache.copy_row(i, j)                                       # row j continues as row i does
        model(ids, kv_cache=cache)                                 # ids [B, T]: T more tokens for every row
        cache.reset(i)                                             # row i empty again
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

    def view(self, rows):
        """The rows of a slice, in this cache's memory: a forward through the view moves their positions here."""
        return KVCache(self.k[:, rows], self.v[:, rows], self.pos[rows], self.prev[rows])

    def reset(self, i):
        self.pos[i], self.prev[i] = 0, 0

    def copy_row(self, src, dst):
        """Row dst becomes a copy of row src (one prompt prefilled once, sampled many times)."""
        n = int(self.pos[src])
        self.k[:, dst, :n], self.v[:, dst, :n] = self.k[:, src, :n], self.v[:, src, :n]
        self.pos[dst], self.prev[dst] = n, self.prev[src]

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

CALC_MATH, CALC_TEXT = set("0123456789*+-/.() "), set(string.ascii_letters + string.digits + "'\"()._ ")
CALC_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
            ast.FloorDiv: operator.floordiv, ast.USub: operator.neg, ast.UAdd: operator.pos}
CALC_REFUSED = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "globals", "locals", "vars", "dir",
                "getattr", "setattr", "delattr", "hasattr")  # nanochat's words (any case) that get a text no answer
CALC_METHODS = {"count", "upper", "lower", "strip", "lstrip", "rstrip", "title", "capitalize", "casefold", "swapcase"}

def use_calculator(expr, max_len=1000):
    """nanochat's calculator (the same at 885a4f2 and 92d63d4), its results and refusals: arithmetic of digits,
    + - * / // and parentheses (no ** and no %), or text with a .count( (string literals' methods, chained) and none
    of nanochat's refused words; None where it gives none. Evaluated on the syntax tree, never by eval(): nothing
    else can run, and without powers a bounded expression cannot blow up. The engine inserts str(result): "24.0"
    for 48/2, as nanochat's models saw."""
    expr, chars = expr.replace(",", ""), set(expr) - {","}
    text = chars <= CALC_TEXT and ".count(" in expr and not any(word in expr.lower() for word in CALC_REFUSED)
    if len(expr) > max_len or not (chars <= CALC_MATH or text):
        return None  # ** is refused as the syntax tree meets it

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
            return node.value
        if isinstance(node, (ast.BinOp, ast.UnaryOp)) and type(node.op) in CALC_OPS:
            operands = (node.left, node.right) if isinstance(node, ast.BinOp) else (node.operand,)
            return CALC_OPS[type(node.op)](*map(value, operands))
        if isinstance(node, ast.Tuple) and not node.elts:  # "()": nanochat's eval answers ()
            return ()
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CALC_METHODS \
                and not node.keywords and isinstance(target := value(node.func.value), str):
            return getattr(target, node.func.attr)(*map(value, node.args))
        raise TypeError("not the calculator's")

    try:
        return value(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ArithmeticError, TypeError, ValueError, RecursionError):
        return None

@dataclass
class Sampling:  # one prompt's settings: temperature 0 (below 1e-4) = greedy, top_k 0 = all, top_p 0 = the top token
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 512  # tokens per sample, the tool's included
    seed: int | None = None  # None: torch's global RNG

def sample(logits, sampling, rng):
    """[B, V] raw logits -> [B] token ids: top_k, then the softcap (it keeps their order: a tanh over k logits, not
    the vocab), temperature and top_p. Each row draws its own part of the rng's stream: its token is the same
    whatever the other rows' logits."""
    if sampling.temperature < 1e-4:  # greedy: a tinier temperature (1e-300) overflows the softmax into NaN
        return softcap(logits).argmax(-1)
    idx = None
    if sampling.top_k > 0:
        logits, idx = torch.topk(logits, min(sampling.top_k, logits.size(-1)), dim=-1)
    probs = F.softmax(softcap(logits) / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:  # the most likely tokens whose probabilities sum past top_p (multinomial rescales)
        top, order = probs.sort(dim=-1, descending=True)
        probs = probs.scatter(-1, order, top.masked_fill(top.cumsum(-1) - top > sampling.top_p, 0.0))
    choice = torch.multinomial(probs, 1, generator=rng)
    return (choice if idx is None else idx.gather(1, choice))[:, 0]

@dataclass(eq=False)  # a row is itself, not its fields
class Row:  # one sample decoding in the cache's row `index`
    index: int
    choice: int  # which of its prompt's n samples
    owner: object = None  # the caller's, as add() was given it
    ids: list = field(default_factory=list)  # the tokens so far, the stop token left out
    mask: list = field(default_factory=list)  # per token: 1 sampled, 0 forced by the tool
    python: int | None = None  # where in ids the calculator call being read begins (after <|python_start|>)
    forced: deque = field(default_factory=deque)  # its result, forced in before sampling resumes
    live: bool = True  # False once finished or freed

@dataclass(eq=False)
class Group:  # the rows one add() started: one prompt's samples, drawn together from one rng
    sampling: Sampling
    rng: torch.Generator | None
    logits: torch.Tensor  # [n, V] raw next-token logits; a finished row's are a live sibling's (drawn, unused)
    rows: list

@dataclass
class Event:  # what step() did to a row
    row: Row
    token: int  # sampled, or forced by the tool (row.mask says which)
    finish: str | None  # "stop" (<|assistant_end|> or <|bos|>), "length" (max_tokens or a full cache), "error", None

class Engine:
    """A KV cache of max_batch rows of max_len positions and their rows' samples, the calculator's result forced in
    after <|python_end|>, between <|output_start|> and <|output_end|>; free() ends a row early (a stop string, a
    cancelled client)."""

    def __init__(self, model, tokenizer, max_batch=1, max_len=None):
        self.model, self.tokenizer, self.device = model, tokenizer, model.get_device()
        self.stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.tool_tokens = [tokenizer.encode_special(f"<|{t}|>") for t in
                            ("python_start", "python_end", "output_start", "output_end")]
        self.allocate(max_batch, max_len or model.config.sequence_len)

    def allocate(self, max_batch, max_len):  # a new, empty cache
        self.max_batch, self.max_len = max_batch, max_len
        self.cache = KVCache.for_model(self.model, max_batch, max_len)
        self.rows, self.groups = [None] * max_batch, []  # a cache row's Row; the groups with live rows

    def _forward(self, ids, cache):  # the last position's raw logits: only it meets the lm_head, uncapped
        with autocast(self.device):
            h = self.model.hidden_states(torch.tensor(ids, dtype=torch.long, device=self.device), cache)[:, -1]
            return self.model.lm_head(h)[:, :self.model.config.vocab_size].float()

    @torch.inference_mode()
    def add(self, prompt, sampling, n=1, owner=None):
        """n samples of a prompt in the lowest free rows: one prefill, its cache row copied to the others. Its Rows."""
        free = [i for i, row in enumerate(self.rows) if row is None][:n]
        if len(free) < n:
            raise ValueError(f"{n} rows asked of the engine, {len(free)} free")
        self.cache.reset(free[0])
        logits = self._forward([prompt], self.cache.view(slice(free[0], free[0] + 1)))
        for i in free[1:]:
            self.cache.copy_row(free[0], i)
        rng = None if sampling.seed is None else torch.Generator(self.device).manual_seed(sampling.seed)
        rows = [Row(i, choice, owner) for choice, i in enumerate(free)]
        for row in rows:
            self.rows[row.index] = row
        self.groups.append(Group(sampling, rng, logits.expand(n, -1), rows))
        return rows

    def free(self, row):  # a no-op for a row already ended
        if row.live:
            self.rows[row.index], row.live = None, False
            self.groups = [group for group in self.groups if any(r.live for r in group.rows)]

    @torch.inference_mode()
    def step(self):
        """A token for each live row, its Event (finished rows are freed); then one forward up to the last live row."""
        events, tokens = [], [0] * self.max_batch  # free rows decode a dummy token
        for group in list(self.groups):  # a group's rows are sampled in one call, even its finished ones
            try:
                drawn = sample(group.logits, group.sampling, group.rng).tolist()
            except RuntimeError:  # its logits or settings cannot be sampled (NaN): its rows end, no other's
                events += [Event(row, None, "error") for row in group.rows if row.live]
                for row in group.rows:
                    self.free(row)
                continue
            for row, token in zip(group.rows, drawn):
                if not row.live:
                    continue
                forced = bool(row.forced)
                token = tokens[row.index] = row.forced.popleft() if forced else token
                if token not in self.stops:
                    row.ids.append(token), row.mask.append(int(not forced))
                    self._run_tool(row, token)
                full = len(row.ids) >= group.sampling.max_tokens or int(self.cache.pos[row.index]) + 1 >= self.max_len
                events.append(Event(row, token, "stop" if token in self.stops else "length" if full else None))
                if events[-1].finish:
                    self.free(row)
        live = [row.index for row in self.rows if row]
        if live:  # free rows among them decode at a live row's position: level rows keep the cache's fast path
            self.cache.pos[[i for i in range(live[-1]) if self.rows[i] is None]] = int(self.cache.pos[live[0]])
            logits = self._forward([[t] for t in tokens[:live[-1] + 1]], self.cache.view(slice(0, live[-1] + 1)))
            for group in self.groups:
                sibling = next(row for row in group.rows if row.live)
                group.logits = logits[[(row if row.live else sibling).index for row in group.rows]]
        return events

    def _run_tool(self, row, token):  # token has just joined row.ids
        py_start, py_end, out_start, out_end = self.tool_tokens
        if token == py_start:
            row.python = len(row.ids)
        elif token == py_end and row.python is not None:  # the call's result is forced in next
            result = use_calculator(self.tokenizer.decode(row.ids[row.python:-1]))
            if result is not None:
                row.forced.extend([out_start] + self.tokenizer.encode(str(result)) + [out_end])
            row.python = None

    def complete(self, prompts, samplings, n=1):
        """n completions (token ids, the stop token left out) of each prompt, decoded together max_batch rows at
        a time: a prompt joins as rows free up, each with its own Sampling (seed included), so a prompt's samples
        do not depend on the others'. max_batch must hold n rows; max_len a prompt and its max_tokens."""
        return [[row.ids for row in rows] for rows in self._decode(prompts, samplings, n)]

    def _decode(self, prompts, samplings, n):  # each prompt's Rows, all ended
        groups, waiting = [], list(zip(prompts, samplings))
        while waiting or any(self.rows):
            while waiting and self.rows.count(None) >= n:
                groups.append(self.add(*waiting.pop(0), n))
            if any(event.finish == "error" for event in self.step()):  # whole answers or none, never a short one
                raise RuntimeError("the model's next-token distribution could not be sampled (NaN logits?)")
        return groups

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """num_samples completions of a prompt: whole sequences (prompt + completion, the stop token left out)
        and their masks (0: the prompt and the tool's tokens). max_tokens None: the model's sequence_len."""
        max_tokens = self.model.config.sequence_len if max_tokens is None else max_tokens
        max_len = min(len(tokens) + max_tokens, self.model.cos.size(1))  # past sequence_len, up to the rotary tables
        if num_samples > self.max_batch or max_len > self.max_len:  # grows to the largest call (no row is live)
            self.allocate(max(num_samples, self.max_batch), max(max_len, self.max_len))
        sampling = Sampling(temperature, top_k or 0, max_tokens=max_tokens, seed=seed)
        (rows,) = self._decode([tokens], [sampling], num_samples)
        return [list(tokens) + row.ids for row in rows], [[0] * len(tokens) + row.mask for row in rows]
