"""
Chat evaluation of an SFT/DPO checkpoint: nanochat's tasks and their ChatCORE, identity probes, and
persona metrics with and without the persona's system message (held-out trader loss, preference for
the Master's answers, DPO reward accuracy and margin, an LLM judge's win rate, all against the reference).

    python eval.py -i sft                        # everything, one process
    python eval.py -i dpo -a "ARC-Easy|GSM8K" --max_problems=100
    torchrun --standalone --nproc_per_node=8 eval.py -i dpo
    OPENROUTER_API_KEY=... python eval.py -i dpo -a "Trader-DPO|Identity"   # the judge joins in

Writes $NANOCHAT_BASE_DIR/report/chimera-chat-evaluation-{source}.md (one `- Task: value` line
per metric, as nanochat's report reads them) and chimera-chat-evaluation-{source}.json beside it.
"""

import contextlib
import dataclasses
import functools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Optional

import torch

from common import (UserError, ProgressBar, all_reduce_sum, atomic_write_json, autocast, check_settings,
                    cleanup_dist, init_dist, parse_config, print0, run_main, write_report_section)
from checkpoint import checkpoint_dir_for, find_last_step, load_model
from engine import Engine
import dpo
import openrouter
import tasks
from sft import conversation_loss
from tasks import download_lock

# nanochat 885a4f2's chat_eval task set; ChatCORE centres each accuracy on its chance level
CHAT_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
CONDITIONS = ("no system", "with system")  # the persona metrics without / with the persona's system message
PROBE_KEYS = ("prompt", "persona_answer", "generic_answer")  # one identity probe per line of its JSONL
ALIASES = {"i": "source", "a": "task_name"}  # -i, -a as in nanochat's chat_eval
IDENTITY_PROBES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "identity_probes.jsonl")


@dataclasses.dataclass
class Config:
    source: str = "sft"  # checkpoint to evaluate: sft|dpo|mid|base|rl (-i)
    model_tag: Optional[str] = None  # model directory; None = Chimera's chimera_d<N>, else the largest d<N>
    step: Optional[int] = None  # checkpoint step; None = the latest
    device_type: str = ""  # cuda|mps|cpu; "" = autodetect
    task_name: str = ""  # tasks separated by |, e.g. "ARC-Easy|GSM8K" (-a); "" = all chat and persona tasks
    max_problems: int = -1  # evaluate at most this many problems per task; -1 = all
    batch_size: int = 8  # problems per forward pass (categorical tasks, persona metrics)
    temperature: float = 0.0  # sampling temperature of generative tasks; 0 = greedy
    top_k: int = 50  # sample among the k most likely tokens
    num_samples: int = 1  # samples per generative problem; a problem passes if any sample does
    max_new_tokens: int = 512  # longest completion sampled
    ref_source: str = ""  # reference of the pair rewards and the judge; "" = the checkpoint this one was trained from
    ref_tag: Optional[str] = None  # the reference's model tag; None = the one trained from (else the default)
    ref_step: Optional[int] = None  # the reference's step; None = the one trained from (else the latest)
    trader_sft_path: Optional[str] = None  # SFT JSONL; None = $NANOCHAT_BASE_DIR/datasets/trader_sft_data.jsonl
    trader_dpo_path: Optional[str] = None  # pairs JSONL; None = $NANOCHAT_BASE_DIR/datasets/trader_dpo_data.jsonl
    identity_path: str = IDENTITY_PROBES  # identity probes JSONL: {"prompt", "persona_answer", "generic_answer"}
    sft_val_fraction: float = -1.0  # held-out share of the SFT data; -1 = the SFT run's (else 0.1)
    dpo_val_fraction: float = -1.0  # held-out share of the pairs; -1 = the DPO run's (else 0.05)
    judge: int = -1  # LLM judge (OpenRouter): 1 = on (needs OPENROUTER_API_KEY), 0 = off, -1 = on when the key is set
    judge_prompts: int = 50  # held-out persona prompts the judge sees


def check_config(c):
    """Settings that would run and report nonsense stop here, one line each."""
    check_settings(c, at_least_1=("batch_size", "num_samples", "max_new_tokens", "top_k", "judge_prompts"),
                   not_negative=("temperature",))  # parse_config refuses NaN and infinities
    if c.max_problems == 0 or c.max_problems < -1:
        raise UserError(f"--max_problems={c.max_problems}: must be -1 (all) or at least 1")
    odd = [k for k in ("sft_val_fraction", "dpo_val_fraction") if getattr(c, k) != -1 and not 0 <= getattr(c, k) < 1]
    if odd:
        raise UserError(f"--{odd[0]}={getattr(c, odd[0])}: must be -1 (the training run's) or in [0, 1)")
    if c.judge not in (-1, 0, 1):
        raise UserError(f"--judge={c.judge}: expected 1 (on), 0 (off) or -1 (on when OPENROUTER_API_KEY is set)")
    if c.judge == 1 and not os.environ.get("OPENROUTER_API_KEY"):
        raise UserError("--judge=1 needs OPENROUTER_API_KEY in the environment")


def selected_tasks(c):
    known = [name for name in RUNS if name != "Judge"]  # the judge joins by --judge, not by name
    names = [n.strip() for n in c.task_name.split("|") if n.strip()] or known
    if unknown := [n for n in names if n not in known]:
        raise UserError(f"-a: unknown task {unknown[0]!r}; known: {'|'.join(known)}")
    return names


def chatcore(results):
    """Mean of the centred accuracies, only when every chat task has a result (nanochat)."""
    if not all(isinstance(results.get(name), float) for name in CHAT_TASKS):
        return None
    return sum((results[n] - BASELINES[n]) / (1.0 - BASELINES[n]) for n in CHAT_TASKS) / len(CHAT_TASKS)


def problems(task, c):  # how many of a task's problems to evaluate
    return len(task) if c.max_problems < 0 else min(len(task), c.max_problems)


# nanochat's chat tasks
@torch.no_grad()
def run_categorical(task, tokenizer, model, c, d, bar):
    """Multiple choice: the answer is the letter whose logit is highest at the position that
    follows <|assistant_start|>; batches of prompts padded on the right, sharded by rank."""
    n, bos = problems(task, c), tokenizer.get_bos_token_id()
    passed = total = 0
    for b in range(d.rank, -(-n // c.batch_size), d.world_size):  # every world_size-th batch; summed over ranks
        conversations = [task[i] for i in range(b * c.batch_size, min((b + 1) * c.batch_size, n))]
        prompts = [tokenizer.render_for_completion(conv) for conv in conversations]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=d.device)
        answer_pos = torch.tensor([len(p) - 1 for p in prompts], device=d.device)
        with autocast(d.device):
            h = model.hidden_states(ids)[torch.arange(len(prompts), device=d.device), answer_pos]
            logits = model.logits(h)  # only the answer positions go through the lm_head
        for row, conv in enumerate(conversations):
            choice = logits[row, [tokenizer.encode(l)[0] for l in conv["letters"]]].argmax().item()  # one token each
            passed += int(task.evaluate(conv, conv["letters"][choice]))
        total += len(conversations)
        bar.update(len(conversations))
    return passed, total


@torch.no_grad()
def run_generative(task, tokenizer, model, c, d, bar):
    """Sample num_samples completions per problem with the KV-cache engine (the calculator
    tool included); a problem passes when any sample passes."""
    engine = Engine(model, tokenizer)
    passed = total = 0
    for i in range(d.rank, problems(task, c), d.world_size):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        sequences, _ = engine.generate_batch(prompt, num_samples=c.num_samples, max_tokens=c.max_new_tokens,
                                             temperature=c.temperature, top_k=c.top_k, seed=42 + i)
        passed += int(any(task.evaluate(conv, tokenizer.decode(s[len(prompt):])) for s in sequences))
        total += 1
        bar.update(1, passed=passed)
    return passed, total


def run_chat_task(name, model, tokenizer, c, d, meta):
    task = download_lock(tasks.TASKS[name])
    bar = ProgressBar(len(range(d.rank, problems(task, c), d.world_size)), desc=name, unit="problems")
    run = run_categorical if task.eval_type == "categorical" else run_generative
    passed, total = run(task, tokenizer, model, c, d, bar)
    bar.close()
    passed, total = all_reduce_sum([passed, total], d.device)
    return {name: passed / max(total, 1)}


# Persona metrics, each without and with the persona's system message
def stage_meta(source, c, loaded_meta):
    """A stage's checkpoint meta (split, beta, ...): the loaded one, else its default directory's latest; {} if none."""
    if source == c.source:
        return loaded_meta
    try:
        directory = checkpoint_dir_for(source)
        with open(os.path.join(directory, f"meta_{find_last_step(directory):06d}.json")) as f:
            return json.load(f)
    except (UserError, OSError, ValueError):
        return {}


@functools.lru_cache(maxsize=None)
def persona_system(sft_path):
    """The persona's system message: the SFT data's (what SFT trained with), else data/persona.md's."""
    try:
        return next(r["messages"][0]["content"] for r in tasks.TraderSFT(sft_path, "train", val_fraction=0.0)
                    if r["messages"][0]["role"] == "system")
    except (UserError, StopIteration):
        return openrouter.load_persona(openrouter.PERSONA_PATH)["system"]


def conditioned(conversation, system):
    """The conversation with its system message replaced by `system`, or dropped (None)."""
    messages = [m for m in conversation["messages"] if m["role"] != "system"]
    return dict(conversation, messages=([{"role": "system", "content": system}] if system else []) + messages)


def system_of(condition, c):
    return persona_system(c.trader_sft_path) if condition == "with system" else None


@functools.lru_cache(maxsize=None)
def reference_model(ref_source, source, device, tag, step):
    """The reference of the pair rewards and the judge (loaded once), or None when it is the evaluated model."""
    return None if ref_source in ("", source) else load_model(ref_source, device, "eval", tag, step)[0]


def trader_sft_loss(model, tokenizer, c, d, meta):
    """Mean loss per assistant token on the held-out trader conversations (the SFT split)."""
    task, out = tasks.TraderSFT(c.trader_sft_path, split="val", val_fraction=c.sft_val_fraction), {}
    rows = [task[i] for i in range(problems(task, c))]
    for cond in CONDITIONS:
        with contextlib.suppress(tasks.DataUnavailable):  # no answer token left after truncation: condition left out
            out[f"Trader SFT held-out loss ({cond})"] = conversation_loss(
                model, [conditioned(r, system_of(cond, c)) for r in rows], tokenizer, len(rows), c.batch_size, d,
                model.config.sequence_len)
    if not out:
        raise tasks.DataUnavailable("no held-out trader conversation to score (the val split is empty or truncated)")
    return out


@torch.no_grad()
def prefers_share(model, pairs, pad, c, d):
    """Share of rendered pairs whose first answer has a higher mean log-prob per token than the second."""
    wins = 0
    for idx in dpo.my_batches(pairs, c.batch_size, d):  # the ranks' batches cover every pair once
        first, second, *_ = dpo.batch_logps(model, pairs, idx, pad, d.device)
        n = torch.tensor([[sum(pairs[j][k][1][1:]) for k in (0, 1)] for j in idx], device=first.device)  # scored tokens
        wins += (first / n[:, 0] > second / n[:, 1]).sum().item()
    return all_reduce_sum([wins], d.device)[0] / len(pairs)


def trader_dpo_metrics(model, tokenizer, c, d, meta):
    """On the held-out pairs: how often the model prefers the Master's answer, and the reward
    accuracy and margin against the reference by dpo.py's held-out evaluation (the DPO run's beta, split)."""
    run = SimpleNamespace(**{**dataclasses.asdict(dpo.Config()), **stage_meta("dpo", c, meta).get("user_config", {}),
                             "device_batch_size": c.batch_size})
    task = tasks.TraderDPO(c.trader_dpo_path, split="val", val_fraction=c.dpo_val_fraction)
    pad, out = tokenizer.encode_special("<|assistant_end|>"), {}
    rows = [task[i] for i in range(problems(task, c))]
    reference = reference_model(c.ref_source, c.source, d.device, c.ref_tag, c.ref_step)
    for cond in CONDITIONS:
        system = system_of(cond, c)  # in the prompt exactly as a system message renders: merged, a blank line
        pairs, _ = dpo.render_pairs([dict(r, prompt=f"{system}\n\n{r['prompt']}") if system else r for r in rows],
                                    tokenizer, model.config.sequence_len)  # the whole context, not DPO's max_length:
        if not pairs:  # the system message must fit. None left: the val split is empty, or no answer fits
            continue
        out[f"Persona preference accuracy ({cond})"] = prefers_share(model, pairs, pad, c, d)
        if reference is not None:
            stats = dpo.evaluate(model, lambda p, idx: dpo.batch_logps(reference, p, idx, pad, d.device)[:2],
                                 pairs, pad, run, d)
            model.eval()  # evaluate leaves the model in train mode
            out[f"DPO reward accuracy ({cond})"] = stats["rewards/accuracies"]
            out[f"DPO reward margin ({cond})"] = stats["rewards/margins"]
    if not out:
        raise tasks.DataUnavailable("no held-out DPO pairs (the val split is empty)")
    return out


# The LLM judge (openrouter.py's client), and the identity probes
@functools.lru_cache(maxsize=None)
def judge_client():
    """(client, its model, the persona) for openrouter.judge_both_orders."""
    client = openrouter.client_from_env()
    try:
        return client, client.choose_model(), openrouter.load_persona(openrouter.PERSONA_PATH)
    except UserError as e:  # the API refused (key, credits, ...): the judged metrics are skipped, the rest stays
        raise tasks.DataUnavailable(f"the judge is unavailable: {e}") from None


def sample_answers(model, tokenizer, prompts, system, c):
    """The model's answer to each prompt (after `system`, if any), seeded per prompt."""
    engine, answers = Engine(model, tokenizer), []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.render_for_completion(conditioned({"messages": [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]}, system))
        sequences, _ = engine.generate_batch(ids, num_samples=1, max_tokens=c.max_new_tokens,
                                             temperature=c.temperature, top_k=c.top_k, seed=42 + i)
        answers.append(tokenizer.decode(sequences[0][len(ids):]).strip())
    return answers


def judge_verdicts(prompts, answers, others):
    """+1 / -1 / None per prompt: answers[i] vs others[i], kept only when both orders agree (no position bias)."""
    client, _, persona = judge_client()
    try:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda i: openrouter.judge_both_orders(client, persona, prompts[i], answers[i], others[i]),
                                 range(len(prompts))))
    except openrouter.APIStop as e:  # a key or credit refused mid-run: the judged rows are skipped, the rest stays
        raise tasks.DataUnavailable(f"the judge is unavailable: {e}") from None


def judge_win_rate(model, tokenizer, c, d, meta):
    """The judge compares the model's answers with the reference's on held-out persona prompts (rank 0)."""
    if (reference := reference_model(c.ref_source, c.source, d.device, c.ref_tag, c.ref_step)) is None:
        raise tasks.DataUnavailable(f"the judge compares -i {c.source} with a reference (--ref_source); none here")
    task = tasks.TraderDPO(c.trader_dpo_path, split="val", val_fraction=c.dpo_val_fraction)
    prompts = [task[i]["prompt"] for i in range(min(len(task), c.judge_prompts))]
    if not prompts:
        raise tasks.DataUnavailable("no held-out persona prompts (the DPO val split is empty)")
    out = {}
    for cond in CONDITIONS if d.master else ():
        verdicts = judge_verdicts(prompts, *(sample_answers(m, tokenizer, prompts, system_of(cond, c), c)
                                             for m in (model, reference)))
        wins, losses = verdicts.count(1), verdicts.count(-1)
        out[f"Judge agreeing pairs ({cond})"] = wins + losses
        if wins + losses:
            out[f"Judge win rate ({cond})"] = wins / (wins + losses)
    return out


def probe_problem(r):
    ok = isinstance(r, dict) and all(isinstance(r.get(k), str) and r[k].strip() for k in PROBE_KEYS)
    return None if ok else 'expected {"prompt", "persona_answer", "generic_answer"}, each a non-empty string'


def identity_probes(model, tokenizer, c, d, meta):
    """Who the model is, asked with no system message: the share of probes where the judge
    prefers its own answer to a generic assistant's in both orders, or, with no judge, where
    it gives the persona's answer a higher log-prob per token than the generic one."""
    probes = tasks.read_jsonl(c.identity_path, probe_problem)[:c.max_problems if c.max_problems > 0 else None]
    prompts = [p["prompt"] for p in probes]
    if c.judge:  # rank 0 asks the judge
        verdicts = judge_verdicts(prompts, sample_answers(model, tokenizer, prompts, None, c),
                                  [p["generic_answer"] for p in probes]) if d.master else []
        return {"Identity probe score": verdicts.count(1) / len(probes)} if d.master else {}
    pairs, _ = dpo.render_pairs([{"prompt": p["prompt"], "chosen": p["persona_answer"], "rejected": p["generic_answer"]}
                                 for p in probes], tokenizer, model.config.sequence_len)
    return {"Identity probe score": prefers_share(model, pairs, tokenizer.encode_special("<|assistant_end|>"), c, d)}


RUNS = {**{name: functools.partial(run_chat_task, name) for name in CHAT_TASKS},
        "Trader-SFT": trader_sft_loss, "Trader-DPO": trader_dpo_metrics, "Identity": identity_probes,
        "Judge": judge_win_rate}


def main():
    c = parse_config(Config, aliases=ALIASES)
    check_config(c)
    names = selected_tasks(c)
    c.judge = int(c.judge == 1 or (c.judge == -1 and bool(os.environ.get("OPENROUTER_API_KEY"))))  # -1 resolved
    for cache in (reference_model, persona_system, judge_client):  # per run (tests call main() again)
        cache.cache_clear()
    d = init_dist(c.device_type)
    model, tokenizer, meta = load_model(c.source, d.device, phase="eval", model_tag=c.model_tag, step=c.step)
    if not c.ref_source and meta.get("source"):  # the very checkpoint it was trained from
        c.ref_source, c.ref_tag = meta["source"], c.ref_tag or meta.get("source_tag")
        c.ref_step = meta.get("source_step") if c.ref_step is None else c.ref_step
    c.ref_source = c.ref_source or ("sft" if c.source == "dpo" else "")
    if c.sft_val_fraction < 0:  # the splits the SFT and DPO runs held out
        c.sft_val_fraction = stage_meta("sft", c, meta).get("user_config", {}).get("trader_val_fraction", 0.1)
    if c.dpo_val_fraction < 0:
        c.dpo_val_fraction = stage_meta("dpo", c, meta).get("user_config", {}).get("val_fraction", 0.05)
    print0(f"evaluating {c.source} step {meta.get('step')} on {', '.join(names)} (reference: {c.ref_source or 'none'})")
    results, skipped, t0 = {}, {}, time.time()
    for name in names + (["Judge"] if c.judge else []):
        start = time.time()
        try:
            new = RUNS[name](model, tokenizer, c, d, meta)
        except tasks.DataUnavailable as e:  # no data, or no judge: say so, keep the rest
            skipped[name] = str(e)
            print0(f"{name}: skipped ({e})")
            continue
        results.update(new)
        print0(f"{name}: {', '.join(f'{k} {v:.4f}' for k, v in new.items())} ({time.time() - start:.1f}s)")
    if (core := chatcore(results)) is not None:
        results["ChatCORE metric"] = core
    if d.master:
        judged = judge_client.cache_info().currsize  # a judge answered
        info = {"Skipped tasks": len(skipped), "Evaluation time (s)": round(time.time() - t0, 1),
                "Persona reference": c.ref_source or "none",
                "Judge": f"{judge_client()[1]} (both orders)" if judged else "none (identity probes by log-likelihood)"}
        section_path = write_report_section(f"Chat evaluation {c.source}", [
            {k: v for k, v in dataclasses.asdict(c).items() if k != "task_name"}, results, info])
        atomic_write_json(section_path[:-3] + ".json", {
            "source": c.source, "step": meta.get("step"), "results": results, "skipped": skipped,
            "config": dataclasses.asdict(c)})
    cleanup_dist()


if __name__ == "__main__":
    run_main(main)
