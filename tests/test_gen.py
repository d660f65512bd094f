"""gen.py against a real HTTP server on 127.0.0.1 that speaks OpenRouter and injects faults."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

import gen
import openrouter
from tasks import conversation_problem, dpo_problem
from openrouter_server import FakeOpenRouter

KEY = "sk-or-v1-TESTSECRET-0123456789abcdef"


@pytest.fixture
def server():
    s = FakeOpenRouter(cost=0.01).start()
    yield s
    s.stop()


@pytest.fixture
def run(tmp_path, monkeypatch, server, capsys):
    """run(*flags, env=None) -> (exit code, stdout, stderr) of gen.py in this process."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    monkeypatch.setenv("OPENROUTER_BASE_URL", server.url)
    monkeypatch.delenv("OPENROUTER_MODELS", raising=False)

    def _run(*flags, env=None):
        for k, v in (env or {}).items():
            if v is None:
                monkeypatch.delenv(k, raising=False)
            else:
                monkeypatch.setenv(k, v)
        monkeypatch.setattr(sys, "argv", ["gen.py", "--backoff=0.01", "--workers=2", *flags])
        code = 0
        try:
            gen.run_main(gen.main)
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


def data(tmp_path, kind="sft"):
    path = tmp_path / "datasets" / f"trader_{kind}_data.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "a partial last line"
    return [json.loads(line) for line in text.splitlines()]


def summary(tmp_path):
    return json.loads((tmp_path / "datasets" / "trader_gen_summary.json").read_text())


def test_happy_path_counts_schema_headers_and_cost(run, server, tmp_path):
    code, out, err = run("--sft-examples=6", "--dpo-examples=4")
    assert code == 0, err
    sft, dpo = data(tmp_path, "sft"), data(tmp_path, "dpo")
    assert len(sft) == 6 and len(dpo) == 4
    persona = openrouter.load_persona(openrouter.PERSONA_PATH)
    for record in sft:
        assert conversation_problem(record) is None
        assert record["messages"][0] == {"role": "system", "content": persona["system"]}
        assert sum(m["role"] == "user" for m in record["messages"]) >= 2  # multi-turn
    for record in dpo:
        assert set(record) == {"prompt", "chosen", "rejected", "failure"} and dpo_problem(record) is None
    requests = server.chat_requests()
    assert len(requests) == 10
    headers = requests[0]["headers"]
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["HTTP-Referer"] and headers["X-Title"] == "Chimera"
    body = requests[0]["body"]
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"] == gen.SFT_SCHEMA
    assert body["model"] == "openai/gpt-4o-mini"
    assert "provider" not in body  # OpenRouter-only routing field is not sent to other servers
    s = summary(tmp_path)
    assert s["kinds"]["sft"]["records"] == 6 and s["kinds"]["dpo"]["records"] == 4
    assert s["models"]["openai/gpt-4o-mini"]["requests"] == 10
    assert s["cost_total"] == pytest.approx(0.10)
    assert "spent $0.1000" in out
    section = (tmp_path / "report" / "chimera-synthetic-data.md").read_text()
    assert "- SFT conversations: 6" in section and "- DPO pairs: 4" in section


@pytest.mark.parametrize("fault", ["429", "408", "500", "502", "503", "timeout"])
def test_transient_http_faults_are_retried(run, server, tmp_path, fault):
    server.faults.extend([fault] * (1 if fault == "timeout" else 2))
    code, _, err = run("--sft-examples=2", "--dpo-examples=0", "--workers=1", "--timeout=1")
    assert code == 0, err
    assert len(data(tmp_path)) == 2
    assert summary(tmp_path)["kinds"]["sft"]["this_run"]["failed"] == 0


def test_retry_after_is_honoured(run, server, tmp_path):
    server.retry_after = "1"
    server.faults.append("429")
    t0 = time.time()
    code, _, err = run("--sft-examples=1", "--dpo-examples=0", "--workers=1")
    assert code == 0, err
    assert time.time() - t0 >= 1.0  # waited what the server asked, not the 0.01 s backoff


def test_retry_after_as_an_http_date_is_honoured(run, server, tmp_path):
    import email.utils
    server.retry_after = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: 1 to 2 s from now
    server.faults.append("429")
    t0 = time.time()
    code, _, err = run("--sft-examples=1", "--dpo-examples=0", "--workers=1")
    assert code == 0, err
    assert time.time() - t0 >= 0.9


def test_transient_faults_that_never_end_fail_the_item_and_move_on(run, server, tmp_path):
    server.faults.extend(["503"] * 3)  # item 0: three tries, all 503
    code, _, err = run("--sft-examples=2", "--dpo-examples=0", "--workers=1", "--http-retries=2")
    assert code == 0, err
    assert len(data(tmp_path)) == 2
    assert summary(tmp_path)["kinds"]["sft"]["this_run"]["failed"] == 1


@pytest.mark.parametrize("fault,reason", [
    ("body_error", "error in response"), ("empty_choices", "no choices in response"),
    ("null_content", "empty content"), ("bad_json", "content is not valid JSON"), ("schema", "schema"),
])
def test_unusable_answers_retry_the_item(run, server, tmp_path, fault, reason):
    server.faults.append(fault)
    code, _, err = run("--sft-examples=2", "--dpo-examples=0", "--workers=1")
    assert code == 0, err
    s = summary(tmp_path)["kinds"]["sft"]
    assert s["records"] == 2 and s["this_run"]["failed"] == 0
    assert s["failure_reasons"] == {reason: 1}


def test_an_item_that_stays_unusable_is_counted_failed(run, server, tmp_path):
    server.faults.extend(["bad_json"] * 3)
    code, _, err = run("--sft-examples=2", "--dpo-examples=0", "--workers=1", "--item-attempts=3")
    assert code == 0, err
    s = summary(tmp_path)["kinds"]["sft"]
    assert s["records"] == 2 and s["this_run"]["failed"] == 1
    assert len(server.chat_requests()) == 5


def test_a_run_of_failures_stops_instead_of_spending_forever(run, server, tmp_path):
    server.faults.extend(["bad_json"] * 30)
    code, _, err = run("--sft-examples=3", "--dpo-examples=0", "--workers=1", "--item-attempts=1")
    assert code == 2
    assert "the last 25 sft items all failed (most common reason: content is not valid JSON)" in err
    assert len(server.chat_requests()) == 25


def test_pairs_without_preference_or_lopsided_are_not_kept(run, server, tmp_path):
    server.faults.extend(["identical", "lopsided"])
    code, _, err = run("--sft-examples=0", "--dpo-examples=2", "--workers=1")
    assert code == 0, err
    pairs = data(tmp_path, "dpo")
    assert len(pairs) == 2 and all(p["chosen"] != p["rejected"] for p in pairs)
    for p in pairs:
        short, long = sorted((len(p["chosen"]), len(p["rejected"])))
        assert long <= gen.MAX_LENGTH_RATIO * short
    s = summary(tmp_path)["kinds"]["dpo"]
    assert s["this_run"]["dropped"] == 1  # identical: dropped for good
    assert s["failure_reasons"] == {"chosen and rejected lengths differ too much": 1,
                                    '"chosen" and "rejected" are identical': 1}


def test_exact_duplicates_are_dropped(run, server, tmp_path):
    server.faults.extend([None, "duplicate"])
    code, _, err = run("--sft-examples=3", "--dpo-examples=0", "--workers=1")
    assert code == 0, err
    records = data(tmp_path)
    assert len(records) == 3 and len({json.dumps(r) for r in records}) == 3
    assert summary(tmp_path)["kinds"]["sft"]["this_run"]["duplicate"] == 1


def test_near_duplicates_are_dropped(tmp_path):
    store = openrouter.Store(str(tmp_path / "d.jsonl"), dpo_problem, threshold=0.8)
    words = [f"w{i % 37} x{i % 11}" for i in range(120)]
    base = {"prompt": "How big should my position be?", "chosen": " ".join(words), "rejected": "all in"}
    assert store.add("dpo-0-0", base) == "ok"
    near = dict(base, chosen=" ".join(words[:-1] + ["different"]))
    assert store.add("dpo-0-1", near) == "near_duplicate"
    other = dict(base, prompt="Should I average down?", chosen=" ".join(reversed(words)) + " unrelated")
    assert store.add("dpo-0-2", other) == "ok"
    again = openrouter.Store(store.path, dpo_problem, threshold=0.8)
    assert len(again.records) == 2 and again.done_ids == {"dpo-0-0", "dpo-0-1", "dpo-0-2"}


@pytest.mark.parametrize("status,words", [("401", "API key was rejected"), ("402", "out of credits"),
                                          ("403", "forbidden"), ("400", "refused")])
def test_errors_no_retry_fixes_stop_the_run_keeping_the_data(run, server, tmp_path, status, words):
    code, _, err = run("--sft-examples=2", "--dpo-examples=0", "--workers=1")
    assert code == 0, err
    server.faults.append(status)
    code, _, err = run("--sft-examples=5", "--dpo-examples=0", "--workers=1")
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"HTTP {status}" in errors[0] and words in errors[0]
    assert len(data(tmp_path)) == 2
    assert summary(tmp_path)["kinds"]["sft"]["records"] == 2


def test_model_fallback_uses_the_first_listed_model(run, server, tmp_path):
    server.models = ["vendor/model-b"]
    code, _, err = run("--sft-examples=2", "--dpo-examples=0", env={"OPENROUTER_MODELS": "vendor/model-a, vendor/model-b"})
    assert code == 0, err
    assert {r["body"]["model"] for r in server.chat_requests()} == {"vendor/model-b"}


def test_model_fallback_when_the_listing_fails(run, server, tmp_path):
    server.models, server.list_status = ["vendor/model-b"], 503
    code, out, err = run("--sft-examples=2", "--dpo-examples=0", "--workers=1",
                         "--models=vendor/model-a,vendor/model-b")
    assert code == 0, err
    assert "could not list the models" in out and "falling back to vendor/model-b" in out
    models = [r["body"]["model"] for r in server.chat_requests()]
    assert models[0] == "vendor/model-a" and set(models[1:]) == {"vendor/model-b"}
    assert len(data(tmp_path)) == 2


def test_no_listed_model_is_a_clear_error(run, server, tmp_path):
    code, _, err = run("--sft-examples=2", "--models=vendor/nope")
    assert code == 2 and "none of the models vendor/nope" in err
    assert data(tmp_path) == []


def test_missing_key_writes_nothing(run, server, tmp_path):
    code, _, err = run("--sft-examples=2", env={"OPENROUTER_API_KEY": None})
    assert code == 2 and "OPENROUTER_API_KEY" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "datasets").exists() and not server.requests


@pytest.mark.parametrize("bad", ["\u200b", "\u00a0", " ", "\x7f"])
def test_a_key_with_a_pasted_invisible_character_is_one_line_that_does_not_print_it(run, server, tmp_path, bad):
    code, out, err = run("--sft-examples=2", "--dpo-examples=0", env={"OPENROUTER_API_KEY": KEY[:10] + bad + KEY[10:]})
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not printable ASCII" in err, err
    assert KEY[12:] not in out + err and not (tmp_path / "datasets").exists() and not server.requests


def test_key_never_reaches_a_file_or_the_output(run, server, tmp_path):
    server.faults.extend(["429", "body_error", "duplicate"])
    outputs = run("--sft-examples=3", "--dpo-examples=2")
    server.faults.append("401")
    outputs += run("--sft-examples=6", "--dpo-examples=2", "--workers=1")
    assert KEY not in "".join(str(o) for o in outputs)
    for root, _, files in os.walk(tmp_path):
        for name in files:
            assert KEY.encode() not in open(os.path.join(root, name), "rb").read(), name


def test_max_cost_stops_cleanly(run, server, tmp_path):
    code, out, err = run("--sft-examples=50", "--dpo-examples=10", "--workers=2", "--max-cost=0.05")
    assert code == 0, err
    assert "stopped at --max-cost" in out
    s = summary(tmp_path)
    assert 0.05 <= s["cost_total"] <= 0.05 + 2 * 0.01 + 1e-9  # at most the requests in flight on top
    assert 5 <= len(data(tmp_path)) < 50 and data(tmp_path, "dpo") == []


def test_a_budget_already_spent_starts_no_request(run, server, tmp_path):
    code, out, err = run("--sft-examples=3", "--dpo-examples=0", "--workers=1", "--max-cost=0.02")
    assert code == 0 and "stopped at --max-cost" in out and len(data(tmp_path)) == 2, err
    served = len(server.chat_requests())
    for flags in (("--sft-examples=20", "--dpo-examples=0"), ("--sft-examples=2", "--dpo-examples=5")):
        code, out, err = run(*flags, "--workers=8", "--max-cost=0.02")  # a re-run; the SFT file done, DPO's turn
        assert code == 0 and "stopped at --max-cost" in out, err
    assert len(server.chat_requests()) == served and data(tmp_path, "dpo") == []


def test_a_usage_without_cost_is_charged_its_tokens_at_the_listed_prices(run, server, tmp_path):
    server.cost = None  # OpenAI, Together, Groq, ...: tokens, no cost; listed at $1 / $2 per million tokens
    code, out, err = run("--sft-examples=12", "--dpo-examples=0", "--workers=1", "--max-cost=0.001")
    assert code == 0 and "stopped at --max-cost" in out, err
    assert len(server.chat_requests()) == 2 and summary(tmp_path)["cost_total"] == pytest.approx(2 * 0.0005)
    server.list_status = 500  # no prices listed: the dearest model's, $15 / $75 per million
    code, out, err = run("--sft-examples=12", "--dpo-examples=0", "--workers=1", "--max-cost=0.03")
    assert code == 0 and "stopped at --max-cost" in out, err
    assert len(server.chat_requests()) == 4 and summary(tmp_path)["cost_total"] == pytest.approx(0.001 + 2 * 0.0165)


@pytest.mark.parametrize("flags,message", [
    (["--sft-examples=-3"], "--sft_examples=-3: must be >= 0"),
    (["--sft-exampels=3"], "unknown setting --sft_exampels"),
    (["--workers=0"], "--workers=0: must be at least 1"),
    (["--min-turns=5", "--max-turns=4"], "--min_turns=5: must be at most --max_turns=4"),
    (["--near-dup-threshold=0"], "--near_dup_threshold=0.0: must be > 0"),
    (["--near-dup-threshold=1.5"], "--near_dup_threshold=1.5: must be at most 1"),
    (["--timeout=0"], "--timeout=0.0: must be > 0"),
])
def test_bad_flags(run, server, tmp_path, flags, message):
    code, _, err = run(*flags)
    assert code == 2 and message in err
    assert not (tmp_path / "datasets").exists() and not server.requests


def test_bad_base_url_is_a_clear_error(run, server, tmp_path):
    code, out, err = run("--sft-examples=2", "--base-url=127.0.0.1:9/api/v1")
    assert code == 2 and "bad base URL" in err and data(tmp_path) == []


def test_unwritable_output_dir(run, server, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = run("--sft-examples=2", f"--out-dir={blocker}/sub")
    assert code == 2 and "cannot create the output directory" in err and not server.requests


def test_a_bad_line_in_existing_data_names_file_and_line(run, server, tmp_path):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "trader_sft_data.jsonl").write_text('{"messages": []}\n')
    code, _, err = run("--sft-examples=2")
    assert code == 2 and "trader_sft_data.jsonl:1:" in err and not server.chat_requests()


def test_torn_last_line_is_repaired(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')
    assert openrouter.repair_torn_line(str(path)) is False and path.read_text() == '{"a": 1}\n{"a": 2}\n'
    path.write_text('{"a": 1}\n{"a": ')
    assert openrouter.repair_torn_line(str(path)) is True and path.read_text() == '{"a": 1}\n'


def test_resume_after_kill_9(tmp_path):
    server = FakeOpenRouter(latency=0.2, cost=0.001).start()  # most of a request's time in flight
    try:
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), OPENROUTER_API_KEY=KEY,
                   OPENROUTER_BASE_URL=server.url, PYTHONPATH=gen.__file__.rsplit("/", 1)[0])
        cmd = [sys.executable, gen.__file__, "--sft-examples=40", "--dpo-examples=20", "--workers=4"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sft_path = tmp_path / "datasets" / "trader_sft_data.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and (not sft_path.exists() or len(sft_path.read_text().splitlines()) < 10):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        first_run = len(data(tmp_path))
        assert 10 <= first_run < 40
        with open(sft_path, "a") as f:  # what a kill in the middle of a write leaves behind
            f.write('{"messages": [{"role": "us')
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "cut off a torn last line" in done.stdout
        sft, dpo = data(tmp_path, "sft"), data(tmp_path, "dpo")
        assert len(sft) == 40 and len(dpo) == 20
        assert len({json.dumps(r, sort_keys=True) for r in sft}) == 40
        assert len({json.dumps(r, sort_keys=True) for r in dpo}) == 20
        # finished items were not asked for again: only the ones in flight at the kill are redone
        served = len(server.chat_requests())
        assert served <= 60 + 4
        # every request the provider served is in the summary, the ones in flight at the kill at their most
        s = summary(tmp_path)
        assert served <= s["models"]["openai/gpt-4o-mini"]["requests"] <= served + 4
        assert s["cost_total"] >= served * 0.001
        # those: opened in the ledger before they were sent, never closed, counted at their most
        ledger = [json.loads(line) for line in open(tmp_path / "datasets" / "trader_gen_spend.jsonl")]
        closed = {e.get("close") for e in ledger}
        in_flight = [e["max_cost"] for e in ledger if "open" in e and e["open"] not in closed]
        assert 1 <= len(in_flight) <= 4 and all(m > 0.001 for m in in_flight)
    finally:
        server.stop()


def test_persona_file_and_item_diversity(tmp_path):
    persona = openrouter.load_persona(openrouter.PERSONA_PATH)
    assert persona["name"] == "Chimera" and len(persona["topics"]) >= 20
    specs = [gen.item_spec(persona, "sft", i, seed=0) for i in range(300)]
    assert specs == [gen.item_spec(persona, "sft", i, seed=0) for i in range(300)]  # reproducible
    assert specs != [gen.item_spec(persona, "sft", i, seed=1) for i in range(300)]
    combos = {(s["topic"], s["user"], s["shape"], s["opening"]) for s in specs}
    assert len(combos) >= 290
    assert {s["topic"] for s in specs} == set(persona["topics"])
    broken = tmp_path / "persona.md"
    broken.write_text(open(openrouter.PERSONA_PATH).read().replace("## shapes", "## shape"))
    with pytest.raises(openrouter.UserError, match="missing section '## shapes'"):
        openrouter.load_persona(str(broken))


def test_a_provider_echoing_the_key_leaks_it_nowhere(run, server, tmp_path):
    server.faults.extend(["echo_key"] * 4)  # the key back in `model` and inside the answers (plain and \u-escaped)
    code, out, err = run("--sft-examples=2", "--dpo-examples=2", "--workers=1")
    assert code == 0, err
    assert KEY not in out + err and KEY[1:] not in out + err
    for root, _, files in os.walk(tmp_path):
        for name in files:
            text = open(os.path.join(root, name), "rb").read().decode("utf-8")
            assert KEY[1:] not in text and KEY[1:] not in json.dumps(text), name  # not even \u-escaped
    assert len(data(tmp_path)) == 2 and "***" in json.dumps(data(tmp_path))


def test_a_key_echoed_across_the_cut_of_an_error_message_leaves_none_of_it(monkeypatch):
    """An error message is cut to 300 characters (200 inside an HTTP 200 body): the key is scrubbed before the cut,
    so one straddling it leaves no prefix behind."""
    key = "sk-or-v1-" + "0123456789abcdef" * 4
    client = openrouter.OpenRouter(key, "http://127.0.0.1:9/api/v1", ["m"], retries=0)
    for status, cut, error in ((401, 300, openrouter.APIStop), (200, 200, openrouter.BadAnswer)):
        response = requests.Response()
        response.status_code, body = status, {"error": {"message": "x" * (cut - 30) + " header was: " + key}}
        response._content, response.data = json.dumps(body).encode(), body
        monkeypatch.setattr(client, "_post", lambda body: response)
        with pytest.raises(error) as e:
            client.chat([{"role": "user", "content": "hi"}], "x", {"type": "object"})
        assert "header was: ***" in str(e.value) and key[:12] not in str(e.value)


def test_a_lone_surrogate_in_an_answer_is_cleaned_not_fatal(run, server, tmp_path):
    server.faults.extend(["surrogate", None, "surrogate"])
    code, _, err = run("--sft-examples=2", "--dpo-examples=1", "--workers=1")
    assert code == 0, err
    for kind in ("sft", "dpo"):
        raw = (tmp_path / "datasets" / f"trader_{kind}_data.jsonl").read_bytes().decode("utf-8")  # strict UTF-8
        assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in json.dumps(data(tmp_path, kind), ensure_ascii=False))
        assert "\ufffd" in raw
    assert len(data(tmp_path)) == 2 and len(data(tmp_path, "dpo")) == 1


def test_a_second_gen_on_the_same_files_refuses(run, server, tmp_path):
    import fcntl
    (tmp_path / "datasets").mkdir()
    with open(tmp_path / "datasets" / "trader_gen.lock", "w") as held:  # what a running gen.py holds
        fcntl.flock(held, fcntl.LOCK_EX)
        code, _, err = run("--sft-examples=2", "--dpo-examples=0")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "another gen.py is writing to" in err
    assert not server.chat_requests() and data(tmp_path) == []
    code, _, err = run("--sft-examples=2", "--dpo-examples=0")  # released: runs
    assert code == 0 and len(data(tmp_path)) == 2, err


def gen_subprocess(tmp_path, server, *flags):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), OPENROUTER_API_KEY=KEY, OPENROUTER_BASE_URL=server.url)
    env.pop("OPENROUTER_MODELS", None)
    cmd = [sys.executable, gen.__file__, *flags]
    return cmd, env


def wait_for_records(tmp_path, n, timeout=60):
    path = tmp_path / "datasets" / "trader_sft_data.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and (not path.exists() or len(path.read_text().splitlines()) < n):
        time.sleep(0.02)


def test_ctrl_c_keeps_paid_answers_and_writes_the_summary(tmp_path):
    server = FakeOpenRouter(latency=0.3, cost=0.001).start()
    try:
        cmd, env = gen_subprocess(tmp_path, server, "--sft-examples=40", "--dpo-examples=0", "--workers=4")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_records(tmp_path, 4)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith("error: interrupted"), err
        served = len(server.chat_requests())
        assert 4 <= len(data(tmp_path)) == served < 40  # every answer paid for is in the file, nothing new started
        s = summary(tmp_path)
        assert s["models"]["openai/gpt-4o-mini"]["requests"] == served and s["kinds"]["sft"]["records"] == served
    finally:
        server.stop()


def test_a_full_disk_stops_with_one_line_keeping_whole_lines_and_the_summary(tmp_path, server):
    """A file size limit stands in for a full disk: the data file fills first (its records carry the persona)."""
    import resource
    cmd, env = gen_subprocess(tmp_path, server, "--backoff=0.01", "--sft-examples=20", "--dpo-examples=0")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # noqa: E731
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    path = tmp_path / "datasets" / "trader_sft_data.jsonl"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: stopped: cannot write {path}: ")
    assert 0 < len(data(tmp_path)) < 20 and summary(tmp_path)["kinds"]["sft"]["records"] == len(data(tmp_path))


def test_ctrl_c_ends_the_waits_to_retry_and_a_second_one_aborts_at_once(tmp_path):
    server, procs = FakeOpenRouter(cost=0.001).start(), []
    try:
        server.retry_after = "60"
        server.faults.extend(["429"] * 8)  # each worker's request: a 429 asking for a minute's wait
        cmd, env = gen_subprocess(tmp_path / "retry", server, "--sft-examples=4", "--dpo-examples=0", "--workers=2")
        procs.append(proc := subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        while len(server.chat_requests()) < 2:
            time.sleep(0.02)
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and time.time() - t0 < 10, err
        assert len(server.chat_requests()) == 2  # no retry after Ctrl-C; both items failed, for a re-run
        assert summary(tmp_path / "retry")["kinds"]["sft"]["this_run"]["failed"] == 2
        server.latency = 30.0  # now the second Ctrl-C comes while two requests are under way
        cmd, env = gen_subprocess(tmp_path / "abort", server, "--sft-examples=4", "--dpo-examples=0", "--workers=2")
        procs.append(proc := subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        while len(server.chat_requests()) < 4:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and time.time() - t0 < 5, err
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            "error: interrupted twice: aborted without the summary; re-run to continue"]
    finally:
        for proc in procs:
            proc.kill()
        server.stop()


def test_judge_pairs_failure_types_and_diversity(run, server, tmp_path):
    import itertools
    # pair by pair (chosen is Answer 1 in the first order): agrees chosen wins, agrees it loses, flips with the order
    verdicts = itertools.cycle(["1", "2", "2", "1", "1", "1"])
    server.judge = lambda message, first, second: next(verdicts)
    server.models.append("judge/model")
    code, _, err = run("--sft-examples=0", "--dpo-examples=6", "--workers=1", "--judge-pairs=1",
                       "--judge-model=judge/model")
    assert code == 0, err
    pairs = data(tmp_path, "dpo")
    run_counts = summary(tmp_path)["kinds"]["dpo"]["this_run"]
    assert len(pairs) == 6 and run_counts["new"] == 6
    assert (run_counts["judge_kept"], run_counts["judge_rejected"], run_counts["judge_no_verdict"]) == (6, 5, 5)
    requests = server.chat_requests()
    judged = [r for r in requests if r["body"]["response_format"]["json_schema"]["name"] == "judge_verdict"]
    assert {r["body"]["model"] for r in judged} == {"judge/model"}
    assert len(judged) == 2 * (len(requests) - len(judged))  # both orders of every pair
    s = summary(tmp_path)
    assert s["models"]["judge/model"]["requests"] == len(judged)
    failures = [f.split(":")[0] for f in openrouter.load_persona(openrouter.PERSONA_PATH)["failures"]]
    assert {p["failure"] for p in pairs} <= set(failures)
    stats = s["kinds"]["dpo"]["diversity"]
    assert [stats[f"failure {f}"] for f in failures] == [sum(p["failure"] == f for p in pairs) for f in failures]
    assert 0 < stats["distinct 2-grams"] <= 1 and 0 < stats["distinct 1-grams"] < stats["distinct 2-grams"]
    assert stats["near-duplicate rate (this run)"] == 0
    section = (tmp_path / "report" / "chimera-synthetic-data.md").read_text()
    assert "- DPO judge rejected (this run):" in section and "- DPO failure overconfident:" in section


def test_a_judge_that_gives_no_answer_fails_the_item_for_a_rerun(run, server, tmp_path):
    server.judge = lambda message, first, second: "1" if len(first.split()) > len(second.split()) else "2"  # chosen
    server.faults.extend([None, "503", None, "bad_json", "bad_json", "bad_json"])  # pair 0: a 503; 1: unusable x3
    flags = ("--sft-examples=0", "--judge-pairs=1", "--workers=1", "--http-retries=0")
    code, _, err = run("--dpo-examples=1", *flags)
    assert code == 0, err
    ledger = tmp_path / "datasets" / "trader_dpo_data.ledger.jsonl"
    assert [json.loads(line)["id"] for line in open(ledger)] == ["dpo-0-2"]  # no verdict had is not a final one
    run_summary = summary(tmp_path)["kinds"]["dpo"]
    assert run_summary["this_run"]["failed"] == 2 and run_summary["failure_reasons"] == {"judge failed": 2}
    code, _, err = run("--dpo-examples=3", *flags)
    assert code == 0 and len(data(tmp_path, "dpo")) == 3, err
    assert sorted(json.loads(line)["id"] for line in open(ledger)) == ["dpo-0-0", "dpo-0-1", "dpo-0-2"]


def test_a_tie_in_the_first_order_is_not_asked_in_the_second(run, server, tmp_path):
    asked = []
    def judge(message, first, second):  # a tie on the first 3 asks, then the chosen answer (40 words to 38) wins
        asked.append(first)
        return "tie" if len(asked) <= 3 else "1" if len(first.split()) > len(second.split()) else "2"
    server.judge = judge
    code, _, err = run("--sft-examples=0", "--dpo-examples=1", "--judge-pairs=1", "--workers=1")
    assert code == 0 and len(data(tmp_path, "dpo")) == 1, err
    counts = summary(tmp_path)["kinds"]["dpo"]["this_run"]
    assert (counts["judge_no_verdict"], counts["judge_kept"]) == (3, 1)
    assert len(server.chat_requests()) == 4 + 3 + 2  # 4 pairs made, a judge request for each tie, 2 for the last


def test_failure_types_go_round_evenly_and_reach_the_prompt(run, server, tmp_path):
    code, _, err = run("--sft-examples=0", "--dpo-examples=10", "--workers=1")
    assert code == 0, err
    persona = openrouter.load_persona(openrouter.PERSONA_PATH)
    names = [f.split(":")[0] for f in persona["failures"]]
    assert sorted(p["failure"] for p in data(tmp_path, "dpo")) == sorted(names * 2)
    prompts = [r["body"]["messages"][-1]["content"] for r in server.chat_requests()]
    assert all(any(f in p for f in persona["failures"]) for p in prompts)


# -----------------------------------------------------------------------------
# A hostile provider: what it sends costs an item at most, never the run

def peak_rss_mb(tmp_path, server, *flags):
    """(exit code, peak RSS in MB) of gen.py run in a process of its own (its parent measures only it)."""
    cmd, env = gen_subprocess(tmp_path, server, "--backoff=0.01", *flags)
    measure = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)")
    out = subprocess.run([sys.executable, "-c", measure, *cmd], env=env, capture_output=True, text=True, timeout=120)
    code, mb = out.stdout.split()[-2:]
    return int(code), int(mb)


def test_a_huge_or_gzip_bomb_body_is_an_unusable_answer_in_bounded_memory(tmp_path, server):
    flags = ("--sft-examples=3", "--dpo-examples=0", "--workers=2")
    code, baseline = peak_rss_mb(tmp_path / "plain", server, *flags)
    assert code == 0
    for fault in ("huge", "gzip_bomb"):  # a 1 GiB body; a 1 MiB gzip of 1 GiB, two at once
        server.faults.extend([fault, fault])
        code, mb = peak_rss_mb(tmp_path / fault, server, *flags)
        assert code == 0 and len(data(tmp_path / fault)) == 3
        assert mb < baseline + 100, f"peak RSS {mb} MB, {baseline} MB without the {fault}"
        assert summary(tmp_path / fault)["kinds"]["sft"]["failure_reasons"] == {"response body over 8 MiB": 2}


def test_a_provider_trickling_its_answer_times_out_per_request(run, server, tmp_path):
    server.faults.append("trickle")  # a byte every 0.2 s: each read is quick, the request never ends
    t0 = time.time()
    code, out, err = run("--sft-examples=3", "--dpo-examples=0", "--workers=1", "--timeout=1", "--http-retries=0")
    assert code == 0, err
    assert time.time() - t0 < 6 and len(data(tmp_path)) == 3
    assert summary(tmp_path)["kinds"]["sft"]["this_run"]["failed"] == 1  # that item, after its one try; the run went on
    server.faults.append("trickle")
    code, out, err = run("--sft-examples=4", "--dpo-examples=0", "--workers=1", "--timeout=1")
    assert code == 0 and len(data(tmp_path)) == 4 and summary(tmp_path)["kinds"]["sft"]["this_run"]["failed"] == 0


def test_deeply_nested_answers_are_retried(run, server, tmp_path):
    server.faults.extend(["deep", "deep_body"])
    code, out, err = run("--sft-examples=2", "--dpo-examples=0", "--workers=1")
    assert code == 0 and len(data(tmp_path)) == 2, err
    assert summary(tmp_path)["kinds"]["sft"]["failure_reasons"] == {"content is not valid JSON": 1,
                                                                    "response body is not a JSON object": 1}


def test_nonsense_costs_and_token_counts_count_nothing(run, server, tmp_path):
    nonsense = ["cost=-5", "cost=1e308", "cost=1e308", "cost=nan", "cost=inf", "tokens=1e308", "tokens=-3", "tokens=nan"]
    server.faults.extend(nonsense)
    code, out, err = run("--sft-examples=10", "--dpo-examples=0", "--workers=1")
    assert code == 0, err
    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the summary"))
    s = strict((tmp_path / "datasets" / "trader_gen_summary.json").read_text())
    usage = s["models"]["openai/gpt-4o-mini"]
    assert usage["requests"] == 10 and s["cost_total"] == pytest.approx((10 - 5) * 0.01)
    assert usage["prompt_tokens"] == (10 - 3) * 100 and usage["completion_tokens"] == (10 - 3) * 200
    report = (tmp_path / "report" / "chimera-synthetic-data.md").read_text()
    assert "Cost (USD, all runs): 0.05" in report and "inf" not in report.lower()
    for line in open(tmp_path / "datasets" / "trader_gen_spend.jsonl"):  # the ledger: what counted, nothing else
        strict(line)
    code, out, err = run("--sft-examples=12", "--dpo-examples=0", "--workers=1", "--max-cost=1")  # a later run goes on
    assert code == 0 and len(data(tmp_path)) == 12 and "stopped at --max-cost" not in out
