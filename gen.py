"""
Synthetic persona data through OpenRouter: multi-turn SFT conversations in the voice of data/persona.md, and
Master/Apprentice preference pairs for DPO (chosen = the disciplined persona, rejected = a fluent apprentice
failing in one typed way).

    python gen.py --sft-examples 5000 --dpo-examples 10000   # with OPENROUTER_API_KEY set
    python gen.py --judge-pairs=1 --judge-model=anthropic/claude-3.5-sonnet   # keep only pairs a judge confirms

Writes to $NANOCHAT_BASE_DIR/datasets/: trader_{sft,dpo}_data.jsonl, a ledger of finished items beside each,
trader_gen_spend.jsonl (a line as a request goes, one as it returns) and trader_gen_summary.json; and
report/chimera-synthetic-data.md. Items are drawn from RNGs seeded by (seed, kind, index), so a re-run tops the
files up. One gen.py per output directory at a time.
"""

import itertools
import os
import random
import re
import sys
import time
from collections import Counter, namedtuple
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from common import ProgressBar, UserError, atomic_write_json, check_settings, get_base_dir, parse_config, run_main
from openrouter import (PERSONA_LISTS, PERSONA_PATH, SPEND_FILE, STOP, APIStop, BadAnswer, Spend, Store,
                        client_from_env, hold_lock, judge_both_orders, load_persona, record_text, stop_on_sigint)
from report import write_report_section
from tasks import HTTPGaveUp, conversation_problem, dpo_problem

@dataclass
class Config:
    sft_examples: int = 5000  # SFT conversations the file should hold when done
    dpo_examples: int = 10000  # preference pairs the file should hold when done
    out_dir: str = ""  # where the JSONL files go; "" = $NANOCHAT_BASE_DIR/datasets
    persona: str = PERSONA_PATH  # the persona file (its sections: see data/persona.md)
    base_url: str = ""  # OpenAI-compatible API; "" = $OPENROUTER_BASE_URL or https://openrouter.ai/api/v1
    models: str = ""  # comma-separated, first available wins; "" = $OPENROUTER_MODELS or openai/gpt-4o-mini
    workers: int = 16  # concurrent requests
    seed: int = 0  # seeds each item's topic/user/shape draw
    temperature: float = 1.0  # sampling temperature of the generator model
    max_tokens: int = 2048  # completion token cap per request
    timeout: float = 120.0  # seconds per HTTP request, all of it (a slower one is retried)
    http_retries: int = 6  # retries of one request on 429, 408, 5xx, timeouts and dropped connections
    item_attempts: int = 3  # requests per item when the answer is unusable (error body, bad JSON, wrong shape)
    backoff: float = 1.0  # seconds before the first HTTP retry; doubles each time, with jitter
    max_cost: float = 0.0  # stop cleanly once this many credits (USD) are spent; 0 = no limit
    near_dup_threshold: float = 0.8  # drop a record whose word-trigram similarity to an earlier one reaches this
    min_turns: int = 2  # fewest user turns per SFT conversation
    max_turns: int = 4  # most user turns per SFT conversation
    judge_pairs: bool = False  # keep a pair only when a judge prefers chosen in both orders (2 requests; 1 on a tie)
    judge_model: str = ""  # the judge of --judge-pairs; "" = the generator model

# The prompts and schemas, the records made
def item_spec(persona, kind, index, seed, min_turns=2, max_turns=4):
    rng = random.Random(f"{seed}:{kind}:{index}")
    spec = {"id": f"{kind}-{seed}-{index}", **{key[:-1]: rng.choice(persona[key]) for key in PERSONA_LISTS}}
    if kind == "sft":
        spec["turns"] = rng.randint(min_turns, max_turns)
    else:  # every failure type equally often: DPO sees each way of being wrong
        spec["failure"] = persona["failures"][index % len(persona["failures"])]
    return spec

SFT_SCHEMA = {"type": "object", "required": ["messages"], "additionalProperties": False, "properties": {
    "messages": {"type": "array", "items": {
        "type": "object", "required": ["role", "content"], "additionalProperties": False,
        "properties": {"role": {"type": "string", "enum": ["user", "assistant"]}, "content": {"type": "string"}}}}}}
PAIR_KEYS = ("prompt", "chosen", "rejected")
DPO_SCHEMA = {"type": "object", "properties": {k: {"type": "string"} for k in PAIR_KEYS},
              "required": list(PAIR_KEYS), "additionalProperties": False}
MAX_LENGTH_RATIO = 2.0  # chosen and rejected must be "similar length": the longer at most this many times the shorter

def sft_prompt(persona, spec):
    name = persona["name"]
    system = (f"You write training conversations for a chat model that plays {name}. {name}'s profile, "
              f"which is also the system prompt the model will see:\n\n{persona['system']}\n\n"
              f"How {name} answers: {persona['master']}\n\n"
              "Write natural, specific, varied conversations. Never mention that they are synthetic.")
    user = (f"Write a conversation between a user and {name}.\n"
            f"- The user: {spec['user']}.\n- Topic: {spec['topic']}.\n- Shape: {spec['shape']}.\n"
            f"- The user's first message: {spec['opening']}.\n"
            f"- Exactly {spec['turns']} user messages, each followed by {name}'s reply; the last message is {name}'s.\n"
            f"- {name}'s replies follow the profile exactly, a few short paragraphs at most; no stock openers "
            "such as 'Great question'.\n"
            'Return JSON: {"messages": [{"role": "user", "content": ...}, '
            '{"role": "assistant", "content": ...}, ...]}.')
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]

def dpo_prompt(persona, spec):
    name = persona["name"]
    system = (f"You write preference data that teaches a chat model to answer like {name}, whose profile is:\n\n"
              f"{persona['system']}\n\nThe Master: {persona['master']}\n\nThe Apprentice: {persona['apprentice']}")
    user = (f"Write one message a user sends to {name}, then two answers to it.\n"
            f"- The user: {spec['user']}.\n- Topic: {spec['topic']}.\n- Situation: {spec['shape']}.\n"
            f"- The message: {spec['opening']}; self-contained.\n"
            "- \"chosen\": the Master's answer. \"rejected\": the Apprentice's answer to the same message, "
            f"failing above all this way -- {spec['failure']}.\n"
            "- Both about the same length (within 20%), same format, neither names itself Master or Apprentice.\n"
            'Return JSON: {"prompt": ..., "chosen": ..., "rejected": ...}.')
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]

class Dropped(Exception):
    """The answer is well-formed but carries no preference (chosen == rejected, or one is empty)."""

def sft_record(persona, spec, value):
    turns = value["messages"] if isinstance(value, dict) and isinstance(value.get("messages"), list) else []
    record = {"messages": [{"role": "system", "content": persona["system"]}] + turns}
    if problem := conversation_problem(record):
        raise BadAnswer(f"schema: {problem}")
    record["messages"] = [{"role": m["role"], "content": m["content"].strip()} for m in record["messages"]]
    user_turns = sum(m["role"] == "user" for m in record["messages"])
    if user_turns < min(2, spec["turns"]):
        raise BadAnswer(f"conversation: {user_turns} user turn(s), asked for {spec['turns']}")
    return record

def dpo_record(persona, spec, value):
    if not isinstance(value, dict) or not all(isinstance(value.get(k), str) for k in PAIR_KEYS):
        raise BadAnswer('schema: expected {"prompt", "chosen", "rejected"} strings')
    record = {k: value[k].strip() for k in PAIR_KEYS}
    if not record["prompt"]:
        raise BadAnswer("empty prompt")
    if problem := dpo_problem(record):
        raise Dropped(problem)
    short, long = sorted((len(record["chosen"]), len(record["rejected"])))
    if long > MAX_LENGTH_RATIO * short:
        raise BadAnswer(f"chosen and rejected lengths differ too much ({len(record['chosen'])} vs "
                        f"{len(record['rejected'])} characters)")
    return dict(record, failure=spec["failure"].split(":")[0].strip())

# per kind: its output file, its request's messages (persona, spec), the record made of the answer (persona, spec,
# its JSON; else BadAnswer or Dropped), the JSON schema's name and the schema, the line check SFT/DPO use
Kind = namedtuple("Kind", "file prompt record schema_name schema problem")
KINDS = {"sft": Kind("trader_sft_data.jsonl", sft_prompt, sft_record, "persona_conversation", SFT_SCHEMA,
                     conversation_problem),
         "dpo": Kind("trader_dpo_data.jsonl", dpo_prompt, dpo_record, "preference_pair", DPO_SCHEMA, dpo_problem)}

# Items, asked again while unusable
def spent_out(client, config):  # checked before an item and each attempt: none starts once --max-cost is reached
    # (a pair made within the budget is still judged, its 2 small asks: else it was paid for and thrown away)
    return bool(config.max_cost) and client.spend.cost >= config.max_cost

def make_item(client, persona, kind, spec, config):
    """(record or None, outcome, [failure reasons]) for one item."""
    recipe, reasons = KINDS[kind], []
    for _ in range(config.item_attempts):
        if STOP.is_set() or spent_out(client, config):
            break
        try:
            value = client.chat(recipe.prompt(persona, spec), recipe.schema_name, recipe.schema, config.temperature,
                                config.max_tokens)
            record = recipe.record(persona, spec, value)
        except BadAnswer as e:
            reasons.append(str(e))
            continue
        except (Dropped, HTTPGaveUp) as e:
            return None, "dropped" if isinstance(e, Dropped) else "failed", reasons + [str(e)]
        if kind == "dpo" and config.judge_pairs:  # the judge must prefer chosen whichever answer it reads first
            try:
                verdict = judge_both_orders(client, persona, *(record[k] for k in PAIR_KEYS), config.judge_model)
            except (BadAnswer, HTTPGaveUp) as e:  # no verdict had: the item is not final, a re-run asks again
                return None, "failed", reasons + [f"judge failed: {e}"]
            if verdict != 1:
                outcome = "judge_rejected" if verdict == -1 else "judge_no_verdict"
                return None, outcome, reasons + [outcome.replace("_", " ")]
        return record, "ok", reasons
    return None, "failed", reasons

Run = namedtuple("Run", "counts reasons stop")  # a kind's outcomes this run, its failure reasons, why it stopped

def generate(client, persona, kind, store, target, config, executor):
    """Top `store` up to `target` records, then a Run whose stop is None, "max_cost", "interrupted", the APIStop or
    the OSError (after the requests in flight came back)."""
    judged = ("judge_kept", "judge_rejected", "judge_no_verdict") if kind == "dpo" and config.judge_pairs else ()
    counts = dict.fromkeys(("new", "failed", "duplicate", "near_duplicate", "dropped") + judged, 0)
    failure_reasons, running, stop, streak = Counter(), {}, None, 0
    pending = (i for i in itertools.count() if f"{kind}-{config.seed}-{i}" not in store.done_ids)
    bar = ProgressBar(target, desc=kind, unit="rec", enabled=len(store.records) < target, done=len(store.records))
    try:
        while True:
            stop = stop or ("max_cost" if spent_out(client, config) else None)  # a re-run's budget may be gone
            wanted = min(config.workers, target - len(store.records))  # in flight: no more than could be kept
            while stop is None and not STOP.is_set() and len(running) < wanted:
                spec = item_spec(persona, kind, next(pending), config.seed, config.min_turns, config.max_turns)
                running[executor.submit(make_item, client, persona, kind, spec, config)] = spec
            if not running:
                break
            for future in wait(running, return_when=FIRST_COMPLETED)[0]:
                spec = running.pop(future)
                try:
                    record, outcome, reasons = future.result()
                    failure_reasons.update(r.split(" (")[0].split(":")[0] for r in reasons)  # the kind, no details
                    if outcome == "ok" and judged:
                        counts["judge_kept"] += 1
                    if outcome == "ok":
                        outcome = store.add(spec["id"], record)
                    elif outcome != "failed":  # a final outcome: a re-run does not pay for this item again
                        store.mark(spec["id"], outcome)
                except (APIStop, OSError) as e:  # OSError: a full disk, say (each line written is whole)
                    stop = stop or e
                    continue
                counts["new" if outcome == "ok" else outcome] += 1
                bar.update(int(outcome == "ok"), failed=counts["failed"], spend=f"${client.spend.cost:.4f}")
                streak = 0 if outcome == "ok" else streak + 1
                if streak >= max(25, 2 * config.workers) and stop is None:  # something is wrong for good
                    top = max(failure_reasons, key=failure_reasons.get) if failure_reasons else outcome
                    stop = APIStop(f"the last {streak} {kind} items all failed (most common reason: {top}); "
                                   "check the model and the server")
    finally:
        bar.close()
    return Run(counts, failure_reasons, stop or ("interrupted" if STOP.is_set() else None))

# Summary: counts, spend and diversity, as JSON beside the data and as a report section
def diversity(persona, kind, store, seed, counts):
    """How much of the persona's variety the finished items cover, and how varied their text is."""
    specs = [item_spec(persona, kind, int(i), seed) for k, s, i in (x.rsplit("-", 2) for x in store.ok_ids)
             if k == kind and s == str(seed) and i.isdigit()]
    stats = {f"{key} covered": f"{len({s[key[:-1]] for s in specs})}/{len(persona[key])}"  # topics -> "topic"
             for key in PERSONA_LISTS if specs}
    records = store.records
    answered = sum(counts.get(k, 0) for k in ("new", "duplicate", "near_duplicate"))
    if answered:
        stats["near-duplicate rate (this run)"] = round((answered - counts["new"]) / answered, 4)
    if not records:
        return stats
    words = [re.findall(r"\w+", record_text(r).lower()) for r in records]
    for n in (1, 2):  # distinct-n: distinct word n-grams over all n-grams
        grams = [tuple(w[i:i + n]) for w in words for i in range(len(w) - n + 1)]
        stats[f"distinct {n}-grams"] = round(len(set(grams)) / max(1, len(grams)), 4)
    if kind == "sft":
        turns = [[m for m in r["messages"] if m["role"] != "system"] for r in records]
        stats["mean user turns"] = sum(len(t) for t in turns) / 2 / len(records)
        stats["mean assistant chars"] = float(np.mean([len(m["content"]) for t in turns for m in t[1::2]]))
        return stats
    for key in ("chosen", "rejected"):
        stats[f"mean {key} chars"] = float(np.mean([len(r[key]) for r in records]))
    for name in sorted({f.split(":")[0] for f in persona["failures"]} | {r.get("failure", "untyped") for r in records}):
        stats[f"failure {name}"] = sum(r.get("failure", "untyped") == name for r in records)
    return stats

def write_summary(out_dir, config, persona, stores, targets, runs, spend, wall, model):
    """trader_gen_summary.json, the report section and the closing line."""
    summary = {"model": model, "wall_seconds": round(wall, 1), "cost_total": round(spend.cost, 6),
               "models": spend.models, "kinds": {}}
    lines = [{"Generator model": model, "SFT conversations": len(stores["sft"].records),
              "DPO pairs": len(stores["dpo"].records), "Cost (USD, all runs)": round(spend.cost, 4),
              **{f"{k.split('_')[0].capitalize()} tokens": sum(v[k] for v in spend.models.values())
                 for k in ("prompt_tokens", "completion_tokens")}, "Generation time (s, this run)": round(wall, 1)}]
    for kind, store in stores.items():
        counts, reasons, _ = runs.get(kind, Run({}, {}, None))
        stats = diversity(persona, kind, store, config.seed, counts)
        summary["kinds"][kind] = {"file": store.path, "requested": targets[kind], "records": len(store.records),
                                  "this_run": counts, "failure_reasons": reasons, "diversity": stats}
        lines.append({f"{kind.upper()} {k.replace('_', ' ')} (this run)": v for k, v in counts.items()})
        lines.append({f"{kind.upper()} {k}": v for k, v in stats.items()})
    path = os.path.join(out_dir, "trader_gen_summary.json")
    atomic_write_json(path, summary)
    write_report_section("Synthetic data", lines)
    print(f"spent ${spend.cost:.4f} in all runs; " + ", ".join(f"{k}: {len(stores[k].records)}/{targets[k]}"
                                                              for k in stores) + f"; summary: {path}", flush=True)

def main():
    config = parse_config(Config)
    check_settings(config, at_least_1=("workers", "min_turns", "item_attempts", "max_tokens"),
                   positive=("timeout", "near_dup_threshold"),
                   not_negative=("sft_examples", "dpo_examples", "http_retries", "backoff", "max_cost"),
                   at_most={"min_turns": "max_turns", "near_dup_threshold": 1})
    client = client_from_env(config.base_url, config.models, config.timeout, config.http_retries, config.backoff)
    persona = load_persona(config.persona)
    out_dir = config.out_dir or os.path.join(get_base_dir(), "datasets")
    with hold_lock(os.path.join(out_dir, "trader_gen.lock"), "gen.py", "--out-dir"):  # two would make each item twice
        for path in [os.path.join(out_dir, name) for name in os.listdir(out_dir) if name.startswith("trader_")]:
            if not os.access(path, os.W_OK):
                raise UserError(f"{path} is not writable")
        targets = {"sft": config.sft_examples, "dpo": config.dpo_examples}
        stores = {kind: Store(os.path.join(out_dir, recipe.file), recipe.problem, config.near_dup_threshold)
                  for kind, recipe in KINDS.items()}
        for kind, store in stores.items():
            note = " (cut off a torn last line left by a killed run)" if store.repaired else ""
            print(f"{kind}: {len(store.records)}/{targets[kind]} records in {store.path}{note}", flush=True)
        if all(len(stores[k].records) >= targets[k] for k in KINDS):
            return print("nothing to generate: both files hold the requested counts")
        client.spend = Spend(os.path.join(out_dir, SPEND_FILE))
        print(f"generating with {client.choose_model()} at {client.base_url}, {config.workers} workers", flush=True)
        runs, stop, t0, executor = {}, None, time.time(), ThreadPoolExecutor(config.workers)
        try:
            with stop_on_sigint("finishing the requests in flight, then the summary"):
                for kind in KINDS:
                    if stop is None:
                        runs[kind] = generate(client, persona, kind, stores[kind], targets[kind], config, executor)
                        stop = runs[kind].stop
        except KeyboardInterrupt:  # a second Ctrl-C: out now, not after the requests in flight (ledgered at their most)
            with client.spend.lock:  # no spend line half-written; the data and ledgers are written by this thread
                print("error: interrupted twice: aborted without the summary; re-run to continue", file=sys.stderr,
                      flush=True)
                os._exit(130)
        executor.shutdown()
        try:
            write_summary(out_dir, config, persona, stores, targets, runs, client.spend, time.time() - t0, client.model)
        except OSError as e:  # a full disk: a re-run writes it
            stop = stop if isinstance(stop, OSError) else e
    if isinstance(stop, OSError):
        where = f"{stop.filename}: {stop.strerror}" if stop.filename else str(stop)
        raise UserError(f"stopped: cannot write {where} (every line written is whole; make room and re-run)")
    if isinstance(stop, APIStop):
        raise UserError(f"stopped: {stop} (everything finished so far is kept; re-run to continue)")
    if stop == "interrupted":
        print("error: interrupted: the answers already received are kept and the summary is written; re-run to "
              "continue", file=sys.stderr, flush=True)
        sys.exit(130)
    if stop == "max_cost":
        print(f"stopped at --max-cost={config.max_cost}: re-run with a higher limit to top the files up")

if __name__ == "__main__":
    run_main(main)
