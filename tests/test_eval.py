"""eval.py: categorical and generative scoring, ChatCORE, persona metrics, the report
section, skipping unavailable tasks, and sharding over 2 processes."""

import dataclasses
import json
import os
import shutil
import sys

import pytest
import torch

import dpo
import eval as chat_eval
import tasks
from common import Dist, ProgressBar, UserError
from conftest import REPO, make_tiny_base, run_python, run_torchrun
from checkpoint import load_model, save_checkpoint
from test_tasks import ARC_ROWS, GSM8K_ROW, HUMANEVAL_ROW, MMLU_ROW

ONE = Dist(rank=0, world_size=1, device=torch.device("cpu"))


def seed(dataset, config, split, rows):
    path = tasks.hf_cache_path(dataset, config, split)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def mmlu_rows():
    """Eight MMLU rows whose answers are A, B, C, D, B, B, A, B."""
    return [dict(MMLU_ROW, question=f"{MMLU_ROW['question']} (variant {i})", answer=a)
            for i, a in enumerate([0, 1, 2, 3, 1, 1, 0, 1])]


def seed_all(base):
    seed("allenai/ai2_arc", "ARC-Easy", "test", ARC_ROWS)
    seed("allenai/ai2_arc", "ARC-Challenge", "test", ARC_ROWS[:3])
    seed("cais/mmlu", "all", "test", mmlu_rows())
    gsm = [GSM8K_ROW, dict(GSM8K_ROW, question="How many is 6 times 3?", answer="6*3 = <<6*3=18>>18\n#### 18")]
    seed("openai/gsm8k", "main", "test", gsm)
    seed("openai/openai_humaneval", "openai_humaneval", "test", [HUMANEVAL_ROW])
    with open(os.path.join(base, "task_data", "words_alpha.txt"), "w") as f:  # SpellingBee's word list
        f.write("strawberry\napple\nbanana\n")


@pytest.fixture
def eval_base(tmp_path, monkeypatch):
    """A tiny model saved as the SFT checkpoint, seeded caches, trader data."""
    base = make_tiny_base(tmp_path / "base")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing beyond the seeded caches
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)  # no judge unless a test asks
    m, _, meta = load_model("base", "cpu", "eval", base_dir=base)
    save_checkpoint(os.path.join(base, "chatsft_checkpoints", "d2"), 0, m.state_dict(), dict(meta, source="base"))
    seed_all(base)
    os.makedirs(os.path.join(base, "datasets"))
    with open(os.path.join(base, "datasets", "trader_sft_data.jsonl"), "w") as f:
        for i in range(30):
            f.write(json.dumps({"messages": [{"role": "system", "content": "You are Vex, a cautious trader."},
                                             {"role": "user", "content": f"q{i}: size?"},
                                             {"role": "assistant", "content": f"Risk 1% on idea {i}."}]}) + "\n")
    with open(os.path.join(base, "datasets", "trader_dpo_data.jsonl"), "w") as f:
        for i in range(60):
            f.write(json.dumps({"prompt": f"p{i}", "chosen": f"Stop first {i}.", "rejected": f"All in {i}!"}) + "\n")
    return base


class Prefers(torch.nn.Module):
    """Wraps a GPT so that one token always has the highest logit."""

    def __init__(self, model, token):
        super().__init__()
        self.model, self.token = model, token

    def hidden_states(self, ids):
        return self.model.hidden_states(ids)

    def logits(self, h):
        out = self.model.logits(h).clone()
        out[..., self.token] += 100.0
        return out


def cfg(*args):
    return chat_eval.parse_config(chat_eval.Config, list(args), aliases=chat_eval.ALIASES)


# -----------------------------------------------------------------------------


def test_categorical_scoring_follows_the_preferred_letter(eval_base):
    model, tok, _ = load_model("sft", "cpu", "eval")
    task = tasks.MMLU()
    answers = [task[i]["messages"][1]["content"] for i in range(len(task))]
    for letter in "ABCD":
        rigged = Prefers(model, tok.encode(letter)[0])
        bar = ProgressBar(len(task), enabled=False)
        passed, total = chat_eval.run_categorical(task, tok, rigged, cfg("--batch_size=3"), ONE, bar)
        assert (passed, total) == (answers.count(letter), 8)
    passed, total = chat_eval.run_categorical(task, tok, Prefers(model, tok.encode("B")[0]),
                                              cfg("--max_problems=5"), ONE, ProgressBar(5, enabled=False))
    assert (passed, total) == (answers[:5].count("B"), 5)


class Says(torch.nn.Module):
    """A 'model' whose greedy completion is a fixed text, then <|assistant_end|>: its last hidden state is
    the next token's one-hot vector, which its lm_head (the identity) passes on as logits."""

    def __init__(self, tok, text, config):
        super().__init__()
        self.script = tok.encode(text) + [tok.encode_special("<|assistant_end|>")]
        self.config, self.cos = config, torch.zeros(1, 10 * config.sequence_len, 1, 1)
        self.lm_head = torch.nn.Linear(config.vocab_size, config.vocab_size, bias=False)
        torch.nn.init.eye_(self.lm_head.weight)

    def get_device(self):
        return torch.device("cpu")

    def hidden_states(self, ids, kv_cache):
        if int(kv_cache.pos) == 0:  # the prompt: answer with the script's first token
            self.prompt_len, emitted = ids.size(1), 0
        else:  # one fed-back token: answer with the next one
            emitted = int(kv_cache.pos) - self.prompt_len + 1
        kv_cache.advance(ids.size(1))
        nxt = torch.full(ids.shape, self.script[min(emitted, len(self.script) - 1)])
        return torch.nn.functional.one_hot(nxt, self.config.vocab_size).float()


def test_generative_scoring_grades_the_final_answer(eval_base):
    model, tok, _ = load_model("sft", "cpu", "eval")
    task = tasks.GSM8K()
    says_18 = Says(tok, "6*3 is 18.\n#### 18", model.config)
    passed, total = chat_eval.run_generative(task, tok, says_18, cfg(), ONE, ProgressBar(2, enabled=False))
    assert (passed, total) == (1, 2)  # right on the 6*3 problem, wrong on the clips one
    says_72 = Says(tok, "#### 72", model.config)
    assert chat_eval.run_generative(task, tok, says_72, cfg(), ONE, ProgressBar(2, enabled=False)) == (1, 2)


def test_chatcore_centres_on_chance_and_needs_every_task():
    results = {"ARC-Easy": 0.5, "ARC-Challenge": 0.25, "MMLU": 1.0, "GSM8K": 0.1, "HumanEval": 0.0, "SpellingBee": 0.3}
    expected = ((0.5 - 0.25) / 0.75 + 0.0 + 1.0 + 0.1 + 0.0 + 0.3) / 6  # nanochat 885a4f2's six tasks
    assert chat_eval.chatcore(results) == pytest.approx(expected)
    # nanochat 92d63d4 averages five: SpellingBee is out of its ChatCORE, and not needed for it
    assert chat_eval.chatcore(results, 2026) == pytest.approx(((0.5 - 0.25) / 0.75 + 1.0 + 0.1) / 5)
    assert chat_eval.chatcore({k: v for k, v in results.items() if k != "SpellingBee"}, 2026) is not None
    del results["HumanEval"]
    assert chat_eval.chatcore(results) is None


@pytest.mark.parametrize("generation, figures", [
    (2025, {"HumanEval", "HumanEval (nanochat)", "SpellingBee", "SpellingBee (nanochat)"}),
    (2026, {"HumanEval", "HumanEval (nanochat)", "SpellingBee"})])  # 92d63d4's chat_eval has no SpellingBee
def test_nanochat_figures_follow_the_checkpoints_generation(tmp_path, monkeypatch, generation, figures):
    base = make_tiny_base(tmp_path / "base", generation=generation)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    seed_all(base)
    model, tok, _ = load_model("base", "cpu", "eval", base_dir=base)
    config = cfg("--max_problems=2", "--max_new_tokens=4")
    out = {k: v for name in ("HumanEval", "SpellingBee") for k, v in
           chat_eval.chat_task(name, model, tok, config, None, ONE).items()}
    assert set(out) == figures and all(0.0 <= f.value <= 1.0 and f.measured_on.endswith((" of 1 problems",
                                                                                         " of 2 problems"))
                                       for f in out.values())  # HumanEval's cache holds one


def test_unknown_task_is_a_clear_error():
    with pytest.raises(UserError, match="unknown task 'ARC'"):
        chat_eval.selected_tasks(cfg("-a", "ARC|GSM8K"))
    assert chat_eval.selected_tasks(cfg("-a", "ARC-Easy|GSM8K")) == ["ARC-Easy", "GSM8K"]


def run_eval(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["eval.py", *args])
    chat_eval.main()


def section(base, source):
    text = open(os.path.join(base, "report", f"chimera-chat-evaluation-{source}.md")).read()
    lines = dict(l[2:].split(": ", 1) for l in text.splitlines() if l.startswith("- "))
    return text, lines


def figure(lines, name):
    """A metric's value from its line, `value (what it is measured on)`: a number (ValueError if it is not)."""
    return float(lines[name].split(" (")[0])


def test_full_run_writes_nanochat_section_with_chatcore(eval_base, monkeypatch):
    run_eval(monkeypatch, "-i", "sft", "--max_new_tokens=8", "--batch_size=4", "--max_problems=8")
    text, lines = section(eval_base, "sft")
    assert text.startswith("## Chat evaluation sft\n")
    persona = [f"{m} ({cond})" for m in ("Trader SFT held-out loss", "Persona preference accuracy",
                                         "DPO reward margin") for cond in chat_eval.CONDITIONS]
    for name in chat_eval.CHAT_TASKS + ["ChatCORE metric", "Identity probe score"] + persona:
        figure(lines, name)  # present and numeric
    assert lines["Persona reference"] == "base"  # what the SFT checkpoint was trained from
    # each figure says what it is measured on, and how many: the share as k of n
    assert lines["MMLU"] == f"{figure(lines, 'MMLU'):.4f} ({round(figure(lines, 'MMLU') * 8)} of 8 problems)"
    assert lines["Trader SFT held-out loss (no system)"].endswith(" (per answer token, 3 conversations)")
    assert lines["Persona preference accuracy (no system)"].endswith(" of 4 held-out pairs)")
    assert lines["DPO reward margin (no system)"] == "0.0000 (mean of 4 held-out pairs, against base)"
    # the SFT checkpoint here is its base unchanged: every reward margin is 0, the reward accuracy undefined
    for cond in chat_eval.CONDITIONS:
        assert lines[f"DPO reward accuracy ({cond})"].startswith("undefined (every reward margin is 0")
    assert "DPO reward accuracy (no system)" not in json.load(open(
        os.path.join(eval_base, "report", "chimera-chat-evaluation-sft.json")))["results"]
    # settings left unset (the latest step, the device detected) or that do not apply (greedy: no top_k; no
    # judge: no judge_prompts) are left out
    assert lines["temperature"] == "0.0000" and lines["batch_size"] == "4"
    assert not {"step", "device_type", "top_k", "judge_prompts", "task_name", "trader_sft_path"} & set(lines)
    # the persona's system message changes what the model sees, so the two conditions differ
    assert lines["Trader SFT held-out loss (no system)"] != lines["Trader SFT held-out loss (with system)"]
    data = json.load(open(os.path.join(eval_base, "report", "chimera-chat-evaluation-sft.json")))
    assert data["skipped"] == {} and set(chat_eval.CHAT_TASKS) <= set(data["results"])
    assert data["results"]["ChatCORE metric"] == pytest.approx(chat_eval.chatcore(data["results"]))
    # 885a4f2's figures where Chimera scores otherwise on purpose (tasks.NANOCHAT_TASKS), and their ChatCORE
    as_nanochat = {k: data["results"].get(f"{k} (nanochat)", v) for k, v in data["results"].items()}
    assert {"HumanEval (nanochat)", "SpellingBee (nanochat)"} <= set(lines) and "GSM8K (nanochat)" not in lines
    assert data["results"]["ChatCORE (nanochat)"] == pytest.approx(chat_eval.chatcore(as_nanochat))


def test_missing_task_is_skipped_and_chatcore_omitted(eval_base, monkeypatch, capsys):
    os.remove(tasks.hf_cache_path("openai/openai_humaneval", "openai_humaneval", "test"))
    run_eval(monkeypatch, "-i", "sft", "--max_new_tokens=4", "-a", "ARC-Easy|HumanEval|Trader-DPO")
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith("skipped (") and "HumanEval" in line]) == 1
    _, lines = section(eval_base, "sft")
    assert "ARC-Easy" in lines and "HumanEval" not in lines and "ChatCORE metric" not in lines
    data = json.load(open(os.path.join(eval_base, "report", "chimera-chat-evaluation-sft.json")))
    assert "openai_humaneval" in data["skipped"]["HumanEval"]


def test_condition_truncated_away_is_left_out_not_the_task(eval_base, monkeypatch):
    """A persona system message longer than the context leaves no answer token to score: the
    with-system loss is left out (never reported as 0), the no-system loss stays."""
    with open(os.path.join(eval_base, "datasets", "trader_sft_data.jsonl"), "w") as f:
        for i in range(30):
            f.write(json.dumps({"messages": [{"role": "system", "content": "You are Vex. " * 40},
                                             {"role": "user", "content": f"q{i}: size?"},
                                             {"role": "assistant", "content": f"Risk 1% on idea {i}."}]}) + "\n")
    run_eval(monkeypatch, "-i", "sft", "-a", "Trader-SFT")
    _, lines = section(eval_base, "sft")
    assert figure(lines, "Trader SFT held-out loss (no system)") > 0
    assert "Trader SFT held-out loss (with system)" not in lines and lines["Skipped tasks"] == "none"


def test_dpo_checkpoint_gets_pair_metrics_against_sft(eval_base, monkeypatch):
    m, _, meta = load_model("sft", "cpu", "eval")
    with torch.no_grad():
        m.lm_head.weight.mul_(1.5)  # any change: the "DPO" model now differs from its reference
    save_checkpoint(os.path.join(eval_base, "chatdpo_checkpoints", "d2"), 3, m.state_dict(),
                    dict(meta, source="sft", beta=0.2, user_config={"val_fraction": 0.2, "max_length": 64}))
    run_eval(monkeypatch, "-i", "dpo", "-a", "Trader-DPO")
    _, lines = section(eval_base, "dpo")
    for cond in chat_eval.CONDITIONS:
        acc = figure(lines, f"DPO reward accuracy ({cond})")
        assert 0.0 <= acc <= 1.0 and figure(lines, f"DPO reward margin ({cond})") != 0.0
    assert lines["Persona reference"] == "sft"
    held_out = tasks.TraderDPO(split="val", val_fraction=0.2)
    assert len(held_out) > 0  # the DPO run's split fraction is the one used
    # the pairs are truncated at the DPO run's max_length, as dpo.py's own held-out evaluation truncates them
    reference, tok, _ = load_model("sft", "cpu", "eval")
    pairs = dpo.render_pairs(held_out, tok, 64)[0]  # the DPO run's beta is the default 0.1 here
    figures = dpo.evaluate_pairs(m, reference, pairs, tok.encode_special("<|assistant_end|>"), dpo.DPOLoss(0.1), 8,
                                 Dist(0, 1, torch.device("cpu")))
    assert figure(lines, "DPO reward margin (no system)") == pytest.approx(figures["rewards/margins"], abs=1e-4)
    assert lines["DPO reward accuracy (no system)"].endswith(f" of {len(pairs)} held-out pairs, against sft)")


def test_dpo_reference_is_the_checkpoint_it_was_trained_from(eval_base, monkeypatch):
    """Not the source's default tag (chimera_d2 is preferred) nor its latest step: the policy here
    is its reference unchanged, so every reward margin is exactly zero and the reward accuracy undefined."""
    m, _, meta = load_model("sft", "cpu", "eval")
    save_checkpoint(os.path.join(eval_base, "chatdpo_checkpoints", "d2"), 3, m.state_dict(),
                    dict(meta, source="sft", source_tag="d2", source_step=0, user_config={"val_fraction": 0.2}))
    with torch.no_grad():
        m.lm_head.weight.mul_(1.5)
    for tag, step in (("d2", 5), ("chimera_d2", 0)):  # decoys: a later step, the tag chosen by default
        save_checkpoint(os.path.join(eval_base, "chatsft_checkpoints", tag), step, m.state_dict(), meta)
    run_eval(monkeypatch, "-i", "dpo", "-a", "Trader-DPO")
    _, lines = section(eval_base, "dpo")
    for cond in chat_eval.CONDITIONS:
        assert figure(lines, f"DPO reward margin ({cond})") == 0.0
        assert lines[f"DPO reward accuracy ({cond})"].startswith("undefined (")
        assert lines[f"DPO reward accuracy ({cond})"].endswith(" held-out pairs, against sft d2 step 0)")


def test_settings_left_to_the_checkpoints_are_resolved_once_and_the_config_kept(eval_base, monkeypatch):
    """The reference is the checkpoint the evaluated one was trained from, the splits and the DPO loss
    those of its runs, the judge on with a key; flags given win; the parsed Config is never changed."""
    m, _, meta = load_model("sft", "cpu", "eval")
    dpo_meta = dict(meta, source="sft", source_tag="d2", source_step=0,
                    user_config={"val_fraction": 0.2, "beta": 0.3, "loss_type": "ipo"})
    config = cfg("-i", "dpo")
    resolved = chat_eval.resolve(config, dpo_meta)
    assert resolved == chat_eval.Resolved("sft", "d2", 0, 0.1, 0.2, dpo.DPOLoss(0.3, "ipo", 0.0), 1024, None)
    assert config == cfg("-i", "dpo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ref_source = "sft"
    given = cfg("-i", "dpo", "--ref_source=base", "--dpo_val_fraction=0.3", "--sft_val_fraction=0.5")
    assert chat_eval.resolve(given, dpo_meta)[:5] == ("base", None, None, 0.5, 0.3)
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-test")
    assert isinstance(chat_eval.resolve(config, dpo_meta).judge, chat_eval.Judge)
    assert chat_eval.resolve(cfg("-i", "dpo", "--judge=0"), dpo_meta).judge is None
    monkeypatch.delenv("OPENROUTER_API_KEY")
    save_checkpoint(os.path.join(eval_base, "chatdpo_checkpoints", "d2"), 3, m.state_dict(), dpo_meta)
    run_eval(monkeypatch, "-i", "dpo", "-a", "Trader-DPO")  # the report shows the settings as resolved
    settings = json.load(open(os.path.join(eval_base, "report", "chimera-chat-evaluation-dpo.json")))["config"]
    assert {k: settings[k] for k in ("ref_source", "ref_tag", "ref_step", "dpo_val_fraction", "judge")} == {
        "ref_source": "sft", "ref_tag": "d2", "ref_step": 0, "dpo_val_fraction": 0.2, "judge": 0}


def test_two_processes_shard_and_reduce_like_one(eval_base):
    env = {"NANOCHAT_BASE_DIR": eval_base, "HF_HUB_OFFLINE": "1"}
    args = [os.path.join(REPO, "eval.py"), "-i", "sft", "-a", "ARC-Easy|MMLU|GSM8K|Trader-SFT|Trader-DPO",
            "--max_new_tokens=6", "--batch_size=2"]
    run_python(args, env=env)
    one = json.load(open(os.path.join(eval_base, "report", "chimera-chat-evaluation-sft.json")))["results"]
    run_torchrun(args, env=env)
    two = json.load(open(os.path.join(eval_base, "report", "chimera-chat-evaluation-sft.json")))["results"]
    assert one.keys() == two.keys()
    for k in one:
        assert two[k] == pytest.approx(one[k], abs=1e-5), k


def test_judge_without_key_is_refused_before_loading(eval_base, monkeypatch):
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    monkeypatch.setattr(chat_eval, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match="OPENROUTER_API_KEY"):
        run_eval(monkeypatch, "-i", "dpo", "--judge=1")


def test_judge_counts_only_verdicts_that_survive_swapping_the_order():
    import openrouter
    from openrouter_server import FakeOpenRouter
    server = FakeOpenRouter().start()
    try:
        client = openrouter.OpenRouter("sk-test", server.url, ["openai/gpt-4o-mini"], backoff=0.01)
        persona = openrouter.load_persona(openrouter.PERSONA_PATH)
        server.judge = lambda m, a, b: "1" if "stop" in a else "2"  # a real preference
        assert openrouter.judge_both_orders(client, persona, "size?", "set a stop, risk 1%", "all in") == 1
        assert openrouter.judge_both_orders(client, persona, "size?", "all in", "set a stop, risk 1%") == -1
        server.judge = lambda m, a, b: "1"  # pure position bias: no verdict
        assert openrouter.judge_both_orders(client, persona, "size?", "set a stop, risk 1%", "all in") is None
        server.judge = lambda m, a, b: "tie"
        assert openrouter.judge_both_orders(client, persona, "size?", "a", "b") is None
    finally:
        server.stop()


def test_a_judge_refusing_mid_run_skips_the_judged_rows_not_the_eval(eval_base, monkeypatch):
    from openrouter_server import FakeOpenRouter
    server = FakeOpenRouter().start()  # lists its models, then refuses every chat request (a bad key: 401)
    server.faults.extend(["401"] * 50)
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-test")
    monkeypatch.setenv("OPENROUTER_BASE_URL", server.url)
    try:
        run_eval(monkeypatch, "-i", "sft", "-a", "Trader-SFT|Identity", "--max_new_tokens=4")
    finally:
        server.stop()
    _, lines = section(eval_base, "sft")
    assert figure(lines, "Trader SFT held-out loss (no system)") > 0 and "Identity probe score" not in lines
    assert lines["Skipped tasks"] == "Identity, Judge" and not any(k.startswith("Judge win rate") for k in lines)  # Identity, Judge


def test_judge_win_rate_of_dpo_against_sft(eval_base, monkeypatch):
    from openrouter_server import FakeOpenRouter, judge_parts
    m, _, meta = load_model("sft", "cpu", "eval")
    with torch.no_grad():
        m.lm_head.weight.mul_(3.0)
    save_checkpoint(os.path.join(eval_base, "chatdpo_checkpoints", "d2"), 3, m.state_dict(),
                    dict(meta, source="sft", user_config={"val_fraction": 0.2}))
    server = FakeOpenRouter().start()  # its judge prefers the longer answer, whatever the order; of two as long, the
    server.judge = lambda message, a, b: "1" if (len(a), a) > (len(b), b) else "2"  # later in text: no tie, 2 asks
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-test")
    monkeypatch.setenv("OPENROUTER_BASE_URL", server.url)
    try:
        probes = os.path.join(eval_base, "probes.jsonl")
        with open(probes, "w") as f:  # the generic answers are long: the fake judge prefers them
            f.writelines(json.dumps({"prompt": f"Who are you {i}?", "persona_answer": "Vex.",
                                     "generic_answer": "I am a helpful assistant. " * 20}) + "\n" for i in range(3))
        run_eval(monkeypatch, "-i", "dpo", "-a", "Trader-SFT|Identity", "--judge_prompts=6", "--identity_path",
                 probes, "--max_new_tokens=12", "--temperature=1.0")  # the key is set: the judge is on
    finally:
        server.stop()
    requests = [r["body"] for r in server.chat_requests()]
    assert len(requests) == 3 * 2 + 6 * 2 * 2  # probes, then six prompts x both orders x both conditions
    _, lines = section(eval_base, "dpo")
    assert figure(lines, "Identity probe score") == 0.0 and "openai/gpt-4o-mini" in lines["Judge"]
    requests = requests[6:6 + 12]  # the no-system condition
    forward = {}
    for body in requests:  # the first request of each prompt puts the DPO answer first
        message, first, second = judge_parts(body)
        forward.setdefault(message, (first, second))
    wins = sum((len(a), a) > (len(b), b) for a, b in forward.values())
    losses = sum((len(a), a) < (len(b), b) for a, b in forward.values())
    assert wins + losses > 0  # seeded sampling: some answers differ in length
    assert lines["Judge win rate (no system)"] == (f"{wins / (wins + losses):.4f} ({wins} of {wins + losses} verdicts "
                                                   "that held in both orders, against sft)")
    with_system = lines["Judge win rate (with system)"]  # undefined (saying why) when no verdict held
    assert with_system.startswith("undefined (no verdicts") or 0.0 <= figure(lines, "Judge win rate (with system)") <= 1


@pytest.mark.parametrize("flag", ["--max_problems=0", "--temperature=-1", "--temperature=nan", "--batch_size=0",
                                  "--num_samples=0", "--max_new_tokens=0", "--sft_val_fraction=1.5", "--judge=2"])
def test_nonsense_settings_are_refused_naming_the_flag(flag):
    with pytest.raises(UserError) as e:
        chat_eval.check_config(cfg(flag))
    assert str(e.value).startswith(flag.split("=")[0] + "=") and "\n" not in str(e.value)


def test_nonsense_setting_exits_2_before_loading(eval_base):
    r = run_python([os.path.join(REPO, "eval.py"), "-i", "sft", "--max_problems=0"],
                   env={"NANOCHAT_BASE_DIR": eval_base}, check=False)
    assert r.returncode == 2 and r.stderr.strip() == "error: --max_problems=0: must be -1 (all) or at least 1"


def test_identity_probes_by_log_likelihood(eval_base, monkeypatch, tmp_path):
    """Without a judge, the score is the share of probes whose persona answer the model finds
    likelier per token; swapping the answers turns it into its complement."""
    probes = tasks.read_jsonl(chat_eval.IDENTITY_PROBES, chat_eval.probe_problem)
    assert len(probes) >= 15 and all(p["persona_answer"] != p["generic_answer"] for p in probes)
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("".join(json.dumps(dict(p, persona_answer=p["generic_answer"], generic_answer=p["persona_answer"]))
                               + "\n" for p in probes))
    scores = []
    for path in (chat_eval.IDENTITY_PROBES, str(swapped)):
        run_eval(monkeypatch, "-i", "sft", "-a", "Identity", "--identity_path", path)
        _, lines = section(eval_base, "sft")
        scores.append(figure(lines, "Identity probe score"))
        assert lines["Judge"].startswith("none")
    assert scores[0] + scores[1] == pytest.approx(1.0)


def test_a_pair_the_judge_could_not_answer_has_no_verdict_and_many_mean_no_judge(monkeypatch):
    """A 503 that outlived its retries on one pair of 20 leaves that pair without a verdict (the 19 paid for count);
    on more than a tenth of them, the judge is unavailable for now (the eval is not stamped: a re-run judges)."""
    import openrouter
    failing = set()

    def judge_both_orders(client, persona, prompt, a, b):
        if prompt in failing:
            raise tasks.HTTPGaveUp("HTTP 503 (gave up after 7 tries)")
        return 1

    monkeypatch.setattr(openrouter, "judge_both_orders", judge_both_orders)
    judge, prompts = chat_eval.Judge(), [f"p{i}" for i in range(20)]
    judge.client = object()
    failing.add("p3")
    assert judge.verdicts(prompts, prompts, prompts) == [1] * 3 + [None] + [1] * 16
    failing.update({"p4", "p5"})
    with pytest.raises(tasks.DataUnavailable, match="503") as skipped:
        judge.verdicts(prompts, prompts, prompts)
    assert skipped.value.for_now


def test_a_task_one_rank_could_not_fetch_is_skipped_by_every_rank(monkeypatch):
    """Each rank fetches a task alone (under the cache's lock): one whose fetch failed skipped the task while the
    others scored it, and their sums stopped matching (one task's counts added to the next's, then a hang). Now
    a failure anywhere skips the task on every rank, for now. One process here: the sum says another rank failed."""
    from types import SimpleNamespace
    model = SimpleNamespace(config=SimpleNamespace(generation=2026))
    proc = Dist(rank=0, world_size=2, device=torch.device("cpu"))
    monkeypatch.setattr(chat_eval, "all_reduce_sum", lambda values, device=None: [1.0])  # another rank's failure
    monkeypatch.setattr(tasks, "download_lock", lambda make: object())  # fetched here
    monkeypatch.setattr(chat_eval, "run_categorical", lambda *args: pytest.fail("a rank scored it alone"))
    with pytest.raises(tasks.DataUnavailable, match="ARC-Easy is unavailable on another rank") as skipped:
        chat_eval.chat_task("ARC-Easy", model, None, None, None, proc)
    assert skipped.value.for_now

    def unreachable(make):
        raise tasks.DataUnavailable("allenai/ai2_arc: HTTP 429 (gave up after 7 tries)", for_now=True)

    monkeypatch.setattr(tasks, "download_lock", unreachable)  # this rank's own failure: its own words
    with pytest.raises(tasks.DataUnavailable, match="429"):
        chat_eval.chat_task("ARC-Easy", model, None, None, None, proc)


def test_the_judged_work_is_shared_by_the_ranks_and_fails_on_all_together():
    """With 8 GPUs, rank 0 sampling and judging everything (about 220 answers, 240 judge calls) while the others
    waited in a barrier outlived NCCL's timeout. Each rank now takes every world_size-th prompt (seeded by its
    index, so the answers do not depend on the number of ranks), and a judge failing on one fails on all."""
    class Judge:
        def __init__(self, fail=False):
            self.fail, self.seen = fail, []

        def verdicts(self, prompts, answers, others):
            if self.fail:
                raise tasks.DataUnavailable("the judge is unavailable: HTTP 402")
            self.seen += prompts
            return [1 if len(a) > len(o) else -1 for a, o in zip(answers, others)]

    prompts = [f"p{i}" for i in range(7)]
    answers = lambda picked, seeds: ["x" * s for s in seeds]  # 42 + the prompt's index characters
    others = lambda picked, seeds: ["y" * 45] * len(picked)
    judge = Judge()
    proc = Dist(rank=1, world_size=3, device=torch.device("cpu"))  # one process: the sums are this rank's
    # seeds 43 and 46 against 45; the mean lengths beside: the ranks' sums over all 7 prompts
    assert chat_eval.judged(judge, prompts, answers, others, proc) == (1, 1, (43 + 46) / 7, 90 / 7)
    assert judge.seen == ["p1", "p4"]
    with pytest.raises(tasks.DataUnavailable, match="402"):
        chat_eval.judged(Judge(fail=True), prompts, answers, others, proc)


def test_a_few_held_out_answers_are_kept_for_the_report(eval_base, monkeypatch):
    """Trader-DPO keeps the model's answers to the first held-out prompts (no system message, seeded as the
    judge's are), for the report to set the SFT and DPO answers side by side; an -a of other tasks keeps them."""
    run_eval(monkeypatch, "-i", "sft", "-a", "Trader-DPO", "--max_new_tokens=6", "--dpo_val_fraction=0.2")
    path = os.path.join(eval_base, "report", "chimera-chat-evaluation-sft.json")
    answers = json.load(open(path))["answers"]
    held_out = tasks.TraderDPO(split="val", val_fraction=0.2)
    prompts = [held_out[i]["prompt"] for i in range(3)]
    assert list(answers) == prompts
    model, tok, _ = load_model("sft", "cpu", "eval")
    assert list(answers.values()) == chat_eval.sample_answers(model, tok, prompts, [42, 43, 44], None,
                                                              cfg("--max_new_tokens=6"))
    run_eval(monkeypatch, "-i", "sft", "-a", "Identity")
    assert json.load(open(path))["answers"] == answers


def test_a_partial_eval_updates_its_tasks_and_keeps_the_others(eval_base, monkeypatch, capsys):
    """-a Identity after a run of other tasks: the section holds both (the earlier figures kept, the run's
    updated); skipped tasks are named and said once per cause, not one long line each."""
    run_eval(monkeypatch, "-i", "sft", "-a", "Trader-SFT")
    run_eval(monkeypatch, "-i", "sft", "-a", "Identity")
    _, lines = section(eval_base, "sft")
    assert "Trader SFT held-out loss (no system)" in lines and "Identity probe score" in lines
    for name in ("openai/openai_humaneval", "allenai/ai2_arc"):
        shutil.rmtree(os.path.dirname(os.path.dirname(tasks.hf_cache_path(name, "x", "x"))), ignore_errors=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    run_eval(monkeypatch, "-i", "sft", "-a", "ARC-Easy|ARC-Challenge|HumanEval")
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "skipped" in line] == [
        "skipped (HF_HUB_OFFLINE is set): ARC-Easy, ARC-Challenge, HumanEval (where its data goes: the json beside "
        "the report section)"]
    _, lines = section(eval_base, "sft")
    assert lines["Skipped tasks"] == "ARC-Easy, ARC-Challenge, HumanEval" and "Identity probe score" in lines
    data = json.load(open(os.path.join(eval_base, "report", "chimera-chat-evaluation-sft.json")))
    assert data["skipped_for_now"] == []  # offline is for good: run.sh stamps it


def test_a_dpo_run_on_gen_pys_pairs_has_no_on_policy_figures(tmp_path):
    """gen.py's Store keeps a ledger beside its data too ({"id", "outcome": "ok"}): it is not onpolicy.py's, whose
    lines name their round, so a DPO run on gen.py's pairs shows no "On-policy pairs" line."""
    data = tmp_path / "trader_dpo_data.jsonl"
    meta = {"user_config": {"dpo_data_path": str(data)}}
    (tmp_path / "trader_dpo_data.ledger.jsonl").write_text('{"id": "a1", "outcome": "ok", "hash": "x"}\n')
    assert chat_eval.onpolicy_pairs(meta) is None
    (tmp_path / "trader_dpo_data.ledger.jsonl").write_text(
        '{"id": 1, "round": 1, "outcome": "kept", "cost": 0.25}\n{"id": 2, "round": 1, "outcome": "close", "cost": 0.5}\n')
    assert chat_eval.onpolicy_pairs(meta) == {"kept": 1, "rejected": {"close": 1}, "judge_cost": 0.75}
