"""onpolicy.py on a tiny random model and the demo data, against the fake OpenRouter acting as the judge."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import onpolicy
import tasks
from checkpoint import SOURCE_DIRS, load_model, save_checkpoint
from conftest import REPO, free_port, make_tiny_base, run_torchrun
from engine import Engine
from openrouter_server import FakeOpenRouter, by_position, scores_parts

KEY = "sk-or-v1-TESTSECRET-onpolicy-0123456789"
PAIR = ("prompt", "chosen", "rejected")
FLAGS = ["--source=base", "--max_new_tokens=24", "--batch_size=8", "--workers=4"]


@pytest.fixture(scope="module")
def base_template(tmp_path_factory):
    """A tiny random base model and the demo data as gen.py's files (copied per test)."""
    base = tmp_path_factory.mktemp("onpolicy") / "base"
    make_tiny_base(base, sequence_len=256)
    os.makedirs(base / "datasets")
    for kind in ("sft", "dpo"):
        shutil.copy(os.path.join(REPO, "data", f"demo_{kind}.jsonl"), base / "datasets" / f"trader_{kind}_data.jsonl")
    return base


@pytest.fixture
def base(base_template, tmp_path, monkeypatch):
    shutil.copytree(base_template, tmp_path / "base")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


@pytest.fixture
def server():
    s = FakeOpenRouter(cost=0.001).start()
    yield s
    s.stop()


def environment(base, server):  # what onpolicy.py runs with, over os.environ
    return {"NANOCHAT_BASE_DIR": str(base), "OPENROUTER_API_KEY": KEY, "OPENROUTER_BASE_URL": server.url,
            "OPENROUTER_MODELS": ""}


def start(base, server, *flags, **kwargs):
    return subprocess.Popen([sys.executable, "onpolicy.py", *FLAGS, *flags], cwd=REPO, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **environment(base, server)), **kwargs)


@pytest.fixture
def run(base, server, monkeypatch, capsys):
    """run(*flags, env=None) -> (exit code, stdout, stderr) of onpolicy.py in this process."""
    for k, v in environment(base, server).items():
        monkeypatch.setenv(k, v)

    def _run(*flags, env=None):
        for k, v in (env or {}).items():
            monkeypatch.delenv(k) if v is None else monkeypatch.setenv(k, v)
        monkeypatch.setattr(sys, "argv", ["onpolicy.py", *FLAGS, *flags])
        try:
            onpolicy.run_main(onpolicy.main)
            code = 0
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


def lines(path):
    if not os.path.exists(path):
        return []
    text = open(path).read()
    assert text == "" or text.endswith("\n"), f"{path}: a partial last line"
    return [json.loads(line) for line in text.splitlines()]


def pairs(base, name="trader_dpo_onpolicy"):
    return lines(base / "datasets" / f"{name}.jsonl"), lines(base / "datasets" / f"{name}.ledger.jsonl")


def data_prompts(base, kind, split, fraction=None):
    fraction = {"dpo": 0.05, "sft": 0.1}[kind] if fraction is None else fraction
    task = (tasks.TraderDPO if kind == "dpo" else tasks.TraderSFT)(None, split, fraction)
    return [r["prompt"] if kind == "dpo" else next(m["content"] for m in r["messages"] if m["role"] == "user")
            for r in task]


def settings(**kwargs):  # the held-out shares main() finds without an SFT or DPO run: sft.py's and dpo.py's defaults
    return onpolicy.Config(**{"sft_val_fraction": 0.1, "dpo_val_fraction": 0.05, **kwargs})


def test_prompts_come_from_the_training_splits_only(base):
    config = settings(anchor_frac=1.0)
    prompts = onpolicy.training_prompts(config)
    train = set(data_prompts(base, "dpo", "train") + data_prompts(base, "sft", "train"))
    held_out = set(data_prompts(base, "dpo", "val") + data_prompts(base, "sft", "val"))
    assert held_out and {p.text for p in prompts} == train - held_out and len(prompts) == len(train - held_out)
    apprentice = {r["prompt"]: r["rejected"] for r in tasks.TraderDPO(None, "train", 0.05)}
    assert all(p.apprentice == apprentice.get(p.text) for p in prompts)  # every DPO prompt anchored at 1.0
    assert [p.text for p in onpolicy.training_prompts(settings(prompts=7))] == [p.text for p in prompts[:7]]
    assert sum(p.apprentice is not None for p in onpolicy.training_prompts(settings())) < len(apprentice) / 2


def test_the_held_out_prompts_are_those_of_the_checkpoints_runs(run, base, server):
    """SFT and DPO ran with other held-out shares than their defaults: the round samples none of the prompts eval.py
    holds out for the checkpoint (it trained on some before); flags given win."""
    model, _, meta = load_model("base", "cpu", "eval")
    for stage, run_config in (("sft", {"trader_val_fraction": 0.25}), ("dpo", {"val_fraction": 0.3})):
        save_checkpoint(str(base / SOURCE_DIRS[stage] / "d2"), 3, model.state_dict(),
                        dict(meta, step=3, user_config=run_config))
    code, out, err = run("--source=dpo", "--prompts=12")
    assert code == 0 and "--sft_val_fraction=0.25 --dpo_val_fraction=0.3" in out, err
    judged = {e["id"] for e in pairs(base)[1]}
    expected = onpolicy.training_prompts(settings(prompts=12, sft_val_fraction=0.25, dpo_val_fraction=0.3))
    held_out = data_prompts(base, "dpo", "val", 0.3) + data_prompts(base, "sft", "val", 0.25)
    assert judged == {p.id for p in expected} and not judged & {onpolicy.draw(text) for text in held_out}
    code, _, err = run("--source=dpo", "--prompts=12", "--dpo_val_fraction=0.05", "--sft_val_fraction=0.1",
                       f"--output={base}/given.jsonl")
    assert code == 0, err
    given = {e["id"] for e in lines(base / "given.ledger.jsonl")}
    assert given == {p.id for p in onpolicy.training_prompts(settings(prompts=12))}


def test_pairs_are_the_models_own_samples_judged_in_both_orders(run, base, server):
    server.faults.append("echo_key")  # a provider echoing the key: it reaches no file and no output
    code, out, err = run("--prompts=12")
    assert code == 0, err
    records, ledger = pairs(base)
    assert len(ledger) == 12 and len({e["id"] for e in ledger}) == 12 and records
    assert sum(e["outcome"] in ("kept", "anchored") for e in ledger) == len(records)
    assert f"{len(records)} pairs kept" in out
    # each judged prompt's line has what its asks cost (the fake server's $0.001 a request): the rounds' report reads it
    assert sum(e["cost"] for e in ledger) == pytest.approx(0.001 * len(server.chat_requests()))
    assert len(tasks.TraderDPO(str(base / "datasets" / "trader_dpo_onpolicy.jsonl"), "train", 0.0)) == len(records)
    model, tokenizer, _ = load_model("base", "cpu", "eval")
    engine = Engine(model, tokenizer, max_batch=4, max_len=256)
    data = [json.loads(line) for kind in ("sft", "dpo")
            for line in open(base / "datasets" / f"trader_{kind}_data.jsonl")]
    data_texts = {m["content"] for r in data for m in r.get("messages", [])} | {r.get(k) for r in data for k in PAIR}
    for r in records:
        assert r["source"] == "on-policy" and (r["checkpoint"], r["step"], r["round"]) == ("base/d2", 0, 1)
        ids = tokenizer.render_for_completion({"messages": [{"role": "user", "content": r["prompt"]},
                                                            {"role": "assistant", "content": ""}]})
        samples, _ = engine.generate_batch(ids, 4, 24, 1.0, 50, seed=onpolicy.draw(0, r["prompt"]))
        answers = [tokenizer.decode(s[len(ids):]).strip() for s in samples]
        assert r["chosen"] in answers and r["chosen"] not in data_texts
        assert r["rejected"] in answers if not r["anchor"] else r["rejected"] in data_texts
        chosen, rejected = r["picked"]
        assert all(s[chosen] - s[rejected] >= 2 for s in r["scores"]) and r["tokens"][chosen] < 24  # not cut
    asks = {}  # each prompt judged twice, the second time with its answers in reverse order
    for request in server.chat_requests():
        message, answers = scores_parts(request["body"])
        asks.setdefault(message, []).append(answers)
    assert len(asks) == sum(e["outcome"] != "too_few_answers" for e in ledger)
    assert all(len(a) == 2 and a[1] == a[0][::-1] and len(a[0]) in (4, 5) for a in asks.values())
    for root, _, files in os.walk(base):
        for name in files:
            assert KEY.encode() not in open(os.path.join(root, name), "rb").read(), name
    assert KEY not in out + err


def test_anchors_pair_the_best_sample_with_the_apprentice_answer(run, base, server):
    apprentice = {r["prompt"]: r["rejected"] for r in tasks.TraderDPO(None, "train", 0.05)}
    server.scorer = lambda message, answers: [1 if a in apprentice.values() else 6 for a in answers]
    code, _, err = run("--prompts=16", "--anchor_frac=1")
    assert code == 0, err
    records, ledger = pairs(base)
    anchored = [r for r in records if r["anchor"]]
    assert anchored and all(r["rejected"] == apprentice[r["prompt"]] for r in anchored)
    # the samples all score alike: only an anchor clears the margin
    assert all(r["prompt"] in apprentice for r in records) and len(anchored) == len(records)


def test_a_judge_that_flips_with_the_order_keeps_nothing(run, base, server):
    server.scorer = by_position
    code, out, err = run("--prompts=12", "--anchor_frac=0.5")
    assert code == 0, err
    records, ledger = pairs(base)
    assert records == [] and len(ledger) == 12 and "0 pairs kept" in out
    assert {e["outcome"] for e in ledger} <= {"disagree", "close", "all_cut", "too_few_answers"}
    assert len(server.chat_requests()) >= 12


def test_a_failing_judge_leaves_the_prompt_to_a_rerun(run, base, server):
    server.faults.extend(["body_error"] * 3)  # OpenRouter's error inside an HTTP 200, on each attempt of one ask
    code, out, err = run("--prompts=3", "--workers=1")
    assert code == 0 and "1 not judged (re-run to ask again)" in out, err
    assert len(pairs(base)[1]) == 2  # no ledger line, as for a verdict: the failure was the API's, not the answers'
    served = len(server.chat_requests())
    assert run("--prompts=3", "--workers=1")[0] == 0
    assert len(pairs(base)[1]) == 3 and len(server.chat_requests()) - served == 2  # asked again, both orders


def test_no_key_exits_2_with_one_line_and_writes_nothing(run, base, server):
    before = sorted(os.listdir(base / "datasets"))
    code, _, err = run("--prompts=4", env={"OPENROUTER_API_KEY": None})
    assert code == 2 and "OPENROUTER_API_KEY" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(base / "datasets")) == before and not server.requests


def test_a_lone_surrogate_in_the_data_stops_with_one_line(run, base, server):
    path = base / "datasets" / "trader_dpo_data.jsonl"
    with open(path, "a") as f:  # half an emoji, as in scraped text: valid JSON, but no UTF-8 file can hold it
        f.writelines(json.dumps(dict(r, prompt=r["prompt"] + " \ud83d")) + "\n" for r in lines(path)[:3])
    before = sorted(os.listdir(base / "datasets"))
    code, _, err = run("--prompts=4")
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"error: {path}: " in err and "surrogate" in err
    assert sorted(os.listdir(base / "datasets")) == before and not server.requests


def test_one_writer_and_one_round_per_file(run, base, server):
    with open(base / "datasets" / "trader_dpo_onpolicy.jsonl.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, _, err = run("--prompts=2")
    assert code == 2 and "another onpolicy.py is writing" in err and not server.chat_requests()
    assert run("--prompts=8")[0] == 0 and pairs(base)[0]
    served = len(server.chat_requests())
    assert run("--prompts=8")[0] == 0 and len(server.chat_requests()) == served  # done: nothing asked again
    code, _, err = run("--prompts=8", "--round=2")
    assert code == 2 and "holds round 1 pairs from base/d2 step 0" in err and "--output" in err
    assert run("--prompts=4", "--round=2", f"--output={base}/r2.jsonl")[0] == 0
    assert {r["round"] for r in lines(base / "r2.jsonl")} <= {2} and len(lines(base / "r2.ledger.jsonl")) == 4


def test_a_full_disk_stops_with_one_line_and_whole_lines(run, base, server, monkeypatch):
    """An append that fails (ENOSPC) on the writing rank stops the stage with one line (its peers stop at the next
    chunk, not at the dist timeout); what was written is whole lines, and a re-run resumes it."""
    real, calls = tasks.append_jsonl, []

    def append(path, record):
        calls.append(path)
        if len(calls) > 6:
            raise OSError(28, "No space left on device", path)
        real(path, record)

    monkeypatch.setattr(tasks, "append_jsonl", append)
    code, out, err = run("--prompts=20", "--workers=1")
    assert code == 2 and "Traceback" not in err  # stderr: the progress bar, then one line
    assert err.splitlines()[-1].startswith("error: stopped: [Errno 28] No space left on device")
    assert 0 < len(pairs(base)[0]) + len(pairs(base)[1]) <= 6  # pairs.jsonl / ledger: whole lines (pairs() checks)
    monkeypatch.setattr(tasks, "append_jsonl", real)
    assert run("--prompts=20", "--workers=1")[0] == 0
    kept, ledger = pairs(base)
    judged = {onpolicy.draw(r["prompt"]) for r in kept} | {e["id"] for e in ledger}
    assert len(judged) == 20 and len({r["prompt"] for r in kept}) == len(kept)


def test_max_cost_stops_cleanly_in_gens_ledger(run, base, server):
    code, out, err = run("--prompts=40", "--max_cost=0.01", "--workers=1")
    assert code == 0 and "stopped at --max_cost" in out, err
    spend = lines(base / "datasets" / "trader_gen_spend.jsonl")
    assert 10 <= sum("close" in e and "model" in e for e in spend) <= 13  # a request or two in flight past it
    assert len(pairs(base)[1]) < 40


def test_two_processes_write_the_same_file_as_one(base, server, tmp_path):
    shutil.copytree(base, tmp_path / "two")
    one = start(base, server, "--prompts=12", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert one.wait(timeout=240) == 0, one.stderr.read()
    run_torchrun(["onpolicy.py", *FLAGS, "--prompts=12"], env=environment(tmp_path / "two", server))
    for name in ("trader_dpo_onpolicy.jsonl", "trader_dpo_onpolicy.ledger.jsonl"):
        assert (base / "datasets" / name).read_text() == (tmp_path / "two" / "datasets" / name).read_text()
    assert pairs(base)[0]


def test_two_processes_wait_out_a_judge_slower_than_the_dist_timeout(base):
    """Rank 0 drains the judge's queue while rank 1 waits: they meet every few seconds, so a judge slower than
    CHIMERA_DIST_TIMEOUT (a 429 storm's Retry-After) stops nothing, and every verdict paid for is ledgered."""
    server = FakeOpenRouter(latency=3.0, cost=0.001).start()
    try:
        run_torchrun(["onpolicy.py", *FLAGS, "--prompts=4", "--workers=1"], timeout=180,
                     env={**environment(base, server), "CHIMERA_DIST_TIMEOUT": "20"})  # the judge: 3 s an ask, 24 s
        ledger = pairs(base)[1]
        judged = sum(e["outcome"] != "too_few_answers" for e in ledger)
        assert len(ledger) == 4 and len(server.chat_requests()) == 2 * judged == 8
    finally:
        server.stop()


def test_processes_that_read_other_prompts_stop_together(base, server):
    """A node with an older copy of the data (or gen.py appending between the ranks' reads): rank 0 would pair its
    prompts with answers rank 1 sampled for others. Every rank stops with one line, before the model loads."""
    views = os.path.join(REPO, "tests", "dist_views.py")
    with pytest.raises(AssertionError) as failed:
        run_torchrun([views, "onpolicy.py", *FLAGS, "--prompts=0"], timeout=120,
                     env={**environment(base, server), "VIEW": "fewer_rows", "CHIMERA_DIST_TIMEOUT": "60"})
    # each rank says it, unless torchrun ends the other first, as soon as one has exited
    assert "\nerror: the processes read different training prompts" in str(failed.value)
    assert not os.path.exists(base / "datasets" / "trader_dpo_onpolicy.jsonl") and not server.requests


def wait_for_ledger(base, n, timeout=120):
    ledger, deadline = base / "datasets" / "trader_dpo_onpolicy.ledger.jsonl", time.time() + timeout
    while time.time() < deadline and (not ledger.exists() or len(ledger.read_text().splitlines()) < n):
        time.sleep(0.02)


def test_a_kill_mid_run_resumes_without_duplicates(base, tmp_path):
    server = FakeOpenRouter(latency=0.1, cost=0.001).start()
    try:
        shutil.copytree(base, tmp_path / "uninterrupted")
        assert start(tmp_path / "uninterrupted", server, "--prompts=24").wait(timeout=240) == 0
        proc = start(base, server, "--prompts=24", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_ledger(base, 6)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert 6 <= len(pairs(base)[1]) < 24
        with open(base / "datasets" / "trader_dpo_onpolicy.jsonl", "a") as f:
            f.write('{"prompt": "torn')  # what a kill in the middle of a write leaves
        served = len(server.chat_requests())
        assert start(base, server, "--prompts=24").wait(timeout=240) == 0
        assert pairs(base)[0] == pairs(tmp_path / "uninterrupted")[0]  # the same pairs, each once, in the same order
        ids = [e["id"] for e in pairs(base)[1]]
        assert len(ids) == len(set(ids)) >= 23  # one killed between its record and ledger line is done by its record
        assert len(server.chat_requests()) - served <= 2 * (24 - 6 + 4)  # only what was not finished is asked again
    finally:
        server.stop()


def test_ctrl_c_on_one_rank_stops_every_rank_with_130(base):
    """A Ctrl-C that reaches rank 1 only (its terminal, a scheduler's signal) stops the round on every rank as on
    rank 0: exit 130, the judged kept, not exit 0 after a part of the round (run.sh would stamp it done)."""
    server = FakeOpenRouter(latency=0.3, cost=0.001).start()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **environment(base, server))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "onpolicy.py", *FLAGS, "--prompts=40"]
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_ledger(base, 3)
        ours = {b"RANK=1", f"NANOCHAT_BASE_DIR={base}".encode()}
        rank1 = next(int(pid) for pid in os.listdir("/proc") if pid.isdigit() and ours <= environ(pid))
        os.kill(rank1, signal.SIGINT)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode != 0 and "error: interrupted" in err, err
        assert 3 <= len(pairs(base)[1]) < 40
    finally:
        server.stop()


def environ(pid):  # a process's environment entries (none if it is gone, or not ours to read)
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return set(f.read().split(b"\0"))
    except OSError:
        return set()


def test_ctrl_c_exits_130_keeping_what_was_judged(base):
    server = FakeOpenRouter(latency=0.3, cost=0.001).start()
    try:
        proc = start(base, server, "--prompts=40", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for_ledger(base, 3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith("error: interrupted"), err
        entries = pairs(base)[1]
        judged = sum(e["outcome"] != "too_few_answers" for e in entries)
        assert 3 <= len(entries) < 40 and len(server.chat_requests()) == 2 * judged  # every answer paid for is kept
    finally:
        server.stop()
