"""run.sh: the offline demo profile end to end on the smallest settings, a real run beside a
finished nanochat speedrun (Chimera's own stages, nanochat's files untouched, skipping from
Chimera's stamps), the start checkpoint of both nanochat generations, and the clear stops when
a real run lacks what it needs."""

import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, make_tiny_base

SMALLEST = {  # the smallest settings that still train on real tokens (demo rows are 1.5-2.3k bytes)
    "SFT_EXTRA_ARGS": "--num_iterations=2 --max_seq_len=1024 --eval_every=-1 --eval_batches=1",
    "DPO_EXTRA_ARGS": "--num_iterations=2 --max_length=256 --eval_every=-1",
    "EVAL_EXTRA_ARGS": "--max_new_tokens=4",
}


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):  # run.sh copies report.md into the cwd: here a test's own directory
    monkeypatch.chdir(tmp_path)


def run_sh(env, timeout=400, args=(), cwd=None):
    full = {k: v for k, v in os.environ.items() if k not in ("OPENROUTER_API_KEY", "CHIMERA_DEMO")}
    full.update({"CHIMERA_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env})
    return subprocess.run(["bash", os.path.join(REPO, "run.sh"), *args], env=full, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_demo_profile_end_to_end_then_resumes(tmp_path):
    demo = tmp_path / "demo"
    env = {
        "CHIMERA_DEMO_DIR": str(demo), "NANOCHAT_BASE_DIR": str(tmp_path / "real"), "CHIMERA_DEMO_DEPTH": "1",
        **SMALLEST}
    proc = run_sh(env, cwd=tmp_path)  # report.md's copy goes to the cwd
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OFFLINE DEMO" in proc.stdout and (tmp_path / "report.md").exists()
    lines = proc.stdout.splitlines()  # it ends with the command that chats with the DPO model, then the report
    chat = lines[lines.index("=== done ===") + 2]
    assert lines[-1] == str(demo / "report" / "chimera-report.md") and "chat.py -i dpo --model_tag=d1" in chat
    answer = subprocess.run(["bash", "-c", chat + ' -p "hello" --max_tokens=8'], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr[-2000:]
    for directory in ("base_checkpoints/d1", "chatsft_checkpoints/chimera_d1", "chatdpo_checkpoints/d1"):
        assert any(n.startswith("model_") for n in os.listdir(demo / directory)), directory
    assert not (tmp_path / "real").exists()  # the demo never touches the real base dir
    report = (demo / "report" / "chimera-report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| Metric"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["Metric", "BASE", "MID", "SFT", "DPO", "RL"]
    row = next(line for line in report.splitlines() if line.startswith("| Persona preference accuracy"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] != "-" and cells[4] != "-"  # measured after SFT and after DPO, on the pairs DPO held out
    assert cells[3].split(" of ")[1] == cells[4].split(" of ")[1] == "9 held-out pairs)", row  # 0.2 of the data
    again = run_sh(env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(", skipped") == 5  # base, sft, eval sft, dpo, eval dpo


def test_onpolicy_rounds_each_in_its_own_directory_the_last_loaded_and_skipped_on_a_rerun(tmp_path):
    """ONPOLICY_ROUNDS=2 with the fake OpenRouter as a consistent judge: after the DPO on the data's pairs, two rounds
    (on-policy pairs, DPO from the latest model, its eval), -i dpo's default the last; the report has a row per round;
    a re-run skips them."""
    import checkpoint
    from openrouter_server import FakeOpenRouter

    server, demo = FakeOpenRouter(cost=0.001).start(), tmp_path / "demo"
    env = {"CHIMERA_DEMO": "1", "CHIMERA_DEMO_DIR": str(demo), "CHIMERA_DEMO_DEPTH": "1", **SMALLEST,
           "EVAL_EXTRA_ARGS": "--max_new_tokens=4 --judge_prompts=4", "OPENROUTER_API_KEY": "sk-or-test",
           "OPENROUTER_BASE_URL": server.url, "OPENROUTER_MODELS": "", "ONPOLICY_ROUNDS": "2",
           "ONPOLICY_EXTRA_ARGS": "--prompts=12 --samples=3 --max_new_tokens=32 --min_margin=1"}
    try:
        first, second = run_sh(env, cwd=tmp_path), run_sh(env, cwd=tmp_path)
    finally:
        server.stop()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for r, parent in ((1, "d1"), (2, "d1_r1")):  # each round from the one before, its frozen reference
        meta = last_meta(demo / "chatdpo_checkpoints" / f"d1_r{r}")
        assert (meta["source"], meta["source_tag"]) == ("dpo", parent)
        assert meta["user_config"]["dpo_data_path"] == str(demo / "datasets" / f"trader_dpo_onpolicy_r{r}.jsonl")
        pairs = [json.loads(line) for line in open(demo / "datasets" / f"trader_dpo_onpolicy_r{r}.jsonl")]
        assert pairs and {(p["round"], p["checkpoint"]) for p in pairs} == {(r, f"dpo/{parent}")}
    assert checkpoint.find_largest_model(str(demo / "chatdpo_checkpoints")) == "d1_r2"
    lines = first.stdout.splitlines()
    assert "chat.py -i dpo --model_tag=d1_r2" in lines[lines.index("=== done ===") + 2]
    report = (demo / "report" / "chimera-report.md").read_text()
    rows = report.split("## DPO rounds\n\n")[1].split("\n\n")[0].splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["0 (gen.py's pairs)", "1 (d1_r1)", "2 (d1_r2)"]
    for r, row in enumerate(rows):  # the judge's win rate against SFT and the answer lengths; the round's pairs, cost
        cells = [c.strip() for c in row.strip("|").split("|")]
        section = json.load(open(demo / "report" / f"chimera-chat-evaluation-dpo{r and f'-d1_r{r}' or ''}.json"))
        win, length, sft = (section["figures"]["Judge"][f"{m} (no system)"]
                            for m in ("Judge win rate", "Answer length", "Reference answer length"))
        assert "against sft chimera_d1" in win[1] and cells[2:4] == [f"{length[0]:.4f}", f"{sft[0]:.4f}"], row
        assert cells[1] == ("undefined" if win[0] == "undefined" else f"{win[0]:.4f} ({win[1].split(' verd')[0]})")
        ledger = [json.loads(line) for line in open(demo / "datasets" / f"trader_dpo_onpolicy_r{r}.ledger.jsonl")] \
            if r else []
        kept = sum(e["outcome"] in ("kept", "anchored") for e in ledger)
        assert cells[4] == "-" if r == 0 else cells[4].startswith(f"{kept} kept, {len(ledger) - kept} rejected (") \
            and cells[4].endswith(f"), judge ${sum(e['cost'] for e in ledger):.4f}"), row
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count(", skipped") == 11 and "=== DPO round 1 (dpo.py) ===" not in second.stdout


def test_help_says_what_it_does_and_starts_nothing(tmp_path):
    proc = run_sh({"NANOCHAT_BASE_DIR": str(tmp_path / "base"), "CHIMERA_DEMO_DIR": str(tmp_path / "demo")},
                  timeout=30, args=["--help"], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("Chimera: the whole post-training pipeline")
    assert "CHIMERA_DEMO_DIR" in proc.stdout and "NANOCHAT_BASE_DIR" in proc.stdout and not os.listdir(tmp_path)
    assert run_sh({}, timeout=30, args=["--demo"], cwd=tmp_path).returncode == 2 and not os.listdir(tmp_path)


def test_a_checkpoint_without_key_or_data_stops_with_a_message(tmp_path):
    make_tiny_base(tmp_path)
    proc = run_sh({"NANOCHAT_BASE_DIR": str(tmp_path)}, timeout=60)
    assert proc.returncode != 0
    assert "no OPENROUTER_API_KEY" in proc.stderr and "CHIMERA_DEMO=1" in proc.stderr
    assert not (tmp_path / "chatsft_checkpoints").exists()


def test_a_key_without_a_checkpoint_stops_with_a_message(tmp_path):
    proc = run_sh({"NANOCHAT_BASE_DIR": str(tmp_path), "OPENROUTER_API_KEY": "sk-or-x"}, timeout=60)
    assert proc.returncode != 0 and "no nanochat checkpoint" in proc.stderr


# -----------------------------------------------------------------------------
# One run per base dir; evaluations stamped only when nothing was skipped for now. Cheap: the stages are stand-ins

STAND_IN = """#!{python}
# Python for run.sh with its stages stood in for: each leaves only what run.sh looks at ($FAKE_SKIPPED: eval.py's
# skips; $FAKE_SLEEP: sft.py's seconds); its own one-liners run for real
import json, os, sys, time
base, args = os.environ.get("NANOCHAT_BASE_DIR", ""), sys.argv[1:]  # run.sh's, once it has chosen it
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
if args[0] in ("sft.py", "dpo.py") or "fresh_base" in args[-1]:
    folder = {{"sft.py": "chatsft_checkpoints", "dpo.py": "chatdpo_checkpoints"}}.get(args[0], "base_checkpoints")
    os.makedirs(os.path.join(base, folder, flags.get("out_tag", "d1")), exist_ok=True)
    open(os.path.join(base, folder, flags.get("out_tag", "d1"), "model_000001.pt"), "w").write(" ".join(args))
    time.sleep(float(os.environ.get("FAKE_SLEEP", 0)) if args[0] == "sft.py" else 0)
    if args[0] == "dpo.py":
        tag = flags.get("out_tag", "")  # a DPO round's section: by its tag
        open(os.path.join(base, "report", "chimera-chat-dpo" + ("-" + tag) * ("_r" in tag) + ".md"), "w").write(
            " ".join(args))
elif args[0] == "onpolicy.py":  # a line more in the pairs (none in round $FAKE_NO_PAIRS) and the ledger
    none = flags["round"] == os.environ.get("FAKE_NO_PAIRS")
    for path in [flags["output"]] * (not none) + [flags["output"][:-6] + ".ledger.jsonl"]:
        open(path, "a").write(json.dumps({{"round": flags["round"]}}) + "\\n")
elif args[0] == "eval.py":
    name = args[2] + ("-" + flags["model_tag"]) * ("_r" in flags.get("model_tag", ""))  # a DPO round's: by tag
    with open(os.path.join(base, "report", f"chimera-chat-evaluation-{{name}}.json"), "w") as f:
        json.dump({{"results": {{}}, "skipped": json.loads(os.environ.get("FAKE_SKIPPED", "{{}}")),
                   "skipped_for_now": json.loads(os.environ.get("FAKE_FOR_NOW", "[]"))}}, f)
elif args[0] == "hub.py":  # a pull that finds every file there already: it writes nothing
    pass
elif args[0] == "checkpoint.py":  # no nanochat checkpoint: the demo's own
    print("START=base START_DIR=none TAG=")
elif not args[0].endswith("report.py") and "import torch" not in args[-1]:  # the venv's packages are there
    os.execv({python!r}, [{python!r}, *args])
"""


@pytest.fixture
def stand_in(tmp_path):
    """run(**env) -> run.sh's demo on base dir tmp_path/demo, stages stood in for (logged in tmp_path/stages.log);
    and the base dir."""
    python = tmp_path / "python"
    python.write_text(STAND_IN.format(python=sys.executable))
    python.chmod(0o755)
    env = {"CHIMERA_PYTHON": str(python), "CHIMERA_DEMO": "1", "CHIMERA_DEMO_DIR": str(tmp_path / "demo"),
           "CHIMERA_DEMO_DEPTH": "1", "NPROC_PER_NODE": "1", "FAKE_LOG": str(tmp_path / "stages.log")}
    (tmp_path / "stages.log").write_text("")
    return lambda **more: run_sh({**env, **more}, timeout=120), tmp_path / "demo"


def test_a_second_run_on_the_same_base_dir_stops_at_once_naming_the_first(stand_in, tmp_path):
    run, base = stand_in
    env = {k: v for k, v in os.environ.items() if k not in ("OPENROUTER_API_KEY", "CHIMERA_DEMO")}
    env.update({"CHIMERA_PYTHON": str(tmp_path / "python"), "CHIMERA_DEMO": "1", "CHIMERA_DEMO_DIR": str(base),
                "CHIMERA_DEMO_DEPTH": "1", "NPROC_PER_NODE": "1", "FAKE_SLEEP": "60", "FAKE_LOG": str(tmp_path / "stages.log"),
                "CHIMERA_FROM": "karpathy/nanochat-d2", "NANOCHAT_BASE_DIR": str(base)})  # locked before the pull
    first = subprocess.Popen(["bash", os.path.join(REPO, "run.sh")], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and "sft.py" not in (tmp_path / "stages.log").read_text():
            time.sleep(0.1)  # the first run is in its SFT stage
        t0 = time.time()
        second = run(CHIMERA_FROM="karpathy/nanochat-d2", NANOCHAT_BASE_DIR=str(base))
        assert second.returncode == 1 and time.time() - t0 < 30
        assert second.stderr.startswith(f"run.sh: another run.sh is running on {base} (pid {first.pid}, started ")
        assert second.stderr.count("\n") == 1 and "sft.py" not in second.stdout
        log = (tmp_path / "stages.log").read_text()
        assert log.count("sft.py") == 1 and log.count("hub.py pull") == 1  # the second ran no stage, not even its pull
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    third = run()  # the lock ends with the run (here a kill -9 of it and its stage)
    assert third.returncode == 0, third.stderr


def test_an_evaluation_skipped_for_now_is_not_stamped_and_a_judge_redoes_it(stand_in, tmp_path):
    run, base = stand_in
    offline = json.dumps({"ARC-Easy": "allenai/ai2_arc is not cached and could not be fetched: HF_HUB_OFFLINE is set",
                          "Trader-SFT": "no held-out trader conversation to score (the val split is empty)"})
    evals = lambda: [line for line in (tmp_path / "stages.log").read_text().splitlines() if line.startswith("eval.py")]
    first = run(FAKE_SKIPPED=offline)  # no key: skips for good are done
    assert first.returncode == 0, first.stderr
    assert len(evals()) == 2 and all("--judge=0" in line for line in evals())
    for_now = json.dumps({"Judge": "the judge is unavailable: HTTP 402, out of credits", "GSM8K":
                          "openai/gsm8k (main/test) is not cached and could not be fetched: talking to https://x"})
    second = run(FAKE_SKIPPED=for_now, FAKE_FOR_NOW='["Judge", "GSM8K"]', OPENROUTER_API_KEY="sk-or-x")  # a judge now: the evaluations are redone
    assert second.returncode == 0, second.stderr
    assert second.stdout.count(", skipped") == 3 and len(evals()) == 4 and "--judge=1" in evals()[-1]
    assert second.stdout.count("not stamped (Judge, GSM8K skipped for now): the next run redoes it") == 2
    third = run(FAKE_SKIPPED=offline, OPENROUTER_API_KEY="sk-or-x")  # and again, until no skip is for now
    assert third.stdout.count(", skipped") == 3 and len(evals()) == 6 and "not stamped" not in third.stdout
    fourth = run(FAKE_SKIPPED=offline, OPENROUTER_API_KEY="sk-or-x")
    assert fourth.stdout.count(", skipped") == 5 and len(evals()) == 6
    assert "sk-or-x" not in "".join(p.read_text() for p in (base / "chimera").iterdir())  # the key is no stamp's


def test_a_rounds_pairs_resume_after_a_kill_and_start_afresh_when_its_inputs_change(stand_in, tmp_path):
    run, base = stand_in
    pairs = lambda r: (base / "datasets" / f"trader_dpo_onpolicy_r{r}.jsonl").read_text().count("\n")
    assert run(ONPOLICY_ROUNDS="2").stderr == "run.sh: ONPOLICY_ROUNDS=2 needs OPENROUTER_API_KEY\n"
    assert run(ONPOLICY_ROUNDS="x", OPENROUTER_API_KEY="sk-or-x").returncode == 1 and not base.exists()
    env = {"ONPOLICY_ROUNDS": "2", "OPENROUTER_API_KEY": "sk-or-x"}
    assert run(**env).returncode == 0 and (pairs(1), pairs(2)) == (1, 1)
    assert run(**env).stdout.count(", skipped") == 11 and (pairs(1), pairs(2)) == (1, 1)
    os.remove(base / "chimera" / "on_policy_pairs__round_2.stamp")  # killed before its stamp: resumed, topped up
    assert run(**env).returncode == 0 and (pairs(1), pairs(2)) == (1, 2)
    changed = run(DPO_EXTRA_ARGS="--beta=0.2", **env)  # round 0's model changed: each round's pairs anew
    assert changed.returncode == 0 and (pairs(1), pairs(2)) == (1, 1) and ", skipped" not in changed.stdout.split(
        "=== DPO (dpo.py) ===")[1]
    flags = run(DPO_EXTRA_ARGS="--beta=0.2", ONPOLICY_EXTRA_ARGS="--max_cost=5", **env)  # a raised budget: resumed
    assert flags.returncode == 0 and (pairs(1), pairs(2)) == (2, 2)
    dpo_dir = base / "chatdpo_checkpoints"
    fewer = run(DPO_EXTRA_ARGS="--beta=0.2", ONPOLICY_EXTRA_ARGS="--max_cost=5", **{**env, "ONPOLICY_ROUNDS": "1"})
    assert fewer.returncode == 0 and sorted(os.listdir(dpo_dir)) == ["d1", "d1_r1"]  # round 2 is an earlier run's
    assert not list((base / "report").glob("*d1_r2*")) and "--model_tag=d1_r1" in fewer.stdout.splitlines()[-3]


def test_a_round_that_keeps_no_pairs_ends_the_rounds_and_the_run_goes_on(stand_in, tmp_path):
    run, base = stand_in
    env = {"ONPOLICY_ROUNDS": "3", "OPENROUTER_API_KEY": "sk-or-x"}
    assert run(**env).returncode == 0 and len(os.listdir(base / "chatdpo_checkpoints")) == 4
    ended = run(FAKE_NO_PAIRS="2", DPO_EXTRA_ARGS="--beta=0.2", **env)  # round 0 anew: each round's pairs anew
    assert ended.returncode == 0, ended.stderr
    assert "=== round 2 kept no pairs: the rounds end with round 1 ===" in ended.stdout
    assert "DPO round 2" not in ended.stdout and "=== report (report.py generate) ===" in ended.stdout
    assert sorted(os.listdir(base / "chatdpo_checkpoints")) == ["d1", "d1_r1"]  # the earlier rounds 2, 3 removed
    assert not list((base / "report").glob("*d1_r[23]*")) and "--model_tag=d1_r1" in ended.stdout.splitlines()[-3]
    again = run(FAKE_NO_PAIRS="2", DPO_EXTRA_ARGS="--beta=0.2", **env)
    assert again.returncode == 0 and again.stdout.count(", skipped") == 9 and "the rounds end with round 1" in \
        again.stdout


def test_a_stage_that_wrote_nothing_is_done_and_another_depths_rounds_leave_the_report(stand_in, tmp_path):
    """A pull that found every file there writes nothing: stamped done all the same (it listed the repo and hashed
    the checkpoint on every run, and failed offline). Round sections of another depth an earlier run left are not
    this run's (its round 0 replaced theirs). A real run's report knows when Chimera started (no nanochat header)."""
    run, base = stand_in
    report = base / "report"
    report.mkdir(parents=True)
    for name in ("chimera-chat-evaluation-dpo-d26_r1.md", "chimera-chat-dpo-d26_r1.md", "chimera-chat-dpo-d1_r1.md"):
        (report / name).write_text("an earlier run's\n")
    env = {"CHIMERA_FROM": "karpathy/nanochat-d2", "NANOCHAT_BASE_DIR": str(base), "ONPOLICY_ROUNDS": "1",
           "OPENROUTER_API_KEY": "sk-or-x"}
    first, second = run(**env), run(**env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "=== pull karpathy/nanochat-d2 (hub.py pull): finished before with these settings and inputs, skipped" \
        in second.stdout
    assert (tmp_path / "stages.log").read_text().count("hub.py pull") == 1
    assert not list(report.glob("*d26_r1*"))
    assert (report / "chimera-chat-dpo-d1_r1.md").read_text() != "an earlier run's\n"  # this depth's: this run's
    started = (report / "chimera-header.md").read_text()
    assert started.startswith("Run started: 20") and second.stdout.count(", skipped") == 9  # pull, base, 4 + 3 round
    gone = run(**env, CHIMERA_DEMO="0")  # no checkpoint there after the stamped pull (deleted since): said, no demo
    assert gone.returncode == 1 and "pull_*.stamp to pull it again" in gone.stderr and "DEMO" not in gone.stdout


# -----------------------------------------------------------------------------
# What run.sh asks checkpoint.py: SFT's start

def touch_model(base, source_dir, tag, step=0):
    os.makedirs(base / source_dir / tag, exist_ok=True)
    (base / source_dir / tag / f"model_{step:06d}.pt").write_bytes(b"")


def test_start_is_mid_if_present_else_base_and_nanochats_largest_tag(tmp_path):
    import checkpoint
    base = tmp_path / "base"
    assert checkpoint.default_start(str(base)) == "base" and checkpoint.nanochat_tag(str(base)) is None
    assert not base.exists()  # asking creates nothing
    for tag in ("d2", "d12", "d4", "chimera_d20"):
        touch_model(base, "base_checkpoints", tag)
    os.makedirs(base / "base_checkpoints" / "d30")  # no model file: no checkpoint
    os.makedirs(base / "mid_checkpoints" / "d8")
    assert checkpoint.nanochat_tag(str(base / "base_checkpoints")) == "d12"  # never Chimera's chimera_d<N>
    assert checkpoint.default_start(str(base)) == "base"
    touch_model(base, "mid_checkpoints", "d8")
    assert checkpoint.default_start(str(base)) == "mid"


def test_run_sh_reads_the_start_from_checkpoint_py(tmp_path):
    base = tmp_path / "a base dir"  # a space: the answer is quoted for the shell
    for tag in ("d2", "chimera_d2", "d3"):
        touch_model(base, "chatsft_checkpoints", tag)
    touch_model(base, "mid_checkpoints", "d3", step=10)
    touch_model(base, "mid_checkpoints", "d3", step=9)
    script = os.path.join(REPO, "checkpoint.py")
    shell = f'eval "$({sys.executable} {script} start "$0" "$1")"; echo "$START|$START_DIR|$TAG"'
    out = subprocess.run(["bash", "-c", shell, str(base), "sft"], capture_output=True, text=True, check=True).stdout
    assert out == f"sft|{base}/chatsft_checkpoints|d3\n"
    out = subprocess.run(["bash", "-c", shell, str(base), ""], capture_output=True, text=True, check=True).stdout
    assert out == f"mid|{base}/mid_checkpoints|d3\n"
    bad = run_sh({"NANOCHAT_BASE_DIR": str(base), "CHIMERA_START": "dpo"}, timeout=60)
    assert bad.returncode == 1 and bad.stderr == "run.sh: CHIMERA_START=dpo: expected mid, base or sft\n"
    assert not (base / "nothing").exists()


# -----------------------------------------------------------------------------
# Beside a finished nanochat run

# a real run offline: persona data only (no SmolTalk), no chat benchmarks
REAL_OFFLINE = {**SMALLEST, "SFT_EXTRA_ARGS": SMALLEST["SFT_EXTRA_ARGS"] + " --sft_dataset=trader", "HF_HUB_OFFLINE": "1"}


def file_hashes(root):
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def nanochat_checkpoint(base, source, tag="d2"):
    """A copy of the tiny base model as nanochat would leave it in <source>_checkpoints/<tag>
    (nanochat's meta has no Chimera mark)."""
    src, dst = os.path.join(base, "base_checkpoints", "d2"), os.path.join(base, f"{source}_checkpoints", tag)
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if src != dst:
            shutil.copy(os.path.join(src, name), dst)
        if name.startswith("meta_"):
            meta = json.load(open(os.path.join(dst, name)))
            meta.pop("chimera", None)
            meta["user_config"] = {"source": source}
            json.dump(meta, open(os.path.join(dst, name), "w"))


def speedrun_base_dir(base):
    """A base dir as nanochat's (2025) speedrun leaves it: tokenizer, base, mid and its own SFT
    checkpoints, its report sections; plus the persona data a real run would generate."""
    make_tiny_base(base)
    nanochat_checkpoint(base, "base")  # as nanochat's own base training left it
    nanochat_checkpoint(base, "mid")
    nanochat_checkpoint(base, "chatsft")
    os.makedirs(os.path.join(base, "report"))
    for name in ("header.md", "base-model-evaluation.md", "midtraining.md", "chat-evaluation-mid.md",
                 "chat-sft.md", "chat-evaluation-sft.md"):
        with open(os.path.join(base, "report", name), "w") as f:
            f.write(f"## nanochat's {name}\ntimestamp: 2025-11-01 10:00:00\n\n- ARC-Easy: 0.3861\n")
    os.makedirs(os.path.join(base, "datasets"))
    for k in ("sft", "dpo"):
        shutil.copy(os.path.join(REPO, "data", f"demo_{k}.jsonl"), os.path.join(base, "datasets", f"trader_{k}_data.jsonl"))


def last_meta(directory):
    name = max(n for n in os.listdir(directory) if n.startswith("meta_"))
    return json.load(open(os.path.join(directory, name)))


@pytest.fixture(scope="module")
def speedrun(tmp_path_factory):
    """run.sh on a speedrun base dir: fresh, again unchanged, after the DPO data changed, after
    a file Chimera wrote was removed."""
    base = str(tmp_path_factory.mktemp("speedrun"))
    speedrun_base_dir(base)
    before = file_hashes(base)
    env, cwd = {"NANOCHAT_BASE_DIR": base, **REAL_OFFLINE}, tmp_path_factory.mktemp("cwd")
    run_sh = functools.partial(globals()["run_sh"], cwd=cwd)  # report.md's copy goes there
    first = run_sh(env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    after_first = file_hashes(base)
    second = run_sh(env)
    dpo_data = os.path.join(base, "datasets", "trader_dpo_data.jsonl")
    lines = open(dpo_data).readlines()
    open(dpo_data, "w").writelines(lines[:-1])  # one pair fewer
    third = run_sh(env)
    os.remove(os.path.join(base, "report", "chimera-chat-evaluation-dpo.md"))
    fourth = run_sh(env)
    return dict(base=base, before=before, after_first=after_first, runs=(first, second, third, fourth))


def test_beside_a_speedrun_chimera_runs_its_own_stages(speedrun):
    base, first = speedrun["base"], speedrun["runs"][0]
    assert "OFFLINE DEMO" not in first.stdout and ", skipped" not in first.stdout
    sft_meta = last_meta(os.path.join(base, "chatsft_checkpoints", "chimera_d2"))
    assert sft_meta["source"] == "mid" and sft_meta["user_config"]["model_tag"] == "d2"  # 2025: from mid
    dpo_meta = last_meta(os.path.join(base, "chatdpo_checkpoints", "d2"))
    assert dpo_meta["source"] == "sft" and dpo_meta["user_config"]["model_tag"] == "chimera_d2"  # Chimera's SFT
    assert (sft_meta["source_tag"], dpo_meta["source_tag"]) == ("d2", "chimera_d2")  # eval's references
    for source in ("sft", "dpo"):
        assert os.path.exists(os.path.join(base, "report", f"chimera-chat-evaluation-{source}.json"))


def test_beside_a_speedrun_nanochat_checkpoints_are_untouched(speedrun):
    before, after = speedrun["before"], speedrun["after_first"]
    kept = {p: h for p, h in before.items() if not p.startswith("report")}
    assert {p: after.get(p) for p in kept} == kept


def test_beside_a_speedrun_nanochat_report_sections_are_untouched(speedrun):
    before, after = speedrun["before"], speedrun["after_first"]
    kept = {p: h for p, h in before.items() if p.startswith("report")}
    assert {p: after.get(p) for p in kept} == kept


def test_beside_a_speedrun_rerun_skips_by_stamps_and_redoes_what_changed(speedrun):
    _, second, third, _ = speedrun["runs"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count(", skipped") == 4  # sft, eval sft, dpo, eval dpo
    assert third.returncode == 0, third.stderr[-3000:]
    skipped = [line for line in third.stdout.splitlines() if ", skipped" in line]
    assert len(skipped) == 1 and "SFT (sft.py)" in skipped[0]  # the DPO data feeds eval sft, DPO, eval dpo
    assert "=== DPO (dpo.py) ===" in third.stdout


def test_beside_a_speedrun_a_stage_whose_output_changed_is_redone(speedrun):
    """A stamp alone is not enough: the files Chimera wrote must still be what it wrote."""
    fourth = speedrun["runs"][3]
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert fourth.stdout.count(", skipped") == 3
    assert "=== evaluate DPO (eval.py -i dpo) ===" in fourth.stdout


@pytest.mark.parametrize("layout, start, expected", [
    (("base",), "", "base_checkpoints/d2"),  # 2026 nanochat: no mid
    (("base", "mid"), "", "mid_checkpoints/d2"),  # 2025 nanochat
    (("base", "mid", "chatsft"), "sft", "chatsft_checkpoints/d2"),  # the user's own nanochat SFT, when asked
])
def test_start_checkpoint_for_both_generations(tmp_path, layout, start, expected):
    make_tiny_base(tmp_path)
    for source in layout[1:]:
        nanochat_checkpoint(str(tmp_path), source)
    proc = run_sh({"NANOCHAT_BASE_DIR": str(tmp_path), "CHIMERA_START": start}, timeout=60)
    assert f"Chimera's SFT starts from {tmp_path}/{expected} ===" in proc.stdout
    assert proc.returncode != 0 and "no OPENROUTER_API_KEY" in proc.stderr  # and stops: no data, no key


def test_chimera_from_pulls_a_published_model_once_and_starts_from_it(tmp_path):
    """CHIMERA_FROM=REPO_ID: hub.py pull is a stamped stage before anything else, and the pulled model (the fixture's
    meta says base_train wrote it) becomes SFT's start; a re-run skips the pull."""
    from test_hub import FakeHub, repo_files

    hub = FakeHub()
    hub.add("karpathy/nanochat-d2", repo_files(2025, "flat"))
    try:
        env = {"NANOCHAT_BASE_DIR": str(tmp_path / "base"), "CHIMERA_FROM": "karpathy/nanochat-d2",
               "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": ""}
        for run in (1, 2):
            proc = run_sh(env, timeout=120)
            assert "found a base checkpoint" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
            assert ("pull karpathy/nanochat-d2 (hub.py pull): finished before" in proc.stdout) == (run == 2)
        assert "SFT starts from " + str(tmp_path / "base" / "base_checkpoints" / "d2") in proc.stdout
    finally:
        hub.close()
