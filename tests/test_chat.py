"""chat.py: the terminal chat, the OpenAI-compatible server, concurrency and the page."""

import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest
import requests
import torch

import chat
import openrouter
from common import UserError
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
        defaults = chat.Sampling(temperature=0.0, top_k=0, max_tokens=24)
        self.servers = [chat.make_server(self.sched, "base/d2", defaults, port=free_port(), api_key=k) for k in ("", KEY)]
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.url, self.key_url = (f"http://127.0.0.1:{s.server_port}" for s in self.servers)

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
    proc = run_python(["chat.py", "-i", "base", "-p", "What is a stop?", "--temperature=0", "--max_tokens=12"],
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
    monkeypatch.setattr(engine, "sample", fail)
    r = served.post({"messages": user("hi")})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    events = sse_events(served.post({"messages": user("hi"), "stream": True, "n": 2}))
    assert events[-1]["error"]["type"] == "server_error"
    assert all(c["finish_reason"] is None for e in events[:-1] for c in e["choices"])
    with pytest.raises(UserError, match="failed while decoding"):  # -p exits 2, not 0
        chat.chat_cli(served.sched, chat.Config(prompt="hi"), out=io.StringIO())
    assert "RuntimeError: out of memory" in capsys.readouterr().err
    monkeypatch.setattr(served.sched.engine, "_forward", fail)  # a failing prefill ends its request too
    assert served.post({"messages": user("hi"), "n": 2}).status_code == 500


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
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
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
