"""
On-policy preference pairs: the model answers training prompts --samples times, the persona judge scores the answers
twice (the second time in reverse order), and where both asks agree, the best answer against the worst (or, for
--anchor_frac of the prompts, against gen.py's Apprentice answer) is a DPO pair (OAIF; RLHF Workflow).

    torchrun --standalone --nproc_per_node=8 onpolicy.py --source=sft     # with OPENROUTER_API_KEY set
    torchrun --standalone --nproc_per_node=8 onpolicy.py --source=dpo --model_tag=d20 --round=2 \\
        --output=$NANOCHAT_BASE_DIR/datasets/trader_dpo_onpolicy_r2.jsonl   # a later round: its own file

Prompts: the training splits of datasets/trader_dpo_data.jsonl and trader_sft_data.jsonl (first user messages), none
that a held-out split holds. Answers are sampled without a system message, seeded by the prompt: 1 and N processes write
the same pairs. Writes --output in trader_dpo_data.jsonl's format (dpo.py --dpo_data_path=... trains on it), a ledger
of judged prompts beside it (each one's outcome and judge cost), and the judge's spend to gen.py's
trader_gen_spend.jsonl there. A re-run resumes.
"""

import hashlib
import os
import re
from collections import Counter, namedtuple
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Optional

import torch.distributed as dist

import tasks
from checkpoint import checkpoint_dir_for, find_last_step, held_out_fractions, load_model, read_meta
from common import (ProgressBar, UserError, all_reduce_sum, check_settings, cleanup_dist, differs_from_rank0,
                    get_base_dir, init_dist, parse_config, print0, rank0_value, run_main)
from engine import Engine, Sampling
from openrouter import (PERSONA_PATH, STOP, APIStop, BadAnswer, Spend, client_from_env, hold_lock, judge_system,
                        load_persona, repair_torn_line, stop_on_sigint)

@dataclass
class Config:
    source: str = "sft"  # checkpoint to sample from: sft|dpo|...
    model_tag: Optional[str] = None  # its directory; None = the largest
    step: Optional[int] = None  # its step; None = the latest
    device_type: str = ""  # cuda|mps|cpu; "" = autodetect
    round: int = 1  # recorded in each record: a file holds one round's pairs from one checkpoint
    output: str = ""  # the pairs; "" = $NANOCHAT_BASE_DIR/datasets/trader_dpo_onpolicy.jsonl
    dpo_val_fraction: float = -1.0  # the pairs held out by hash (eval scores them); -1 = the DPO run's, as eval.py
    sft_val_fraction: float = -1.0  # the conversations held out; -1 = the SFT run's (sft.py --trader_val_fraction)
    prompts: int = 0  # most prompts to use (in an order drawn by --seed); 0 = all
    samples: int = 4  # answers per prompt
    max_new_tokens: int = 256  # tokens per answer; one cut here can be rejected, never chosen
    temperature: float = 1.0  # sampling temperature
    top_k: int = 50  # sample among the top_k tokens (0 = all)
    batch_size: int = 32  # rows decoded together per process (a prompt's samples share its prefill)
    seed: int = 0  # seeds the prompts' order, anchors and samples
    min_margin: float = 2.0  # keep a pair only when both asks score chosen this much (of 10) above rejected
    anchor_frac: float = 0.25  # share of prompts whose rejected answer is gen.py's Apprentice answer, when it lost
    judge_model: str = ""  # the judge; "" = $OPENROUTER_MODELS or openai/gpt-4o-mini
    workers: int = 16  # concurrent judge requests
    max_cost: float = 0.0  # stop cleanly once the spend ledger (gen.py's runs too) reaches this (USD); 0 = no limit

Prompt = namedtuple("Prompt", "id text seed apprentice")  # apprentice: gen.py's rejected answer if anchored
Answer = namedtuple("Answer", "text tokens cut")  # cut: stopped by --max_new_tokens
HEARTBEAT = 5.0  # seconds between the ranks' meetings while rank 0 waits on the judge: no collective waits longer
SCORES_SCHEMA = {"type": "object", "properties": {"scores": {"type": "array", "items": {"type": "integer"}}},
                 "required": ["scores"], "additionalProperties": False}

def draw(*parts):  # a 48-bit number fixed by the parts: the same on every rank and every run
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:6], "big")

def training_prompts(config):
    """The training splits' prompts, each once, in an order drawn by --seed, capped at --prompts."""
    def prompts(split):  # (text, apprentice, file)
        dpo = tasks.TraderDPO(None, split, config.dpo_val_fraction)
        sft = tasks.TraderSFT(None, split, config.sft_val_fraction)
        return [(r["prompt"], r["rejected"], dpo.path) for r in dpo] + [
            (next(m["content"] for m in r["messages"] if m["role"] == "user"), None, sft.path) for r in sft]
    held_out = {text for text, _, _ in prompts("val")}
    train = [p for p in prompts("train") if p[0] not in held_out]
    # a lone surrogate (half an emoji) passes the data checks, but no UTF-8 file can hold a pair made of it
    if bad := next((p for p in train if re.search("[\ud800-\udfff]", p[0] + (p[1] or ""))), None):
        raise UserError(f"{bad[2]}: the line of {bad[0][:40]!r}... holds a lone surrogate (half an emoji, not "
                        "UTF-8 text): fix or drop it")
    found = {text: apprentice for text, apprentice, _ in train[::-1]}  # the first's
    order = sorted(found, key=lambda text: draw(config.seed, "order", text))[:config.prompts or None]
    return [Prompt(draw(text), text, draw(config.seed, text), found[text] if
                   found[text] and draw(config.seed, "anchor", text) < config.anchor_frac * 2**48 else None)
            for text in order]

def sample(engine, rendered, prompts, config):
    """[[Answer] * --samples] per prompt, the prompts decoded together, each prompt's samples from one prefill."""
    samplings = [Sampling(config.temperature, config.top_k, max_tokens=config.max_new_tokens, seed=p.seed)
                 for p in prompts]
    done = engine.complete([rendered[p.id] for p in prompts], samplings, config.samples)
    return [[Answer(engine.tokenizer.decode(ids).strip(), len(ids), len(ids) >= config.max_new_tokens) for ids in row]
            for row in done]

# The judge: a score for every answer, asked in both orders; the pair both asks agree on
def score_answers(client, persona, message, answers, attempts=3):
    """The judge's 1-10 score of each answer, in the answers' order, from each of two asks (the second shows them
    reversed: a verdict that flips with the order is position bias); None when an ask's answers are unusable. No
    answer at all (BadAnswer: an error inside an HTTP 200, ...) from the last attempt is raised: that is transient."""
    asks = []
    for shown in (answers, answers[::-1]):
        user = (f"Message:\n{message}\n\n" + "".join(f"Answer {i}:\n{a}\n\n" for i, a in enumerate(shown, 1)) +
                f'Score each answer from 1 (worst) to 10 (best). Return JSON: {{"scores": [{len(shown)} integers, '
                "one per answer, in order]}.")
        for attempt in range(attempts):
            try:
                value = client.chat([{"role": "system", "content": judge_system(persona)},
                                     {"role": "user", "content": user}], "judge_scores", SCORES_SCHEMA, 0.0, 64)
            except BadAnswer:
                if attempt + 1 < attempts:
                    continue
                raise
            scores = value.get("scores") if isinstance(value, dict) else None
            if isinstance(scores, list) and len(scores) == len(shown) and all(type(s) is int for s in scores):
                asks.append(scores if shown is answers else scores[::-1])
                break
        else:
            return None
    return asks

def pick(asks, texts, choosable, anchored, min_margin):
    """(chosen, rejected, outcome): indices into texts (the samples, then the anchor if any). Chosen: the choosable
    sample both asks score highest; rejected: the anchor, else the sample both score lowest; min_margin below it."""
    if asks is None:
        return None, None, "no_verdict"
    best = {max(choosable, key=s.__getitem__) for s in asks} if choosable else set()
    worst = {min(range(len(texts) - anchored), key=s.__getitem__) for s in asks}
    if len(best) != 1:
        return None, None, "disagree" if best else "all_cut"
    chosen = best.pop()
    for rejected in [len(texts) - 1] * anchored + [*worst] * (len(worst) == 1):
        if texts[rejected] != texts[chosen] and all(s[chosen] - s[rejected] >= min_margin for s in asks):
            return chosen, rejected, "anchored" if anchored and rejected == len(texts) - 1 else "kept"
    return None, None, "close" if len(worst) == 1 else "disagree"

def judge(client, persona, prompt, answers, run, config, halt):
    """(record or None, outcome, the judge's cost) for a prompt; the outcome None when it was not judged."""
    samples = [a for a in answers if a.text]  # an empty answer has no place in trader_dpo_data.jsonl's format
    texts = [a.text for a in samples] + ([prompt.apprentice] if prompt.apprentice else [])
    if len(texts) < 2:
        return None, "too_few_answers", 0.0
    if halt():
        return None, None, 0.0
    spent = getattr(client.spend.thread, "cost", 0.0)  # this worker judges one prompt at a time
    try:
        asks = score_answers(client, persona, prompt.text, texts)
    except (BadAnswer, tasks.HTTPGaveUp):  # transient: no ledger line, a re-run asks again
        return None, None, 0.0
    cost = getattr(client.spend.thread, "cost", 0.0) - spent
    choosable = [i for i, a in enumerate(samples) if not a.cut]
    chosen, rejected, outcome = pick(asks, texts, choosable, bool(prompt.apprentice), config.min_margin)
    if chosen is None:
        return None, outcome, cost
    return {"prompt": prompt.text, "chosen": texts[chosen], "rejected": texts[rejected], "source": "on-policy", **run,
            "anchor": outcome == "anchored", "judge": client.model, "scores": asks, "picked": [chosen, rejected],
            "tokens": [a.tokens for a in samples]}, outcome, cost

# The output: one writer, resumed from its records and ledger
def ledger_path(path):  # the judged prompts' outcomes (and the judge's cost), beside the pairs
    return re.sub(r"(\.jsonl)?$", ".ledger.jsonl", path, 1)

def ledger_problem(entry):
    return None if isinstance(entry, dict) and {"id", "outcome"} <= entry.keys() else "not a ledger line"

def open_output(path, run, client):
    """(the held lock, the ledger's path, the ids of the prompts judged); the judge's spend ledger and model. A file
    (or ledger) of another round or checkpoint is refused: a round trains on its own model's samples."""
    lock, ledger = hold_lock(path + ".lock", "onpolicy.py"), ledger_path(path)
    for f in (path, ledger):
        repair_torn_line(f)
    records = list(tasks.iter_jsonl(path, tasks.dpo_problem)) if os.path.isfile(path) else []
    entries = list(tasks.iter_jsonl(ledger, ledger_problem)) if os.path.isfile(ledger) else []
    if other := next((r for r in records + entries if any(r.get(k) != v for k, v in run.items())), None):
        raise UserError(f"{path} holds round {other.get('round')} pairs from {other.get('checkpoint')} step "
                        f"{other.get('step')}, not this run's: pass another --output")
    client.spend = Spend(os.path.join(os.path.dirname(os.path.abspath(path)), "trader_gen_spend.jsonl"))
    client.choose_model()
    return lock, ledger, {draw(r["prompt"]) for r in records} | {  # a kept pair is done if its record is there
        e["id"] for e in entries if e["outcome"] not in ("kept", "anchored")}

def main():
    config = parse_config(Config)
    check_settings(config, at_least_1=("round", "samples", "max_new_tokens", "batch_size", "workers"),
                   not_negative=("prompts", "temperature", "top_k", "max_cost", "anchor_frac"), tags=("model_tag",),
                   positive=("min_margin",), at_most={"anchor_frac": 1, "samples": "batch_size"})
    for key in ("dpo_val_fraction", "sft_val_fraction"):
        if getattr(config, key) != -1 and not 0 <= getattr(config, key) <= 0.99:
            raise UserError(f"--{key}={getattr(config, key)}: must be -1 (the training run's) or in [0, 0.99]")
    client = client_from_env(models=config.judge_model)  # no key: exit 2, nothing written
    persona = load_persona(PERSONA_PATH)
    proc = init_dist(config.device_type)
    directory = checkpoint_dir_for(config.source, config.model_tag)  # its runs' held-out prompts, as eval.py's
    step = find_last_step(directory) if config.step is None else config.step
    meta_path = os.path.join(directory, f"meta_{step:06d}.json")
    sft_held, dpo_held = held_out_fractions(config.source, read_meta(meta_path), config.sft_val_fraction,
                                            config.dpo_val_fraction)
    config = replace(config, sft_val_fraction=sft_held, dpo_val_fraction=dpo_held)
    prompts = training_prompts(config)  # bad data fails before the model loads
    if differs_from_rank0(prompts):  # each rank read its own files
        raise UserError("the processes read different training prompts (data files other than rank 0's): every node "
                        "needs the same datasets/trader_*_data.jsonl, or pairs would get answers to other prompts")
    model, tokenizer, meta = load_model(config.source, proc.device, "eval", config.model_tag, config.step)
    run = {"checkpoint": f"{config.source}/{os.path.basename(checkpoint_dir_for(config.source, config.model_tag))}",
           "step": meta.get("step", config.step), "round": config.round}
    output = config.output or os.path.join(get_base_dir(), "datasets", "trader_dpo_onpolicy.jsonl")
    try:  # rank 0 writes and asks the judge
        lock, ledger, done = open_output(output, run, client) if proc.master else (None, None, None)
    except (UserError, OSError) as e:  # shared: the other ranks stop too, rather than wait in a collective
        done = e if isinstance(e, UserError) else UserError(f"{output}: {e.strerror or e}")
    if isinstance(done := rank0_value(done), UserError):
        raise done
    rendered = {p.id: tokenizer.render_for_completion({"messages": [{"role": "user", "content": p.text},
                                                                     {"role": "assistant", "content": ""}]})
                for p in prompts}
    todo = [p for p in prompts if p.id not in done]
    print0(f"{run['checkpoint']} step {run['step']}, round {run['round']}: {len(todo)} of {len(prompts)} training "
           f"prompts (held out: --sft_val_fraction={sft_held} --dpo_val_fraction={dpo_held}) to sample, "
           f"{config.samples} answers each -> {output}")
    longest = max(map(len, rendered.values()), default=0)  # a long prompt is sampled too, as DPO truncates it
    engine = Engine(model, tokenizer, config.batch_size, min(longest + config.max_new_tokens + 1, model.cos.size(1)))
    chunk = proc.world_size * 4 * (config.batch_size // config.samples)  # 4 engine-fulls a rank: rows end unevenly
    spent, api_stop, jobs, counts, unjudged = client.spend.cost, [], [], Counter(), 0
    halt = lambda: bool(STOP.is_set() or api_stop or (config.max_cost and client.spend.cost >= config.max_cost))
    bar = ProgressBar(len(prompts), desc=f"round {config.round}", unit="prompt", done=len(prompts) - len(todo))

    def write():  # rank 0: the judgements finished, in prompt order
        nonlocal unjudged
        while jobs and jobs[0][1].done():
            prompt, future = jobs.pop(0)
            try:  # a failure here (the API stopped, a full disk) stops every rank at their next meeting, with one line
                record, outcome, cost = future.result()
                if record:
                    tasks.append_jsonl(output, record)
                if outcome:  # else not judged (a stop, the judge failed): a re-run asks
                    tasks.append_jsonl(ledger, {"id": prompt.id, **run, "outcome": outcome, "cost": cost})
            except (APIStop, OSError) as e:
                api_stop.append(e)
                continue
            if outcome:
                counts[outcome] += 1
                bar.update(1, kept=counts["kept"] + counts["anchored"], spend=f"${client.spend.cost - spent:.4f}")
            else:
                unjudged += 1

    def settle(drain):
        """Every rank: rank 0 writes what the judge finished. While it is more than a chunk behind (draining: until
        nothing is left) the ranks meet every HEARTBEAT seconds, so no collective waits on the judge: a slow one, or a
        429 storm's Retry-After, would outlast CHIMERA_DIST_TIMEOUT. True when the run stops."""
        while True:
            write()
            behind, interrupted, halted = all_reduce_sum([bool(jobs) and (drain or len(jobs) > chunk), STOP.is_set(),
                                                          proc.master and halt()])
            if interrupted:  # a Ctrl-C on any rank is every rank's: rank 0's judge asks no more, all exit 130
                STOP.set()
            if not behind or ((interrupted or halted) and not drain):
                return bool(interrupted or halted)
            if jobs:
                wait([jobs[0][1]], timeout=HEARTBEAT)

    with stop_on_sigint("finishing the judge requests under way"), ThreadPoolExecutor(config.workers) as pool:
        for start in range(0, len(todo), chunk):
            if settle(drain=False):
                break
            part = todo[start:start + chunk]
            answers = [sample(engine, rendered, part[proc.rank::proc.world_size], config)]
            if dist.is_initialized():  # every rank's, in rank order
                dist.all_gather_object(gathered := [None] * proc.world_size, answers[0])
                answers = gathered
            for i, prompt in enumerate(part if proc.master else []):
                answer = answers[i % proc.world_size][i // proc.world_size]
                jobs.append((prompt, pool.submit(judge, client, persona, prompt, answer, run, config, halt)))
        settle(drain=True)
    bar.close()
    interrupted, api_stop = rank0_value((STOP.is_set(), str(api_stop[0]) if api_stop else None))
    print0(f"round {config.round}: {sum(counts.values())} prompts judged, {counts['kept'] + counts['anchored']} pairs "
           f"kept ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"
           f"{f', {unjudged} not judged (re-run to ask again)' if unjudged else ''}; judge {client.model}, "
           f"${client.spend.cost - spent:.4f} this run; {output}")
    cleanup_dist()  # every rank is here: the group goes down whole, before any exit
    if api_stop:
        raise UserError(f"stopped: {api_stop} (the pairs judged so far are kept; re-run to continue)")
    if interrupted:  # run_main: "error: interrupted", exit 130
        raise KeyboardInterrupt
    if proc.master and config.max_cost and client.spend.cost >= config.max_cost:
        print(f"stopped at --max_cost={config.max_cost}: re-run with a higher limit to continue", flush=True)

if __name__ == "__main__":
    run_main(main)
