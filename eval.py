"""
Chat evaluation of an SFT/DPO checkpoint: nanochat's tasks (ARC-Easy, ARC-Challenge, MMLU,
GSM8K, HumanEval and their ChatCORE), plus the persona and preference metrics nothing else
reports (held-out trader loss, held-out DPO pair accuracy and margin against the SFT
reference, and optionally an LLM judge's win rate of DPO over SFT answers).

    python eval.py -i sft                        # everything, one process
    python eval.py -i dpo -a "ARC-Easy|GSM8K" --max_problems=100
    torchrun --standalone --nproc_per_node=8 eval.py -i dpo
    OPENROUTER_API_KEY=... python eval.py -i dpo -a Trader-DPO --judge=1

Writes $NANOCHAT_BASE_DIR/report/chat-evaluation-{source}.md (one `- Task: value` line per
metric, as nanochat's report reads them) and chat-evaluation-{source}.json beside it.
"""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch

from common import (UserError, ProgressBar, all_reduce_sum, atomic_write_json, autocast, cleanup_dist,
                    config_dict, init_dist, master_first, parse_config, print0, run_main, write_report_section)
from model import Engine, checkpoint_dir_for, find_last_step, load_model
import tasks

CHAT_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]
PERSONA_TASKS = ["Trader-SFT", "Trader-DPO"]
# ChatCORE centres each accuracy on its chance level: 1 in 4 for multiple choice
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}


@dataclass
class Config:
    source: str = "sft"  # checkpoint to evaluate: sft|dpo|mid|base|rl (-i)
    model_tag: Optional[str] = None  # d<N> directory; None = the largest
    step: Optional[int] = None  # checkpoint step; None = the latest
    device_type: str = ""  # cuda|mps|cpu; "" = autodetect
    task_name: str = ""  # tasks separated by |, e.g. "ARC-Easy|GSM8K" (-a); "" = all chat and persona tasks
    max_problems: int = -1  # evaluate at most this many problems per task; -1 = all
    batch_size: int = 8  # problems per forward pass (categorical tasks, persona metrics)
    temperature: float = 0.0  # sampling temperature of generative tasks; 0 = greedy
    top_k: int = 50  # sample among the k most likely tokens
    num_samples: int = 1  # samples per generative problem; a problem passes if any sample does
    max_new_tokens: int = 512  # longest completion sampled
    ref_source: str = "sft"  # reference model of the DPO pair rewards
    trader_sft_path: Optional[str] = None  # SFT JSONL; None = $NANOCHAT_BASE_DIR/datasets/trader_sft_data.jsonl
    trader_dpo_path: Optional[str] = None  # pairs JSONL; None = $NANOCHAT_BASE_DIR/datasets/trader_dpo_data.jsonl
    sft_val_fraction: float = -1.0  # held-out share of the SFT data; -1 = the SFT run's (else 0.1)
    dpo_val_fraction: float = -1.0  # held-out share of the pairs; -1 = the DPO run's (else 0.05)
    judge: bool = False  # also ask an LLM judge (OpenRouter) whether DPO beats SFT on held-out prompts
    judge_prompts: int = 50  # held-out persona prompts the judge sees


ALIASES = {"i": "source", "a": "task_name"}


def selected_tasks(c):
    if not c.task_name:
        return CHAT_TASKS + PERSONA_TASKS
    names = [n.strip() for n in c.task_name.split("|") if n.strip()]
    unknown = [n for n in names if n not in CHAT_TASKS + PERSONA_TASKS]
    if unknown:
        raise UserError(f"-a: unknown task {unknown[0]!r}; known: {'|'.join(CHAT_TASKS + PERSONA_TASKS)}")
    return names


def chatcore(results):
    """Mean of the centred accuracies, only when every chat task has a result (nanochat)."""
    if not all(isinstance(results.get(name), float) for name in CHAT_TASKS):
        return None
    return sum((results[n] - BASELINES[n]) / (1.0 - BASELINES[n]) for n in CHAT_TASKS) / len(CHAT_TASKS)


# -----------------------------------------------------------------------------
# nanochat's chat tasks


@torch.no_grad()
def run_categorical(task, tokenizer, model, c, d, bar):
    """Multiple choice: the answer is the letter whose logit is highest at the position that
    follows <|assistant_start|>; batches of prompts padded on the right, sharded by rank."""
    n = len(task) if c.max_problems < 0 else min(len(task), c.max_problems)
    bos = tokenizer.get_bos_token_id()
    letter_id = {}
    passed = total = 0
    batches = list(range(0, n, c.batch_size))
    for start in batches[d.rank::d.world_size]:
        conversations = [task[i] for i in range(start, min(start + c.batch_size, n))]
        prompts = [tokenizer.render_for_completion(conv) for conv in conversations]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=d.device)
        answer_pos = torch.tensor([len(p) - 1 for p in prompts], device=d.device)
        with autocast(d.device):
            h = model.hidden_states(ids)[torch.arange(len(prompts), device=d.device), answer_pos]
            logits = model.logits(h)  # only the answer positions go through the lm_head
        for row, conv in enumerate(conversations):
            letters = conv["letters"]
            for letter in letters:
                if letter not in letter_id:
                    encoded = tokenizer.encode(letter)
                    assert len(encoded) == 1, f"answer letter {letter!r} is not one token"
                    letter_id[letter] = encoded[0]
            choice = logits[row, [letter_id[l] for l in letters]].argmax().item()
            passed += int(task.evaluate(conv, letters[choice]))
            total += 1
            bar.update(1)
    return passed, total


@torch.no_grad()
def run_generative(task, tokenizer, model, c, d, bar):
    """Sample num_samples completions per problem with the KV-cache engine (the calculator
    tool included); a problem passes when any sample passes."""
    n = len(task) if c.max_problems < 0 else min(len(task), c.max_problems)
    engine = Engine(model, tokenizer)
    passed = total = 0
    for i in range(d.rank, n, d.world_size):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        sequences, _ = engine.generate_batch(prompt, num_samples=c.num_samples, max_tokens=c.max_new_tokens,
                                             temperature=c.temperature, top_k=c.top_k, seed=42 + i)
        completions = [tokenizer.decode(s[len(prompt):]) for s in sequences]
        passed += int(any(task.evaluate(conv, completion) for completion in completions))
        total += 1
        bar.update(1, passed=passed)
    return passed, total


def run_chat_task(name, tokenizer, model, c, d):
    task = master_first(tasks.TASKS[name])
    n = len(task) if c.max_problems < 0 else min(len(task), c.max_problems)
    mine = len(range(d.rank, n, d.world_size))
    bar = ProgressBar(mine, desc=name, unit="problems")
    run = run_categorical if task.eval_type == "categorical" else run_generative
    passed, total = run(task, tokenizer, model, c, d, bar)
    bar.close()
    passed, total = all_reduce_sum([passed, total], d.device)
    return passed / max(total, 1)


# -----------------------------------------------------------------------------
# Persona and preference metrics


def trader_sft_loss(model, tokenizer, c, d):
    """Mean loss per assistant token on the held-out trader conversations (the SFT split)."""
    from sft import conversation_loss
    fraction = c.sft_val_fraction
    if fraction < 0:  # the split the SFT run held out
        fraction = stage_meta("sft").get("user_config", {}).get("trader_val_fraction", 0.1)
    task = tasks.TraderSFT(c.trader_sft_path, split="val", val_fraction=fraction)
    if len(task) == 0:
        raise tasks.DataUnavailable("no held-out trader conversations (the val split is empty)")
    rows = len(task) if c.max_problems < 0 else c.max_problems
    return {"Trader SFT held-out loss": conversation_loss(model, task, tokenizer, rows, c.batch_size, d,
                                                         model.config.sequence_len)}


def held_out_pairs(c, dpo_meta):
    """The DPO pairs held out by the DPO run's split (or --dpo_val_fraction)."""
    fraction = c.dpo_val_fraction
    if fraction < 0:
        fraction = dpo_meta.get("user_config", {}).get("val_fraction", 0.05)
    return tasks.TraderDPO(c.trader_dpo_path, split="val", val_fraction=fraction)


@torch.no_grad()
def trader_dpo_metrics(model, tokenizer, c, d):
    """On the held-out pairs: how often the model prefers the Master's answer (per-token
    log-prob, no reference needed), and DPO's implicit-reward accuracy and margin against
    the reference (ref_source), with the beta and split the DPO run used."""
    import dpo
    meta = stage_meta("dpo")
    beta = meta.get("beta", 0.1)
    max_len = min(meta.get("user_config", {}).get("max_length", 1024), model.config.sequence_len)
    task = held_out_pairs(c, meta)
    pairs, _ = dpo.render_pairs(task, tokenizer, max_len)
    if c.max_problems >= 0:
        pairs = pairs[:c.max_problems]
    if not pairs:
        raise tasks.DataUnavailable("no held-out DPO pairs (the val split is empty)")
    reference = None
    if c.ref_source != c.source:
        reference = load_model(c.ref_source, d.device, phase="eval")[0]
    pad = tokenizer.encode_special("<|assistant_end|>")
    mine = list(range(d.rank, len(pairs), d.world_size))
    sums = {"prefers_chosen": 0.0, "accuracy": 0.0, "margin": 0.0}
    for i in range(0, len(mine), c.batch_size):
        idx = mine[i:i + c.batch_size]
        pc, pr, _ = dpo.batch_logps(model, pairs, idx, pad, d.device)
        n_c = torch.tensor([sum(pairs[j][0][1][1:]) for j in idx], device=pc.device)
        n_r = torch.tensor([sum(pairs[j][1][1][1:]) for j in idx], device=pc.device)
        sums["prefers_chosen"] += (pc / n_c > pr / n_r).float().sum().item()
        if reference is not None:
            rc, rr, _ = dpo.batch_logps(reference, pairs, idx, pad, d.device)
            _, chosen_r, rejected_r = dpo.dpo_loss(pc, pr, rc, rr, beta)
            sums["accuracy"] += (chosen_r > rejected_r).float().sum().item()
            sums["margin"] += (chosen_r - rejected_r).sum().item()
    keys = list(sums)
    totals = all_reduce_sum([sums[k] for k in keys] + [len(mine)], d.device)
    n = totals[-1]
    out = {"Persona preference accuracy": totals[0] / n}
    if reference is not None:
        out[f"DPO pair reward accuracy (vs {c.ref_source})"] = totals[1] / n
        out[f"DPO pair reward margin (vs {c.ref_source})"] = totals[2] / n
    return out


def sample_answer(engine, tokenizer, prompt, c, seed):
    ids = tokenizer.render_for_completion({"messages": [{"role": "user", "content": prompt},
                                                        {"role": "assistant", "content": ""}]})
    sequences, _ = engine.generate_batch(ids, num_samples=1, max_tokens=c.max_new_tokens,
                                         temperature=c.temperature, top_k=c.top_k, seed=seed)
    return tokenizer.decode(sequences[0][len(ids):]).strip()


def judge_win_rate(model, tokenizer, c, d):
    """An LLM judge (gen.py's client) compares the evaluated model's answers with the
    reference's on held-out persona prompts, each pair in both orders; a pair counts only
    when both orders agree, so position bias cancels out. Rank 0 only."""
    import gen
    if c.ref_source == c.source:
        raise tasks.DataUnavailable(f"the judge compares -i {c.source} with --ref_source; they are the same")
    if not d.master:
        return {}
    task = held_out_pairs(c, stage_meta("dpo"))
    prompts = [task[i]["prompt"] for i in range(min(len(task), c.judge_prompts))]
    if not prompts:
        raise tasks.DataUnavailable("no held-out persona prompts (the DPO val split is empty)")
    client = gen.client_from_env()
    judge_model = client.choose_model()
    persona = gen.load_persona(gen.PERSONA_PATH)
    reference = load_model(c.ref_source, d.device, phase="eval")[0]
    answers = {}
    for name, m in (("model", model), ("reference", reference)):
        engine, bar = Engine(m, tokenizer), ProgressBar(len(prompts), desc=f"judge: {name} answers", unit="answers")
        answers[name] = []
        for i, prompt in enumerate(prompts):
            answers[name].append(sample_answer(engine, tokenizer, prompt, c, seed=42 + i))
            bar.update(1)
        bar.close()
    with ThreadPoolExecutor(8) as pool:  # the judge is remote: its requests overlap
        verdicts = list(pool.map(lambda i: gen.judge_both_orders(client, persona, prompts[i], answers["model"][i],
                                                                 answers["reference"][i]), range(len(prompts))))
    wins, losses = verdicts.count(1), verdicts.count(-1)
    out = {f"Judge agreeing pairs (of {len(prompts)}, {judge_model})": wins + losses}
    if wins + losses:
        out[f"Judge win rate (vs {c.ref_source})"] = wins / (wins + losses)
    return out


def stage_meta(source):
    """The latest checkpoint meta of a stage (its split, beta, ...), or {} if none."""
    try:
        directory = checkpoint_dir_for(source)
        with open(os.path.join(directory, f"meta_{find_last_step(directory):06d}.json")) as f:
            return json.load(f)
    except (UserError, OSError, ValueError):
        return {}


# -----------------------------------------------------------------------------


def main():
    c = parse_config(Config, aliases=ALIASES)
    names = selected_tasks(c)
    if c.judge and not os.environ.get("OPENROUTER_API_KEY"):
        raise UserError("--judge=1 needs OPENROUTER_API_KEY in the environment")
    d = init_dist(c.device_type)
    model, tokenizer, meta = load_model(c.source, d.device, phase="eval", model_tag=c.model_tag, step=c.step)
    print0(f"evaluating {c.source} step {meta.get('step')} on {', '.join(names)}")
    results, skipped, t0 = {}, {}, time.time()
    for name in names:
        start, before = time.time(), set(results)
        try:
            if name in CHAT_TASKS:
                results[name] = run_chat_task(name, tokenizer, model, c, d)
            elif name == "Trader-SFT":
                results.update(trader_sft_loss(model, tokenizer, c, d))
            else:
                results.update(trader_dpo_metrics(model, tokenizer, c, d))
        except tasks.DataUnavailable as e:
            skipped[name] = str(e)
            print0(f"{name}: skipped ({e})")
            continue
        new = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k not in before)
        print0(f"{name}: {new} ({time.time() - start:.1f}s)")
    if c.judge:
        try:
            results.update(judge_win_rate(model, tokenizer, c, d))
        except (tasks.DataUnavailable, UserError) as e:  # no data, or the judge's API refused: say so, keep the rest
            skipped["Judge"] = str(e)
            print0(f"Judge: skipped ({e})")
    core = chatcore(results)
    if core is not None:
        results["ChatCORE metric"] = core
    for k, v in results.items():
        print0(f"{k}: {v:.4f}")
    if d.master:
        section_path = write_report_section(f"Chat evaluation {c.source}", [
            {k: v for k, v in config_dict(c).items() if k != "task_name"}, results,
            {"Skipped tasks": len(skipped), "Evaluation time (s)": round(time.time() - t0, 1)}])
        atomic_write_json(section_path[:-3] + ".json", {
            "source": c.source, "step": meta.get("step"), "results": results, "skipped": skipped,
            "config": config_dict(c)})
    cleanup_dist()


if __name__ == "__main__":
    run_main(main)
