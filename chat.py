"""
Talk to a checkpoint: an interactive terminal chat, a one-shot answer for scripts, or an
OpenAI-compatible HTTP server (chat completions, streaming, a small chat page at /).

    python chat.py -i dpo                            # terminal chat; type `clear` or `quit`
    python chat.py -i sft -p "What is a stop-loss?"  # one answer, then exit
    python chat.py -i dpo --persona                  # open with data/persona.md's system message
    python chat.py -i dpo --serve --port 8000        # http://127.0.0.1:8000/ and /v1/chat/completions

One Scheduler thread owns the model and decodes every request in flight together, each in
its own KV-cache row with its own sampling settings; the calculator tool runs as in
nanochat's engine (model.Engine's tool logic).
"""

import hmac
import json
import queue
import select
import socket
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import torch

from common import UserError, autocast, autodetect_device_type, config_dict, parse_config, run_main
from model import Engine, KVCache, _Row, checkpoint_dir_for, load_model


@dataclass
class Config:
    source: str = "sft"  # checkpoint to talk to: base|mid|sft|dpo|rl (-i)
    model_tag: Optional[str] = None  # d<N> directory; None = the default tag
    step: Optional[int] = None  # checkpoint step; None = the latest
    device_type: str = ""  # cuda|mps|cpu; "" = autodetect
    prompt: str = ""  # answer this one prompt and exit (-p)
    system: str = ""  # system message opening every conversation of the terminal chat
    persona: bool = False  # use data/persona.md's system message (when --system is empty)
    temperature: float = 0.6  # sampling temperature; 0 = greedy (the server's default too)
    top_k: int = 50  # sample among the k most likely tokens; 0 = all (the server's default too)
    max_tokens: int = 512  # longest reply (the server's default too)
    seed: int = -1  # terminal chat's sampling seed; -1 = a fresh one per reply
    serve: bool = False  # run the HTTP server instead of the terminal chat
    host: str = "127.0.0.1"  # address the server binds
    port: int = 8000  # port the server listens on
    api_key: str = ""  # when set, /v1/ requests need "Authorization: Bearer <key>"
    max_batch: int = 8  # KV-cache rows: completions decoded together


ALIASES = {"i": "source", "p": "prompt"}


@dataclass
class Sampling:  # one request's settings; top_k 0 = off, seed None = random, n replies to one prompt
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 512
    stop: list = field(default_factory=list)  # strings that end a reply (left out of it)
    seed: Optional[int] = None
    n: int = 1


def sample(logits, s, rng):
    """One token id from [V] float logits under a request's temperature, top_k and top_p."""
    if s.temperature == 0:
        return int(logits.argmax())
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # the mass before a token already covers top_p
        logits = logits.index_fill(0, order[drop], float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=rng))


def prompt_ids(tokenizer, messages):
    """A conversation ending with a user message, rendered as nanochat renders it for
    sampling the assistant's reply (ValueError when the roles are not system?, user, ...)."""
    return tokenizer.render_for_completion({"messages": list(messages) + [{"role": "assistant", "content": ""}]})


# -----------------------------------------------------------------------------
# The scheduler: all requests in flight decode together


class Completion:
    """One request: n rows under one Sampling, with its own random generator. The scheduler
    puts (choice index, text delta, finish_reason or None) on `events`; a finish_reason is
    "stop", "length" or "error"."""

    def __init__(self, prompt, s, device):
        self.prompt, self.s, self.events, self.cancelled, self.completion_tokens = prompt, s, queue.Queue(), False, 0
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(s.seed if s.seed is not None else int.from_bytes(uuid.uuid4().bytes[:6], "big"))


class _Slot:  # a row being decoded: its tokens, tool state, text sent so far, next logits
    def __init__(self, req, index):
        self.req, self.index, self.ids, self.tool, self.sent, self.logits = req, index, [], _Row(), 0, None


class Scheduler:
    """Owns the model and one KV cache of max_batch rows in one thread. Waiting requests join
    free rows between steps (each row prefilled on its own); a step samples one token per
    active row and runs one forward pass for all of them, each row at its own position; a
    finished or cancelled request frees its rows at once."""

    def __init__(self, model, tokenizer, max_batch=8):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.device, self.max_len = model.get_device(), model.config.sequence_len
        self.cache = KVCache.for_model(model, max_batch, self.max_len)
        self.engine = Engine(model, tokenizer)  # for its calculator-tool logic
        sp = tokenizer.encode_special
        self.tool_ids = [sp(t) for t in ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")]
        self.stops = {sp("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.slots, self.waiting, self.cond, self.closed = [None] * max_batch, deque(), threading.Condition(), False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, prompt, s):
        assert 1 <= s.n <= self.max_batch and len(prompt) < self.max_len
        req = Completion(prompt, s, self.device)
        with self.cond:
            self.waiting.append(req)
            self.cond.notify()
        return req

    def cancel(self, req):
        req.cancelled = True  # the loop frees its rows before the next step

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()

    @torch.inference_mode()
    def _loop(self):
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.closed or self.waiting or any(self.slots))
                if self.closed:
                    return
                joining = []
                while self.waiting and (self.waiting[0].cancelled or self.slots.count(None) >= self.waiting[0].s.n):
                    req = self.waiting.popleft()  # oldest first, into the lowest free rows, while it fits
                    free = [i for i, slot in enumerate(self.slots) if slot is None and not req.cancelled]
                    for index, row in zip(range(req.s.n), free):
                        self.slots[row] = _Slot(req, index)
                        joining.append(row)
            try:
                for row in joining:
                    self.cache.reset(row)
                    self.slots[row].logits = self._forward([self.slots[row].req.prompt], self.cache.row(row))[0]
                self._step()
            except Exception as e:  # a failing model ends the requests in flight, not the server
                print(f"error while decoding: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                for row, slot in enumerate(self.slots):
                    if slot:
                        slot.req.events.put((slot.index, "", "error"))
                        self.slots[row] = None

    def _forward(self, ids, cache):
        with autocast(self.device):
            return self.model(torch.tensor(ids, dtype=torch.long, device=self.device), kv_cache=cache)[:, -1].float()

    def _step(self):
        tokens = [0] * self.max_batch  # free rows decode a dummy token and are reset after
        for row, slot in enumerate(self.slots):
            if slot and not slot.req.cancelled:
                forced = slot.tool.forced
                tokens[row] = forced.popleft() if forced else sample(slot.logits, slot.req.s, slot.req.rng)
                self.engine._track_tool(slot.tool, tokens[row], *self.tool_ids)
                if not self._emit(slot, tokens[row], int(self.cache.pos[row]) + 1 >= self.max_len):
                    continue
            self.slots[row] = None
        if any(self.slots):  # the rows up to the last active one: a view of the cache, one forward pass
            m = max(row for row, slot in enumerate(self.slots) if slot) + 1
            c = self.cache
            logits = self._forward([[t] for t in tokens[:m]], KVCache(c.k[:, :m], c.v[:, :m], c.pos[:m], c.prev[:m]))
            for row in range(m):
                if self.slots[row]:
                    self.slots[row].logits = logits[row]
                else:
                    self.cache.reset(row)

    def _emit(self, slot, token, full):
        """Account for a new token; send the text that can no longer turn into a stop string.
        Returns the finish reason, or None while the row goes on."""
        req, s = slot.req, slot.req.s
        req.completion_tokens += 1
        finish = "stop" if token in self.stops else None
        if not finish:
            slot.ids.append(token)
        text = self.tokenizer.decode(slot.ids)
        cuts = [p for p in (text.find(x) for x in s.stop) if p >= 0]
        if cuts:
            text, finish = text[:min(cuts)], "stop"
        elif not finish and (len(slot.ids) >= s.max_tokens or full):
            finish = "length"
        end = len(text)
        if not finish:  # hold back a possible stop-string prefix and a split UTF-8 character
            end -= max([len(x) - 1 for x in s.stop] + [0])
            while end > slot.sent and text[end - 1] == "\ufffd":
                end -= 1
        if end > slot.sent or finish:
            req.events.put((slot.index, text[slot.sent:max(end, slot.sent)], finish))
            slot.sent = max(end, slot.sent)
        return finish


def stream_reply(req, on_delta, client_gone=lambda: False):
    """Wait for a request's events, calling on_delta(index, text, finish); returns the finish
    reasons per choice. Raises ConnectionError as soon as client_gone() is true."""
    finishes = [None] * req.s.n
    while None in finishes:
        if client_gone():
            raise ConnectionError("client disconnected")
        try:
            index, text, finishes[index] = event = req.events.get(timeout=0.25)
            on_delta(*event)
        except queue.Empty:
            pass
    return finishes


# -----------------------------------------------------------------------------
# Terminal chat


def chat_cli(sched, c, read=input, out=sys.stdout):
    system = c.system
    if not system and c.persona:
        from gen import PERSONA_PATH, load_persona
        system = load_persona(PERSONA_PATH)["system"]
    s = Sampling(temperature=c.temperature, top_k=c.top_k, max_tokens=c.max_tokens, seed=None if c.seed < 0 else c.seed)
    history = []

    def reply(text):
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids = prompt_ids(sched.tokenizer, messages)
        if len(ids) >= sched.max_len:
            raise UserError(f"the conversation is {len(ids)} tokens, the model's context is {sched.max_len}")
        parts = []
        stream_reply(sched.submit(ids, s), lambda i, t, f: (parts.append(t), out.write(t), out.flush()))
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(parts)})

    if c.prompt:
        return reply(c.prompt)
    out.write("Chat with the model: `clear` starts a new conversation, `quit` (or Ctrl-D) ends.\n")
    while True:
        try:
            text = read("\nUser: ").strip()
        except EOFError:
            return
        if text in ("quit", "exit"):
            return
        if text == "clear":
            history.clear()
            out.write("(new conversation)\n")
        elif text:
            out.write("Assistant: ")
            try:
                reply(text)
            except UserError as e:  # a conversation past the context: say so, keep the chat going
                history.pop()
                out.write(f"{e}; `clear` to start over\n")


# -----------------------------------------------------------------------------
# The OpenAI-compatible server


class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


FIELDS = {  # name: (type, low, high) of the fields read; others (response_format, ...) are ignored
    "temperature": (float, 0, 2), "top_p": (float, 0, 1), "top_k": (int, 0, 1 << 30), "max_tokens": (int, 1, 1 << 30),
    "max_completion_tokens": (int, 1, 1 << 30), "n": (int, 1, None), "seed": (int, -(1 << 63), 1 << 64),
    "stream": (bool,), "model": (str,), "stream_options": (dict,), "messages": (list,), "stop": ((str, list),)}


def parse_request(body, defaults, max_n):
    """A chat-completions body -> (messages, Sampling, stream, include_usage); APIError 400
    naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, (typ, *bounds) in FIELDS.items():
        v, lo, hi = body.get(name), *(bounds or (None, None))
        hi = max_n if name == "n" else hi
        ok = v is None or (isinstance(v, int if typ is int else (int, float) if typ is float else typ)
                           and (typ is bool or not isinstance(v, bool)) and (lo is None or lo <= v <= hi))
        if not ok:
            kind = {int: "an integer", float: "a number"}.get(typ, "of type " + getattr(typ, "__name__", "string or list"))
            raise APIError(400, f"'{name}' must be {kind}" + (f" from {lo} to {hi}" if lo is not None else ""), name)
    messages, stop = body.get("messages"), body.get("stop")
    plain = []
    for i, m in enumerate(messages or []):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)  # OpenAI's text parts
        role = {"developer": "system"}.get(m.get("role"), m.get("role")) if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise APIError(400, f"'messages'[{i}] needs a role (system, user, assistant) and string content", "messages")
        plain.append({"role": role, "content": content})
    if not plain:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    stop = [stop] if isinstance(stop, str) else stop or []
    if len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    get = lambda name, default: default if body.get(name) is None else body[name]
    s = Sampling(temperature=get("temperature", defaults.temperature), top_p=get("top_p", 1.0), stop=stop,
                 top_k=get("top_k", defaults.top_k), seed=body.get("seed"), n=get("n", 1),
                 max_tokens=get("max_tokens", get("max_completion_tokens", defaults.max_tokens)))
    if s.top_p == 0:
        s = replace(s, temperature=0.0)  # nothing but the most likely token
    return plain, s, bool(body.get("stream")), bool((body.get("stream_options") or {}).get("include_usage"))


class Handler(BaseHTTPRequestHandler):
    ROUTES = {"/": "GET", "/v1/models": "GET", "/v1/chat/completions": "POST"}

    def log_message(self, *args):  # the server prints its own line per request
        pass

    def _send(self, status, obj, content_type="application/json", log=""):
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", self.ROUTES[self.path.split("?")[0]])
        self.end_headers()
        self.wfile.write(data)
        print(f"{self.command} {self.path} {status}{log}", flush=True)

    def do_GET(self):
        self._route()

    do_POST = do_GET

    def _route(self):
        path, srv = self.path.split("?")[0], self.server
        try:
            if path not in self.ROUTES:
                raise APIError(404, f"no route {self.command} {path}", code="not_found")
            if self.ROUTES[path] != self.command:
                raise APIError(405, f"{path} takes {self.ROUTES[path]}, not {self.command}", code="method_not_allowed")
            sent = self.headers.get("Authorization", "").encode()
            if srv.api_key and path != "/" and not hmac.compare_digest(sent, f"Bearer {srv.api_key}".encode()):
                raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key")
            if path == "/":
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif path == "/v1/models":
                self._send(200, {"object": "list", "data": [
                    {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "chimera"}]})
            else:
                self._complete(srv, time.time())
        except APIError as e:
            self._send(e.status, {"error": {"message": str(e), "type": e.kind, "param": e.param, "code": e.code}})
        except ConnectionError:  # BrokenPipeError included
            print(f"{self.command} {self.path} client disconnected", flush=True)

    def _client_gone(self):
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _event(self, obj):
        self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
        self.wfile.flush()

    def _complete(self, srv, t0):
        try:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length)) if 0 < length <= 1 << 24 else None
        except ValueError:
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        messages, s, stream, include_usage = parse_request(body, srv.defaults, srv.sched.max_batch)
        try:
            prompt = prompt_ids(srv.sched.tokenizer, messages)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", "messages") from None
        if len(prompt) >= srv.sched.max_len:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; the model's context is {srv.sched.max_len}",
                           "messages", "context_length_exceeded")
        req, texts = srv.sched.submit(prompt, s), [""] * s.n
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(t0), "model": srv.model_name}
        chunk = dict(head, object="chat.completion.chunk")
        try:
            if stream:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for i in range(s.n):
                    self._event(dict(chunk, choices=[
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
                finishes = stream_reply(req, lambda i, t, f: self._event(dict(chunk, choices=[
                    {"index": i, "delta": {"content": t} if t else {}, "finish_reason": f}])), self._client_gone)
            else:
                finishes = stream_reply(req, lambda i, t, f: texts.__setitem__(i, texts[i] + t), self._client_gone)
        finally:
            srv.sched.cancel(req)  # a no-op when it finished; frees the rows of a client that left
        dt, done = time.time() - t0, req.completion_tokens
        log = f" {len(prompt)} prompt + {done} completion tokens in {dt:.2f}s ({done / dt:.1f} tokens/s)"
        usage = {"prompt_tokens": len(prompt), "completion_tokens": done, "total_tokens": len(prompt) + done}
        if stream:
            if include_usage:
                self._event(dict(chunk, choices=[], usage=usage))
            self._event(b"[DONE]")
            print(f"{self.command} {self.path} 200{log}", flush=True)
        elif "error" in finishes:
            raise APIError(500, "the model failed while decoding (see the server's log)", kind="server_error")
        else:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                        "finish_reason": finishes[i]} for i in range(s.n)]
            self._send(200, dict(head, object="chat.completion", usage=usage, choices=choices), log=log)


def make_server(sched, model_name, defaults, host="127.0.0.1", port=8000, api_key=""):
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.sched, server.model_name, server.defaults, server.api_key = sched, model_name, defaults, api_key
    server.created = int(time.time())
    return server


PAGE = """<!doctype html><meta charset="utf-8"><title>Chimera chat</title><style>
body{font:15px system-ui,sans-serif;max-width:46em;margin:auto;padding:1em}textarea{width:100%;box-sizing:border-box}
#log div{white-space:pre-wrap;margin:.5em 0;padding:.6em;border-radius:6px}.user{background:#e6edfb}.assistant{background:#eee}
</style><div id="log"></div><textarea id="input" rows="3" placeholder="Enter sends, Shift+Enter is a new line"></textarea>
<button id="send">Send</button> <button id="new">New chat</button><script>
let messages = [], key = "";
const $ = id => document.getElementById(id), input = $("input");
const add = (cls, text) => $("log").appendChild(Object.assign(document.createElement("div"), {className: cls, textContent: text}));
const post = () => fetch("/v1/chat/completions", {method: "POST", body: JSON.stringify({messages, stream: true}),
  headers: Object.assign({"Content-Type": "application/json"}, key ? {Authorization: "Bearer " + key} : {})});
async function send() {
  const text = input.value.trim();
  if (!text || $("send").disabled) return;
  input.value = ""; $("send").disabled = true; messages.push({role: "user", content: text}); add("user", text);
  const out = add("assistant", ""); let reply = "", buf = "";
  try {
    let r = await post();
    if (r.status == 401 && (key = prompt("API key") || "")) r = await post();
    if (!r.ok) throw new Error((await r.json()).error.message);
    for (const reader = r.body.getReader(), dec = new TextDecoder();;) {
      const {done, value} = await reader.read();
      if (done) break;
      const events = (buf += dec.decode(value, {stream: true})).split("\\n\\n"); buf = events.pop();
      for (const e of events.map(e => e.slice(6)).filter(e => e != "[DONE]"))
        out.textContent = (reply += JSON.parse(e).choices[0]?.delta?.content || "");
    }
    messages.push({role: "assistant", content: reply});
  } catch (e) { messages.pop(); out.textContent = "error: " + e.message; }
  $("send").disabled = false; input.focus();
}
$("send").onclick = send;
$("new").onclick = () => { messages = []; $("log").textContent = ""; input.focus(); };
input.onkeydown = e => { if (e.key == "Enter" && !e.shiftKey) { e.preventDefault(); send(); } };
</script>
"""


# -----------------------------------------------------------------------------


def main():
    c = parse_config(Config, aliases=ALIASES)
    if c.max_batch < 1 or c.max_tokens < 1 or c.temperature < 0 or c.top_k < 0:
        raise UserError("--max_batch and --max_tokens must be positive, --temperature and --top_k not negative")
    shown = dict(config_dict(c), api_key="***" if c.api_key else "")  # the key never reaches a log
    print(", ".join(f"{k}={v}" for k, v in shown.items() if v not in (None, "")), file=sys.stderr)
    device = torch.device(c.device_type or autodetect_device_type())
    model, tokenizer, meta = load_model(c.source, device, phase="eval", model_tag=c.model_tag, step=c.step)
    tag = checkpoint_dir_for(c.source, c.model_tag).rstrip("/").split("/")[-1]
    name = f"{c.source}/{tag}"
    sched = Scheduler(model, tokenizer, c.max_batch)
    defaults = Sampling(temperature=c.temperature, top_k=c.top_k, max_tokens=c.max_tokens)
    try:
        if not c.serve:
            return chat_cli(sched, c)
        try:
            server = make_server(sched, name, defaults, c.host, c.port, c.api_key)
        except OSError as e:
            raise UserError(f"--host={c.host} --port={c.port}: cannot listen there ({e.strerror})") from None
        print(f"serving {name} (step {meta.get('step')}) at http://{c.host}:{server.server_port}/ "
              f"(OpenAI API: http://{c.host}:{server.server_port}/v1)", flush=True)
        server.serve_forever()
    finally:
        sched.close()  # the decoding thread ends before the interpreter does


if __name__ == "__main__":
    run_main(main)
