"""
A fake OpenRouter on 127.0.0.1 for the tests and bench/bench_gen.py: GET /models and
POST /chat/completions in OpenRouter's shape (usage.cost included), answering the JSON
schema gen.py asks for with varied made-up text, judging (two answers, or scores for several: onpolicy.py) by
a rule a test sets, and injecting faults on demand.

    server = FakeOpenRouter(latency=0.2).start()   # server.url -> http://127.0.0.1:PORT/api/v1
    server.faults.extend(["429", "bad_json"])      # the next two chat requests fail that way
    python tests/openrouter_server.py --port 8765 --latency 0.2   # standalone
"""

import argparse
import json
import random
import re
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ("risk stop size entry exit plan loss gain account market trade price level volume trend range "
         "breakout retest margin leverage drawdown journal rule setup signal news earnings option future "
         "crypto spread fee tax hedge cash bond index fund sector rotation momentum value patience "
         "discipline checklist target invalidation portfolio correlation liquidity slippage volatility").split()

# fault name -> what the next chat request gets
FAULTS = ("429", "408", "500", "502", "503", "400", "401", "402", "403", "404", "timeout", "body_error",
          "empty_choices", "null_content", "bad_json", "schema", "identical", "lopsided", "duplicate",
          "echo_key",  # a hostile provider: the Authorization header back in `model`, the key inside the content
          "surrogate",  # an escaped lone surrogate ("\\ud800") inside the answer
          # a hostile provider's bodies: 1 GiB (streamed), a 1 MiB gzip inflating to 1 GiB, one byte per
          # trickle_interval, an answer's content or the whole body nested 100,000 deep
          "huge", "gzip_bomb", "trickle", "deep", "deep_body")
# and "cost=X" / "tokens=X": usage.cost / prompt and completion tokens X (-5, 1e308, nan, inf)
HUGE = 1 << 30
_bomb = []


def gzip_bomb():
    """A valid one-member gzip of HUGE spaces, about 1 MiB: a 1 MiB block deflated after a full flush (which resets
    the compressor) comes out the same every time, so the middle is one segment repeated."""
    if not _bomb:
        block, deflate, crc = b" " * (1 << 20), zlib.compressobj(9, zlib.DEFLATED, 31), 0
        first = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
        segment = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
        for _ in range(HUGE // len(block)):
            crc = zlib.crc32(block, crc)
        last = deflate.flush()[:-8]  # the empty final block, less the trailer of two blocks
        _bomb.append(first + segment * (HUGE // len(block) - 1) + last + struct.pack("<II", crc, HUGE % 2**32))
    return _bomb[0]


def longer_wins(message, first, second):
    return "1" if len(first) > len(second) else "2" if len(second) > len(first) else "tie"


def by_text(message, answers):
    """A consistent judge: each answer's score (1-10) follows from its text alone, whatever the order shown."""
    return [1 + zlib.crc32(a.encode()) % 10 for a in answers]


def by_position(message, answers):
    """A judge with position bias: the first answer shown scores highest, whatever it says."""
    return list(range(10, 10 - len(answers), -1))


def scores_parts(body):
    """(message, [answers]) of a scoring request, as onpolicy.score_answers lays it out."""
    text = body["messages"][-1]["content"]
    message, *answers = re.split(r"\n\nAnswer \d+:\n", text[len("Message:\n"):text.rindex("\n\nScore each answer")])
    return message, answers


JUDGE_RE = re.compile(r"Message:\n(.*)\n\nAnswer 1:\n(.*)\n\nAnswer 2:\n(.*)\n\nWhich answer is better", re.S)


def judge_parts(body):
    """(message, first, second) of a judge request, as gen.judge_both_orders lays it out."""
    return JUDGE_RE.search(body["messages"][-1]["content"]).groups()


class FakeOpenRouter:
    def __init__(self, models=("openai/gpt-4o-mini",), latency=0.0, cost=0.001, port=0, seed=0,
                 list_status=200, missing_models=()):
        self.models, self.latency, self.cost = list(models), latency, cost
        self.list_status, self.missing_models = list_status, set(missing_models)
        self.faults, self.requests, self.lock = [], [], threading.Lock()
        self.rng, self.counter, self.last_answer = random.Random(seed), 0, None
        self.retry_after, self.trickle_interval = "0", 0.2
        self.pricing = {"prompt": "0.000001", "completion": "0.000002"}  # USD per token, as OpenRouter lists them
        self.judge = longer_wins  # (message, first, second) -> "1" | "2" | "tie" for judge requests
        self.scorer = by_text  # (message, [answers]) -> [score per answer] for scoring requests
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/api/v1"

    def start(self):
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def chat_requests(self):
        with self.lock:
            return [r for r in self.requests if r["path"].endswith("/chat/completions")]

    # -- answers ---------------------------------------------------------------------

    def _text(self, rng, n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    def _answer(self, schema_name, fault):
        with self.lock:
            self.counter += 1
            rng = random.Random(self.rng.random())
            if fault == "duplicate" and self.last_answer is not None:
                return self.last_answer
        if schema_name == "preference_pair":
            chosen = self._text(rng, 40)
            answer = {"prompt": self._text(rng, 15), "chosen": chosen, "rejected": self._text(rng, 38)}
            if fault == "identical":
                answer["rejected"] = chosen
            elif fault == "lopsided":
                answer["rejected"] = self._text(rng, 200)
        else:
            turns = rng.randint(2, 3)
            answer = {"messages": [{"role": role, "content": self._text(rng, 25)}
                                   for _ in range(turns) for role in ("user", "assistant")]}
            if fault == "schema":
                answer["messages"][0]["role"] = "narrator"
        if fault == "schema" and schema_name == "preference_pair":
            del answer["rejected"]
        text = json.dumps(answer)
        with self.lock:
            self.last_answer = text
        return text

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                # headers and body go out as two writes: without this, Nagle + delayed ACK add ~40 ms
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):
                pass

            def _send(self, status, payload, headers=None):
                body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _stream(self, chunks, length, headers=None):
                """Send a body of `length` bytes as `chunks` come, until the client hangs up."""
                self.send_response(200)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(length), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    for chunk in chunks:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except OSError:
                    pass

            def _record(self, body=None):
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})

            def do_GET(self):
                self._record()
                if not self.path.endswith("/models"):
                    return self._send(404, {"error": {"code": 404, "message": "no such route"}})
                if server.list_status != 200:
                    return self._send(server.list_status, {"error": {"code": server.list_status, "message": "down"}})
                self._send(200, {"data": [{"id": m, "name": m, "pricing": server.pricing} for m in server.models]})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError:
                    return self._send(400, {"error": {"code": 400, "message": "bad request body"}})
                self._record(body)
                with server.lock:
                    fault = server.faults.pop(0) if server.faults else None
                if server.latency:
                    time.sleep(server.latency)
                if fault == "timeout":
                    time.sleep(3.0)
                model = body.get("model")
                if model in server.missing_models or model not in server.models:
                    return self._send(404, {"error": {"code": 404, "message": f"model {model} not found"}})
                if fault in ("429", "408", "500", "502", "503", "400", "401", "402", "403", "404"):
                    code = int(fault)
                    headers = {"Retry-After": server.retry_after} if code == 429 else None
                    return self._send(code, {"error": {"code": code, "message": f"injected {fault}"}}, headers)
                usage = {"prompt_tokens": 100, "completion_tokens": 200, "total_tokens": 300, "cost": server.cost}
                if fault and fault.startswith(("cost=", "tokens=")):
                    value = float(fault.split("=")[1])
                    usage.update({"cost": value} if fault.startswith("cost") else
                                 {"prompt_tokens": value, "completion_tokens": value})
                if fault == "huge":
                    block = b" " * (1 << 20)
                    return self._stream((block for _ in range(HUGE // len(block))), HUGE)
                if fault == "gzip_bomb":
                    bomb = gzip_bomb()
                    return self._stream((bomb[i:i + 65536] for i in range(0, len(bomb), 65536)), len(bomb),
                                        {"Content-Encoding": "gzip"})
                if fault == "deep_body":
                    return self._send(200, b"[" * 100_000 + b"]" * 100_000)
                if fault == "body_error":
                    return self._send(200, {"error": {"code": 502, "message": "provider returned error"}})
                if fault == "empty_choices":
                    return self._send(200, {"id": "gen-x", "model": model, "choices": [], "usage": usage})
                schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("name", "")
                if schema == "judge_verdict":
                    content = json.dumps({"winner": server.judge(*judge_parts(body))})
                elif schema == "judge_scores":
                    content = json.dumps({"scores": server.scorer(*scores_parts(body))})
                else:
                    content = None if fault == "null_content" else server._answer(schema, fault)
                if fault == "bad_json":
                    content = content[: len(content) // 2]
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                if fault == "echo_key" and key:  # the key plain in a message and \u-escaped (JSON) in another
                    content = content.replace('"content": "', f'"content": "my key is {key} ', 1)
                    content = content.replace('"content": "', '"content": "\\u%04x%s ' % (ord(key[0]), key[1:]), 2)
                    model = self.headers["Authorization"]
                if fault == "surrogate":  # at the end of the answer's last string
                    content = content[:content.rindex('"')] + "\\ud800" + content[content.rindex('"'):]
                if fault == "deep":
                    content = "[" * 100_000 + "]" * 100_000
                answer = {"id": f"gen-{server.counter}", "model": model, "object": "chat.completion",
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": content}}], "usage": usage}
                if fault == "trickle":  # a whole answer, one byte at a time
                    body = json.dumps(answer).encode()
                    return self._stream((time.sleep(server.trickle_interval) or body[i:i + 1] for i in range(len(body))),
                                        len(body))
                self._send(200, answer)

        return Handler


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--models", default="openai/gpt-4o-mini")
    args = parser.parse_args()
    server = FakeOpenRouter(models=args.models.split(","), latency=args.latency, port=args.port).start()
    print(f"fake OpenRouter at {server.url}", flush=True)
    threading.Event().wait()
