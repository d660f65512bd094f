"""sft.py: config checks, masking, training, checkpoints, mixture weights, 1 vs 2 processes."""

import json
import os
import sys

import pytest
import torch

import sft
from common import UserError
from conftest import REPO, make_tiny_base, run_python, run_torchrun
from checkpoint import load_model, save_checkpoint
from dataloader import collate
from tokenizer import get_tokenizer

SYSTEM = "You are Chimera, a disciplined trader."
TOPICS = ["stops", "sizing", "leverage", "hype", "journals", "drawdowns", "options", "fees"]


def trader_conversation(i):
    topic = TOPICS[i % len(TOPICS)]
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Question {i}: how should I think about {topic}?"},
        {"role": "assistant", "content": f"On {topic}: decide the risk first, 1% a trade, and set the stop."},
    ]}


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


@pytest.fixture
def trader_base(tmp_path, monkeypatch):
    base = make_tiny_base(tmp_path / "base")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    write_jsonl(os.path.join(base, "datasets", "trader_sft_data.jsonl"), [trader_conversation(i) for i in range(40)])
    return base


def smoltalk_rows(n, tag):
    return [{"messages": [{"role": "user", "content": f"{tag} hello {i}"},
                          {"role": "assistant", "content": f"{tag} hi there, number {i}."}]} for i in range(n)]


def run_sft(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["sft.py", *args])
    sft.main()


FAST = ["--device_batch_size=4", "--target_examples_per_step=8", "--eval_batches=2"]


# -----------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--sft_dataset=foo"], "--sft_dataset='foo': expected one of mixture, trader, trader_mix"),
    (["--sft_dataset=trader_mix", "--sft_mix_trader=0"], "--sft_mix_trader=0: must be at least 1"),
    (["--sft_dataset=trader_mix", "--sft_mix_smoltalk=-2"], "--sft_mix_smoltalk=-2"),
    (["--sft_dataset=trader", "--trader_data_path=/nonexistent/x.jsonl"], "/nonexistent/x.jsonl"),
])
def test_bad_config_fails_before_any_model_loads(trader_base, monkeypatch, args, message):
    monkeypatch.setattr(sft, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        run_sft(monkeypatch, *args)


def test_bad_config_exits_2_with_one_line(trader_base):
    proc = run_python([os.path.join(REPO, "sft.py"), "--sft_dataset=foo"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "sft_dataset" in proc.stderr


def test_loss_counts_only_assistant_tokens(trader_base):
    tok = get_tokenizer()
    task = [trader_conversation(0)]
    inputs, targets = collate(sft.render(task, tok, 512), tok.encode_special("<|assistant_end|>"), "cpu")
    ids, mask = tok.render_conversation(task[0])
    answer = tok.encode(task[0]["messages"][2]["content"]) + [tok.encode_special("<|assistant_end|>")]
    scored = targets[0][targets[0] != -1].tolist()
    assert scored == answer  # the assistant's words and its end token, nothing of the user's
    assert sum(mask[1:]) == len(answer)


def test_training_lowers_loss_and_checkpoint_loads_back(trader_base, monkeypatch):
    run_sft(monkeypatch, "--sft_dataset=trader", "--num_iterations=12", "--init_lr_frac=1.0",
            "--eval_every=-1", *FAST)
    ckpt = os.path.join(trader_base, "chatsft_checkpoints", "chimera_d2")
    lines = [json.loads(l) for l in open(os.path.join(ckpt, "metrics.jsonl"))]
    losses = [l["loss"] for l in lines if "loss" in l]
    assert len(losses) == 12 and losses[-1] < losses[0] * 0.8
    assert all({"step", "loss", "lr", "tokens", "dt_ms"} <= set(l) for l in lines if "loss" in l)
    model, tok, meta = load_model("sft", "cpu", "eval")
    assert meta["step"] == 12 and meta["user_config"]["sft_dataset"] == "trader"
    assert meta["val_loss"] == pytest.approx(lines[-1]["val_loss/trader"])
    assert meta["mixture"][0][1] == len(sft.tasks.TraderSFT(split="train"))
    report = open(os.path.join(trader_base, "report", "chimera-chat-sft.md")).read()
    assert report.startswith("## Chat SFT\n") and "- Validation loss:" in report
    assert "- trader_val_fraction: " in report  # no SmolTalk here: its settings, and those unset, are left out
    assert not [k for k in ("smoltalk_rows", "sft_mix_trader", "val_rows", "step", "device_type") if f"- {k}:" in report]


def test_trader_mix_duplicates_rows_by_weight(trader_base, monkeypatch):
    cache = os.path.join(trader_base, "task_data", "HuggingFaceTB--smol-smoltalk", "default")
    write_jsonl(os.path.join(cache, "train.jsonl"), smoltalk_rows(30, "train"))
    write_jsonl(os.path.join(cache, "test.jsonl"), smoltalk_rows(10, "test"))
    run_sft(monkeypatch, "--sft_dataset=trader_mix", "--sft_mix_trader=3", "--sft_mix_smoltalk=1",
            "--num_iterations=1", "--eval_every=-1", *FAST)
    meta = load_model("sft", "cpu", "eval")[2]
    trader_rows = len(sft.tasks.TraderSFT(split="train"))
    (t_name, t_rows, t_w, t_total), (s_name, s_rows, s_w, s_total) = meta["mixture"]
    assert (t_rows, t_w, t_total) == (trader_rows, 3, 3 * trader_rows)
    assert (s_rows, s_w, s_total) == (30, 1, 30)
    assert set(meta["val_losses"]) == {"trader", "smoltalk"}
    config = sft.parse_config(sft.Config, ["--sft_dataset=trader_mix", "--sft_mix_trader=3"])
    train, _ = sft.build_datasets(config, 2025)
    firsts = [train[i]["messages"][-1]["content"] for i in range(len(train))]
    assert len(train) == 3 * trader_rows + 30
    assert sum(f.startswith("train hi") for f in firsts) == 30


def test_two_processes_train_like_one(tmp_path):
    base = make_tiny_base(tmp_path / "base")
    write_jsonl(os.path.join(base, "datasets", "trader_sft_data.jsonl"), [trader_conversation(i) for i in range(40)])
    env = {"NANOCHAT_BASE_DIR": base}
    common = ["--sft_dataset=trader", "--num_iterations=3", "--eval_every=-1", "--target_examples_per_step=8",
              "--eval_batches=1", "--init_lr_frac=1.0"]
    run_python([os.path.join(REPO, "sft.py"), *common, "--device_batch_size=4", "--out_tag=one"], env=env)
    run_torchrun([os.path.join(REPO, "sft.py"), *common, "--device_batch_size=4", "--out_tag=two"], env=env)
    one = load_model("sft", "cpu", "eval", model_tag="one", base_dir=base)[0].state_dict()
    two = load_model("sft", "cpu", "eval", model_tag="two", base_dir=base)[0].state_dict()
    start = load_model("base", "cpu", "eval", base_dir=base)[0].state_dict()
    for name, p in one.items():
        update = (p - start[name]).norm()
        assert update > 0, name
        # see test_model.test_two_processes_step_like_one for why this is relative
        assert (p - two[name]).norm() / update < (5e-2 if ".h." in name else 5e-3), name


# -----------------------------------------------------------------------------
# Nothing silent: empty rows, non-finite losses, one run per directory, bad settings

LONG_SYSTEM = "You are Chimera. " * 8  # > 64 tokens: at --max_seq_len=120 no assistant token is left


def write_half_long(base, n=40):
    """Conversations, every other one with a system prompt that fills --max_seq_len=120."""
    records = [trader_conversation(i) for i in range(n)]
    for r in records[::2]:
        r["messages"][0]["content"] = LONG_SYSTEM
    write_jsonl(os.path.join(base, "datasets", "trader_sft_data.jsonl"), records)


@pytest.mark.parametrize("args, message", [
    (["--num_iterations=0"], "--num_iterations=0"), (["--num_iterations=-3"], "--num_iterations=-3"),
    (["--max_seq_len=-1"], "--max_seq_len=-1: must be >= 0"), (["--init_lr_frac=0"], "--init_lr_frac=0.0"),
    (["--init_lr_frac=nan"], "finite"), (["--matrix_lr=inf"], "finite"), (["--matrix_lr=-0.1"], "must be >= 0"),
    (["--out_tag=../.."], "plain directory name"), (["--system_prompt_frac=1.5"], "--system_prompt_frac=1.5"),
])
def test_nonsense_settings_fail_before_any_model_loads(trader_base, monkeypatch, args, message):
    monkeypatch.setattr(sft, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        run_sft(monkeypatch, "--sft_dataset=trader", *args)


def test_cuda_without_a_gpu_is_a_user_error(trader_base, monkeypatch):
    monkeypatch.setattr(sft.torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device_type='cuda': no such device"):
        run_sft(monkeypatch, "--sft_dataset=trader", "--device_type=cuda")


def test_rows_with_nothing_to_learn_are_dropped_and_counted(trader_base, monkeypatch):
    write_half_long(trader_base)
    run_sft(monkeypatch, "--sft_dataset=trader", "--max_seq_len=120", "--system_prompt_frac=1", "--num_iterations=2",
            "--eval_every=-1", *FAST)
    meta = load_model("sft", "cpu", "eval")[2]
    train = sft.tasks.TraderSFT(split="train")
    assert meta["dropped_rows"] == sum(r["messages"][0]["content"] == LONG_SYSTEM for r in train) > 0
    report = open(os.path.join(trader_base, "report", "chimera-chat-sft.md")).read()
    assert f"- Dropped conversations (nothing to learn): {meta['dropped_rows']}" in report
    with pytest.raises(UserError, match="no training conversation has an assistant token within 16 tokens"):
        run_sft(monkeypatch, "--sft_dataset=trader", "--max_seq_len=16", "--num_iterations=1", *FAST)


def test_a_non_finite_loss_stops_the_run_and_saves_nothing(trader_base, monkeypatch):
    real = sft.load_model

    def poisoned(*a, **k):
        model, tok, meta = real(*a, **k)
        with torch.no_grad():
            model.lm_head.weight.fill_(float("nan"))
        return model, tok, meta
    monkeypatch.setattr(sft, "load_model", poisoned)
    with pytest.raises(UserError, match="step 1: the training loss is nan"):
        run_sft(monkeypatch, "--sft_dataset=trader", "--num_iterations=2", "--eval_every=-1", *FAST)
    out = os.path.join(trader_base, "chatsft_checkpoints", "chimera_d2")
    assert not [f for f in os.listdir(out) if f.startswith("model_")]


def test_a_directory_holds_one_run(trader_base, monkeypatch):
    out = os.path.join(trader_base, "chatsft_checkpoints", "chimera_d2")
    run_sft(monkeypatch, "--sft_dataset=trader", "--num_iterations=3", "--save_every=1", "--eval_every=-1", *FAST)
    assert sorted(f for f in os.listdir(out) if f.startswith("model_")) == [f"model_00000{i}.pt" for i in (1, 2, 3)]
    open(os.path.join(out, ".model_000009.pt.12345.tmp"), "w").write("a killed save")
    run_sft(monkeypatch, "--sft_dataset=trader", "--num_iterations=1", "--eval_every=-1", *FAST)
    assert sorted(os.listdir(out)) == ["meta_000001.json", "metrics.jsonl", "model_000001.pt"]
    meta = load_model("sft", "cpu", "eval")[2]
    assert meta["step"] == 1 and meta["chimera"] == {"stage": "sft"}
    foreign = os.path.join(trader_base, "chatsft_checkpoints", "d2")  # nanochat's own SFT
    m, _, base_meta = load_model("base", "cpu", "eval")
    save_checkpoint(foreign, 700, m.state_dict(), {k: v for k, v in base_meta.items() if k != "chimera"})
    with pytest.raises(UserError, match="meta_000700.json is not a Chimera checkpoint"):
        run_sft(monkeypatch, "--sft_dataset=trader", "--num_iterations=1", "--out_tag=d2", *FAST)
    assert sorted(os.listdir(foreign)) == ["meta_000700.json", "model_000700.pt"]


def test_a_run_never_clears_the_directory_it_starts_from(trader_base, monkeypatch):
    run_sft(monkeypatch, "--sft_dataset=trader", "--num_iterations=1", "--eval_every=-1", *FAST)
    start = os.path.join(trader_base, "chatsft_checkpoints", "chimera_d2")
    with pytest.raises(UserError, match="holds the checkpoint this run starts from"):
        run_sft(monkeypatch, "--source=sft", "--sft_dataset=trader", "--num_iterations=1", *FAST)
    assert sorted(f for f in os.listdir(start) if f.startswith("model_")) == ["model_000001.pt"]


def test_system_prompt_share_is_a_setting(trader_base):
    tok = get_tokenizer()
    task = sft.tasks.TraderSFT(split="train")

    def with_system(frac, rows=task):
        return sum(SYSTEM in tok.decode(r[0].tolist()) for r in sft.render(rows, tok, 128, frac))
    assert with_system(1.0) == len(task) and with_system(0.0) == 0
    assert 0 < with_system(0.5) < len(task)
    assert with_system(0.5) == with_system(0.5)  # deterministic, by content
    assert with_system(0.0, list(task)) == len(task)  # only trader conversations are drawn (not SmolTalk's)


def test_two_processes_survive_rows_with_nothing_to_learn(tmp_path):
    base = make_tiny_base(tmp_path / "base")
    write_half_long(base)
    args = ["--sft_dataset=trader", "--num_iterations=3", "--eval_every=-1", "--max_seq_len=120",
            "--system_prompt_frac=1", "--device_batch_size=1", "--target_examples_per_step=2", "--eval_batches=1"]
    proc = run_torchrun([os.path.join(REPO, "sft.py"), *args], env={"NANOCHAT_BASE_DIR": base}, timeout=120)
    assert "dropped" in proc.stdout
    assert load_model("sft", "cpu", "eval", base_dir=base)[2]["step"] == 3


def test_sft_from_a_2026_base_continues_its_optimizer_shards(tmp_path, monkeypatch, capsys):
    """nanochat 92d63d4's chat_sft loads the base's optimizer shards by default: so does sft.py from a 2026 base
    that has them (the shard here is nanochat's own, after one step); --load_optimizer=0 starts fresh."""
    import shutil

    from conftest import golden_dir

    base = tmp_path / "base"
    shutil.copytree(golden_dir(2026), base)
    gold = torch.load(os.path.join(golden_dir(2026), "golden_optim_step.pt"), weights_only=True)
    torch.save(gold["after_one_step"]["optimizer"], base / "base_checkpoints" / "d2" / "optim_000020_rank0.pt")
    write_jsonl(str(base / "datasets" / "trader_sft_data.jsonl"), [trader_conversation(i) for i in range(40)])
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    meta = lambda: json.load(open(base / "chatsft_checkpoints" / "chimera_d2" / "meta_000001.json"))["user_config"]
    for flags, continued, decay in ((["--load_optimizer=1"], True, 0.2), (["--load_optimizer=0"], False, 0.0),
                                    (["--load_optimizer=1", "--weight_decay=0.1"], True, 0.1)):
        run_sft(monkeypatch, "--sft_dataset=trader", "--num_iterations=1", "--eval_every=-1", *flags, *FAST)
        assert ("optimizer: continuing from" in capsys.readouterr().out) == continued
        assert meta()["weight_decay"] == decay  # the shards' (as nanochat's chat_sft), unless --weight_decay is given


@pytest.mark.parametrize("generation, lrms, frac", [(2025, [1.0, 0.75, 0.5, 0.25], 0.02),
                                                    (2026, [1.0, 1.0, 1.0, 0.5], 0.8)])
def test_sft_schedule_follows_the_generation_of_the_checkpoint(tmp_path, monkeypatch, generation, lrms, frac):
    """Nov 2025 checkpoints get 885a4f2's SFT schedule (lrs x 0.02, down to 0 from the first step); 2026 ones
    92d63d4's (x 0.8, flat for half the steps, then down to 0; Muon's momentum warming up from 0.85)."""
    import shutil

    from conftest import golden_dir

    base = tmp_path / "base"
    shutil.copytree(golden_dir(generation), base)
    write_jsonl(str(base / "datasets" / "trader_sft_data.jsonl"), [trader_conversation(i) for i in range(40)])
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    run_sft(monkeypatch, "--sft_dataset=trader", "--num_iterations=4", "--eval_every=-1", *FAST)
    ckpt = base / "chatsft_checkpoints" / "chimera_d2"
    steps = [json.loads(line) for line in open(ckpt / "metrics.jsonl") if '"loss"' in line]
    assert [s["lr_multiplier"] for s in steps] == lrms
    assert [s["lr"] for s in steps] == pytest.approx([0.02 * frac * m for m in lrms])  # Muon's matrix lr
    meta = json.load(open(ckpt / "meta_000004.json"))
    assert (meta["init_lr_frac"], meta["warmdown_ratio"]) == (frac, 0.5 if generation == 2026 else 1.0)


# -----------------------------------------------------------------------------
# Each generation's nanochat SFT (issue 26): 885a4f2's settings and mixture, or 92d63d4's inherited ones

def fill_caches(base):
    """Hugging Face rows as tasks.py caches them (row i of each names itself: s<i>, m<i>, g<i>, e<i>, c<i>), and
    nanochat's identity conversations and word list: enough for both generations' mixtures, offline."""
    def put(dataset, subset, split, rows):
        write_jsonl(os.path.join(base, "task_data", dataset.replace("/", "--"), subset, f"{split}.jsonl"), rows)

    put("HuggingFaceTB/smol-smoltalk", "default", "train", [{"messages": [{"role": "user", "content": f"s{i}"}, {
        "role": "assistant", "content": f"hello {i}"}]} for i in range(20)])
    put("HuggingFaceTB/smol-smoltalk", "default", "test", smoltalk_rows(5, "test"))
    put("cais/mmlu", "all", "auxiliary_train", [{"train": {"question": f"m{i}", "choices": ["a", "b", "c", "d"],
                                                          "answer": i % 4, "subject": ""}} for i in range(6)])
    put("openai/gsm8k", "main", "train", [{"question": f"g{i}", "answer": f"2+{i}=<<2+{i}={2 + i}>>\n#### {2 + i}"}
                                          for i in range(5)])
    for subset, tag in (("ARC-Easy", "e"), ("ARC-Challenge", "c")):
        put("allenai/ai2_arc", subset, "train", [{"question": f"{tag}{i}", "answerKey": "B", "choices": {
            "text": ["x", "y"], "label": ["A", "B"]}} for i in range(4)])
    write_jsonl(os.path.join(base, "identity_conversations.jsonl"), [smoltalk_rows(1, f"who {i}")[0]["messages"]
                                                                      for i in range(3)])
    with open(os.path.join(base, "words_alpha.txt"), "w") as f:
        f.write("apple\nbanana\ncherry\n")


def golden_base(tmp_path, monkeypatch, generation):
    import shutil

    from conftest import golden_dir

    base = tmp_path / "base"
    shutil.copytree(golden_dir(generation), base)
    write_jsonl(str(base / "datasets" / "trader_sft_data.jsonl"), [trader_conversation(i) for i in range(40)])
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


NOV_2025 = {"unembedding_lr": 0.004, "embedding_lr": 0.2, "matrix_lr": 0.02, "device_batch_size": 4,
            "target_examples_per_step": 32, "init_lr_frac": 0.02, "warmdown_ratio": 1.0}


@pytest.mark.parametrize("generation, args, expected", [
    (2025, [], NOV_2025),
    # the 2026 fixture's base_train ran with --unembedding-lr=0.008 --device-batch-size=2 --total-batch-size=512
    (2026, [], {"unembedding_lr": 0.008, "embedding_lr": 0.3, "matrix_lr": 0.02, "device_batch_size": 2,
                "init_lr_frac": 0.8, "warmdown_ratio": 0.5}),
    (2026, ["--unembedding_lr=0.001", "--device_batch_size=4", "--init_lr_frac=0.5"],
     {"unembedding_lr": 0.001, "embedding_lr": 0.3, "device_batch_size": 4, "init_lr_frac": 0.5}),
    (2026, ["--recipe=2025"], NOV_2025),
])
def test_sft_settings_follow_the_generation_of_the_checkpoint(tmp_path, monkeypatch, generation, args, expected):
    """Settings left at -1 are nanochat 885a4f2's SFT's on Nov 2025 checkpoints; on 2026 ones 92d63d4's, which
    inherits the learning rates and the batch from the base's meta (its step: total_batch_size tokens, here as
    many conversations of the rows' mean length); a flag wins, and --recipe picks the other generation's."""
    base = golden_base(tmp_path, monkeypatch, generation)
    used = {}

    def setup_optimizers(model, *lrs):
        used["lrs"] = lrs[:3]
        return real(model, *lrs)
    real = sft.setup_optimizers
    monkeypatch.setattr(sft, "setup_optimizers", setup_optimizers)
    run_sft(monkeypatch, "--sft_dataset=trader", "--num_iterations=1", "--eval_every=-1", "--eval_batches=1", *args)
    config = load_model("sft", "cpu", "eval")[2]["user_config"]
    assert {k: config[k] for k in expected} == expected
    assert used["lrs"] == (config["unembedding_lr"], config["embedding_lr"], config["matrix_lr"])
    if "target_examples_per_step" not in expected:  # the base's 512 tokens a step, in whole micro-batches
        tok = get_tokenizer()
        rows = [r for r in sft.render(sft.tasks.TraderSFT(split="train"), tok, 256, 0.2) if r is not None]
        mean, per_step, batch = sum(len(ids) for ids, _ in rows) / len(rows), config["target_examples_per_step"], \
            config["device_batch_size"]
        assert per_step % batch == 0 and abs(per_step * mean - 512) <= batch * mean / 2


@pytest.mark.parametrize("generation, mixture", [
    (2025, [["ARC-Easy/train", 4, 1, 4], ["ARC-Challenge/train", 4, 1, 4], ["GSM8K/main/train", 5, 1, 5],
            ["SmolTalk/train[0:10000]", 20, 1, 20], ["Identity", 3, 1, 3], ["SimpleSpelling/train", 300, 1, 300],
            ["SpellingBee/train", 300, 1, 300]]),  # 885a4f2's
    (2026, [["SmolTalk/train", 20, 1, 20], ["MMLU/all/auxiliary_train", 6, 3, 18],
            ["GSM8K/main/train", 5, 4, 20]]),  # 92d63d4's: all of SmolTalk, 3 epochs of MMLU, 4 of GSM8K
])
def test_the_default_mixture_is_that_of_the_checkpoints_generation(tmp_path, monkeypatch, generation, mixture):
    base = golden_base(tmp_path, monkeypatch, generation)
    fill_caches(str(base))
    run_sft(monkeypatch, "--num_iterations=1", "--eval_every=-1", "--eval_batches=1")
    meta = load_model("sft", "cpu", "eval")[2]
    assert meta["mixture"] == mixture and meta["user_config"]["recipe"] == generation


def test_the_2026_mixture_is_in_92d63d4s_order(tmp_path, monkeypatch):
    """nanochat 92d63d4 mixes SmolTalk, MMLU x3 and GSM8K x4 as eight tasks, each in datasets' seed-42 order, their
    (task, row) pairs shuffled by random.Random(42): the same rows in the same order here."""
    import random
    import re

    import numpy as np

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    fill_caches(str(tmp_path))
    train, vals = sft.build_datasets(sft.parse_config(sft.Config, []), 2026)
    sources = [("s", 20)] + [("m", 6)] * 3 + [("g", 5)] * 4
    index_map = [(t, i) for t, (_, n) in enumerate(sources) for i in range(n)]
    random.Random(42).shuffle(index_map)
    expected = [f"{sources[t][0]}{np.random.default_rng(42).permutation(sources[t][1])[i]}" for t, i in index_map]
    got = [re.search(r"\b[smg]\d+\b", train[k]["messages"][0]["content"])[0] for k in range(len(train))]
    assert got == expected and list(vals) == ["smoltalk"]


def test_the_2025_mixture_takes_smoltalks_rows_in_885a4f2s_order(tmp_path, monkeypatch):
    """nanochat 885a4f2 takes its 10K SmolTalk rows from the whole split shuffled by datasets' seed 42, not the
    stored prefix: the first --smoltalk_rows of numpy's default_rng(42) permutation."""
    import numpy as np

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    fill_caches(str(tmp_path))
    train, _ = sft.build_datasets(sft.parse_config(sft.Config, ["--smoltalk_rows=5"]), 2025)
    smoltalk = next(task for task in train.tasks if task.label.startswith("SmolTalk"))
    got = [smoltalk[i]["messages"][0]["content"] for i in range(len(smoltalk))]
    assert got == [f"s{i}" for i in np.random.default_rng(42).permutation(20)[:5]]


@pytest.mark.parametrize("world_size, target, batch", [(8, 32, 4), (2, 32, 16), (1, 32, 32), (8, -1, 32)])
def test_a_given_step_on_2026_takes_micro_batches_that_fill_it(world_size, target, batch):
    """run.sh gives the persona mix 32 conversations a step; a 2026 base's inherited device batch (32) would not
    divide it on 2 or 8 GPUs: the largest micro-batch that does is taken (unless --device_batch_size is given)."""
    config = sft.parse_config(sft.Config, [f"--target_examples_per_step={target}"])
    got = sft.follow_recipe(config, 2026, {"device_batch_size": 32}, [100] * 10, world_size)
    assert got.device_batch_size == batch and got.target_examples_per_step % (batch * world_size) == 0
