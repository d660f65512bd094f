"""tasks.py: Task slicing and mixtures, the persona data, nanochat's renderings from seeded
caches and the viewer-API row loader against a loopback server (the code sandbox:
test_sandbox.py)."""

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import requests

import tasks
from common import UserError
from conftest import free_port, run_python


@pytest.fixture
def base(tmp_path, monkeypatch):
    path = tmp_path / "base"
    path.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(path))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(tasks, "HF_BACKOFF", 0.01)  # retries in a blink
    monkeypatch.setattr(tasks, "_unreachable", set())
    return path


def seed_cache(dataset, config, split, rows, name=None):
    path = tasks.hf_cache_path(dataset, config, split)
    if name:
        path = os.path.join(os.path.dirname(path), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


# -----------------------------------------------------------------------------
# Task slicing and mixtures


class ListTask(tasks.Task):
    def __init__(self, items, label="list", **kwargs):
        super().__init__(**kwargs)
        self.items, self.label = items, label

    def num_examples(self):
        return len(self.items)

    def get_example(self, index):
        return self.items[index]


def test_task_slicing():
    items = list(range(10))
    assert list(ListTask(items)) == items
    assert list(ListTask(items, start=2, stop=8, step=3)) == [2, 5]
    assert len(ListTask(items, start=1, step=2)) == 5 and ListTask(items, start=1, step=2)[4] == 9
    assert list(ListTask(items, start=7, stop=100)) == [7, 8, 9]  # stop past the end is capped
    assert len(ListTask(items, start=12)) == 0
    assert ListTask(items, start=3, stop=5).name == "list[3:5]"
    with pytest.raises(IndexError):
        ListTask(items, stop=3)[3]
    for bad in (dict(start=-1), dict(step=0), dict(start=5, stop=4)):
        with pytest.raises(ValueError):
            ListTask(items, **bad)


def test_mixture_weights_determinism_and_composition():
    a = ListTask([f"a{i}" for i in range(5)], label="A")
    b = ListTask([f"b{i}" for i in range(3)], label="B", stop=2)
    mix = tasks.TaskMixture([a, b], weights=[2, 1])
    seen = list(mix)
    assert len(mix) == 12
    assert all(seen.count(f"a{i}") == 2 for i in range(5))
    assert seen.count("b0") == seen.count("b1") == 1 and "b2" not in seen
    assert list(tasks.TaskMixture([a, b], weights=[2, 1])) == seen  # same seed, same order
    assert list(tasks.TaskMixture([a, b], weights=[2, 1], seed=7)) != seen
    assert seen[:4] != ["a0", "a1", "a2", "a3"]  # shuffled, not concatenated
    assert mix.composition() == [("A", 5, 2, 10), ("B[0:2]", 2, 1, 2)]
    # weights of 1 give nanochat's order: the (task, index) list shuffled by Random(42)
    pairs = [(0, i) for i in range(5)] + [(1, i) for i in range(2)]
    import random
    random.Random(42).shuffle(pairs)
    assert list(tasks.TaskMixture([a, b])) == [[a, b][t][i] for t, i in pairs]


@pytest.mark.parametrize("weights", [[0, 1], [-1, 1], [1.5, 1], [True, 1], [1], ["2", 1]])
def test_mixture_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        tasks.TaskMixture([ListTask([1]), ListTask([2])], weights=weights)


# -----------------------------------------------------------------------------
# Persona data


def sft_record(i):
    return {"messages": [{"role": "system", "content": "You are Vex, a veteran futures trader."},
                         {"role": "user", "content": f"What about position {i}?"},
                         {"role": "assistant", "content": f"Cut it at level {i}. Discipline first."}]}


def write_lines(path, lines):
    with open(path, "a") as f:
        f.writelines(line + "\n" for line in lines)


def test_trader_sft_split_is_deterministic_and_stable_under_appends(base):
    path = base / "datasets" / "trader_sft_data.jsonl"
    path.parent.mkdir()
    write_lines(path, [json.dumps(sft_record(i)) for i in range(300)] + [""])  # a blank line is skipped
    train, val = tasks.TraderSFT(split="train"), tasks.TraderSFT(split="val")  # default path
    train_q = {ex["messages"][1]["content"] for ex in train}
    val_q = {ex["messages"][1]["content"] for ex in val}
    assert len(train_q) + len(val_q) == 300 and not train_q & val_q
    assert 10 <= len(val_q) <= 60  # ~10%
    assert train.eval_type == "generative" and train[0]["messages"][0]["role"] == "system"

    write_lines(path, [json.dumps(sft_record(i)) for i in range(300, 400)])
    train2 = {ex["messages"][1]["content"] for ex in tasks.TraderSFT(split="train")}
    val2 = {ex["messages"][1]["content"] for ex in tasks.TraderSFT(split="val")}
    assert train_q <= train2 and val_q <= val2 and len(train2) + len(val2) == 400

    shuffled = base / "shuffled.jsonl"  # the split follows content, not line order
    write_lines(shuffled, [json.dumps(sft_record(i)) for i in reversed(range(300))])
    assert {ex["messages"][1]["content"] for ex in tasks.TraderSFT(str(shuffled), split="val")} == val_q


@pytest.mark.parametrize("line, why", [
    ('{"messages": [', "not valid JSON"),
    ('{"text": "hi"}', '"messages"'),
    ('{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]}', "role"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}', "role"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "system", "content": "c"}]}', "role"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}', "content"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}]}', "assistant"),
])
def test_trader_sft_bad_line_names_file_and_line(tmp_path, line, why):
    path = tmp_path / "sft.jsonl"
    write_lines(path, [json.dumps(sft_record(0)), "", line])
    with pytest.raises(UserError) as e:
        tasks.TraderSFT(str(path))
    assert f"{path}:3:" in str(e.value) and why in str(e.value)


@pytest.mark.parametrize("raw, why", [
    (b"[" * 100_000 + b"]" * 100_000, "beyond what Python parses"),  # RecursionError inside json
    (b'{"messages": ' + b"9" * 5000 + b"}", None),  # Python >= 3.11: an int of 5,000 digits is refused
    (b'{"messages": "caf\xe9"}', "not UTF-8"),  # Latin-1, not UTF-8
])
def test_hostile_line_is_one_clear_error_on_its_own_line(tmp_path, raw, why):
    path = tmp_path / "sft.jsonl"
    good = json.dumps(sft_record(0)).encode()
    path.write_bytes(b"\n".join([good] * 3000 + [raw, good]) + b"\n")  # past the decoder's first chunk
    with pytest.raises(UserError) as e:
        tasks.TraderSFT(str(path))
    assert str(e.value).startswith(f"{path}:3001:") and (why is None or why in str(e.value))


def test_an_append_the_disk_cuts_short_leaves_whole_lines_and_names_the_file(tmp_path):
    """A file size limit stands in for a full disk: the write stops part-way, the file is cut back to its lines."""
    path = tmp_path / "data.jsonl"
    script = ("import resource, sys, tasks\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))  # Python ignores SIGXFSZ: writes fail\n"
              "tasks.append_jsonl(sys.argv[1], {'a': 'x' * 50})\n"
              "try:\n    tasks.append_jsonl(sys.argv[1], {'b': 'y' * 50})\n"
              "except OSError as e:\n    print(e.filename, e.strerror)\n")
    out = run_python(["-c", script, str(path)]).stdout
    assert out.startswith(f"{path} ") and path.read_text() == json.dumps({"a": "x" * 50}) + "\n"


def test_trader_files_empty_or_missing(tmp_path, base):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    for cls in (tasks.TraderSFT, tasks.TraderDPO):
        with pytest.raises(UserError, match="empty"):
            cls(str(empty))
        with pytest.raises(UserError, match="not found") as e:
            cls()
        assert os.path.join(str(base), "datasets") in str(e.value)


def dpo_record(i):
    return {"prompt": f"Should I average down on trade {i}?", "chosen": "No. Cut losers, press winners.",
            "rejected": f"Sure, double it {i} times!"}


def test_trader_dpo_split_and_format(base):
    path = base / "dpo.jsonl"
    write_lines(path, [json.dumps(dpo_record(i)) for i in range(400)])
    train, val = tasks.TraderDPO(str(path), "train"), tasks.TraderDPO(str(path), "val")
    assert len(train) + len(val) == 400 and 5 <= len(val) <= 45  # ~5%
    assert set(train[0]) == {"prompt", "chosen", "rejected"}
    old_val = [ex["prompt"] for ex in val]
    write_lines(path, [json.dumps(dpo_record(i)) for i in range(400, 500)])
    assert set(old_val) <= {ex["prompt"] for ex in tasks.TraderDPO(str(path), "val")}
    assert not set(old_val) & {ex["prompt"] for ex in tasks.TraderDPO(str(path), "train")}


@pytest.mark.parametrize("record, why", [
    ({"prompt": "p", "chosen": "c"}, '"rejected"'),
    ({"prompt": "", "chosen": "c", "rejected": "r"}, '"prompt"'),
    ({"prompt": "p", "chosen": ["c"], "rejected": "r"}, '"chosen"'),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    (["p", "c", "r"], "expected an object"),
])
def test_trader_dpo_bad_line(tmp_path, record, why):
    path = tmp_path / "dpo.jsonl"
    write_lines(path, [json.dumps(dpo_record(0)), json.dumps(record)])
    with pytest.raises(UserError) as e:
        tasks.TraderDPO(str(path))
    assert f"{path}:2:" in str(e.value) and why in str(e.value)


# -----------------------------------------------------------------------------
# nanochat's renderings, from seeded caches

ARC_ROWS = [
    {"id": "Mercury_7220990", "question": "Which factor will most likely cause a person to develop a fever?",
     "choices": {"text": ["a leg muscle relaxing after exercise", "a bacterial population in the bloodstream",
                          "several viral particles on the skin", "carbohydrates being digested in the stomach"],
                 "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    {"id": "NYSEDREGENTS_2015_4_8", "question": "Which form of energy is produced when a rubber band vibrates?",
     "choices": {"text": ["chemical", "light", "electrical", "sound"], "label": ["1", "2", "3", "4"]},
     "answerKey": "4"},
] + [{"id": f"q{i}", "question": f"Question {i}?", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
      "answerKey": "C"} for i in range(2, 5)]

MMLU_ROW = {"question": "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
            "subject": "abstract_algebra", "choices": ["0", "4", "2", "6"], "answer": 1}

GSM8K_ROW = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                         "to her friends in May. How many clips did Natalia sell altogether in April and May?",
             "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
                       "clips altogether in April and May.\n#### 72"}

HUMANEVAL_ROW = {
    "task_id": "HumanEval/0",
    "prompt": 'from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n'
              '    """ Check if in given list of numbers, are any two numbers closer to each other than\n'
              '    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n'
              '    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n    True\n    """\n',
    "canonical_solution": "    for idx, elem in enumerate(numbers):\n        for idx2, elem2 in enumerate(numbers):\n"
                          "            if idx != idx2:\n                distance = abs(elem - elem2)\n"
                          "                if distance < threshold:\n                    return True\n\n"
                          "    return False\n",
    "test": "\n\nMETADATA = {\n    'author': 'jt',\n    'dataset': 'test'\n}\n\n\ndef check(candidate):\n"
            "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
            "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
            "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n"
            "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.8) == False\n"
            "    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False\n\n",
    "entry_point": "has_close_elements",
}

SMOLTALK_ROWS = [
    {"messages": [{"content": "You are a helpful assistant.", "role": "system"},
                  {"content": "Hi! Can you name a prime?", "role": "user"},
                  {"content": "Sure: 7.", "role": "assistant"}], "source": "smol-magpie-ultra"},
    {"messages": [{"content": "Hello", "role": "user"}, {"content": "Hi there!", "role": "assistant"},
                  {"content": "Bye", "role": "user"}, {"content": "Goodbye!", "role": "assistant"}],
     "source": "everyday-conversations"},
]


def test_arc_rendering_and_nanochat_order(base):
    seed_cache("allenai/ai2_arc", "ARC-Easy", "test", ARC_ROWS)
    arc = tasks.ARC("ARC-Easy", "test")
    # datasets' .shuffle(seed=42) of 5 rows, i.e. numpy default_rng(42).permutation(5)
    assert [ex["messages"][0]["content"] for ex in arc] == [
        tasks.render_mc(ARC_ROWS[i]["question"], ARC_ROWS[i]["choices"]["label"], ARC_ROWS[i]["choices"]["text"])
        for i in [4, 2, 3, 1, 0]]
    first = arc[4]
    assert first == {"messages": [
        {"role": "user", "content": "Multiple Choice question: Which factor will most likely cause a person to "
                                    "develop a fever?\n- a leg muscle relaxing after exercise=A\n- a bacterial "
                                    "population in the bloodstream=B\n- several viral particles on the skin=C\n"
                                    "- carbohydrates being digested in the stomach=D\n\nRespond only with the "
                                    "letter of the correct answer."},
        {"role": "assistant", "content": "B"}], "letters": ["A", "B", "C", "D"]}
    assert arc.eval_type == "categorical"
    assert arc.evaluate(first, "B") == 1 and arc.evaluate(first, "A") == 0
    assert arc[3]["messages"][1]["content"] == "4" and "- sound=4\n" in arc[3]["messages"][0]["content"]
    assert len(tasks.ARC("ARC-Easy", "test", stop=2)) == 2


def test_mmlu_rendering(base):
    seed_cache("cais/mmlu", "all", "test", [MMLU_ROW])
    seed_cache("cais/mmlu", "auxiliary_train", "train", [{"train": dict(MMLU_ROW, subject="")}])
    ex = tasks.MMLU()[0]
    assert ex["messages"][0]["content"] == (
        "Multiple Choice question: Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) "
        "over Q.\n- 0=A\n- 4=B\n- 2=C\n- 6=D\n\nRespond only with the letter of the correct answer.")
    assert ex["messages"][1] == {"role": "assistant", "content": "B"}
    assert ex["subject"] == "abstract_algebra" and tuple(ex["letters"]) == ("A", "B", "C", "D")
    assert tasks.MMLU().evaluate(ex, "B") == 1
    aux = tasks.MMLU("auxiliary_train", "train")[0]  # the {"train": row} wrapper is removed
    assert aux["messages"] == ex["messages"]


def test_gsm8k_rendering_and_evaluation(base):
    seed_cache("openai/gsm8k", "main", "test", [GSM8K_ROW])
    gsm = tasks.GSM8K()
    ex = gsm[0]
    assert ex["messages"][0] == {"role": "user", "content": GSM8K_ROW["question"]}
    assert ex["messages"][1]["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"}, {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"}, {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"}]
    assert tasks.gsm8k_parts("a <<x=y=3>> b <<noequals>>")[1:5] == [
        {"type": "python", "text": "x=y"}, {"type": "python_output", "text": "3"}, {"type": "text", "text": " b "},
        {"type": "python", "text": "noequals"}]
    assert gsm.eval_type == "generative"
    assert gsm.evaluate(ex, "She sold 24 in May, so 48+24=72.\n#### 72") == 1
    assert gsm.evaluate(ex, "#### 71") == 0
    assert gsm.evaluate(ex, "The answer is 72.") == 0  # no #### marker
    assert gsm.evaluate(ex, None) == 0


def test_gsm8k_answer_extraction():
    assert tasks.extract_gsm8k_answer("so #### 1,234") == "1234"
    assert tasks.extract_gsm8k_answer("#### -5 degrees") == "-5"
    assert tasks.extract_gsm8k_answer("#### 3.50") == "3.50"
    assert tasks.extract_gsm8k_answer("answer: 12") is None
    assert tasks.extract_gsm8k_answer(None) is None


def test_humaneval_rendering_and_evaluation(base):
    seed_cache("openai/openai_humaneval", "openai_humaneval", "test", [HUMANEVAL_ROW])
    he = tasks.TASKS["HumanEval"]()
    ex = he[0]
    assert ex["messages"] == [
        {"role": "user", "content": HUMANEVAL_ROW["prompt"]},
        {"role": "assistant", "content": HUMANEVAL_ROW["prompt"] + "\n" + HUMANEVAL_ROW["canonical_solution"]}]
    assert ex["entry_point"] == "has_close_elements" and ex["test"] == HUMANEVAL_ROW["test"]
    # the completion relies on List from the prompt's imports
    correct = ("Here is the function:\n```python\ndef has_close_elements(numbers: List[float], threshold: float) "
               "-> bool:\n    s = sorted(numbers)\n    return any(b - a < threshold for a, b in zip(s, s[1:]))\n"
               "```\nIt sorts first.")
    assert he.evaluate(ex, correct) == 1
    assert he.evaluate(ex, ex["messages"][1]["content"]) == 1  # plain code, no fence
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert he.evaluate(ex, wrong) == 0
    assert he.evaluate(ex, "I cannot write code.") == 0


def test_extract_imports_stops_at_code():
    prompt = 'import math\n# helper\nfrom typing import List\n\ndef f(x):\n    """\n    from the list, pick\n    """\n'
    assert tasks.extract_imports(prompt) == "import math\nfrom typing import List"
    assert tasks.extract_code("```\nx = 1\n```") == "x = 1"


def test_smoltalk_prefix_and_validation(base):
    seed_cache("HuggingFaceTB/smol-smoltalk", "default", "train", SMOLTALK_ROWS)
    st = tasks.SmolTalk("train")
    assert [ex["messages"] for ex in st] == [r["messages"] for r in SMOLTALK_ROWS]  # stored order, no source key
    assert set(st[0]) == {"messages"}
    st[0]["messages"].append("mutated")  # examples are copies
    assert len(st[0]["messages"]) == 3
    assert len(tasks.SmolTalk("train", stop=1)) == 1
    bad = SMOLTALK_ROWS + [{"messages": [{"content": "a", "role": "assistant"}, {"content": "b", "role": "user"}]}]
    path = seed_cache("HuggingFaceTB/smol-smoltalk", "default", "test", bad)
    with pytest.raises(UserError, match=f"{path}:3: .*role"):
        tasks.SmolTalk("test")


def seed_words(base, words=("strawberry", "apple", "banana", "kiwi")):
    (base / "task_data").mkdir(exist_ok=True)
    (base / "task_data" / "words_alpha.txt").write_text("".join(w + "\r\n" for w in words))  # the file's CRLF


def test_spelling_tasks_render_and_grade_like_nanochat(base):
    seed_words(base)
    bee, test_bee = tasks.SpellingBee(size=50, split="train"), tasks.SpellingBee(size=50, split="test")
    assert len(bee) == 50 and bee[7] == tasks.SpellingBee(size=50)[7]  # example i is a function of i
    assert [bee[i] for i in range(10)] != [test_bee[i] for i in range(10)]  # test seeds are apart from train's
    for i in range(50):
        user, assistant = bee[i]["messages"]
        python = [p["text"] for p in assistant["content"] if p["type"] == "python"][0]
        word, letter = python.split("'")[1], python.split("'")[3]
        assert word in ("strawberry", "apple", "banana", "kiwi") and word in user["content"]
        answer = str(word.count(letter))
        assert assistant["content"][-1]["text"].endswith(f"#### {answer}")
        assert [p["text"] for p in assistant["content"] if p["type"] == "python_output"] == [answer]
        assert bee.evaluate(bee[i], f"so #### {answer}") == 1 and bee.evaluate(bee[i], "#### 99") == 0
    spell = tasks.SimpleSpelling(size=5)
    word = spell[0]["messages"][0]["content"].removeprefix("Spell the word: ")
    assert spell[0]["messages"][1]["content"] == f"{word}:{','.join(word)}"


with open(os.path.join(os.path.dirname(__file__), "fixtures", "eval_golden.json"), encoding="utf-8") as f:
    GOLDEN = json.load(f)  # nanochat's own spelling examples and grades, HumanEval verdicts per generation


def test_spelling_examples_and_grades_are_nanochats_on_its_train_and_test_seeds(base):
    seed_words(base, GOLDEN["words"])
    nanochat = GOLDEN["spellingbee_885a4f2"]
    train, test = tasks.SpellingBee(300, "train"), tasks.NANOCHAT_TASKS[2025]["SpellingBee"]()
    assert len(test) == 256 and [test[i] for i in range(len(nanochat["test_size256"]))] == nanochat["test_size256"]
    assert [train[i] for i in range(len(nanochat["train_size300"]))] == nanochat["train_size300"]
    assert test[0] == train[1] and test[6] == train[7]  # nanochat's test example i is its train example i + 1
    simple = tasks.SimpleSpelling(300, "train")
    assert [simple[i] for i in range(len(nanochat["simplespelling_train_size300"]))] == \
        nanochat["simplespelling_train_size300"]
    assert [test.evaluate(test[i], completion) for i, completion, _ in nanochat["grades"]] == \
        [grade for _, _, grade in nanochat["grades"]]
    assert "SpellingBee" not in tasks.NANOCHAT_TASKS[2026]  # 92d63d4's chat_eval has no SpellingBee


@pytest.mark.parametrize("generation, commit", [(2025, "885a4f2"), (2026, "92d63d4")])
def test_nanochat_humaneval_grades_as_that_generations_chat_eval(base, generation, commit):
    problems, cases = GOLDEN["humaneval"]["problems"], GOLDEN["humaneval"]["cases"]
    seed_cache("openai/openai_humaneval", "openai_humaneval", "test", problems)
    task = tasks.NANOCHAT_TASKS[generation]["HumanEval"]()
    problem = {ex["entry_point"]: ex for ex in task}
    conversation = lambda p: problem[problems[p]["entry_point"]]
    # a __name__ == "__main__" block runs on 2026 only; exiting with status 0 passes 2026, fails 2025
    assert [task.evaluate(conversation(p), completion) for p, completion, _ in cases] == \
        [grades[commit] for _, _, grades in cases]
    # Chimera grades otherwise on purpose: the prompt's helpers are there, only literals come back (no Counter)
    (_, no_helper, grades), (_, counter, counter_grades) = cases[11], cases[13]
    assert grades[commit] == 0 and tasks.TASKS["HumanEval"]().evaluate(conversation(1), no_helper) == 1
    assert counter_grades[commit] == 1 and tasks.TASKS["HumanEval"]().evaluate(conversation(2), counter) == 0


def test_mixture_is_nanochat_885a4f2s_and_says_where_missing_files_go(base, monkeypatch):
    import sft
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seed_cache("allenai/ai2_arc", "ARC-Easy", "train", ARC_ROWS)
    seed_cache("allenai/ai2_arc", "ARC-Challenge", "train", ARC_ROWS[:2])
    seed_cache("openai/gsm8k", "main", "train", [GSM8K_ROW])
    seed_cache("HuggingFaceTB/smol-smoltalk", "default", "train", SMOLTALK_ROWS)
    seed_cache("HuggingFaceTB/smol-smoltalk", "default", "test", SMOLTALK_ROWS)
    seed_words(base)
    config = sft.parse_config(sft.Config, ["--sft_dataset=mixture"])
    with pytest.raises(tasks.DataUnavailable) as e:  # offline, no identity conversations anywhere
        sft.build_datasets(config, 2025)
    assert str(base / "task_data" / "identity_conversations.jsonl") in str(e.value) and tasks.IDENTITY_URL in str(e.value)
    identity = [[{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "nanochat"}]] * 3
    (base / "identity_conversations.jsonl").write_text("".join(json.dumps(m) + "\n" for m in identity))  # nanochat's place
    train, _ = sft.build_datasets(config, 2025)
    assert [(name, rows) for name, rows, _, _ in train.composition()] == [
        ("ARC-Easy/train", 5), ("ARC-Challenge/train", 2), ("GSM8K/main/train", 1), ("SmolTalk/train[0:10000]", 2),
        ("Identity", 3), ("SimpleSpelling/train", 300), ("SpellingBee/train", 300)]
    assert len(train) == 613


def test_registry_builds_eval_tasks(base):
    seed_words(base)
    seed_cache("allenai/ai2_arc", "ARC-Easy", "test", ARC_ROWS)
    seed_cache("allenai/ai2_arc", "ARC-Challenge", "test", ARC_ROWS[:2])
    seed_cache("cais/mmlu", "all", "test", [MMLU_ROW])
    seed_cache("openai/gsm8k", "main", "test", [GSM8K_ROW])
    seed_cache("openai/openai_humaneval", "openai_humaneval", "test", [HUMANEVAL_ROW])
    built = {name: make() for name, make in tasks.TASKS.items()}
    assert {n: (len(t), t.eval_type) for n, t in built.items()} == {
        "ARC-Easy": (5, "categorical"), "ARC-Challenge": (2, "categorical"), "MMLU": (1, "categorical"),
        "GSM8K": (1, "generative"), "HumanEval": (1, "generative"), "SpellingBee": (256, "generative")}
    assert len(tasks.TASKS["ARC-Easy"](stop=3)) == 3


def test_bad_cache_row_names_file_and_line(base):
    path = seed_cache("allenai/ai2_arc", "ARC-Easy", "test", [ARC_ROWS[0], dict(ARC_ROWS[0], answerKey="E")])
    with pytest.raises(UserError, match=f"{path}:2: answerKey 'E'"):
        tasks.ARC("ARC-Easy", "test")
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(UserError, match=f"{path}:3: not valid JSON"):
        tasks.hf_rows("allenai/ai2_arc", "ARC-Easy", "test")


def test_prefetch_cli(base):
    seed_cache("allenai/ai2_arc", "ARC-Easy", "test", ARC_ROWS)
    env = {"NANOCHAT_BASE_DIR": str(base)}
    assert "ARC-Easy/test: 5 examples" in run_python(["tasks.py", "ARC-Easy"], env=env, timeout=60).stdout
    proc = run_python(["tasks.py", "NoSuchTask"], env=env, timeout=60, check=False)
    assert proc.returncode == 2 and "unknown task 'NoSuchTask'" in proc.stderr


# -----------------------------------------------------------------------------
# The viewer-API loader against a loopback /rows server


class RowsServer:
    """A stand-in for datasets-server's /rows: pagination, the 100-row limit, and scripted
    failures served before normal answers."""

    def __init__(self, splits):
        self.splits, self.requests, self.script = splits, [], []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                params = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
                server.requests.append({"params": params, "headers": dict(self.headers), "t": time.monotonic()})
                status, headers, body = server.answer(url.path, params)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                data = json.dumps(body).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def answer(self, path, params):
        if self.script:
            return self.script.pop(0)
        key = (params.get("dataset"), params.get("config"), params.get("split"))
        if path != "/rows" or key not in self.splits:
            return 404, {}, {"error": "The dataset does not exist, or is not accessible."}
        offset, length = int(params["offset"]), int(params["length"])
        if not 0 < length <= 100:
            return 422, {}, {"error": "Parameter 'length' must be between 1 and 100"}
        items = self.splits[key]
        rows = [{"row_idx": offset + i, "row": item["row"], "truncated_cells": item.get("truncated_cells", [])}
                for i, item in enumerate(items[offset:offset + length])]
        return 200, {}, {"features": [], "rows": rows, "num_rows_total": len(items),
                         "num_rows_per_page": 100, "partial": False}

    def pages(self):
        return [(int(r["params"]["offset"]), int(r["params"]["length"])) for r in self.requests]


ROWS = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(250)]


@pytest.fixture
def server(base, monkeypatch):
    srv = RowsServer({("org/data", "main", "train"): [{"row": r} for r in ROWS]})
    monkeypatch.setenv("CHIMERA_HF_ROWS_URL", srv.url)  # base URL: /rows is appended
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def test_rows_pagination_and_cache_reuse(server, base):
    rows = tasks.hf_rows("org/data", "main", "train")
    assert rows == ROWS
    assert server.pages() == [(0, 100), (100, 100), (200, 50)]
    cache = base / "task_data" / "org--data" / "main" / "train.jsonl"
    assert [json.loads(line) for line in cache.read_text().splitlines()] == ROWS
    assert not [p for p in os.listdir(cache.parent) if p.endswith(".tmp")]
    assert tasks.hf_rows("org/data", "main", "train") == ROWS and len(server.requests) == 3  # cached
    assert tasks.hf_rows("org/data", "main", "train", stop=5) == ROWS[:5] and len(server.requests) == 3


def test_rows_prefix_fetch(server, base):
    folder = base / "task_data" / "org--data" / "main"
    assert tasks.hf_rows("org/data", "main", "train", stop=150) == ROWS[:150]
    assert server.pages() == [(0, 100), (100, 50)]
    assert sorted(os.listdir(folder)) == ["train.first150.jsonl"]  # not mistaken for the whole split
    assert tasks.hf_rows("org/data", "main", "train", stop=120) == ROWS[:120] and len(server.requests) == 2
    assert tasks.hf_rows("org/data", "main", "train", stop=30) == ROWS[:30] and len(server.requests) == 2
    assert tasks.hf_rows("org/data", "main", "train", stop=200) == ROWS[:200]  # a longer prefix is fetched
    assert sorted(os.listdir(folder)) == ["train.first200.jsonl"]
    assert tasks.hf_rows("org/data", "main", "train") == ROWS  # the whole split replaces prefixes
    assert sorted(os.listdir(folder)) == ["train.jsonl"]
    n = len(server.requests)
    assert tasks.hf_rows("org/data", "main", "train", stop=1000) == ROWS and len(server.requests) == n
    assert tasks.hf_rows("org/data", "main", "train", stop=7) == ROWS[:7] and len(server.requests) == n
    shutil.rmtree(folder)
    tasks.hf_rows("org/data", "main", "train", stop=10)
    assert server.pages()[-1] == (0, 10)  # a small prefix asks only for what it needs


def test_rows_stop_past_the_end_is_the_whole_split(server, base):
    assert tasks.hf_rows("org/data", "main", "train", stop=1000) == ROWS
    assert os.listdir(base / "task_data" / "org--data" / "main") == ["train.jsonl"]


def test_rows_retry_500_and_429_retry_after(server, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")
    server.script = [(500, {}, {"error": "boom"}), (429, {"Retry-After": "1"}, {"error": "slow down"})]
    assert tasks.hf_rows("org/data", "main", "train", stop=100) == ROWS[:100]
    assert len(server.requests) == 3
    waited = server.requests[2]["t"] - server.requests[1]["t"]
    assert 0.9 <= waited < 5  # Retry-After honoured (backoff alone would be 0.02 s)
    assert all(r["headers"].get("Authorization") == "Bearer hf_secret_token_123" for r in server.requests)
    out = capsys.readouterr()
    assert "HTTP 500" in out.out and "HTTP 429" in out.out
    assert "hf_secret_token_123" not in out.out + out.err


def test_a_token_echoed_across_the_cut_of_an_error_message_leaves_none_of_it(server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")
    server.script = [(403, {}, {"error": "x" * 180 + " header: Bearer hf_secret_token_123"})]  # across the 200th
    with pytest.raises(tasks.DataUnavailable) as e:
        tasks.hf_rows("org/data", "main", "train")
    assert "Bearer ***" in str(e.value) and "hf_secret" not in str(e.value)


def test_a_retry_wait_ends_when_stop_is_set():
    """Ctrl-C (gen.py's STOP) ends a wait to retry at once, whatever Retry-After asked for."""
    response, stop = requests.Response(), threading.Event()
    response.status_code, response.headers["Retry-After"] = 429, "60"
    threading.Timer(0.2, stop.set).start()
    t0 = time.time()
    with pytest.raises(tasks.HTTPGaveUp, match=r"HTTP 429 \(stopped before retry 1\)"):
        tasks.http_retry(lambda: response, 6, 1.0, max_wait=300.0, stop=stop)
    assert time.time() - t0 < 5


def test_cached_file_retries_a_transient_failure(server, base):
    server.script = [(503, {}, {"error": "busy"}), (200, {}, ["apple", "pear"])]
    path = tasks.cached_file(server.url + "/words_alpha.txt")
    assert open(path).read() == json.dumps(["apple", "pear"]) and len(server.requests) == 2
    assert path == str(base / "task_data" / "words_alpha.txt")


def test_rows_truncated_cells_skipped_and_counted(base, monkeypatch, capsys):
    items = [{"row": r, "truncated_cells": ["answer"] if i in (3, 140) else []} for i, r in enumerate(ROWS[:160])]
    srv = RowsServer({("org/big", "default", "train"): items})
    monkeypatch.setenv("CHIMERA_HF_ROWS_URL", srv.url + "/rows")
    try:
        rows = tasks.hf_rows("org/big", "default", "train")
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
    assert rows == [r for i, r in enumerate(ROWS[:160]) if i not in (3, 140)]
    assert "skipped 2 rows with truncated cells" in capsys.readouterr().out


def test_rows_unavailable_names_the_cache(base, monkeypatch):
    monkeypatch.setenv("CHIMERA_HF_ROWS_URL", f"http://127.0.0.1:{free_port()}/rows")  # nothing listens
    t = time.time()
    with pytest.raises(tasks.DataUnavailable) as e:
        monkeypatch.setattr(tasks, "HF_RETRIES", 2)
        tasks.hf_rows("org/data", "main", "train")
    assert time.time() - t < 5
    expected = os.path.join(str(base), "task_data", "org--data", "main", "train.jsonl")
    assert "org/data (main/train)" in str(e.value) and expected in str(e.value)
    assert isinstance(e.value, UserError) and not os.path.exists(expected)
    assert e.value.for_now and "org/data" not in e.value.cause  # a later run may reach it; the cause, no path
    # an eval task without cache or network says the same, in one line
    monkeypatch.setattr(tasks, "HF_RETRIES", 0)
    with pytest.raises(tasks.DataUnavailable, match="ARC-Challenge/test.*task_data.*allenai--ai2_arc"):
        tasks.ARC("ARC-Challenge", "test")


@pytest.mark.parametrize("value", ["1", "true", "Yes", "ON"])
def test_offline_env_fails_at_once_without_a_request(server, monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(tasks.DataUnavailable, match="HF_HUB_OFFLINE.*org--data") as e:
        tasks.hf_rows("org/data", "main", "train")
    assert server.requests == [] and not e.value.for_now and e.value.cause == "HF_HUB_OFFLINE is set"


@pytest.mark.parametrize("value", ["0", "false", "No", "off", ""])
def test_offline_env_set_to_false_is_online(server, monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", value)
    assert tasks.hf_rows("org/data", "main", "train", stop=10) == ROWS[:10] and len(server.requests) == 1


def test_unreachable_endpoint_is_written_off_for_the_run(base, monkeypatch):
    monkeypatch.setenv("CHIMERA_HF_ROWS_URL", f"http://127.0.0.1:{free_port()}/rows")  # nothing listens
    with pytest.raises(tasks.DataUnavailable, match=r"gave up after 3 tries"):
        tasks.hf_rows("org/data", "main", "train")
    t = time.time()
    with pytest.raises(tasks.DataUnavailable, match="unreachable earlier"):
        monkeypatch.setattr(tasks, "HF_BACKOFF", 10.0)  # would wait 10 s if retried
        tasks.hf_rows("org/other", "main", "test")
    assert time.time() - t < 1


def test_rows_client_errors_are_not_retried(server):
    with pytest.raises(tasks.DataUnavailable, match="HTTP 404.*does not exist"):
        tasks.hf_rows("org/missing", "main", "train")
    assert len(server.requests) == 1



@pytest.mark.parametrize("body, why", [
    (["not", "a", "page"], "unexpected response"),
    ({"rows": [{"row": {"q": 1}}]}, "unexpected response"),  # no num_rows_total
    ({"rows": "nope", "num_rows_total": 3}, "unexpected response"),
    ({"rows": [], "num_rows_total": 0}, "the split has no rows"),
    ({"rows": [], "num_rows_total": 5}, "no rows at offset 0 of 5"),
])
def test_malformed_page_is_unavailable_and_caches_nothing(server, base, body, why):
    server.script = [(200, {}, body)]
    with pytest.raises(tasks.DataUnavailable, match=why):
        tasks.hf_rows("org/data", "main", "train")
    assert not os.path.exists(tasks.hf_cache_path("org/data", "main", "train"))


DOWNLOAD_IN_PROCESS = r"""
import sys, tasks
tasks.HF_BACKOFF = 0.01
rows = tasks.download_lock(lambda: tasks.hf_rows("org/data", "main", "train"))
print(len(rows))
"""


def test_processes_that_share_a_cache_download_it_once(server, base):
    """Under torchrun every rank builds its datasets through download_lock: the first fills the cache, the
    others read it (no barrier on global rank 0, which with per-node disks left every other node's ranks racing)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", DOWNLOAD_IN_PROCESS], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    assert [p.communicate(timeout=120)[0].strip() for p in procs] == ["250"] * 3
    assert server.pages() == [(0, 100), (100, 100), (200, 50)]  # one fetch, not three
