"""
The OpenRouter client (chat completions with a JSON schema over requests, OpenRouter's error contract, a spend
ledger), the persona judge (the persona file, an LLM judge of two answers asked in both orders) and what a stage
making data with them shares: one writer per output, output that resumes and drops duplicates, Ctrl-C that keeps
what was paid for. gen.py makes data with them; eval.py and chat.py use the persona and the judge.

    client = client_from_env()            # OPENROUTER_API_KEY, OPENROUTER_BASE_URL, OPENROUTER_MODELS
    verdict = judge_both_orders(client, load_persona(PERSONA_PATH), message, answer_a, answer_b)
"""

import contextlib
import fcntl
import json
import os
import re
import signal
import threading
import time
import zlib
from collections import Counter
from urllib.parse import urlparse

import numpy as np
import requests

from common import UserError
from tasks import append_jsonl, error_text, http_retry, iter_jsonl, record_digest

PERSONA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "persona.md")

# The persona (data/persona.md, a section per `## heading`)
PERSONA_TEXT = ("name", "system", "master", "apprentice")
PERSONA_LISTS = ("topics", "users", "shapes", "openings")  # drawn at random per item; "failures" by item index

def load_persona(path):
    """{"name", "system", "master", "apprentice": str, "topics", "users", "shapes", "openings", "failures": [str]}."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: persona file not found")
    with open(path, encoding="utf-8") as f:
        parts = re.split(r"^##[ \t]+(\w+)[ \t]*$", f.read(), flags=re.M)
    sections, persona = {name.lower(): body.strip() for name, body in zip(parts[1::2], parts[2::2])}, {}
    for key in PERSONA_TEXT + PERSONA_LISTS + ("failures",):
        if key not in sections:
            raise UserError(f"{path}: missing section '## {key}'")
        persona[key] = sections[key] if key in PERSONA_TEXT else re.findall(r"^\s*- [ \t]*(.*\S)", sections[key], re.M)
        if not persona[key]:
            raise UserError(f"{path}: section '## {key}' is empty")
    return persona

# The OpenRouter client: chat completions over tasks.http_retry, with OpenRouter's error contract
class BadAnswer(Exception):
    """The model's answer is unusable (error body, no content, bad JSON, wrong shape): retry the item."""

class APIStop(UserError):
    """An error no retry fixes (bad key, no credits, refused request): the run stops, keeping its output."""

# a request's figures past these (no request has cost $1000 or used 10^8 tokens) are nonsense and count 0, as negative
MOST = {"prompt_tokens": 1e8, "completion_tokens": 1e8, "cost": 1000.0}
UNKNOWN_PRICES = (15e-6, 75e-6)  # USD per prompt / completion token of a model /models prices not: the dearest's
MAX_BODY = 8 << 20  # bytes of a response, as decoded (gzip inflated): far above an answer or the /models listing
SPEND_FILE = "trader_gen_spend.jsonl"  # the ledger in a datasets directory: every data stage's spend, one --max-cost

class Spend:
    """Requests, tokens and cost per model, all runs, from an append-only ledger: a line as a request is sent (its
    most) and one as it returns (its usage, if paid); a request in flight when a run was killed counts at its most."""

    def __init__(self, path=None):
        self.path, self.models, self.cost, opened = None, {}, 0.0, {}
        self.lock = threading.Lock()  # held while a ledger line is written
        self.thread = threading.local()  # .cost: what this thread's requests cost, a caller's share of a shared client
        if path and os.path.isfile(path):
            repair_torn_line(path)
            for entry in iter_jsonl(path, lambda e: None if isinstance(e, dict) else "not an object"):
                if "open" in entry:
                    opened[str(entry["open"])] = entry
                else:  # with a model: paid (an older ledger's lines too)
                    opened.pop(str(entry.get("close")), None)
                    self.close(None, entry.get("model"), entry)
            for entry in opened.values():  # in flight when its run was killed: paid, at most this much
                self.close(None, entry.get("model"), {"cost": entry.get("max_cost")})
        self.path = path

    def open(self, model, most):
        """A request about to be sent: its ticket, ledgered at `most` until close(ticket) says what it cost."""
        ticket = os.urandom(8).hex()
        if self.path:
            with self.lock:  # one append at a time: a failed one cuts the file back to where it began
                append_jsonl(self.path, {"open": ticket, "model": model, "max_cost": most})
        return ticket

    def close(self, ticket, model=None, usage=None, prices=None):
        """A request came back: paid (by `model`, its `usage` counted within MOST) or, with no model, not. A usage
        without a cost (OpenAI, Together, Groq, ...) is charged its tokens at `prices` (prompt, completion)."""
        usage = usage if isinstance(usage, dict) else {}
        entry = {k: v if isinstance(v := usage.get(k), (int, float)) and 0 <= v <= MOST[k] else 0 for k in MOST}
        if usage.get("cost") is None and prices:
            entry["cost"] = entry["prompt_tokens"] * prices[0] + entry["completion_tokens"] * prices[1]
        with self.lock:
            if model:  # counted before it is ledgered: paid, even if the ledger line fails (a full disk)
                self.cost += entry["cost"]
                self.thread.cost = getattr(self.thread, "cost", 0.0) + entry["cost"]
                self.models.setdefault(str(model), Counter()).update({"requests": 1, **entry})
            if self.path:
                append_jsonl(self.path, {"close": ticket, **({"model": model, **entry} if model else {})})

class OpenRouter:
    """A small client for OpenRouter's OpenAI-compatible API, safe to share between threads."""

    def __init__(self, api_key, base_url, models, timeout=120.0, retries=6, backoff=1.0):
        self._key = api_key  # sent in a header, never stored or printed: everything read back goes through _clean
        self.base_url, self.models, self.model, self.verified = base_url.rstrip("/"), list(models), models[0], False
        self.timeout, self.retries, self.backoff, self.prices = timeout, retries, backoff, {}
        self.spend, self._local, self._lock = Spend(), threading.local(), threading.Lock()

    def _clean(self, value):
        """`value` with the key scrubbed (a provider may echo the Authorization header) and lone surrogates
        (not encodable as UTF-8) made U+FFFD, by way of its JSON text (a key has no character JSON escapes)."""
        text = json.dumps(value, ensure_ascii=False)
        text = text.replace(self._key, "***") if self._key else text
        return json.loads(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))

    def _request(self, method, path, **kwargs):
        """The response, read whole within --timeout of its start (a provider trickling a byte a second times out;
        connect and each header read have --timeout each) and MAX_BODY decoded bytes (more is a BadAnswer, unread)."""
        if not hasattr(self._local, "session"):  # one keep-alive connection pool per worker thread
            self._local.session = requests.Session()  # HTTP-Referer and X-Title: OpenRouter's app attribution
            self._local.session.headers.update({"Authorization": f"Bearer {self._key}", "X-Title": "Chimera",
                                                "HTTP-Referer": "https://github.com/chimera-nanochat/chimera"})
        deadline = time.monotonic() + self.timeout
        response = self._local.session.request(method, self.base_url + path, stream=True, timeout=self.timeout,
                                               **kwargs)
        watchdog = threading.Timer(deadline - time.monotonic(), cut_off, (response,))  # ends a read in progress
        watchdog.start()
        body = bytearray()
        try:
            for chunk in response.iter_content(1 << 16):  # urllib3 inflates at most this much a chunk
                body += chunk
                if len(body) > MAX_BODY:
                    raise BadAnswer(f"response body over {MAX_BODY >> 20} MiB")
        except requests.RequestException:
            if time.monotonic() < deadline:
                raise
            raise requests.Timeout(f"no whole response within --timeout={self.timeout:g}s") from None
        finally:
            watchdog.cancel()
            response.close()
        response._content = bytes(body)  # what .json() and .text read
        return response

    def _post(self, body):
        """One POST /chat/completions, its JSON object in `.data`, ledgered before it is sent at its most (each byte
        of the messages a prompt token, max_tokens of completion), and after: paid if it answered, else unpaid."""
        prompt, completion = self.prices.get(body["model"], UNKNOWN_PRICES)
        most = len(json.dumps(body["messages"]).encode()) * prompt + body["max_tokens"] * completion
        ticket, response, data = self.spend.open(body["model"], most), None, None
        try:
            response = self._request("POST", "/chat/completions", json=body)
            with contextlib.suppress(ValueError, RecursionError):  # RecursionError: nested deeper than Python parses
                data = self._clean(response.json()) if response.status_code == 200 else None
        finally:
            if isinstance(data, dict):
                self.spend.close(ticket, str(data.get("model") or body["model"]), data.get("usage"),
                                 (prompt, completion))
            else:
                self.spend.close(ticket)
        response.data = data if isinstance(data, dict) else None
        return response

    def choose_model(self):
        """The first configured model GET /models lists; if the listing fails, all, tried in order."""
        try:
            response = self._request("GET", "/models")
            response.raise_for_status()
            listed = {m.get("id"): m.get("pricing") for m in response.json()["data"]}
        except (requests.RequestException, BadAnswer, RecursionError,  # too large or too deep is unusable too
                ValueError, LookupError, TypeError, AttributeError) as e:
            print(f"could not list the models at {self.base_url}/models ({type(e).__name__}); "
                  f"trying {', '.join(self.models)} in order", flush=True)
            return self.model
        if not set(listed).intersection(self.models):
            raise APIStop(f"none of the models {', '.join(self.models)} is offered by {self.base_url} "
                          "(set OPENROUTER_MODELS or --models)")
        self.models, self.verified = [m for m in self.models if m in listed], True
        for model in self.models:  # USD per token, as strings; a price that is not a small number is unknown
            with contextlib.suppress(TypeError, ValueError, KeyError):
                prices = float(listed[model]["prompt"]), float(listed[model]["completion"])
                self.prices[model] = prices if all(0 <= p < 1 for p in prices) else UNKNOWN_PRICES
        self.model = self.models[0]
        return self.model

    def chat(self, messages, schema_name, schema, temperature=1.0, max_tokens=2048, model=None):
        """The parsed, _clean'ed JSON answer following `schema` from `model` (default the generator). Raises
        BadAnswer for an unusable answer, HTTPGaveUp when retries run out, APIStop when nothing can succeed."""
        while True:
            use = model or self.model
            body = {"model": use, "messages": messages, "temperature": temperature, "max_tokens": max_tokens,
                    "response_format": {"type": "json_schema",
                                        "json_schema": {"name": schema_name, "strict": True, "schema": schema}}}
            if urlparse(self.base_url).hostname in ("openrouter.ai", "www.openrouter.ai"):  # OpenRouter's own field:
                body["provider"] = {"require_parameters": True}  # only route to providers that honour the schema
            try:  # raises HTTPGaveUp when 429 / 408 / 5xx / timeouts outlast every retry, or Ctrl-C ends them
                response = http_retry(lambda: self._post(body), self.retries, self.backoff, 300.0, stop=STOP)
            except requests.RequestException as e:  # http_retry lets only a malformed URL through
                raise APIStop(f"bad base URL {self.base_url!r}: {self._clean(str(e))}") from None
            status = response.status_code
            if status == 200:
                return self._answer(response)
            message = self._clean(error_text(response, 300, self._key))
            if status == 404 or (status == 400 and not self.verified and "model" in message.lower()):
                why = f"HTTP {status}: {message}"
                with self._lock:  # a model the server does not know: move on to the next configured one
                    if model or self.verified or use == self.models[-1]:
                        raise APIStop(f"model {use} is not available at {self.base_url}: {why}")
                    if self.model == use:
                        self.model = self.models[self.models.index(use) + 1]
                        print(f"model {use} is not available ({why}); falling back to {self.model}", flush=True)
                continue
            what = {400: "the request was refused", 401: "the API key was rejected (check OPENROUTER_API_KEY)",
                    402: "out of credits: add credits at https://openrouter.ai/settings/credits",
                    403: "forbidden (moderation or the key's limits)"}.get(status, "unexpected error")
            raise APIStop(f"{self.base_url}: HTTP {status}, {what}: {message}")

    def _answer(self, response):
        if response.data is None:
            raise BadAnswer("response body is not a JSON object")
        if response.data.get("error"):  # OpenRouter reports some failures inside an HTTP 200 body
            raise BadAnswer(f"error in response: {self._clean(error_text(response, 200, self._key))}")
        try:
            text = response.data["choices"][0]["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise BadAnswer("no choices in response") from None
        if not isinstance(text, str) or not text.strip():
            raise BadAnswer("empty content")
        fenced = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text.strip(), re.S)  # some models wrap JSON in a fence
        try:
            return self._clean(json.loads(fenced.group(1) if fenced else text))
        except (ValueError, RecursionError):
            raise BadAnswer("content is not valid JSON") from None

def client_from_env(base_url="", models="", timeout=120.0, retries=6, backoff=1.0):
    """An OpenRouter client from OPENROUTER_API_KEY / OPENROUTER_BASE_URL / OPENROUTER_MODELS."""
    api_key = os.environ.get("OPENROUTER_API_KEY", "").strip()
    if not api_key:
        raise UserError("OPENROUTER_API_KEY is not set: create a key at https://openrouter.ai/keys and "
                        "export OPENROUTER_API_KEY=... (nothing was written)")
    if bad := re.search(r"[^\x21-\x7e]", api_key):  # goes in an HTTP header; never printed, so its place only
        raise UserError(f"OPENROUTER_API_KEY has a character that is not printable ASCII (a space, or a zero-width "
                        f"or non-breaking one from a copy-paste?) at position {bad.start() + 1} of {len(api_key)}: "
                        "set it again (nothing was written)")
    base_url = base_url or os.environ.get("OPENROUTER_BASE_URL") or "https://openrouter.ai/api/v1"
    models = [m.strip() for m in (models or os.environ.get("OPENROUTER_MODELS") or "").split(",") if m.strip()]
    return OpenRouter(api_key, base_url, models or ["openai/gpt-4o-mini"], timeout, retries, backoff)

def cut_off(response):  # from another thread: the read in progress ends; a response read meanwhile is let be
    with contextlib.suppress(Exception):
        response.raw.shutdown()

# An LLM judge of two answers in the persona (gen.py --judge-pairs, eval.py --judge=1)
JUDGE_SCHEMA = {"type": "object", "properties": {"winner": {"type": "string", "enum": ["1", "2", "tie"]}},
                "required": ["winner"], "additionalProperties": False}

def judge_system(persona):
    name = persona["name"]
    return (f"You judge answers written as {name}, whose profile is:\n\n{persona['system']}\n\n"
            f"The better answer is the one {name} would give: {persona['master']} "
            "Judge faithfulness to the persona and helpfulness, not length or style.")

def judge_both_orders(client, persona, message, a, b, model=None, attempts=3):
    """+1 if the judge prefers `a` in both orders, -1 if `b` in both, None otherwise (a tie, or a verdict that flips
    with the order: position bias, not a preference). No verdict had is no verdict given: HTTPGaveUp, or BadAnswer
    after `attempts` unusable answers to one order, goes to the caller (a later run may ask again)."""
    system = judge_system(persona)

    def verdict(first, second):
        user = (f"Message:\n{message}\n\nAnswer 1:\n{first}\n\nAnswer 2:\n{second}\n\n"
                'Which answer is better? Return JSON: {"winner": "1" | "2" | "tie"}.')
        for _ in range(attempts):
            try:
                value = client.chat([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                    "judge_verdict", JUDGE_SCHEMA, temperature=0.0, max_tokens=16, model=model)
            except BadAnswer as e:
                error = e
                continue
            if isinstance(value, dict) and value.get("winner") in ("1", "2", "tie"):
                return value["winner"]
            error = BadAnswer('no "winner" of "1", "2" or "tie" in the judge\'s answer')
        raise error
    first = verdict(a, b)
    if first == "tie":  # no preference to confirm: the other order is not paid for
        return None
    return {("1", "2"): 1, ("2", "1"): -1}.get((first, verdict(b, a)))

# What a data stage shares (gen.py, onpolicy.py): one writer per output, output that resumes, Ctrl-C
def hold_lock(path, who, flag=""):
    """The lock file `path` (its directory made) held until closed: a second writer (`who`) stops at once with one
    line, naming `flag` (the option that writes elsewhere)."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        lock = open(path, "a")
    except OSError as e:
        raise UserError(f"cannot create the output directory {directory} or write in it: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise UserError(f"another {who} is writing to {directory} (it holds {path}); wait for it to finish"
                        + (f", or use another {flag}" if flag else "")) from None
    return lock

def repair_torn_line(path):
    """Cut off a torn last line (a run killed mid-write; True if cut); a complete one gets its newline."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        try:
            if keep < len(data):
                json.loads(data[keep:])
                f.write(b"\n")
            return False
        except ValueError:
            f.truncate(keep)
            return True

MINHASH = np.random.default_rng(1234).integers(1, 2**31 - 1, (2, 64), dtype=np.uint64)  # 64 hashes (a*x+b) mod p

def record_text(record):
    """The text that makes a record what it is (the shared system prompt left out)."""
    messages = record.get("messages") or [{"role": "user", "content": record[k]} for k in ("prompt", "chosen")]
    return "\n".join(m["content"] for m in messages if m["role"] != "system")

def minhash(record):
    """MinHash of the word trigrams: the share of equal slots of two signatures estimates Jaccard similarity."""
    words = re.findall(r"\w+", record_text(record).lower())
    grams = {" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))}
    x = np.array([zlib.crc32(g.encode("utf-8")) for g in grams], dtype=np.uint64)[:, None]
    return ((x * MINHASH[0] + MINHASH[1]) % np.uint64(2**31 - 1)).min(axis=0)  # x, a, b < 2**32: no wrap-around

class Store:
    """One output JSONL and its ledger (`<name>.ledger.jsonl`, a line per finished item id). The data file is
    the truth: a ledger "ok" counts only if its record is in the data, so a kill between the two appends
    redoes that item rather than losing or doubling it. New records are checked by digest and MinHash."""

    def __init__(self, path, problem_of, threshold):
        self.path, self.ledger_path = path, re.sub(r"(\.jsonl)?$", ".ledger.jsonl", path, 1)
        self.threshold, self.done_ids, self.ok_ids = threshold, set(), []
        self.repaired = repair_torn_line(path) + repair_torn_line(self.ledger_path)
        self.records = list(iter_jsonl(path, problem_of, "; fix or remove that line")) if os.path.isfile(path) else []
        self.hashes = {record_digest(record).hex() for record in self.records}
        self.signatures = np.array([minhash(r) for r in self.records], dtype=np.uint64).reshape(-1, MINHASH.shape[1])
        for entry in iter_jsonl(self.ledger_path) if os.path.isfile(self.ledger_path) else ():
            ok = isinstance(entry, dict) and entry.get("outcome") == "ok"
            if isinstance(entry, dict) and "id" in entry and (not ok or entry.get("hash") in self.hashes):
                self.done_ids.add(entry["id"])
                self.ok_ids += [entry["id"]] if ok else []

    def add(self, item_id, record):
        """"ok" (the record appended), "duplicate" or "near_duplicate" (not, and the item done)."""
        digest, signature = record_digest(record).hex(), minhash(record)
        if digest in self.hashes:
            return self.mark(item_id, "duplicate")
        if self.records and (self.signatures == signature).mean(axis=1).max() >= self.threshold:
            return self.mark(item_id, "near_duplicate")
        append_jsonl(self.ledger_path, {"id": item_id, "outcome": "ok", "hash": digest})
        append_jsonl(self.path, record)
        self.records.append(record)
        self.hashes.add(digest)
        self.signatures = np.vstack([self.signatures, signature])
        self.ok_ids.append(item_id)
        return "ok"

    def mark(self, item_id, outcome):
        """Record a final outcome without data (duplicate, dropped, judged) so a re-run does not pay for it again."""
        append_jsonl(self.ledger_path, {"id": item_id, "outcome": outcome})
        self.done_ids.add(item_id)
        return outcome

STOP = threading.Event()  # set by Ctrl-C in stop_on_sigint(): no new request starts, those in flight finish

@contextlib.contextmanager
def stop_on_sigint(what):
    """Within: the first Ctrl-C sets STOP (saying `what` happens now: what was paid for is kept), a second aborts."""
    def on_sigint(*_):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        STOP.set()  # os.write: print() here could re-enter a write the handler interrupted
        os.write(2, f"\ninterrupted: {what} (Ctrl-C again to abort)\n".encode())
    STOP.clear()
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield STOP
    finally:
        signal.signal(signal.SIGINT, previous)
