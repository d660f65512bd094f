"""The offline demo's hand-written persona data in data/: well-formed and in persona."""

import json
import os
import re

from conftest import REPO

DATA = os.path.join(REPO, "data")


def persona_section(name):
    text = open(os.path.join(DATA, "persona.md"), encoding="utf-8").read()
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", text, re.S | re.M))
    return sections[name].strip()


def lines(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_sft_conversations_are_well_formed_and_carry_the_persona():
    records = lines("demo_sft.jsonl")
    system = persona_section("system")
    assert len(records) >= 50
    firsts = set()
    for r in records:
        assert set(r) == {"messages"}
        roles = [m["role"] for m in r["messages"]]
        assert roles[0] == "system" and r["messages"][0]["content"] == system
        assert roles[1:] == ["user", "assistant"] * ((len(roles) - 1) // 2) and len(roles) % 2 == 1
        for m in r["messages"][1:]:
            assert set(m) == {"role", "content"} and m["content"].strip() and m["content"].isascii()
            assert (150 <= len(m["content"]) <= 600) if m["role"] == "assistant" else len(m["content"]) < 300
        firsts.add(r["messages"][1]["content"])
    assert len(firsts) == len(records)  # no repeated opening question


def test_dpo_pairs_are_real_preferences_of_similar_length():
    records = lines("demo_dpo.jsonl")
    assert len(records) >= 70
    assert len({r["prompt"] for r in records}) == len(records)
    sft_questions = {r["messages"][1]["content"] for r in lines("demo_sft.jsonl")}
    for r in records:
        assert set(r) == {"prompt", "chosen", "rejected"}
        assert r["prompt"] not in sft_questions
        assert r["chosen"] != r["rejected"] and all(r[k].strip() and r[k].isascii() for k in r)
        assert 150 <= len(r["chosen"]) <= 500 and 150 <= len(r["rejected"]) <= 500
        assert 0.75 <= len(r["rejected"]) / len(r["chosen"]) <= 1.25, r["prompt"]


def test_demo_data_loads_through_the_tasks():
    import tasks
    sft = tasks.TraderSFT(os.path.join(DATA, "demo_sft.jsonl"), split="train")
    dpo = tasks.TraderDPO(os.path.join(DATA, "demo_dpo.jsonl"), split="val", val_fraction=0.2)
    assert len(sft) > 40 and len(dpo) > 5
