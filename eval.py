"""
Chat evaluation of an SFT/DPO checkpoint: nanochat's tasks and their ChatCORE, identity probes, and
persona metrics with and without the persona's system message (held-out trader loss, preference for
the Master's answers; DPO reward accuracy and margin and an LLM judge's win rate, against the reference).

    python eval.py -i sft                        # everything, one process
    python eval.py -i dpo -a "ARC-Easy|GSM8K" --max_problems=100
    torchrun --standalone --nproc_per_node=8 eval.py -i dpo
    OPENROUTER_API_KEY=... python eval.py -i dpo -a "Trader-DPO|Identity"   # the judge joins in

Writes $NANOCHAT_BASE_DIR/report/chimera-chat-evaluation-{source}.md (one `- Task: value (measured on)` line
per metric, as nanochat's report reads them) and chimera-chat-evaluation-{source}.json beside it, which also
keeps a few held-out answers for the report to show side by side.
"""

import contextlib
import dataclasses
import functools
import json
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional

import torch

from common import (UserError, ProgressBar, all_reduce_sum, atomic_write_json, autocast, check_settings,
                    cleanup_dist, get_base_dir, init_dist, parse_config, print0, run_main)
from checkpoint import checkpoint_dir_for, held_out_fractions, load_model, stage_config
from engine import Engine, Sampling
import dpo
import onpolicy
import openrouter
from report import PAIRS_KEY, write_report_section
import tasks
from sft import conversation_loss

# nanochat 885a4f2's chat_eval task set; ChatCORE centres each accuracy on its chance level
CHAT_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
CONDITIONS = ("no system", "with system")  # the persona metrics without / with the persona's system message
ALIASES = {"i": "source", "a": "task_name"}  # -i, -a as in nanochat's chat_eval
IDENTITY_PROBES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "identity_probes.jsonl")
ANSWERS_KEPT = 3  # held-out prompts whose answers the json keeps for the report

@dataclasses.dataclass(frozen=True)  # as given: Resolved holds what its -1 and "" mean
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

def check_config(config):
    """Settings that would run and report nonsense stop here, one line each."""
    check_settings(config, at_least_1=("batch_size", "num_samples", "max_new_tokens", "top_k", "judge_prompts"),
                   not_negative=("temperature",))  # parse_config refuses NaN and infinities
    if config.max_problems == 0 or config.max_problems < -1:
        raise UserError(f"--max_problems={config.max_problems}: must be -1 (all) or at least 1")
    for key in ("sft_val_fraction", "dpo_val_fraction"):
        if getattr(config, key) != -1 and not 0 <= getattr(config, key) < 1:
            raise UserError(f"--{key}={getattr(config, key)}: must be -1 (the training run's) or in [0, 1)")
    if config.judge not in (-1, 0, 1):
        raise UserError(f"--judge={config.judge}: expected 1 (on), 0 (off) or -1 (on when OPENROUTER_API_KEY is set)")
    if config.judge == 1 and not os.environ.get("OPENROUTER_API_KEY"):
        raise UserError("--judge=1 needs OPENROUTER_API_KEY in the environment")

def selected_tasks(config):
    known = [name for name in EVALUATIONS if name != "Judge"]  # the judge joins by --judge, not by name
    names = [n.strip() for n in config.task_name.split("|") if n.strip()] or known
    if unknown := [n for n in names if n not in known]:
        raise UserError(f"-a: unknown task {unknown[0]!r}; known: {'|'.join(known)}")
    return names

def chatcore(results, generation=2025):
    """Mean of the centred accuracies over the generation's chat_eval task set, only when every one of them has
    a result (nanochat): 885a4f2's six tasks; 92d63d4 dropped SpellingBee from ChatCORE."""
    names = [n for n in CHAT_TASKS if generation == 2025 or n != "SpellingBee"]
    if not all(isinstance(results.get(name), float) for name in names):
        return None
    return sum((results[n] - BASELINES[n]) / (1.0 - BASELINES[n]) for n in names) / len(names)

def problems(task, config):  # how many of a task's problems to evaluate
    return len(task) if config.max_problems < 0 else min(len(task), config.max_problems)

class Figure(NamedTuple):  # a metric as the report shows it: "0.4444 (4 of 9 held-out pairs)"
    value: object  # a float, or "undefined"
    measured_on: str = ""  # on what (and against what), and how many

    def __str__(self):
        value = f"{self.value:.4f}" if isinstance(self.value, float) else str(self.value)
        return f"{value} ({self.measured_on})" if self.measured_on else value

def share(k, n, items):  # k of n items; undefined when there is none
    return Figure(k / n, f"{k} of {n} {items}") if n else Figure("undefined", f"no {items}")

# What the settings left to the checkpoints (-1, "") mean for this one, worked out once in main (Config is frozen)
class Resolved(NamedTuple):
    ref_source: str  # the reference of the pair rewards and the judge; "" = none
    ref_tag: Optional[str]
    ref_step: Optional[int]
    sft_val_fraction: float
    dpo_val_fraction: float
    dpo_loss: dpo.DPOLoss  # the DPO run's beta, loss type and label smoothing
    dpo_max_length: int  # the DPO run's truncation: its held-out figures and eval's agree
    judge: Optional["Judge"]  # None = off

    @property
    def reference_name(self):  # "sft chimera_d2 step 14"; a tag or step left to the defaults is not named
        step = None if self.ref_step is None else f"step {self.ref_step}"
        return " ".join(filter(None, (self.ref_source, self.ref_tag, step))) or "none"

class Judge:
    """openrouter.py's LLM judge, connected on first use; `model` names it once it has answered."""
    client = model = persona = None

    def verdicts(self, prompts, answers, others):
        """+1 / -1 / None per prompt: answers[i] vs others[i], kept only when both orders agree (no position bias)."""
        client = self.client or openrouter.client_from_env()
        try:  # the API refusing (a key, credits, ...), first or mid-run, skips the judged metrics, not the rest
            if self.client is None:
                self.model, self.persona = client.choose_model(), openrouter.load_persona(openrouter.PERSONA_PATH)
                self.client = client
            with ThreadPoolExecutor(8) as pool:
                verdicts = list(pool.map(lambda i: self.verdict(client, prompts[i], answers[i], others[i]),
                                         range(len(prompts))))
        except UserError as e:
            raise tasks.DataUnavailable(f"the judge is unavailable: {e}", for_now=True) from None
        failed = [v for v in verdicts if isinstance(v, Exception)]  # a few are no verdict; more, a judge not there
        if len(failed) * 10 > len(verdicts):
            raise tasks.DataUnavailable(f"the judge is unavailable: {failed[0]}", for_now=True) from None
        return [None if isinstance(v, Exception) else v for v in verdicts]

    def verdict(self, client, prompt, answer, other):  # the judge's, or what kept it from answering (retries spent)
        try:
            return openrouter.judge_both_orders(client, self.persona, prompt, answer, other)
        except (openrouter.BadAnswer, tasks.HTTPGaveUp) as e:
            return e

def resolve(config, meta):
    """By default the reference is the very checkpoint this one was trained from (its meta's source, tag and
    step), the splits and loss those of the SFT and DPO runs, and the judge on when a key is set."""
    trained_from = meta if not config.ref_source and meta.get("source") else {}
    dpo_run = {**dataclasses.asdict(dpo.Config()), **stage_config("dpo", config.source, meta)}
    sft_val_fraction, dpo_val_fraction = held_out_fractions(config.source, meta, config.sft_val_fraction,
                                                            config.dpo_val_fraction)
    return Resolved(
        ref_source=config.ref_source or trained_from.get("source") or ("sft" if config.source == "dpo" else ""),
        ref_tag=config.ref_tag or trained_from.get("source_tag"),
        ref_step=trained_from.get("source_step") if config.ref_step is None else config.ref_step,
        sft_val_fraction=sft_val_fraction, dpo_val_fraction=dpo_val_fraction,
        dpo_loss=dpo.DPOLoss(dpo_run["beta"], dpo_run["loss_type"], dpo_run["label_smoothing"]),
        dpo_max_length=dpo_run["max_length"],
        judge=Judge() if config.judge == 1 or (config.judge == -1 and os.environ.get("OPENROUTER_API_KEY")) else None)

# nanochat's chat tasks
@torch.no_grad()
def run_categorical(task, tokenizer, model, config, proc, bar):
    """Multiple choice: the letter with the highest logit after <|assistant_start|>; right-padded batches."""
    n, bos, batch_size = problems(task, config), tokenizer.get_bos_token_id(), config.batch_size
    passed = total = 0
    for b in range(proc.rank, -(-n // batch_size), proc.world_size):  # every world_size-th batch; summed over ranks
        conversations = [task[i] for i in range(b * batch_size, min((b + 1) * batch_size, n))]
        prompts = [tokenizer.render_for_completion(conv) for conv in conversations]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=proc.device)
        answer_pos = torch.tensor([len(p) - 1 for p in prompts], device=proc.device)
        with autocast(proc.device):
            h = model.hidden_states(ids)[torch.arange(len(prompts), device=proc.device), answer_pos]
            logits = model.logits(h)  # only the answer positions go through the lm_head
        for row, conv in enumerate(conversations):
            choice = logits[row, [tokenizer.encode(l)[0] for l in conv["letters"]]].argmax().item()  # one token each
            passed += int(task.evaluate(conv, conv["letters"][choice]))
        total += len(conversations)
        bar.update(len(conversations))
    return passed, total

@torch.no_grad()
def run_generative(task, tokenizer, model, config, proc, bar):
    """num_samples completions per problem by the KV-cache engine (calculator included); any one may pass it."""
    engine = Engine(model, tokenizer)
    passed = total = 0
    for i in range(proc.rank, problems(task, config), proc.world_size):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        sequences, _ = engine.generate_batch(prompt, num_samples=config.num_samples, max_tokens=config.max_new_tokens,
                                             temperature=config.temperature, top_k=config.top_k, seed=42 + i)
        passed += int(any(task.evaluate(conv, tokenizer.decode(s[len(prompt):])) for s in sequences))
        total += 1
        bar.update(1, passed=passed)
    return passed, total

def chat_task(name, model, tokenizer, config, resolved, proc):
    """The task's accuracy; where Chimera scores it otherwise on purpose, also nanochat's ("<name> (nanochat)")."""
    out, nanochat = {}, tasks.NANOCHAT_TASKS[model.config.generation].get(name)
    for key, make in [(name, tasks.TASKS[name])] + [(f"{name} (nanochat)", nanochat)] * bool(nanochat):
        try:  # each rank fetches alone: one that cannot (its retries spent) must not leave the others' sums unmatched
            task, failed = tasks.download_lock(make), None
        except tasks.DataUnavailable as e:
            failed = e
        if all_reduce_sum([failed is not None], proc.device)[0]:
            raise failed or tasks.DataUnavailable(f"{key} is unavailable on another rank", for_now=True)
        bar = ProgressBar(len(range(proc.rank, problems(task, config), proc.world_size)), desc=key, unit="problems")
        score = run_categorical if task.eval_type == "categorical" else run_generative
        passed, total = score(task, tokenizer, model, config, proc, bar)
        bar.close()
        passed, total = all_reduce_sum([passed, total], proc.device)
        out[key] = share(int(passed), int(total), "problems")
    return out

# Persona metrics, each without and with the persona's system message
@functools.lru_cache(maxsize=None)
def system_of(condition, config):
    """A condition's system message: None, or the persona's (the SFT data's, what SFT trained on; else persona.md's)."""
    if condition != "with system":
        return None
    try:
        rows = tasks.TraderSFT(config.trader_sft_path, "train", val_fraction=0.0)
        return next(r["messages"][0]["content"] for r in rows if r["messages"][0]["role"] == "system")
    except (UserError, StopIteration):
        return openrouter.load_persona(openrouter.PERSONA_PATH)["system"]

def conditioned(conversation, system):
    """The conversation with its system message replaced by `system`, or dropped (None)."""
    messages = [m for m in conversation["messages"] if m["role"] != "system"]
    return dict(conversation, messages=([{"role": "system", "content": system}] if system else []) + messages)

@functools.lru_cache(maxsize=None)
def reference_model(config, resolved, device):
    """The reference of the pair rewards and the judge (loaded once), or None when it is the evaluated model."""
    if resolved.ref_source in ("", config.source):
        return None
    return load_model(resolved.ref_source, device, "eval", resolved.ref_tag, resolved.ref_step)[0]

def trader_sft_loss(model, tokenizer, config, resolved, proc):
    """Mean loss per assistant token on the held-out trader conversations (the SFT split)."""
    task, out = tasks.TraderSFT(config.trader_sft_path, split="val", val_fraction=resolved.sft_val_fraction), {}
    rows = [task[i] for i in range(problems(task, config))]
    for cond in CONDITIONS:
        with contextlib.suppress(tasks.DataUnavailable):  # no answer token left after truncation: condition left out
            out[f"Trader SFT held-out loss ({cond})"] = Figure(conversation_loss(
                model, [conditioned(r, system_of(cond, config)) for r in rows], tokenizer, len(rows), config.batch_size,
                proc, model.config.sequence_len), f"per answer token, {len(rows)} conversations")
    if not out:
        raise tasks.DataUnavailable("no held-out trader conversation to score (the val split is empty or truncated)")
    return out

@torch.no_grad()
def preferred(model, pairs, pad_id, batch_size, proc, items):
    """The share of rendered pairs (items) whose first answer has a higher mean log-prob per token than the second."""
    wins = 0
    for indices in dpo.my_batches(pairs, batch_size, proc):  # the ranks' batches cover every pair once
        logps = dpo.batch_logps(model, pairs, indices, pad_id, proc.device)
        scored = torch.tensor([[sum(mask[1:]) for _, mask in (pairs[i].chosen, pairs[i].rejected)] for i in indices],
                              device=logps.chosen.device)  # the answers' tokens
        wins += (logps.chosen / scored[:, 0] > logps.rejected / scored[:, 1]).sum().item()
    return share(int(all_reduce_sum([wins], proc.device)[0]), len(pairs), items)

def trader_dpo_metrics(model, tokenizer, config, resolved, proc):
    """Held-out pairs: how often the model prefers the Master's answer; reward accuracy and margin (dpo.py's)."""
    task = tasks.TraderDPO(config.trader_dpo_path, split="val", val_fraction=resolved.dpo_val_fraction)
    pad_id, out = tokenizer.encode_special("<|assistant_end|>"), {}
    rows = [task[i] for i in range(problems(task, config))]
    reference = reference_model(config, resolved, proc.device)
    for cond in CONDITIONS:
        system = system_of(cond, config)  # in the prompt exactly as a system message renders: merged, a blank line
        # truncated as DPO truncates (its held-out figures and these agree), the system message on top of that
        budget = resolved.dpo_max_length + (len(tokenizer.encode(f"{system}\n\n")) if system else 0)
        pairs, _ = dpo.render_pairs([dict(r, prompt=f"{system}\n\n{r['prompt']}") if system else r for r in rows],
                                    tokenizer, min(budget, model.config.sequence_len))
        if not pairs:  # none left: the val split is empty, or no answer fits
            continue
        out[f"Persona preference accuracy ({cond})"] = preferred(model, pairs, pad_id, config.batch_size, proc,
                                                                 "held-out pairs")
        if reference is not None:
            held_out = dpo.evaluate_pairs(model, reference, pairs, pad_id, resolved.dpo_loss, config.batch_size, proc)
            accuracy, margin, n = held_out["rewards/accuracies"], held_out["rewards/margins"], len(pairs)
            against = f"held-out pairs, against {resolved.reference_name}"
            out[f"DPO reward accuracy ({cond})"] = share(round(accuracy * n), n, against) if accuracy or margin else \
                Figure("undefined", f"every reward margin is 0, the model scoring as its reference; {n} {against}")
            out[f"DPO reward margin ({cond})"] = Figure(margin, f"mean of {n} {against}")
    if not out:
        raise tasks.DataUnavailable("no held-out DPO pairs (the val split is empty)")
    return out

# The LLM judge, and the identity probes
def sample_answers(model, tokenizer, prompts, seeds, system, config):
    """The model's answer to each prompt (after `system`, if any), decoded together, seeded per prompt."""
    ids = [tokenizer.render_for_completion(conditioned({"messages": [
        {"role": "user", "content": p}, {"role": "assistant", "content": ""}]}, system)) for p in prompts]
    max_len = min(max(map(len, ids), default=0) + config.max_new_tokens, model.cos.size(1))
    samplings = [Sampling(config.temperature, config.top_k, max_tokens=config.max_new_tokens, seed=s) for s in seeds]
    done = Engine(model, tokenizer, config.batch_size, max_len).complete(ids, samplings)
    return [tokenizer.decode(answer).strip() for (answer,) in done]

def judged(judge, prompts, answers, others, proc):
    """(wins, losses, the answers' and the others' mean length in characters) of answers(prompts, seeds) over
    others(...) summed over ranks, each rank sampling and judging its share (no rank waits on one that does it all);
    DataUnavailable on every rank if the judge failed on any."""
    mine = list(range(proc.rank, len(prompts), proc.world_size))
    counts, why = [0, 0, 0, 0, 0], "the judge is unavailable (on another rank)"
    try:
        picked, seeds = [prompts[i] for i in mine], [42 + i for i in mine]
        mine_a, mine_b = (answers(picked, seeds), others(picked, seeds)) if mine else ([], [])
        verdicts = judge.verdicts(picked, mine_a, mine_b) if mine else []
        counts[:4] = verdicts.count(1), verdicts.count(-1), sum(map(len, mine_a)), sum(map(len, mine_b))
    except tasks.DataUnavailable as e:
        counts[4], why = 1, str(e)
    wins, losses, chars, other_chars, failed = all_reduce_sum(counts, proc.device)
    if failed:
        raise tasks.DataUnavailable(why, for_now=True)
    return int(wins), int(losses), chars / max(len(prompts), 1), other_chars / max(len(prompts), 1)

def judge_win_rate(model, tokenizer, config, resolved, proc):
    """The judge compares the model's answers with the reference's on held-out persona prompts."""
    if (reference := reference_model(config, resolved, proc.device)) is None:
        raise tasks.DataUnavailable(f"the judge compares -i {config.source} with a reference (--ref_source); none here")
    task = tasks.TraderDPO(config.trader_dpo_path, split="val", val_fraction=resolved.dpo_val_fraction)
    prompts = [task[i]["prompt"] for i in range(min(len(task), config.judge_prompts))]
    if not prompts:
        raise tasks.DataUnavailable("no held-out persona prompts (the DPO val split is empty)")
    out = {}
    for cond in CONDITIONS:
        answers, others = (functools.partial(sample_answers, m, tokenizer, system=system_of(cond, config),
                                             config=config) for m in (model, reference))
        wins, losses, chars, reference_chars = judged(resolved.judge, prompts, answers, others, proc)
        out[f"Judge win rate ({cond})"] = share(wins, wins + losses, f"verdicts that held in both orders, against "
                                                                     f"{resolved.reference_name}")
        # beside it, as judges favour longer answers
        out[f"Answer length ({cond})"] = Figure(chars, f"mean characters, {len(prompts)} held-out prompts")
        out[f"Reference answer length ({cond})"] = Figure(reference_chars, f"{resolved.reference_name}'s")
    return out

def probe_problem(r):  # one identity probe per line of its JSONL
    keys = ("prompt", "persona_answer", "generic_answer")
    ok = isinstance(r, dict) and all(isinstance(r.get(k), str) and r[k].strip() for k in keys)
    return None if ok else 'expected {"prompt", "persona_answer", "generic_answer"}, each a non-empty string'

def identity_probes(model, tokenizer, config, resolved, proc):
    """Who the model is, asked with no system message: the share of probes where the judge prefers its answer to a
    generic assistant's (both orders), or, with no judge, where the persona's answer has the higher log-prob/token."""
    probes = tasks.read_jsonl(config.identity_path, probe_problem)[:max(config.max_problems, 0) or None]
    prompts = [p["prompt"] for p in probes]
    if resolved.judge:  # its answer against a generic assistant's, judged
        generic = {p["prompt"]: p["generic_answer"] for p in probes}
        answers = functools.partial(sample_answers, model, tokenizer, system=None, config=config)
        wins, *_ = judged(resolved.judge, prompts, answers, lambda picked, _: [generic[p] for p in picked], proc)
        return {"Identity probe score": share(wins, len(probes), "identity probes, judged")}
    pairs, _ = dpo.render_pairs([{"prompt": p["prompt"], "chosen": p["persona_answer"], "rejected": p["generic_answer"]}
                                 for p in probes], tokenizer, model.config.sequence_len)
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    return {"Identity probe score": preferred(model, pairs, pad_id, config.batch_size, proc, "identity probes")}

def held_out_answers(model, tokenizer, config, resolved):
    """{prompt: the model's answer} for a few held-out persona prompts (no system message, seeded as the judge's
    are), for the report to show the SFT and DPO answers side by side."""
    task = tasks.TraderDPO(config.trader_dpo_path, split="val", val_fraction=resolved.dpo_val_fraction)
    prompts = [task[i]["prompt"] for i in range(min(len(task), ANSWERS_KEPT))]
    return dict(zip(prompts, sample_answers(model, tokenizer, prompts, range(42, 42 + len(prompts)), None, config)))

def onpolicy_pairs(meta):
    """What the judge made of the on-policy prompts this DPO run trained on (onpolicy.py's ledger beside its pairs):
    pairs kept, prompts rejected by outcome, the judge's cost; None for other data."""
    path = (meta.get("user_config") or {}).get("dpo_data_path")
    if not path or not os.path.isfile(ledger := onpolicy.ledger_path(path)):
        return None
    entries = list(tasks.iter_jsonl(ledger, onpolicy.ledger_problem))
    if not entries or any("round" not in e for e in entries):  # gen.py's ledger of the data it wrote, not onpolicy's
        return None
    outcomes = Counter(e["outcome"] for e in entries)
    kept = outcomes.pop("kept", 0) + outcomes.pop("anchored", 0)
    return {"kept": kept, "rejected": dict(outcomes), "judge_cost": sum(e.get("cost", 0.0) for e in entries)}

EVALUATIONS = {**{name: functools.partial(chat_task, name) for name in CHAT_TASKS},
               "Trader-SFT": trader_sft_loss, "Trader-DPO": trader_dpo_metrics, "Identity": identity_probes,
               "Judge": judge_win_rate}

def main():
    config = parse_config(Config, aliases=ALIASES)
    check_config(config)
    names = selected_tasks(config)
    for cache in (reference_model, system_of):  # per run (tests call main() again)
        cache.cache_clear()
    proc = init_dist(config.device_type)
    model, tokenizer, meta = load_model(config.source, proc.device, "eval", config.model_tag, config.step)
    resolved = resolve(config, meta)
    print0(f"evaluating {config.source} step {meta.get('step')} on {', '.join(names)} "
           f"(reference: {resolved.reference_name})")
    figures, skipped, t0 = {}, {}, time.time()  # {task: {metric: Figure}}, {task: DataUnavailable}
    for name in names + (["Judge"] if resolved.judge else []):
        start = time.time()
        try:
            figures[name] = EVALUATIONS[name](model, tokenizer, config, resolved, proc)
        except tasks.DataUnavailable as e:  # no data, or no judge: said once per cause below, the rest kept
            skipped[name] = e
            continue
        print0(f"{name}: {', '.join(f'{k} {f}' for k, f in figures[name].items())} ({time.time() - start:.1f}s)")
    for cause in dict.fromkeys(e.cause for e in skipped.values()):  # not a long line (a cache path) per task
        these = [n for n, e in skipped.items() if e.cause == cause]
        print0(f"skipped ({cause}): {', '.join(these)}" + " (where its data goes: the json beside the report "
               "section)" * any(n in CHAT_TASKS for n in these))
    tag = os.path.basename(checkpoint_dir_for(config.source, config.model_tag))
    name = f"{config.source}-{tag}" if re.fullmatch(r".+_r\d+", tag) else config.source  # a DPO round: by its tag
    record = {"source": config.source, "step": meta.get("step"), "figures": figures, "onpolicy": onpolicy_pairs(meta),
              "skipped": {n: str(e) for n, e in skipped.items()},
              "skipped_for_now": [n for n, e in skipped.items() if e.for_now],
              "answers": held_out_answers(model, tokenizer, config, resolved) if "Trader-DPO" in figures else {}}
    section_json = os.path.join(get_base_dir(), "report", f"chimera-chat-evaluation-{name}.json")
    if config.task_name and os.path.exists(section_json):  # -a: these tasks updated, the others kept
        with open(section_json, encoding="utf-8") as f:
            earlier = json.load(f)
        if earlier.get("step") == meta.get("step") and isinstance(earlier.get("figures"), dict):
            for key in ("figures", "skipped"):  # a task run now replaces its earlier figures or skip
                record[key] = {**{k: v for k, v in earlier[key].items() if k not in {**figures, **skipped}},
                               **record[key]}
            record["answers"] = record["answers"] or earlier["answers"]
    results = {k: Figure(*f) for by_metric in record["figures"].values() for k, f in by_metric.items()}
    values = {k: f.value for k, f in results.items()}
    variants = tasks.NANOCHAT_TASKS[model.config.generation]  # nanochat's figures where Chimera's differ on purpose
    as_nanochat = {k: values.get(f"{k} (nanochat)") if k in variants else v for k, v in values.items()}
    for key, by_name in (("ChatCORE metric", values), ("ChatCORE (nanochat)", as_nanochat)):
        if (core := chatcore(by_name, model.config.generation)) is not None:
            results[key] = Figure(core)
    if proc.master:
        # the settings as run: a flag Resolved holds (by the same name) as resolved
        settings = {k: getattr(resolved, k, v) for k, v in dataclasses.asdict(config).items()}
        settings["judge"] = int(resolved.judge is not None)
        unused = {"task_name", "top_k" if config.temperature == 0 else "", "" if resolved.judge else "judge_prompts"}
        judge = resolved.judge.model if resolved.judge else None  # None: no judge answered
        info = {"Skipped tasks": ", ".join(record["skipped"]) or "none",
                "Evaluation time (s)": round(time.time() - t0, 1), "Persona reference": resolved.reference_name,
                "Judge": f"{judge} (both orders)" if judge else "none (identity probes by log-likelihood)"}
        if pairs := record["onpolicy"]:
            rejected = ", ".join(f"{k} {v}" for k, v in sorted(pairs["rejected"].items()))
            info[PAIRS_KEY] = (f"{pairs['kept']} kept, {sum(pairs['rejected'].values())} rejected "
                               f"({rejected or 'none'}), judge ${pairs['judge_cost']:.4f}")
        section_path = write_report_section(f"Chat evaluation {name}", [
            {k: v for k, v in settings.items() if k not in unused}, {k: str(f) for k, f in results.items()}, info])
        atomic_write_json(section_path[:-3] + ".json", {**record, "config": settings, "results": {
            k: f.value for k, f in results.items() if isinstance(f.value, float)}})  # the undefined: in figures
    cleanup_dist()

if __name__ == "__main__":
    run_main(main)
