"""chat.py: the terminal chat, the OpenAI-compatible server, concurrency and the page."""

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

import chat
import openrouter
from common import UserError, parse_config
from conftest import free_port, make_tiny_base, run_python
from checkpoint import load_model
import engine
from engine import Engine

KEY = "test-key-123"


class Served:
    def __init__(self, base):
        self.model, self.tok, _ = load_model("base", "cpu", "eval", base_dir=base)
        self.sched = chat.Scheduler(self.model, self.tok, max_batch=8)
        self.submitted = []
        submit = self.sched.submit
        self.sched.submit = lambda req: self.submitted.append(req) or submit(req)
        self.servers = [self.server(api_key=k) for k in ("", KEY)]
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.url, self.key_url = (f"http://127.0.0.1:{s.server_port}" for s in self.servers)

    def server(self, **settings):  # greedy replies of 24 tokens unless asked otherwise
        config = chat.Config(temperature=0.0, top_k=0, max_tokens=24, port=free_port(), **settings)
        return chat.make_server(self.sched, "base/d2", config)

    def post(self, body, url=None, **kw):
        return requests.post((url or self.url) + "/v1/chat/completions", json=body, timeout=60, **kw)

    def engine_text(self, messages, max_tokens=24):
        prompt = prompt_ids(self.tok, messages)
        seqs, _ = Engine(self.model, self.tok).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
        return self.tok.decode(seqs[0][len(prompt):])

    def close(self):
        for server in self.servers:
            server.shutdown()
            server.server_close()
        self.sched.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = make_tiny_base(tmp_path_factory.mktemp("chat") / "base", sequence_len=1024)
    s = Served(base)
    yield s
    s.close()


def prompt_ids(tok, messages):
    return tok.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})


def user(text):
    return [{"role": "user", "content": text}]


def sse_events(response):
    lines = [l for l in response.text.split("\n\n") if l]
    assert all(l.startswith("data: ") for l in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(l[6:]) for l in lines[:-1]]


# -----------------------------------------------------------------------------
# Terminal chat


def test_prompt_answers_once_through_a_tiny_model(tmp_path):
    base = make_tiny_base(tmp_path / "base")
    proc = run_python(["chat.py", "-i", "base", "-g", "d2", "-s", "0", "-k", "5", "-t", "0", "-p", "What is a stop?",
                       "--max_tokens=12"],
                      env={"NANOCHAT_BASE_DIR": base, "PYTHONIOENCODING": "utf-8"})
    model, tok, _ = load_model("base", "cpu", "eval", base_dir=base)
    prompt = prompt_ids(tok, user("What is a stop?"))
    seqs, _ = Engine(model, tok).generate_batch(prompt, max_tokens=12, temperature=0.0)
    expected = tok.decode(seqs[0][len(prompt):])
    assert expected and proc.stdout == expected + "\n"


def test_history_is_rendered_as_nanochat_renders_a_conversation(served):
    tok, sp = served.tok, served.tok.encode_special
    c = chat.Config(system="Be brief.", temperature=0.0, max_tokens=6)
    lines, n0 = iter(["hi", "how are you", "clear", "again", "quit"]), len(served.submitted)
    chat.chat_cli(served.sched, c, read=lambda _: next(lines), out=io.StringIO())
    prompts = [r.prompt for r in served.submitted[n0:]]
    reply = served.engine_text([{"role": "system", "content": "Be brief."}] + user("hi"), max_tokens=6)
    U, E, A, AE = (sp(f"<|{t}|>") for t in ("user_start", "user_end", "assistant_start", "assistant_end"))
    bos = tok.get_bos_token_id()
    assert prompts[0] == [bos, U] + tok.encode("Be brief.\n\nhi") + [E, A]
    assert prompts[1] == prompts[0] + tok.encode(reply) + [AE, U] + tok.encode("how are you") + [E, A]
    assert prompts[2] == [bos, U] + tok.encode("Be brief.\n\nagain") + [E, A]  # `clear` started over
    assert len(prompts) == 3


def test_persona_system_message_and_a_prompt_past_the_context(served):
    """data/persona.md's system message (about 1,100 bytes) opens the conversation; on the
    1,024-token byte-level model that is too long, which -p reports as an error."""
    system = openrouter.load_persona(openrouter.PERSONA_PATH)["system"]
    expected = len(prompt_ids(served.tok, [{"role": "system", "content": system}] + user("hi")))
    with pytest.raises(UserError, match=f"conversation is {expected} tokens; the model's context is 1024"):
        chat.chat_cli(served.sched, chat.Config(prompt="hi", persona=True), out=io.StringIO())
    out = io.StringIO()  # the terminal chat says so and goes on
    chat.chat_cli(served.sched, chat.Config(persona=True), read=lambda _, lines=iter(["hi", "quit"]): next(lines), out=out)
    assert f"conversation is {expected} tokens" in out.getvalue()


# -----------------------------------------------------------------------------
# The server


def test_reply_and_stream_parse_as_openai_and_greedy_equals_the_engine(served):
    messages = [{"role": "system", "content": "You trade."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Size my stop?"}]
    expected = served.engine_text(messages)
    r = served.post({"model": "base/d2", "messages": messages, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "base/d2" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected} and choice["finish_reason"] == "length"
    prompt_len = len(prompt_ids(served.tok, messages))
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 24, "total_tokens": prompt_len + 24}

    r = served.post({"messages": messages, "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["Content-Type"] == "text/event-stream"
    events = sse_events(r)
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [e["choices"][0] for e in events if e["choices"]]
    assert len(deltas) > 3 and "".join(d["delta"].get("content", "") for d in deltas) == expected
    assert [d["finish_reason"] for d in deltas][-1] == "length" and events[-1]["usage"] == body["usage"]


def test_n_seed_and_top_p(served):
    r = served.post({"messages": user("hi"), "n": 2, "temperature": 0}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert r["choices"][0]["message"] == r["choices"][1]["message"] and r["usage"]["completion_tokens"] == 48
    sampled = [served.post({"messages": user("hi"), "n": 2, "temperature": 1.0, "top_p": 0.9, "seed": 7}).json()
               for _ in range(2)]
    assert sampled[0]["choices"] == sampled[1]["choices"]  # the seed makes a request reproducible
    greedy = served.post({"messages": user("hi"), "top_p": 0.0, "temperature": 1.0}).json()
    assert greedy["choices"][0]["message"] == r["choices"][0]["message"]  # top_p 0: only the top token


def test_stop_strings_end_the_reply_before_them(served):
    full = served.engine_text(user("tell me"), max_tokens=24)
    stop = full[5:7]
    for stream in (False, True):
        r = served.post({"messages": user("tell me"), "stop": [stop, "never-appears"], "stream": stream})
        if stream:
            choices = [e["choices"][0] for e in sse_events(r)]
            text, finish = "".join(c["delta"].get("content", "") for c in choices), choices[-1]["finish_reason"]
        else:
            text, finish = r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]
        assert text == full[:full.find(stop)] and finish == "stop"


def test_the_calculator_tool_runs_and_its_result_is_forced_back(served, monkeypatch):
    sp = served.tok.encode_special
    script = [sp("<|python_start|>")] + served.tok.encode("12*3") + [sp("<|python_end|>"), sp("<|assistant_end|>")]
    scripted = lambda logits, sampling, rng: torch.tensor([script.pop(0) if script else sp("<|assistant_end|>")])
    monkeypatch.setattr(engine, "sample", scripted)  # the model "writes" a tool call (its result is forced, not drawn)
    r = served.post({"messages": user("What is 12*3?")}).json()
    assert r["choices"][0]["message"]["content"] == "<|python_start|>12*3<|python_end|><|output_start|>36<|output_end|>"
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 11 and not script


def test_a_model_failing_while_decoding_is_an_openai_error_not_a_finish_reason(served, monkeypatch, capsys):
    def fail(*args):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(engine, "sample", fail)  # a row that cannot be sampled: an error event
    r = served.post({"messages": user("hi")})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    events = sse_events(served.post({"messages": user("hi"), "stream": True, "n": 2}))
    assert events[-1]["error"]["type"] == "server_error"
    assert all(c["finish_reason"] is None for e in events[:-1] for c in e["choices"])
    with pytest.raises(UserError, match="failed while decoding"):  # -p exits 2, not 0
        chat.chat_cli(served.sched, chat.Config(prompt="hi"), out=io.StringIO())
    assert "could not be sampled" in capsys.readouterr().err
    monkeypatch.setattr(served.sched.engine, "_forward", fail)  # a failing prefill ends its request too
    assert served.post({"messages": user("hi"), "n": 2}).status_code == 500
    assert "RuntimeError: out of memory" in capsys.readouterr().err


@pytest.mark.parametrize("body, param", [
    (b"{not json", None), ({"messages": user("hi"), "temperature": "hot"}, "temperature"),
    ({"messages": user("hi"), "n": 0}, "n"), ({"messages": user("hi"), "n": 9}, "n"),
    ({"messages": user("hi"), "max_tokens": -1}, "max_tokens"), ({"messages": user("hi"), "top_k": 1.5}, "top_k"),
    ({"messages": user("hi"), "stop": 3}, "stop"), ({"messages": user("hi"), "seed": "x"}, "seed"),
    ({"messages": user("hi"), "seed": 1 << 64}, "seed"),
    ({"messages": user("hi"), "stream": "yes"}, "stream"), ({"temperature": 0}, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"), ([1, 2], None),
])
def test_bad_requests_are_400_with_an_openai_error(served, body, param):
    data = body if isinstance(body, bytes) else json.dumps(body)
    r = requests.post(served.url + "/v1/chat/completions", data=data, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert param is None or param in error["message"]


def test_error_statuses(served):
    r = served.post({"messages": user("x" * 1100)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = requests.get(served.url + "/v2/nothing", timeout=30)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = requests.get(served.url + "/v1/chat/completions", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert requests.post(served.url + "/v1/models", timeout=30).status_code == 405
    assert served.post({"messages": user("hi")}, url=served.key_url).status_code == 401
    wrong = served.post({"messages": user("hi")}, url=served.key_url, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(served.key_url + "/v1/models", timeout=30).status_code == 401
    assert served.post({"messages": user("hi")}, url=served.key_url, headers={"Authorization": f"Bearer {KEY}"}).ok


def raw_request(port, head, body=b"", half_close=False):
    """A request sent by hand; the raw reply (b"" if the server closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head.encode() + body)
        if half_close:  # as `nc -N` does: done sending, still reading
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply


def post_head(length, extra=""):
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {length}\r\n\r\n")


def test_a_tiny_temperature_is_greedy_and_a_failing_row_ends_only_its_request(served, monkeypatch):
    greedy = served.engine_text(user("hi"))
    r = served.post({"messages": user("hi"), "temperature": 1e-300})  # softcap(logits) / 1e-300 was NaN
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == greedy
    out = io.StringIO()  # `--temperature 1e-300` at start: the defaults of every request
    chat.chat_cli(served.sched, chat.Config(prompt="hi", temperature=1e-300, max_tokens=24), out=out)
    assert out.getvalue() == greedy + "\n"

    sample, forward, live_at_failure = engine.sample, served.sched.engine._forward, []

    def sample_failing_at_1_5(logits, sampling, rng):  # one request's row cannot be sampled
        if sampling.temperature == 1.5:
            live_at_failure.append(sum(1 for row in served.sched.engine.rows if row))
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return sample(logits, sampling, rng)

    def slow_forward(ids, cache):  # and another's prefill fails
        if len(ids[0]) > 1 and "BREAK" in served.tok.decode(ids[0]):
            raise RuntimeError("out of memory")
        return (time.sleep(0.02), forward(ids, cache))[1]

    monkeypatch.setattr(engine, "sample", sample_failing_at_1_5)
    monkeypatch.setattr(served.sched.engine, "_forward", slow_forward)
    long = {"messages": user("a long answer"), "max_tokens": 60, "temperature": 0}
    expected = served.engine_text(user("a long answer"), max_tokens=60)
    with requests.post(served.url + "/v1/chat/completions", json=dict(long, stream=True), stream=True, timeout=60) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l)  # the long reply is under way
        assert served.post({"messages": user("hot"), "temperature": 1.5, "n": 2}).status_code == 500
        assert served.post({"messages": user("BREAK")}).status_code == 500
        events = [json.loads(l[6:]) for l in lines if l and l != b"data: [DONE]"]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == expected and events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert live_at_failure and live_at_failure[0] == 3  # it failed beside the long reply's row, which went on


def test_timeouts_and_caps_on_connections_and_bodies(served):
    server = served.server(timeout=1, max_connections=3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_port
    try:
        t0 = time.time()
        silent = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(3)]
        time.sleep(0.3)
        reply = raw_request(port, post_head(2), b"{}")  # a fourth: refused at once
        assert reply.startswith(b"HTTP/1.0 503") and b"too many connections" in reply
        assert all(sock.recv(1) == b"" for sock in silent)  # closed after the 1 s timeout
        assert 0.9 < time.time() - t0 < 5
        for sock in silent:
            sock.close()
        t0 = time.time()  # a body that never comes: the connection ends after the timeout
        assert raw_request(port, post_head(100), b'{"messages": ') == b"" and time.time() - t0 < 5
        reply = raw_request(port, post_head(10 ** 12), b'{"messages": []}')  # refused before reading a byte
        assert reply.startswith(b"HTTP/1.0 413") and b"request_too_large" in reply
        assert raw_request(port, post_head(-5), b"{}").startswith(b"HTTP/1.0 400")
        body = json.dumps({"messages": user("hi"), "max_tokens": 2}).encode()
        assert raw_request(port, post_head(len(body)), body).startswith(b"HTTP/1.0 200")  # and all is well
    finally:
        server.shutdown()
        server.server_close()


def test_a_client_that_half_closes_gets_its_reply(served):
    body = json.dumps({"messages": user("hi"), "max_tokens": 5}).encode()
    reply = raw_request(served.servers[0].server_port, post_head(len(body)), body, half_close=True)
    assert reply.startswith(b"HTTP/1.0 200") and json.loads(reply.split(b"\r\n\r\n", 1)[1])["usage"]


def test_pages_of_other_origins_and_foreign_hosts_are_refused(served, monkeypatch, capsys):
    port, n0 = served.servers[0].server_port, len(served.submitted)
    evil = served.post({"messages": user("hi")}, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "bad_origin"
    rebound = requests.get(served.url + "/v1/models", headers={"Host": f"evil.example:{port}"}, timeout=30)
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    assert len(served.submitted) == n0  # nothing was generated for them
    assert served.post({"messages": user("hi")}, headers={"Origin": f"http://127.0.0.1:{port}"}).ok  # the page's own
    assert served.post({"messages": user("hi")}, headers={"Host": f"localhost:{port}"}).ok

    for allowed, origin in (("http://a.example, http://b.example", "http://b.example"), ("*", "http://c.example")):
        server = served.server(allow_origin=allowed)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
        try:
            r = requests.post(url, json={"messages": user("hi")}, headers={"Origin": origin}, timeout=30)
            assert r.ok and r.headers["Access-Control-Allow-Origin"] == origin
            preflight = requests.options(url, headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
            assert preflight.status_code == 204 and preflight.headers["Access-Control-Allow-Origin"] == origin
            other = requests.post(url, json={"messages": user("hi")}, headers={"Origin": "http://d.example"})
            assert other.status_code == (200 if allowed == "*" else 403)
        finally:
            server.shutdown()
            server.server_close()

    capsys.readouterr()
    for key in ("", KEY):  # beyond loopback without a key: one line of warning
        served.server(host="0.0.0.0", api_key=key).server_close()
        err = capsys.readouterr().err
        assert (err.count("warning") == 1 and "no API key" in err) if not key else err == ""


def test_the_key_comes_from_the_flag_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIMERA_API_KEY", "from-env")
    (tmp_path / "key").write_text("from-file\nnot this line\n")
    assert chat.api_key(chat.Config()) == "from-env"
    assert chat.api_key(chat.Config(api_key_file=str(tmp_path / "key"))) == "from-file"
    assert chat.api_key(chat.Config(api_key="flag", api_key_file=str(tmp_path / "key"))) == "flag"
    for bad in ("missing", "empty"):
        (tmp_path / "empty").write_text("\n")
        with pytest.raises(UserError, match=f"--api_key_file=.*{bad}: no key"):
            chat.api_key(chat.Config(api_key_file=str(tmp_path / bad)))
    monkeypatch.delenv("CHIMERA_API_KEY")
    assert chat.api_key(chat.Config()) == ""


def test_one_line_answers_instead_of_tracebacks(served, monkeypatch, capsys):
    r = requests.post(served.url + "/v1/chat/completions", data="[" * 20000, timeout=30)  # RecursionError
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    headers = {"Authorization": f"bearer {KEY}"}  # the scheme is case-insensitive
    assert served.post({"messages": user("hi"), "max_tokens": 2}, url=served.key_url, headers=headers).ok

    def slow_refusal(*args):
        time.sleep(0.5)
        raise chat.APIError(400, "too late")
    monkeypatch.setattr(chat, "parse_request", slow_refusal)
    capsys.readouterr()
    with socket.create_connection(("127.0.0.1", served.servers[0].server_port)) as sock:  # leaves before the reply
        sock.sendall(post_head(2).encode() + b"{}")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # closes with a reset
    time.sleep(1.5)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "client gone" in captured.out

    for argv, message in ((["--port", "99999"], "--port=99999: must be at most 65535"),
                          (["--max_batch", "1000000"], "--max_batch=1000000: must be at most 1024")):
        monkeypatch.setattr(sys, "argv", ["chat.py", "--serve"] + argv)
        with pytest.raises(UserError, match=message):
            chat.main()


def test_unknown_models_are_404_and_nanochat_flags_and_help(served):
    r = served.post({"messages": user("hi"), "model": "gpt-4o"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert all(served.post({"messages": user("hi"), "model": m, "max_tokens": 2}).ok for m in ("base/d2", "base"))
    config = parse_config(chat.Config, ["--seed", "7", "-t", "1e-300"], aliases={"t": "temperature"})
    req, *_ = chat.parse_request({"messages": user("hi")}, config, served.sched)
    assert req.sampling.seed == 7 and req.sampling.temperature == 1e-300  # the requests' default: greedy (engine)
    helped = run_python(["chat.py", "--help"])
    assert all(x in helped.stdout for x in ("-g", "-s", "-t", "-k", "--seed", "NANOCHAT_BASE_DIR", "CHIMERA_API_KEY"))


def test_gen_client_gets_answers(served, monkeypatch):
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    monkeypatch.setenv("OPENROUTER_BASE_URL", served.key_url + "/v1")
    monkeypatch.setenv("OPENROUTER_MODELS", "base/d2")
    client = openrouter.client_from_env(retries=0)
    assert client.choose_model() == "base/d2"
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}
    # gen's client wants JSON; a tiny random model answers text, which it rejects after a full exchange
    with pytest.raises(openrouter.BadAnswer, match="not valid JSON"):
        client.chat(user("hi"), "answer", schema, temperature=0.0, max_tokens=8)
    usage = client.spend.models["base/d2"]
    assert usage["requests"] == 1 and usage["completion_tokens"] == 8 and usage["prompt_tokens"] > 0


def test_eight_concurrent_requests_match_their_solo_replies_and_models_stays_responsive(served):
    prompts = [f"question number {i}" + "?" * i for i in range(8)]
    body = lambda p: {"messages": user(p), "max_tokens": 200}
    alone = [served.post(body(p)).json()["choices"][0]["message"]["content"] for p in prompts]
    together, finished = [None] * 8, []

    def ask(i):
        together[i] = served.post(body(prompts[i])).json()["choices"][0]["message"]["content"]
        finished.append(time.time())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    while not any(s for s in served.sched.engine.rows):
        time.sleep(0.005)
    assert requests.get(served.url + "/v1/models", timeout=30).json()["data"][0]["id"] == "base/d2"
    answered, busy = time.time(), sum(1 for s in served.sched.engine.rows if s)
    for t in threads:
        t.join()
    assert together == alone and busy >= 1 and answered < max(finished)


def test_a_client_that_disconnects_frees_its_rows(tmp_path):
    served = Served(make_tiny_base(tmp_path / "base", sequence_len=1024))
    with torch.no_grad():  # no special token can win: a reply runs to max_tokens
        served.model.lm_head.weight[256:] = 0.0
    try:
        disconnect_midway(served)
    finally:
        served.close()


def disconnect_midway(served):
    port = served.servers[0].server_port
    assert served.post({"messages": user("go on"), "max_tokens": 1000}).json()["usage"]["completion_tokens"] == 1000
    body = json.dumps({"messages": user("go on"), "max_tokens": 1000, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        received = b""
        while b"data: " not in received:
            received += sock.recv(4096)
    while len(served.submitted) < 2:  # the role chunk goes out before the request reaches the scheduler
        time.sleep(0.01)
    req = served.submitted[-1]
    deadline = time.time() + 30
    while not (req.cancelled and not any(served.sched.engine.rows)) and time.time() < deadline:
        time.sleep(0.01)
    assert not any(served.sched.engine.rows) and req.cancelled and req.completion_tokens < 1000


def test_2026_generation_decodes_together_as_the_engine_alone(tmp_path):
    served = Served(make_tiny_base(tmp_path / "base", sequence_len=256, generation=2026))
    try:
        prompts = ["a", "a longer question?", "mid"]
        expected = [served.engine_text(user(p), max_tokens=40) for p in prompts]
        got = [None] * 3

        def ask(i):
            got[i] = [c["message"]["content"] for c in served.post({"messages": user(prompts[i]), "max_tokens": 40,
                                                                    "n": 2}).json()["choices"]]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [[e, e] for e in expected]
    finally:
        served.close()


# -----------------------------------------------------------------------------
# The page in a real headless browser, driven over the DevTools protocol on a pipe


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class DevTools:
    """Chrome DevTools protocol over --remote-debugging-pipe: JSON messages ending in NUL
    on fd 3 (commands) and fd 4 (replies and events)."""

    def __init__(self, browser, profile):
        cmd_r, self.cmd_w = os.pipe()
        self.out_r, out_w = os.pipe()
        script = (f"exec {browser} --headless --no-sandbox --disable-gpu --user-data-dir={profile} "
                  f"--remote-debugging-pipe 3<&{cmd_r} 4>&{out_w}")
        self.proc = subprocess.Popen(["bash", "-c", script], pass_fds=(cmd_r, out_w), stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self.next_id, self.buf, self.session = 0, b"", None

    def call(self, method, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                chunk = os.read(self.out_r, 1 << 16)
                assert chunk, "the browser closed its pipe"
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]

    def js(self, expression):
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return reply["result"].get("value")

    def close(self):
        self.proc.kill()
        self.proc.wait()
        os.close(self.cmd_w)
        os.close(self.out_r)


@pytest.mark.skipif(BROWSER is None, reason="no chromium installed")
def test_the_page_streams_a_reply_in_a_headless_browser(served, tmp_path):
    browser, forward = DevTools(BROWSER, tmp_path / "profile"), served.sched.engine._forward
    served.sched.engine._forward = lambda ids, cache: (time.sleep(0.02), forward(ids, cache))[1]  # slow enough to watch
    try:
        target = browser.call("Target.createTarget", url=served.url + "/")["targetId"]
        browser.session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        deadline = time.time() + 30
        while browser.js("document.readyState + !!document.getElementById('send')") != "completetrue":
            assert time.time() < deadline
            time.sleep(0.05)
        # count the reply's visible changes: a streamed reply grows in several steps
        browser.js("window.changes = 0; new MutationObserver(() => window.changes++)"
                   ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})")
        browser.js("document.getElementById('input').focus()")
        browser.call("Input.insertText", text="Hello there")
        browser.call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13)
        while browser.js("document.getElementById('send').disabled || !document.querySelector('.assistant')"):
            assert time.time() < deadline
            time.sleep(0.05)
        reply = browser.js("document.querySelector('.assistant').textContent")
        assert browser.js("document.querySelector('.user').textContent") == "Hello there"
        assert reply and reply == served.engine_text(user("Hello there"))
        assert browser.js("window.changes") > 3
        browser.js("document.getElementById('new').click()")
        assert browser.js("document.getElementById('log').children.length") == 0
    finally:
        served.sched.engine._forward = forward
        browser.close()


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="no node installed")
def test_the_page_shows_the_message_of_an_error_event(served, monkeypatch):
    """The page's script in node, on a stub document, against the server: a failure mid-stream shows its message."""
    def fail(*args):
        raise RuntimeError("nan")
    monkeypatch.setattr(engine, "sample", fail)
    script = open(chat.PAGE, encoding="utf-8").read().split("<script>")[1].split("</script>")[0]
    stub = ("const els = {}, el = () => ({value: '', children: [], appendChild(c) { this.children.push(c); return c; },"
            " focus() {}}); globalThis.document = {getElementById: id => els[id] ??= el(), createElement: el};"
            f" const real = fetch; globalThis.fetch = (u, o) => real('{served.url}' + u, o);")
    run = "$('input').value = 'hi'; send().then(() => console.log($('log').children[1].textContent));"
    proc = subprocess.run([NODE, "-e", stub + script + run], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "error: the model failed while decoding (see the server's log)", proc.stderr
