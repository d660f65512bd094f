"""
A fake OpenRouter on 127.0.0.1 for the tests and bench/bench_gen.py: GET /models and
POST /chat/completions in OpenRouter's shape (usage.cost included), answering the JSON
schema gen.py asks for with varied made-up text, and injecting faults on demand.

    server = FakeOpenRouter(latency=0.2).start()   # server.url -> http://127.0.0.1:PORT/api/v1
    server.faults.extend(["429", "bad_json"])      # the next two chat requests fail that way
    python tests/openrouter_server.py --port 8765 --latency 0.2   # standalone
"""

import argparse
import json
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ("risk stop size entry exit plan loss gain account market trade price level volume trend range "
         "breakout retest margin leverage drawdown journal rule setup signal news earnings option future "
         "crypto spread fee tax hedge cash bond index fund sector rotation momentum value patience "
         "discipline checklist target invalidation portfolio correlation liquidity slippage volatility").split()

# fault name -> what the next chat request gets
FAULTS = ("429", "408", "500", "502", "503", "400", "401", "402", "403", "404", "timeout", "body_error",
          "empty_choices", "null_content", "bad_json", "schema", "identical", "lopsided", "duplicate",
          "echo_key",  # a hostile provider: the Authorization header back in `model`, the key inside the content
          "surrogate")  # an escaped lone surrogate ("\\ud800") inside the answer


def longer_wins(message, first, second):
    return "1" if len(first) > len(second) else "2" if len(second) > len(first) else "tie"


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
        self.retry_after = "0"
        self.judge = longer_wins  # (message, first, second) -> "1" | "2" | "tie" for judge requests
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

            def _record(self, body=None):
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})

            def do_GET(self):
                self._record()
                if not self.path.endswith("/models"):
                    return self._send(404, {"error": {"code": 404, "message": "no such route"}})
                if server.list_status != 200:
                    return self._send(server.list_status, {"error": {"code": server.list_status, "message": "down"}})
                self._send(200, {"data": [{"id": m, "name": m} for m in server.models]})

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
                if fault == "body_error":
                    return self._send(200, {"error": {"code": 502, "message": "provider returned error"}})
                if fault == "empty_choices":
                    return self._send(200, {"id": "gen-x", "model": model, "choices": [], "usage": usage})
                schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("name", "")
                if schema == "judge_verdict":
                    content = json.dumps({"winner": server.judge(*judge_parts(body))})
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
                self._send(200, {"id": f"gen-{server.counter}", "model": model, "object": "chat.completion",
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": usage})

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
