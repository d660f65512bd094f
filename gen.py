"""
Synthetic persona data through OpenRouter: multi-turn SFT conversations in the persona's
voice, and Master/Apprentice preference pairs (chosen = the disciplined persona, rejected =
a fluent but undisciplined apprentice) for DPO.

    export OPENROUTER_API_KEY=sk-or-...
    python gen.py --sft-examples 5000 --dpo-examples 10000
    OPENROUTER_MODELS=openai/gpt-4o-mini,anthropic/claude-3.5-haiku python gen.py --workers 32 --max-cost 5

Writes $NANOCHAT_BASE_DIR/datasets/trader_sft_data.jsonl ({"messages": [...]} per line),
trader_dpo_data.jsonl ({"prompt", "chosen", "rejected"} per line), a ledger of finished
items beside each, trader_gen_summary.json (counts, tokens and cost per model, diversity)
and the report section report/synthetic-data.md.

The persona lives in data/persona.md: edit it to make your own. Each item draws a topic,
a user, a conversation shape and an opening style from an RNG seeded by (seed, kind, item
index), so items are reproducible and a re-run knows which ones are already done.

Re-running tops the files up to the requested counts: finished items are skipped, a torn
last line left by a killed run is cut off, exact and near duplicates are dropped.
Any OpenAI-compatible server works (--base-url / OPENROUTER_BASE_URL: vLLM, llama.cpp...).
"""

import json
import os
import random
import re
import threading
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import requests

from common import (ProgressBar, UserError, append_jsonl, atomic_write_json, get_base_dir, parse_config,
                    retry_after, run_main, write_report_section)
from tasks import conversation_problem, dpo_problem, iter_jsonl, record_digest

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
DEFAULT_MODELS = "openai/gpt-4o-mini"
PERSONA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "persona.md")


@dataclass
class Config:
    sft_examples: int = 5000  # SFT conversations the file should hold when done
    dpo_examples: int = 10000  # preference pairs the file should hold when done
    out_dir: str = ""  # where the JSONL files go; "" = $NANOCHAT_BASE_DIR/datasets
    persona: str = PERSONA_PATH  # the persona file (sections: name, system, master, apprentice, topics, users, shapes)
    base_url: str = ""  # OpenAI-compatible API; "" = $OPENROUTER_BASE_URL or https://openrouter.ai/api/v1
    models: str = ""  # comma-separated, first available wins; "" = $OPENROUTER_MODELS or openai/gpt-4o-mini
    workers: int = 16  # concurrent requests
    seed: int = 0  # seeds each item's topic/user/shape draw
    temperature: float = 1.0  # sampling temperature of the generator model
    max_tokens: int = 2048  # completion token cap per request
    timeout: float = 120.0  # seconds per HTTP request
    http_retries: int = 6  # retries of one request on 429, 408, 5xx, timeouts and dropped connections
    item_attempts: int = 3  # requests per item when the answer is unusable (error body, bad JSON, schema)
    backoff: float = 1.0  # seconds before the first HTTP retry; doubles each time, with jitter
    max_cost: float = 0.0  # stop cleanly once this many credits (USD) are spent; 0 = no limit
    near_dup_threshold: float = 0.8  # drop a record whose word-trigram similarity to an earlier one reaches this
    min_turns: int = 2  # fewest user turns per SFT conversation
    max_turns: int = 4  # most user turns per SFT conversation


def check_config(c):
    for key in ("sft_examples", "dpo_examples"):
        if getattr(c, key) < 0:
            raise UserError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(c, key)}")
    if c.workers < 1:
        raise UserError(f"--workers must be >= 1, got {c.workers}")
    if c.item_attempts < 1 or c.http_retries < 0:
        raise UserError("--item-attempts must be >= 1 and --http-retries >= 0")
    if c.timeout <= 0 or c.backoff < 0 or c.max_cost < 0 or c.max_tokens < 1:
        raise UserError("--timeout and --max-tokens must be > 0; --backoff and --max-cost >= 0")
    if not 0.0 < c.near_dup_threshold <= 1.0:
        raise UserError(f"--near-dup-threshold must be in (0, 1], got {c.near_dup_threshold}")
    if not 1 <= c.min_turns <= c.max_turns:
        raise UserError(f"need 1 <= --min-turns <= --max-turns, got {c.min_turns} and {c.max_turns}")


# -----------------------------------------------------------------------------
# The persona: one markdown file, a section per `## heading`

PERSONA_TEXT = ("name", "system", "master", "apprentice")
PERSONA_LISTS = ("topics", "users", "shapes")


def load_persona(path):
    """{"name", "system", "master", "apprentice": str, "topics", "users", "shapes": [str]}."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: persona file not found")
    sections, current = {}, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            heading = re.match(r"^##\s+(\w+)\s*$", line)
            if heading:
                current = heading.group(1).lower()
                sections[current] = []
            elif current is not None:
                sections[current].append(line.rstrip("\n"))
    persona = {}
    for key in PERSONA_TEXT + PERSONA_LISTS:
        lines = sections.get(key)
        if lines is None:
            raise UserError(f"{path}: missing section '## {key}'")
        if key in PERSONA_LISTS:
            persona[key] = [l.strip()[2:].strip() for l in lines if l.strip().startswith("- ") and l.strip()[2:].strip()]
        else:
            persona[key] = "\n".join(lines).strip()
        if not persona[key]:
            raise UserError(f"{path}: section '## {key}' is empty")
    return persona


# Each item's opening message style, drawn alongside the persona file's lists
OPENINGS = [
    "a short, casual message typed on a phone (lowercase, a typo or two)",
    "a detailed message with concrete numbers (account size, prices, percentages)",
    "a worried, slightly emotional message",
    "a blunt one-line question",
    "a confident message that assumes the answer is obvious",
    "a polite, formal message",
    "a message that quotes something they read online",
    "a message that starts with background about themselves before asking",
]


def item_spec(persona, kind, index, seed, min_turns=2, max_turns=4):
    """The reproducible recipe of one item: who asks what, in what shape and style."""
    rng = random.Random(f"{seed}:{kind}:{index}")
    spec = {
        "id": f"{kind}-{seed}-{index}",
        "topic": rng.choice(persona["topics"]),
        "user": rng.choice(persona["users"]),
        "shape": rng.choice(persona["shapes"]),
        "opening": rng.choice(OPENINGS),
    }
    if kind == "sft":
        spec["turns"] = rng.randint(min_turns, max_turns)
    return spec


# -----------------------------------------------------------------------------
# Prompts and the JSON schemas the answers must follow

SFT_SCHEMA = {
    "type": "object",
    "properties": {"messages": {"type": "array", "items": {
        "type": "object",
        "properties": {"role": {"type": "string", "enum": ["user", "assistant"]}, "content": {"type": "string"}},
        "required": ["role", "content"], "additionalProperties": False}}},
    "required": ["messages"], "additionalProperties": False,
}
DPO_SCHEMA = {
    "type": "object",
    "properties": {k: {"type": "string"} for k in ("prompt", "chosen", "rejected")},
    "required": ["prompt", "chosen", "rejected"], "additionalProperties": False,
}
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
            'Return JSON: {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}.')
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def dpo_prompt(persona, spec):
    name = persona["name"]
    system = (f"You write preference data that teaches a chat model to answer like {name}, whose profile is:\n\n"
              f"{persona['system']}\n\nThe Master: {persona['master']}\n\nThe Apprentice: {persona['apprentice']}")
    user = (f"Write one message a user sends to {name}, then two answers to it.\n"
            f"- The user: {spec['user']}.\n- Topic: {spec['topic']}.\n- Situation: {spec['shape']}.\n"
            f"- The message: {spec['opening']}; self-contained.\n"
            "- \"chosen\": the Master's answer. \"rejected\": the Apprentice's answer to the same message.\n"
            "- Both about the same length (within 20%), same format, neither names itself Master or Apprentice.\n"
            'Return JSON: {"prompt": ..., "chosen": ..., "rejected": ...}.')
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def schema_problem(value, schema, where="answer"):
    """None if `value` follows `schema` (the JSON Schema subset used above), else what is wrong."""
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return f"{where} is not an object"
        for key in schema.get("required", []):
            if key not in value:
                return f"{where} lacks {key!r}"
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(props))
            if extra:
                return f"{where} has unexpected keys {extra}"
        for key, sub in props.items():
            if key in value:
                problem = schema_problem(value[key], sub, f"{where}.{key}")
                if problem:
                    return problem
    elif kind == "array":
        if not isinstance(value, list):
            return f"{where} is not an array"
        for i, item in enumerate(value):
            problem = schema_problem(item, schema.get("items", {}), f"{where}[{i}]")
            if problem:
                return problem
    elif kind == "string":
        if not isinstance(value, str):
            return f"{where} is not a string"
        if "enum" in schema and value not in schema["enum"]:
            return f"{where} is {value!r}, not one of {schema['enum']}"
    return None


class BadAnswer(Exception):
    """The model's answer is unusable (error body, no content, bad JSON, wrong shape): retry the item.
    Carries the usage of the request, since a useless answer is still paid for."""

    def __init__(self, message, usage=None, model=None):
        super().__init__(message)
        self.usage, self.model = usage or {}, model


class Dropped(Exception):
    """The answer is well-formed but carries no preference (chosen == rejected, or one is empty)."""


def parse_answer(text, schema):
    if text is None or not str(text).strip():
        raise BadAnswer("empty content")
    text = str(text).strip()
    fenced = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, re.S)  # some models wrap JSON in a code fence
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError:
        raise BadAnswer("content is not valid JSON") from None
    problem = schema_problem(value, schema)
    if problem:
        raise BadAnswer(f"schema: {problem}")
    return value


def sft_record(persona, spec, text):
    """The SFT line for an answer: the persona's system message, then the generated turns."""
    value = parse_answer(text, SFT_SCHEMA)
    messages = [{"role": m["role"], "content": m["content"].strip()} for m in value["messages"]]
    record = {"messages": [{"role": "system", "content": persona["system"]}] + messages}
    problem = conversation_problem(record)
    if problem:
        raise BadAnswer(f"conversation: {problem}")
    user_turns = sum(m["role"] == "user" for m in messages)
    if user_turns < min(2, spec["turns"]):
        raise BadAnswer(f"conversation: {user_turns} user turn(s), asked for {spec['turns']}")
    return record


def dpo_record(persona, spec, text):
    value = parse_answer(text, DPO_SCHEMA)
    record = {k: value[k].strip() for k in ("prompt", "chosen", "rejected")}
    if not record["prompt"]:
        raise BadAnswer("empty prompt")
    problem = dpo_problem(record)
    if problem:
        raise Dropped(problem)
    short, long = sorted((len(record["chosen"]), len(record["rejected"])))
    if long > MAX_LENGTH_RATIO * short:
        raise BadAnswer(f"chosen and rejected lengths differ too much ({len(record['chosen'])} vs "
                        f"{len(record['rejected'])} characters)")
    return record


KINDS = {  # kind -> (file name, prompt builder, record builder, schema name, schema)
    "sft": ("trader_sft_data.jsonl", sft_prompt, sft_record, "persona_conversation", SFT_SCHEMA),
    "dpo": ("trader_dpo_data.jsonl", dpo_prompt, dpo_record, "preference_pair", DPO_SCHEMA),
}


# -----------------------------------------------------------------------------
# The OpenRouter client: chat completions over requests, with OpenRouter's error contract


class APIStop(UserError):
    """An error no retry fixes (bad key, no credits, refused request): the run stops, keeping its output."""


class TransientFailure(Exception):
    """429 / 408 / 5xx / timeouts that outlasted every retry."""


class OpenRouter:
    """A small client for OpenRouter's OpenAI-compatible API, safe to share between threads."""

    def __init__(self, api_key, base_url, models, timeout=120.0, retries=6, backoff=1.0, max_wait=300.0):
        self._key = api_key  # sent in a header, never printed: messages go through _scrub
        self.base_url = base_url.rstrip("/")
        self.models, self.model_index, self.verified = list(models), 0, False
        self.timeout, self.retries, self.backoff, self.max_wait = timeout, retries, backoff, max_wait
        self.openrouter = urlparse(self.base_url).hostname in ("openrouter.ai", "www.openrouter.ai")
        self._local, self._lock = threading.local(), threading.Lock()

    def __repr__(self):
        return f"OpenRouter({self.base_url!r}, models={self.models!r})"

    def _scrub(self, text):
        return str(text).replace(self._key, "***") if self._key else str(text)

    def _session(self):
        if not hasattr(self._local, "session"):  # one keep-alive connection pool per worker thread
            self._local.session = requests.Session()
            self._local.session.headers.update({
                "Authorization": f"Bearer {self._key}",
                "HTTP-Referer": "https://github.com/chimera-nanochat/chimera",  # OpenRouter's app attribution
                "X-Title": "Chimera",
            })
        return self._local.session

    @property
    def model(self):
        return self.models[self.model_index]

    def choose_model(self):
        """Use the first configured model that GET /models lists; if the listing fails, say so
        and keep them all, to be tried in order."""
        try:
            response = self._session().get(self.base_url + "/models", timeout=self.timeout)
            listed = {m.get("id") for m in response.json()["data"]} if response.status_code == 200 else None
            reason = None if listed is not None else f"HTTP {response.status_code}"
        except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError) as e:
            listed, reason = None, type(e).__name__
        if listed is None:
            print(f"could not list the models at {self.base_url}/models ({self._scrub(reason)}); "
                  f"trying {', '.join(self.models)} in order", flush=True)
            return self.model
        available = [m for m in self.models if m in listed]
        if not available:
            raise APIStop(f"none of the models {', '.join(self.models)} is offered by {self.base_url} "
                          "(set OPENROUTER_MODELS or --models)")
        self.models, self.model_index, self.verified = available, 0, True
        return self.model

    def _next_model(self, failed, why):
        """A model the server does not know: move on to the next configured one."""
        with self._lock:
            if self.model == failed:
                if self.verified or self.model_index + 1 >= len(self.models):
                    raise APIStop(f"model {failed} is not available at {self.base_url}: {why}")
                self.model_index += 1
                print(f"model {failed} is not available ({why}); falling back to {self.model}", flush=True)

    def _wait(self, attempt, response=None):
        asked = retry_after(response) if response is not None else None
        if asked is not None:
            return min(asked, self.max_wait)
        return min(self.backoff * 2**attempt, self.max_wait) * random.uniform(0.5, 1.0)  # jitter spreads the herd

    def _error_message(self, response):
        try:
            error = response.json().get("error", {})
            message = error.get("message", "") if isinstance(error, dict) else str(error)
        except (ValueError, AttributeError):
            message = response.text
        return self._scrub(message)[:300]

    def chat(self, messages, schema_name, schema, temperature=1.0, max_tokens=2048):
        """One chat completion asking for JSON that follows `schema`.
        Returns (content or None, usage dict, model). Raises BadAnswer for an answer-level
        error, TransientFailure when retries run out, APIStop when nothing can succeed."""
        for attempt in range(self.retries + 1):
            model = self.model
            body = {
                "model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens,
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": schema_name, "strict": True, "schema": schema}},
            }
            if self.openrouter:
                body["provider"] = {"require_parameters": True}  # only route to providers that honour the schema
            response = None
            try:
                response = self._session().post(self.base_url + "/chat/completions", json=body, timeout=self.timeout)
            except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema,
                    requests.exceptions.InvalidURL) as e:
                raise APIStop(f"bad base URL {self.base_url!r}: {self._scrub(e)}") from None
            except requests.RequestException as e:  # timeouts, dropped connections, truncated bodies
                reason = type(e).__name__
            else:
                status = response.status_code
                if status == 200:
                    return self._content(response, model)
                message = self._error_message(response)
                if status in (408, 429) or status >= 500:
                    reason = f"HTTP {status}"
                elif status == 404 or (status == 400 and not self.verified and "model" in message.lower()):
                    self._next_model(model, f"HTTP {status}: {message}")
                    continue
                else:
                    raise APIStop(self._stop_message(status, message))
            if attempt == self.retries:
                raise TransientFailure(f"{reason} after {self.retries + 1} tries")
            time.sleep(self._wait(attempt, response))
        raise TransientFailure("no model left to try")

    def _stop_message(self, status, message):
        what = {400: "the request was refused", 401: "the API key was rejected (check OPENROUTER_API_KEY)",
                402: "out of credits: add credits at https://openrouter.ai/settings/credits",
                403: "forbidden (moderation or the key's limits)"}.get(status, "unexpected error")
        return f"{self.base_url}: HTTP {status}, {what}: {message}"

    def _content(self, response, model):
        try:
            data = response.json()
        except ValueError:
            raise BadAnswer("response body is not JSON") from None
        if not isinstance(data, dict):
            raise BadAnswer("response body is not an object")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        model = data.get("model") or model
        if data.get("error"):  # OpenRouter reports some failures inside an HTTP 200 body
            error = data["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise BadAnswer(f"error in response: {self._scrub(message)[:200]}", usage, model)
        choices = data.get("choices")
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise BadAnswer("no choices in response", usage, model)
        content = (choices[0].get("message") or {}).get("content")
        return content, usage, model


# -----------------------------------------------------------------------------
# Output files: whole-line appends, a ledger of finished items, exact and near duplicates


def repair_torn_line(path):
    """Cut off a last line without its newline (a run killed mid-write); True if one was cut."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return False
        keep = data.rfind(b"\n") + 1
        try:  # a complete record that only lacks its newline is kept
            json.loads(data[keep:])
            f.write(b"\n")
            return False
        except ValueError:
            f.truncate(keep)
            return True


def record_text(record):
    """The text that makes a record what it is (the shared system prompt left out)."""
    if "messages" in record:
        return "\n".join(m["content"] for m in record["messages"] if m["role"] != "system")
    return record["prompt"] + "\n" + record["chosen"]


class NearDuplicates:
    """MinHash over word trigrams with banded LSH: finds an earlier record whose estimated
    Jaccard similarity reaches `threshold` without comparing against every record."""

    def __init__(self, threshold, num_perm=64, bands=16, seed=1234):
        self.threshold, self.bands, self.rows = threshold, bands, num_perm // bands
        self.seeds = np.random.default_rng(seed).integers(0, 2**63, num_perm, dtype=np.uint64)
        self.signatures, self.buckets = [], {}

    @staticmethod
    def _mix(z):
        """splitmix64's finaliser (wrapping uint64 arithmetic): one independent hash per seed."""
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    def signature(self, text):
        words = re.findall(r"\w+", text.lower())
        grams = {" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))}
        x = np.array([zlib.crc32(g.encode("utf-8")) for g in grams], dtype=np.uint64)
        return self._mix(x[:, None] ^ self.seeds[None, :]).min(axis=0)

    def _keys(self, sig):
        return [(band, sig[band * self.rows:(band + 1) * self.rows].tobytes()) for band in range(self.bands)]

    def find(self, sig):
        """The best similarity to an earlier record if it reaches the threshold, else None."""
        best = 0.0
        for key in self._keys(sig):
            for j in self.buckets.get(key, ()):
                best = max(best, float(np.mean(self.signatures[j] == sig)))
        return best if best >= self.threshold else None

    def add(self, sig):
        for key in self._keys(sig):
            self.buckets.setdefault(key, []).append(len(self.signatures))
        self.signatures.append(sig)


class Store:
    """One output JSONL and its ledger (`<name>.ledger.jsonl`: one line per finished item id).
    The data file is the truth: a ledger "ok" counts only if its record is in the data, so a
    kill between the two appends redoes that item rather than losing or doubling it."""

    def __init__(self, path, problem_of, threshold):
        self.path = path
        self.ledger_path = path[:-len(".jsonl")] + ".ledger.jsonl" if path.endswith(".jsonl") else path + ".ledger"
        self.problem_of = problem_of
        self.hashes, self.near = set(), NearDuplicates(threshold)
        self.count, self.done_ids, self.repaired, self.ok_ids = 0, set(), 0, []

    def load(self):
        for p in (self.path, self.ledger_path):
            self.repaired += repair_torn_line(p)
        for record in self.read(self.path, check=True):
            self._remember(record)
            self.count += 1
        for entry in self.read(self.ledger_path, check=False):
            if not isinstance(entry, dict) or "id" not in entry:
                continue
            if entry.get("outcome") != "ok" or entry.get("hash") in self.hashes:
                self.done_ids.add(entry["id"])
                if entry.get("outcome") == "ok":
                    self.ok_ids.append(entry["id"])
        return self

    def read(self, path, check):
        if os.path.isfile(path):
            yield from iter_jsonl(path, self.problem_of if check else None, "; fix or remove that line")

    def _remember(self, record, sig=None):
        self.hashes.add(record_digest(record).hex())
        self.near.add(self.near.signature(record_text(record)) if sig is None else sig)

    def add(self, item_id, record):
        """Append `record` unless it duplicates an earlier one; returns the outcome."""
        digest = record_digest(record).hex()
        sig = self.near.signature(record_text(record))
        if digest in self.hashes:
            outcome = "duplicate"
        elif self.near.find(sig) is not None:
            outcome = "near_duplicate"
        else:
            append_jsonl(self.ledger_path, {"id": item_id, "outcome": "ok", "hash": digest})
            append_jsonl(self.path, record)
            self._remember(record, sig)
            self.count += 1
            self.ok_ids.append(item_id)
            return "ok"
        self.mark(item_id, outcome)
        return outcome

    def mark(self, item_id, outcome):
        """Record a final outcome without data (duplicate, dropped) so a re-run does not pay for it again."""
        append_jsonl(self.ledger_path, {"id": item_id, "outcome": outcome})
        self.done_ids.add(item_id)


# -----------------------------------------------------------------------------
# Making items: one request per item, retried while the answer is unusable


class Spend:
    """Tokens and cost per model, summed over every request (useless answers are paid for too)."""

    def __init__(self, previous=None):
        self.models = {m: dict(v) for m, v in (previous or {}).items()}

    def add(self, model, usage):
        entry = self.models.setdefault(model or "?", {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                                      "cost": 0.0})
        entry["requests"] += 1
        for key in ("prompt_tokens", "completion_tokens"):
            entry[key] += int(usage.get(key) or 0)
        entry["cost"] += float(usage.get("cost") or 0.0)

    @property
    def cost(self):
        return sum(v["cost"] for v in self.models.values())


def make_item(client, persona, kind, spec, c):
    """(record or None, outcome, [(model, usage)], [failure reasons]) for one item."""
    _, build_prompt, build_record, schema_name, schema = KINDS[kind]
    messages = build_prompt(persona, spec)
    usages, reasons = [], []
    for _ in range(c.item_attempts):
        try:
            text, usage, model = client.chat(messages, schema_name, schema, c.temperature, c.max_tokens)
            usages.append((model, usage))
            return build_record(persona, spec, text), "ok", usages, reasons
        except BadAnswer as e:
            if e.model is not None:
                usages.append((e.model, e.usage))
            reasons.append(str(e))
        except Dropped as e:
            return None, "dropped", usages, reasons + [str(e)]
        except TransientFailure as e:
            return None, "failed", usages, reasons + [str(e)]
    return None, "failed", usages, reasons


def generate(client, persona, kind, store, target, c, spend, executor):
    """Top `store` up to `target` records; returns this run's counts and failure reasons.
    Stops early when --max-cost is reached (counts["stopped"] = "max_cost") or nothing can
    succeed (counts["stopped"] = the APIStop), after the requests in flight come back."""
    counts = {"new": 0, "failed": 0, "duplicate": 0, "near_duplicate": 0, "dropped": 0, "stopped": None}
    failure_reasons = {}
    if store.count >= target:
        return counts, failure_reasons
    give_up_after = max(25, 2 * c.workers)  # consecutive failed items that mean something is wrong for good
    pending = (i for i in range(10**12) if f"{kind}-{c.seed}-{i}" not in store.done_ids)
    bar = ProgressBar(target, desc=kind, unit="rec", enabled=True)
    bar.set_initial(store.count)
    running, stop, streak = {}, None, 0
    try:
        while True:
            while stop is None and len(running) < c.workers and store.count + len(running) < target:
                spec = item_spec(persona, kind, next(pending), c.seed, c.min_turns, c.max_turns)
                running[executor.submit(make_item, client, persona, kind, spec, c)] = spec
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                spec = running.pop(future)
                try:
                    record, outcome, usages, reasons = future.result()
                except APIStop as e:
                    stop = stop or e
                    continue
                for model, usage in usages:
                    spend.add(model, usage)
                for reason in reasons:
                    key = reason.split(" (")[0].split(":")[0]  # the kind of failure, not its details
                    failure_reasons[key] = failure_reasons.get(key, 0) + 1
                streak = streak + 1 if outcome == "failed" else 0
                if streak >= give_up_after and stop is None:
                    top = max(failure_reasons, key=failure_reasons.get)
                    stop = APIStop(f"the last {streak} {kind} items all failed (most common reason: {top}); "
                                   "check the model and the server")
                if outcome == "ok":
                    outcome = store.add(spec["id"], record)
                    counts["new" if outcome == "ok" else outcome] += 1
                    bar.update(1 if outcome == "ok" else 0, failed=counts["failed"], spend=f"${spend.cost:.4f}")
                else:
                    if outcome == "dropped":
                        store.mark(spec["id"], "dropped")
                    counts[outcome] += 1
                    bar.update(0, failed=counts["failed"], spend=f"${spend.cost:.4f}")
                if c.max_cost and spend.cost >= c.max_cost and stop is None:
                    stop = "max_cost"
    finally:
        bar.close()
    counts["stopped"] = stop
    return counts, failure_reasons


# -----------------------------------------------------------------------------
# Summary: counts, spend and diversity, as JSON beside the data and as a report section


def diversity(persona, kind, store, seed):
    """How much of the persona's variety the finished items cover, and their shape."""
    specs = []
    for item_id in store.ok_ids:
        k, s, i = item_id.rsplit("-", 2)
        if k == kind and s == str(seed) and i.isdigit():
            specs.append(item_spec(persona, kind, int(i), seed))
    stats = {f"{key} covered": f"{len({s[key[:-1]] for s in specs})}/{len(persona[key])}"  # topics -> "topic"
             for key in PERSONA_LISTS} if specs else {}
    records = list(store.read(store.path, check=False))
    if not records:
        return stats
    if kind == "sft":
        firsts = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in records]
        stats["mean user turns"] = float(np.mean([sum(m["role"] == "user" for m in r["messages"]) for r in records]))
        stats["mean assistant chars"] = float(np.mean([len(m["content"]) for r in records for m in r["messages"]
                                                       if m["role"] == "assistant"]))
    else:
        firsts = [r["prompt"] for r in records]
        stats["mean chosen chars"] = float(np.mean([len(r["chosen"]) for r in records]))
        stats["mean rejected chars"] = float(np.mean([len(r["rejected"]) for r in records]))
    stats["distinct first messages"] = f"{len(set(firsts))}/{len(firsts)}"
    return stats


def write_summary(path, c, persona, stores, targets, runs, spend, wall, model):
    summary = {"model": model, "wall_seconds": round(wall, 1), "cost_total": round(spend.cost, 6),
               "models": spend.models, "kinds": {}}
    for kind, store in stores.items():
        counts, reasons = runs.get(kind, ({}, {}))
        summary["kinds"][kind] = {"file": store.path, "requested": targets[kind], "records": store.count,
                                  "this_run": {k: v for k, v in counts.items() if k != "stopped"},
                                  "failure_reasons": reasons, "diversity": diversity(persona, kind, store, c.seed)}
    atomic_write_json(path, summary)
    lines = [{"Generator model": model, "SFT conversations": stores["sft"].count,
              "DPO pairs": stores["dpo"].count, "Cost (USD, all runs)": round(spend.cost, 4),
              "Prompt tokens": sum(v["prompt_tokens"] for v in spend.models.values()),
              "Completion tokens": sum(v["completion_tokens"] for v in spend.models.values()),
              "Generation time (s, this run)": round(wall, 1)}]
    for kind, data in summary["kinds"].items():
        run = data["this_run"]
        lines.append({f"{kind.upper()} {k.replace('_', ' ')} (this run)": v for k, v in run.items()})
        lines.append({f"{kind.upper()} {k}": v for k, v in data["diversity"].items()})
    write_report_section("Synthetic data", lines)
    return summary


# -----------------------------------------------------------------------------
# An LLM judge of two answers in the persona (eval.py --judge=1 uses it)

JUDGE_SCHEMA = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": ["1", "2", "tie"]}},
    "required": ["winner"], "additionalProperties": False,
}


def judge_prompt(persona, message, first, second):
    name = persona["name"]
    system = (f"You judge answers written as {name}, whose profile is:\n\n{persona['system']}\n\n"
              f"The better answer is the one {name} would give: {persona['master']} "
              "Judge faithfulness to the persona and helpfulness, not length or style.")
    user = (f"Message:\n{message}\n\nAnswer 1:\n{first}\n\nAnswer 2:\n{second}\n\n"
            'Which answer is better? Return JSON: {"winner": "1" | "2" | "tie"}.')
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def judge_once(client, persona, message, first, second, attempts=3):
    """"1", "2" or "tie" from the judge; None if it gives no usable verdict."""
    for _ in range(attempts):
        try:
            text, _, _ = client.chat(judge_prompt(persona, message, first, second), "judge_verdict",
                                     JUDGE_SCHEMA, temperature=0.0, max_tokens=16)
            return parse_answer(text, JUDGE_SCHEMA)["winner"]
        except BadAnswer:
            continue
        except TransientFailure:
            return None
    return None


def judge_both_orders(client, persona, message, a, b):
    """+1 if the judge prefers `a` in both orders, -1 if `b` in both, None otherwise (a tie,
    no verdict, or a verdict that flips with the order: position bias, not a preference)."""
    forward = judge_once(client, persona, message, a, b)
    backward = judge_once(client, persona, message, b, a)
    if forward == "1" and backward == "2":
        return 1
    if forward == "2" and backward == "1":
        return -1
    return None


def client_from_env(base_url="", models="", timeout=120.0, retries=6, backoff=1.0):
    """An OpenRouter client from OPENROUTER_API_KEY / OPENROUTER_BASE_URL / OPENROUTER_MODELS,
    with its model chosen."""
    api_key = os.environ.get("OPENROUTER_API_KEY", "").strip()
    if not api_key:
        raise UserError("OPENROUTER_API_KEY is not set: create a key at https://openrouter.ai/keys and "
                        "export OPENROUTER_API_KEY=... (nothing was written)")
    base_url = base_url or os.environ.get("OPENROUTER_BASE_URL") or DEFAULT_BASE_URL
    models = [m.strip() for m in (models or os.environ.get("OPENROUTER_MODELS") or DEFAULT_MODELS).split(",")
              if m.strip()]
    return OpenRouter(api_key, base_url, models, timeout, retries, backoff)


# -----------------------------------------------------------------------------
# Main


def output_dir(c):
    out_dir = c.out_dir or os.path.join(get_base_dir(), "datasets")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output directory {out_dir}: {e.strerror}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"the output directory {out_dir} is not writable")
    for name in [k[0] for k in KINDS.values()] + ["trader_gen_summary.json"]:
        path = os.path.join(out_dir, name)
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise UserError(f"{path} is not writable")
    return out_dir


def main():
    c = parse_config(Config)
    check_config(c)
    client = client_from_env(c.base_url, c.models, c.timeout, c.http_retries, c.backoff)
    persona = load_persona(c.persona)
    out_dir = output_dir(c)
    targets = {"sft": c.sft_examples, "dpo": c.dpo_examples}
    problems = {"sft": conversation_problem, "dpo": dpo_problem}
    stores = {}
    for kind, (name, *_rest) in KINDS.items():
        stores[kind] = Store(os.path.join(out_dir, name), problems[kind], c.near_dup_threshold).load()
        note = " (cut off a torn last line left by a killed run)" if stores[kind].repaired else ""
        print(f"{kind}: {stores[kind].count}/{targets[kind]} records in {stores[kind].path}{note}", flush=True)
    if all(stores[k].count >= targets[k] for k in KINDS):
        print("nothing to generate: both files hold the requested counts")
        return

    model = client.choose_model()
    print(f"generating with {model} at {client.base_url}, {c.workers} workers", flush=True)
    summary_path = os.path.join(out_dir, "trader_gen_summary.json")
    previous = {}
    if os.path.isfile(summary_path):
        try:
            with open(summary_path, encoding="utf-8") as f:
                previous = json.load(f).get("models", {})
        except (ValueError, AttributeError):
            previous = {}
    spend, runs, stop = Spend(previous), {}, None
    t0 = time.time()
    with ThreadPoolExecutor(c.workers) as executor:
        for kind in KINDS:
            runs[kind] = generate(client, persona, kind, stores[kind], targets[kind], c, spend, executor)
            stop = runs[kind][0]["stopped"]
            if stop is not None:
                break
    summary = write_summary(summary_path, c, persona, stores, targets, runs, spend, time.time() - t0, client.model)
    print(f"spent ${spend.cost:.4f} in all runs; "
          + ", ".join(f"{k}: {d['records']}/{d['requested']}" for k, d in summary["kinds"].items())
          + f"; summary: {summary_path}", flush=True)
    if isinstance(stop, APIStop):
        raise UserError(f"stopped: {stop} (everything finished so far is kept; re-run to continue)")
    if stop == "max_cost":
        print(f"stopped at --max-cost={c.max_cost}: re-run with a higher limit to top the files up")


if __name__ == "__main__":
    run_main(main)
