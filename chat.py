"""
Talk to a checkpoint: a terminal chat, a one-shot answer, or an OpenAI-compatible server with a chat page.

    python chat.py -i dpo                            # terminal chat; type `clear` or `quit`
    python chat.py -i sft -p "What is a stop-loss?"  # one answer, then exit
    python chat.py -i dpo --persona                  # open with data/persona.md's system message
    python chat.py -i dpo --serve --port 8000        # http://127.0.0.1:8000/ and /v1/chat/completions
"""

import hmac
import ipaddress
import json
import os
import queue
import re
import sys
import threading
import time
import uuid
from collections import defaultdict, deque
from contextlib import suppress
from itertools import takewhile
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from checkpoint import checkpoint_dir_for, load_model
from common import UserError, check_settings, init_dist, parse_config, run_main
from engine import Engine, Sampling
from openrouter import PERSONA_PATH, load_persona

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "chat.html")  # at /, as nanochat's ui.html

@dataclass
class Config:
    source: str = "sft"  # checkpoint to talk to: base|mid|sft|dpo|rl, in $NANOCHAT_BASE_DIR (-i)
    model_tag: str | None = None  # model directory (d<N>, chimera_d<N>); None = the default (-g)
    step: int | None = None  # checkpoint step; None = the latest (-s)
    device_type: str = ""  # cuda|mps|cpu; "" = autodetect
    prompt: str = ""  # answer this one prompt and exit (-p)
    system: str = ""  # system message opening each conversation of the terminal chat
    persona: bool = False  # open with data/persona.md's system message (when --system is empty)
    temperature: float = 0.6  # sampling temperature, 0 (or below 1e-4) = greedy (also the server's default) (-t)
    top_k: int = 50  # sample among the k most likely tokens, 0 = all (also the server's default) (-k)
    seed: int | None = None  # sampling seed; None = random (also the server's default)
    max_tokens: int = 512  # longest reply (also the server's default)
    serve: bool = False  # run the HTTP server instead of the terminal chat
    host: str = "127.0.0.1"  # address the server binds
    port: int = 8000  # port the server listens on
    api_key: str = ""  # when set, /v1/ requests need "Authorization: Bearer <key>"; else $CHIMERA_API_KEY
    api_key_file: str = ""  # a file holding the key (kept out of `ps`), read when --api_key is empty
    allow_origin: str = ""  # other web origins whose pages may call the server: a comma list, or *
    timeout: float = 30.0  # seconds a client may take over each read of its request and each write of the reply
    max_connections: int = 64  # connections served at once; more are answered 503
    max_batch: int = 8  # KV-cache rows: the most replies decoded together

@dataclass(eq=False)  # a request is itself, not its fields
class Request:  # a chat completion: parsed, then shared by the scheduler's thread and wait()
    prompt: list
    sampling: Sampling
    stop: list  # strings that end a reply (left out of it)
    n: int  # replies, sampled from one prefill
    events: queue.Queue = field(default_factory=queue.Queue)  # (choice index, text delta, stop|length|error|None)
    texts: defaultdict = field(default_factory=lambda: defaultdict(str))  # per choice: the text sent so far
    cancelled: bool = False
    completion_tokens: int = 0

# --- The scheduler: all requests in flight decode together -------------------
class Scheduler:
    """The model's thread: waiting requests join the engine's free rows between its steps, and each
    step's tokens go to their requests as text (held back while it may begin a stop string)."""

    def __init__(self, model, tokenizer, max_batch=8):
        self.tokenizer, self.engine = tokenizer, Engine(model, tokenizer, max_batch, model.config.sequence_len)
        self.waiting, self.cond, self.closed = deque(), threading.Condition(), False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, req):
        with self.cond:
            self.waiting.append(req)
            self.cond.notify()
        return req

    def wait(self, req, on_delta):
        """on_delta(index, text, finish) per event until all choices finish; their finish reasons (texts: req.texts)."""
        finishes = [None] * req.n
        try:
            while None in finishes:
                index, text, finishes[index] = event = req.events.get()
                on_delta(*event)
            return finishes
        finally:
            req.cancelled = True  # a no-op once finished; else the scheduler frees its rows before its next step

    def close(self):
        self.closed = True  # the loop ends after its current step
        self.thread.join()

    def _loop(self):
        engine = self.engine
        while not self.closed:
            for row in filter(None, engine.rows):
                if row.owner.cancelled:
                    engine.free(row)
            with self.cond:  # submit() waits out a prefill: it only queues
                if not self.cond.wait_for(lambda: self.waiting or any(engine.rows), timeout=0.25):
                    continue  # idle: no step, and close() is seen within 0.25 s
                while self.waiting and (self.waiting[0].cancelled or engine.rows.count(None) >= self.waiting[0].n):
                    req = self.waiting.popleft()  # oldest first, while it fits, into the lowest free rows
                    try:
                        if not req.cancelled:
                            engine.add(req.prompt, req.sampling, req.n, owner=req)
                    except Exception as e:  # a failing prefill ends its own request
                        self._fail([req], f"{type(e).__name__}: {e}")
            running = {row.owner for row in engine.rows if row}
            try:  # a row that cannot be sampled ends its request alone (an "error" event)
                for event in engine.step():
                    self._send(event)
            except Exception as e:  # a failing forward ends the requests in flight (none can go on), not the server
                self._fail(running, f"{type(e).__name__}: {e}")

    def _fail(self, reqs, why):
        print(f"error while decoding: {why}", file=sys.stderr, flush=True)
        for req in reqs:
            req.cancelled = True  # its rows are freed before the next step
            for index in range(req.n):
                req.events.put((index, "", "error"))

    def _send(self, event):
        """The row's settled text to its request; a stop string in it ends the row."""
        row, req = event.row, event.row.owner
        if event.finish == "error":
            return self._fail([req], "a reply could not be sampled (NaN in its logits?): its request fails alone")
        req.completion_tokens += 1
        text, stop, sent = self.tokenizer.decode(row.ids), req.stop, req.texts[row.choice]
        cut = min([p for p in map(text.find, stop) if p >= 0], default=len(text))
        finish = "stop" if cut < len(text) else event.finish
        if finish:
            self.engine.free(row)
        hold = max([len(x) - 1 for x in stop], default=0)  # unsettled: the tail may begin a stop string
        text = text[:cut] if finish else text[:max(0, cut - hold)].rstrip("\ufffd")  # or end in half a character
        if len(text) > len(sent) or finish:
            req.texts[row.choice] = max(text, sent, key=len)
            req.events.put((row.choice, text[len(sent):], finish))

# --- Terminal chat -----------------------------------------------------------
def chat_cli(sched, config, read=input, out=sys.stdout):
    system = config.system or (load_persona(PERSONA_PATH)["system"] if config.persona else "")
    history = [{"role": "system", "content": system}] if system else []
    if not config.prompt:
        out.write("Chat with the model: `clear` starts a new conversation, `quit` (or Ctrl-D) ends.\n")
    lines = takewhile(lambda text: text not in ("quit", "exit"), iter(lambda: read("\nUser: ").strip(), None))
    with suppress(EOFError):  # Ctrl-D ends the chat too
        for text in filter(None, [config.prompt] if config.prompt else lines):
            if text == "clear":
                del history[bool(system):]
                out.write("(new conversation)\n")
                continue
            messages = history + [{"role": "user", "content": text}]
            try:  # parsed as the server parses a request: config's temperature, top_k and max_tokens are the defaults
                req, *_ = parse_request({"messages": messages}, config, sched)
            except APIError as e:  # longer than the model's context: -p fails, the chat goes on
                if config.prompt:
                    raise UserError(str(e)) from None
                out.write(f"({e}: `clear` starts over)\n")
                continue
            out.write("" if config.prompt else "Assistant: ")
            finishes = sched.wait(sched.submit(req), lambda index, text, finish: (out.write(text), out.flush()))
            out.write("\n")
            if "error" in finishes:  # the scheduler printed why
                raise UserError("the model failed while decoding")
            history += [messages[-1], {"role": "assistant", "content": req.texts[0]}]

# --- The OpenAI-compatible server --------------------------------------------
class APIError(Exception):  # its body is OpenAI's error object
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}

def parse_request(body, config, sched):
    """A chat-completions body -> (Request, stream, include_usage), or an APIError 400 naming a field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    fields = {  # name: (type, low, high) of each field used; others (response_format, ...) are ignored
        "temperature": (float, 0, 2), "top_p": (float, 0, 1), "top_k": (int, 0, 1 << 30), "model": (str,),
        "max_tokens": (int, 1, 1 << 30), "max_completion_tokens": (int, 1, 1 << 30),
        "n": (int, 1, sched.engine.max_batch),
        "seed": (int, -(1 << 63), (1 << 64) - 1), "stream": (bool,), "stream_options": (dict,), "stop": ((str, list),)}
    for name, (typ, *bounds) in fields.items():
        v, lo, hi = body.get(name), *(bounds or (None, None))
        if not (v is None or (isinstance(v, {int: int, float: (int, float)}.get(typ, typ)) and (typ is bool or not
                isinstance(v, bool)) and (lo is None or lo <= v <= hi))):
            kind = {int: "an integer", float: "a number"}.get(typ, getattr(typ, "__name__", "a string or a list"))
            raise APIError(400, f"'{name}' must be {kind}" + (f" from {lo} to {hi}" * (lo is not None)), name)
    stop = [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop") or []
    if len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    text = lambda c: "".join(p.get("text", "") for p in c if isinstance(p, dict)) if isinstance(c, list) else c
    try:  # messages: OpenAI's content parts become plain text; the roles must alternate as nanochat renders them
        messages = [dict(m, content=text(m.get("content"))) for m in body.get("messages") or []]
        prompt = sched.tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    except (ValueError, AttributeError, TypeError) as e:
        raise APIError(400, f"'messages' must be system?, user, assistant, user, ... with string contents ({e})",
                       "messages") from None
    if len(prompt) >= sched.engine.max_len:
        raise APIError(400, f"the conversation is {len(prompt)} tokens; the model's context is {sched.engine.max_len}",
                       "messages", "context_length_exceeded")
    get = lambda name, default=None: default if body.get(name) is None else body[name]
    sampling = Sampling(get("temperature", config.temperature), get("top_k", config.top_k), get("top_p", 1.0),
                        get("max_tokens", get("max_completion_tokens", config.max_tokens)), get("seed", config.seed))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return Request(prompt, sampling, stop, get("n", 1)), bool(body.get("stream")), include_usage

class Handler(BaseHTTPRequestHandler):
    ROUTES = {"/": "GET", "/v1/models": "GET", "/v1/chat/completions": "POST"}
    log_message = lambda self, *args: None  # the server prints its own line per request
    cors = None  # the other web origin a request came from, when allowed

    def handle(self):  # a connection past --max_connections is answered 503 at once, unread
        if not self.server.slots.acquire(blocking=False):
            error = json.dumps(APIError(503, "too many connections", kind="server_error").body).encode()
            return self.wfile.write(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                    b"\r\n%s" % error)
        try:
            super().handle()
        finally:
            self.server.slots.release()

    def _start(self, status, content_type, length=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        if self.cors:
            self.send_header("Access-Control-Allow-Origin", self.cors)
            self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.end_headers()

    def _send(self, status, obj, content_type="application/json", log=""):
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self._start(status, content_type, len(data))
        self.wfile.write(data)
        print(f"{self.command} {self.path} {status}{log}", flush=True)

    def do_GET(self):
        try:
            try:
                self._route(self.path.split("?")[0], self.server)
            except APIError as e:
                self._send(e.status, e.body)
        except OSError as e:  # a failed write or read: the client left, or was too slow (--timeout)
            print(f"{self.command} {self.path} client gone ({type(e).__name__})", flush=True)

    do_POST = do_OPTIONS = do_GET

    def _route(self, path, srv):
        host, origin = self.headers.get("Host", ""), self.headers.get("Origin")
        if srv.loopback and re.sub(r":\d+$", "", host) not in ("", "localhost", "127.0.0.1", "[::1]", srv.config.host):
            raise APIError(403, f"this server answers to localhost, not to Host {host!r}", code="host_not_allowed")
        other = origin if origin and origin != f"http://{host}" else None  # a page of another site
        if other and not {"*", other} & srv.origins:
            raise APIError(403, f"pages of {origin} may not call this server (--allow_origin)", code="bad_origin")
        self.cors = other
        if self.command == "OPTIONS":  # a browser's preflight for an allowed origin
            return self._send(204, b"", "text/plain")
        if path not in self.ROUTES:
            raise APIError(404, f"no route {self.command} {path}", code="not_found")
        if self.ROUTES[path] != self.command:
            raise APIError(405, f"{path} takes {self.ROUTES[path]}, not {self.command}", code="method_not_allowed")
        scheme, _, sent = self.headers.get("Authorization", "").partition(" ")
        sent = sent.strip() if scheme.lower() == "bearer" else ""  # the scheme is case-insensitive
        if srv.config.api_key and path != "/" and not hmac.compare_digest(sent.encode(), srv.config.api_key.encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key")
        if path == "/":
            with open(PAGE, "rb") as f:
                self._send(200, f.read(), "text/html; charset=utf-8")
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "chimera"}]})
        else:
            self._complete(srv)

    def _complete(self, srv):
        t0 = time.time()
        size = self.headers.get("Content-Length", "0")
        if not size.isdigit() or int(size) > srv.max_body:  # before anything is read
            raise APIError(413 if size.isdigit() else 400, f"Content-Length must be 0 to {srv.max_body}",
                           code="request_too_large")
        try:
            body = json.loads(self.rfile.read(int(size)) or b"null")
        except (ValueError, RecursionError):
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        req, stream, include_usage = parse_request(body, srv.config, srv.sched)
        if body.get("model") not in (None, srv.model_name, srv.model_name.split("/")[0]):  # OpenAI's answer
            raise APIError(404, f"The model `{body['model']}` does not exist", code="model_not_found")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(t0), "model": srv.model_name}
        chunk = dict(head, object="chat.completion.chunk")
        event = lambda obj: (self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n"), self.wfile.flush())
        delta = lambda i, d, f: event(dict(chunk, choices=[{"index": i, "delta": d, "finish_reason": f}]))
        if stream:
            self._start(200, "text/event-stream")
            for i in range(req.n):
                delta(i, {"role": "assistant", "content": ""}, None)
        on_delta = lambda i, text, f: stream and f != "error" and delta(i, {"content": text} if text else {}, f)
        finishes = srv.sched.wait(srv.sched.submit(req), on_delta)
        dt, given, done = time.time() - t0, len(req.prompt), req.completion_tokens
        log = f" {given} prompt + {done} completion tokens in {dt:.2f}s ({done / dt:.1f} tokens/s)"
        usage = {"prompt_tokens": given, "completion_tokens": done, "total_tokens": given + done}
        failed = APIError(500, "the model failed while decoding (see the server's log)", kind="server_error")
        if stream:  # headers are sent: a failure is an error event (OpenAI's), never a finish_reason
            if "error" in finishes or include_usage:
                event(failed.body if "error" in finishes else dict(chunk, choices=[], usage=usage))
            self.wfile.write(b"data: [DONE]\n\n")
            print(f"{self.command} {self.path} 200{log}", flush=True)
        elif "error" in finishes:
            raise failed
        else:
            choices = [{"index": i, "message": {"role": "assistant", "content": req.texts[i]}, "logprobs": None,
                        "finish_reason": finishes[i]} for i in range(req.n)]
            self._send(200, dict(head, object="chat.completion", usage=usage, choices=choices), log=log)

def make_server(sched, name, config):
    server = ThreadingHTTPServer((config.host, config.port), type("Handler", (Handler,), {"timeout": config.timeout}))
    vars(server).update(sched=sched, model_name=name, config=config, created=int(time.time()),
                        loopback=ipaddress.ip_address(server.server_address[0]).is_loopback,
                        origins={o.strip().rstrip("/") for o in config.allow_origin.split(",")},
                        slots=threading.BoundedSemaphore(config.max_connections),
                        max_body=32 * sched.engine.max_len + 65536)  # bytes: what a full context can be, and room
    server.handle_error = lambda request, address: print(f"{address}: {sys.exc_info()[1]!r}", file=sys.stderr)
    if not (server.loopback or config.api_key):
        print(f"warning: {config.host} is reachable beyond this machine and no API key is set", file=sys.stderr)
    return server

def api_key(config):  # --api_key, else the first line of --api_key_file, else $CHIMERA_API_KEY; "" = none
    if config.api_key or not config.api_key_file:
        return config.api_key or os.environ.get("CHIMERA_API_KEY", "")
    with suppress(OSError, ValueError), open(config.api_key_file, encoding="utf-8") as f:
        if key := f.readline().strip():
            return key
    raise UserError(f"--api_key_file={config.api_key_file}: no key on its first line (a missing or unreadable file?)")

def main():
    config = parse_config(Config, aliases=dict(i="source", g="model_tag", s="step", t="temperature", k="top_k",
                                               p="prompt"))
    check_settings(config, at_least_1=("max_batch", "max_tokens", "max_connections"), positive=("timeout",),
                   not_negative=("temperature", "top_k", "port"), at_most={"port": 65535, "max_batch": 1024})
    shown = dict(asdict(config), api_key="***" if config.api_key else "")  # the key never reaches a log
    print(", ".join(f"{k}={v}" for k, v in shown.items() if v not in (None, "")), file=sys.stderr)
    config.api_key = api_key(config)
    device = init_dist(config.device_type).device
    model, tokenizer, meta = load_model(config.source, device, "eval", config.model_tag, config.step)
    name = f"{config.source}/{os.path.basename(checkpoint_dir_for(config.source, config.model_tag))}"
    try:
        sched = Scheduler(model, tokenizer, config.max_batch)
    except (RuntimeError, MemoryError) as e:  # torch's out of memory is a RuntimeError
        raise UserError(f"--max_batch={config.max_batch}: no memory for its KV cache ({str(e)[:200]})") from None
    try:
        if not config.serve:
            return chat_cli(sched, config)
        try:  # the config's temperature, top_k, seed and max_tokens are the requests' defaults
            server = make_server(sched, name, config)
        except OSError as e:
            raise UserError(f"--host={config.host} --port={config.port}: cannot listen there ({e.strerror})") from None
        url = f"http://{config.host}:{server.server_port}"
        print(f"serving {name} (step {meta.get('step')}) at {url}/ (OpenAI API: {url}/v1)", flush=True)
        server.serve_forever()
    finally:
        sched.close()  # the decoding thread ends before the interpreter does

if __name__ == "__main__":
    run_main(main)
