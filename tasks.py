"""Chimera's datasets as nanochat Tasks: gen.py's persona data (TraderSFT, TraderDPO), Hugging Face datasets (ARC,
MMLU, GSM8K, HumanEval, SmolTalk; rows cached in $NANOCHAT_BASE_DIR/task_data/, offline too: see hf_rows),
nanochat's identity and spelling tasks, rendered, ordered and graded as nanochat's (numbers compare, also on a prefix).

    python tasks.py                      # fetch and cache everything SFT and eval use
    python tasks.py ARC-Easy GSM8K       # just these (names: see PREFETCH)
    python tasks.py --help               # this text
"""

import contextlib
import copy
import email.utils
import errno
import fcntl
import functools
import hashlib
import itertools
import json
import os
import random
import re
import string
import sys
import time

import numpy as np
import requests

import sandbox
from common import ProgressBar, UserError, about, atomic_write, get_base_dir, print0, run_main
from tokenizer import check_messages

# Task: a list of conversations with a lightweight start/stop/step view
class Task:
    """Conversations num_examples() / get_example(i) (default: copies from self.rows) seen through [start:stop:step]."""

    label = "Task"  # shown in mixture compositions and logs
    eval_type = None  # evaluation tasks: "categorical" (pick a letter) or "generative" (sample)

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad task slice [{start}:{stop}:{step}]: need 0 <= start <= stop and step >= 1")
        self.start, self.stop, self.step = start, stop, step

    @property
    def name(self):
        step = "" if self.step == 1 else f":{self.step}"
        bounds = f"[{self.start}:{'' if self.stop is None else self.stop}{step}]"
        return self.label if bounds == "[0:]" else self.label + bounds

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        return copy.deepcopy(self.rows[index])

    def __len__(self):
        return len(range(self.num_examples())[self.start:self.stop:self.step])  # a stop past the end is capped

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index!r} out of range for {len(self)} examples")
        return self.get_example(self.start + index * self.step)  # IndexError ends iteration: a Task is a sequence

class TaskMixture(Task):
    """Tasks each repeated `weight` times, shuffled by random.Random(seed) (weights 1, seed 42: nanochat's order)."""

    label = "mixture"

    def __init__(self, tasks, weights=None, seed=42, **kwargs):
        super().__init__(**kwargs)
        tasks = list(tasks)
        weights = [1] * len(tasks) if weights is None else list(weights)
        if not tasks or len(weights) != len(tasks) or any(type(w) is not int or w < 1 for w in weights):
            raise ValueError(f"a mixture needs tasks and a positive integer weight each, got {weights}")
        self.tasks, self.weights = tasks, weights
        self.index_map = [(t, i) for t, (task, w) in enumerate(zip(tasks, weights))
                          for _ in range(w) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        t, i = self.index_map[index]
        return self.tasks[t][i]

    def composition(self):
        """[(task name, rows before weighting, weight, rows after weighting)] for logs/meta."""
        return [(task.name, len(task), w, len(task) * w) for task, w in zip(self.tasks, self.weights)]

# Persona data from gen.py: JSONL validated line by line, split by a hash of each record
def conversation_problem(record, strict=True):
    """None if model.py can render `record` (its check), else why not; strict: non-empty texts, the assistant's last."""
    try:
        messages = check_messages(record)
    except ValueError as e:
        return str(e)
    if len(messages) < 2:
        return "needs at least a user and an assistant message"
    if strict and any(not isinstance(m["content"], str) or not m["content"].strip() for m in record["messages"]):
        return "every message needs non-empty text content"
    if strict and messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's"
    return None

def dpo_problem(record):
    if not isinstance(record, dict):
        return 'expected an object {"prompt", "chosen", "rejected"}'
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            return f'"{key}" must be a non-empty string'
    if record["chosen"] == record["rejected"]:
        return '"chosen" and "rejected" are identical (no preference to learn)'
    return None

def iter_jsonl(path, problem_of=lambda record: None, advice=""):
    """The records of a JSONL file, blank lines skipped; a bad line is a UserError naming file:line, then `advice`."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            problem = None
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
            except UnicodeDecodeError:
                problem = "not UTF-8 text"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg})"
            except (RecursionError, ValueError) as e:  # Python's own limits: nesting, digits of an int
                problem = f"JSON beyond what Python parses ({str(e)[:80] or 'nested too deep'})"
            if problem := problem or problem_of(record):
                raise UserError(f"{path}:{lineno}: {problem}{advice}")
            yield record

def append_jsonl(path, record):
    """Append one record as one whole line (a single write), synced to disk; if it fails (a full disk), the file is
    cut back to its whole lines and the OSError names it."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "ab", buffering=0) as f:  # unbuffered: nothing left to flush at close after a failure
        end = f.seek(0, os.SEEK_END)
        try:
            if f.write(line) < len(line):  # a short write: the disk or a size limit is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(f.fileno())
        except OSError as e:
            with contextlib.suppress(OSError):
                f.truncate(end)
            raise OSError(e.errno, e.strerror, path) from e

def read_jsonl(path, problem_of, hint="", stop=None):
    """The (first `stop`) records of a JSONL file, checked by problem_of; a missing or empty file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found{hint}")
    records = list(itertools.islice(iter_jsonl(path, problem_of), stop))
    if not records:
        raise UserError(f"{path}: no records (the file is empty){hint}")
    return records

def record_digest(record):
    """sha256 of the record's canonical JSON: its identity for splits and duplicate checks."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).digest()

def hash_fraction(record):
    """The record's place in [0, 1), from its digest. Appending lines moves nothing."""
    return int.from_bytes(record_digest(record)[:8], "big") / 2.0**64

class TraderData(Task):
    """A gen.py JSONL file split by record hash; rows returned as copies."""

    file, problem_of, default_val_fraction = "", None, 0.0

    def __init__(self, path=None, split="train", val_fraction=None, **kwargs):
        super().__init__(**kwargs)
        self.path = path or os.path.join(get_base_dir(), "datasets", self.file)
        fraction = self.default_val_fraction if val_fraction is None else val_fraction
        assert split in ("train", "val") and 0.0 <= fraction < 1.0, (split, fraction)  # checked by the stages
        self.rows = [r for r in read_jsonl(self.path, type(self).problem_of, hint=" (gen.py writes it)")
                     if (hash_fraction(r) < fraction) == (split == "val")]
        self.split, self.label = split, f"{type(self).__name__}/{split}"

class TraderSFT(TraderData):
    """gen.py's persona conversations: {"messages": [system?, user, assistant, ...]} per line."""

    file, problem_of, default_val_fraction, eval_type = "trader_sft_data.jsonl", conversation_problem, 0.1, "generative"

class TraderDPO(TraderData):
    """gen.py's preference pairs: {"prompt", "chosen", "rejected"} per line."""

    file, problem_of, default_val_fraction = "trader_dpo_data.jsonl", dpo_problem, 0.05

# HTTP with retries (gen.py's OpenRouter client, the Hugging Face rows below)
class HTTPGaveUp(Exception):
    """Transient failures (408, 429, 5xx, timeouts, dropped connections) outlasted every retry."""

def http_retry(send, retries, backoff, max_wait=120.0, log=lambda message: None, connect_retries=None, stop=None):
    """send() -> requests.Response, retried on 408, 429, 5xx, timeouts and dropped connections (at most
    connect_retries times when nothing answers) with exponential backoff, jitter and Retry-After (seconds or a date).
    Any other response is returned for the caller to judge; a malformed URL raises at once; else HTTPGaveUp, also
    as soon as the threading.Event `stop` is set (Ctrl-C) while it waits to retry."""
    for attempt in range(retries + 1):
        response = error = None
        try:
            response = send()
            if response.status_code not in (408, 429) and response.status_code < 500:
                return response
            reason = f"HTTP {response.status_code}"
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema):
            raise
        except requests.RequestException as e:
            reason, error = type(e).__name__, e
        unreachable = isinstance(error, requests.ConnectionError) and attempt >= (connect_retries or retries)
        if attempt == retries or unreachable:
            raise HTTPGaveUp(f"{reason} (gave up after {attempt + 1} tries)") from error
        wait = backoff * 2**attempt * random.uniform(0.5, 1.0)  # jitter spreads the herd that failed together
        asked = response.headers.get("Retry-After", "") if response is not None else ""
        with contextlib.suppress(TypeError, ValueError):  # no Retry-After, or one neither seconds nor a date
            wait = float(asked) if asked.strip().replace(".", "", 1).isdigit() else \
                email.utils.parsedate_to_datetime(asked).timestamp() - time.time()
        wait = min(max_wait, max(0.0, wait))
        log(f"{reason}; retry {attempt + 1}/{retries} in {wait:.1f}s")
        if stop is None:
            time.sleep(wait)
        elif stop.wait(wait):
            raise HTTPGaveUp(f"{reason} (stopped before retry {attempt + 1})") from error

def error_text(response, limit=300, secret=None):
    """The error message of an API response ({"error": {"message": ...}} or {"error": ...}) or its body, `secret`
    (a token the server may echo) scrubbed before the cut: a key across it would leave its start."""
    try:
        error = response.json().get("error", "")
        error = error.get("message", error) if isinstance(error, dict) else error
    except (ValueError, AttributeError, RecursionError):
        error = response.text
    error = str(error)
    return (error.replace(secret, "***") if secret else error)[:limit]

# Hugging Face rows through the dataset viewer API, cached as JSONL
HF_ROWS_URL = "https://datasets-server.huggingface.co/rows"
HF_PAGE = 100  # the viewer's maximum `length` per request
HF_RETRIES = 6  # retries per page on connection errors, 429 and 5xx
HF_CONNECT_RETRIES = 2  # a host we cannot connect to at all is retried only briefly
HF_BACKOFF = 1.0  # seconds before the first retry; doubles each time
HF_TIMEOUT = 30.0  # seconds per request
_unreachable = set()  # endpoints that failed to connect in this process: not tried again

class DataUnavailable(UserError):
    """Data (or the judge) could not be had; the message says where a cache file goes, to supply it by hand.
    cause: the message's gist, for logs that group skips; for_now: a later run may get it (not offline)."""

    def __init__(self, message, cause=None, for_now=False):
        super().__init__(message)
        self.cause, self.for_now = cause or message, for_now

def hf_cache_path(dataset, config, split):
    return os.path.join(get_base_dir(), "task_data", dataset.replace("/", "--"), config, f"{split}.jsonl")

def offline():  # as huggingface_hub reads them: only 1 / ON / YES / TRUE (any case) are set
    flags = (os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag in ("1", "ON", "YES", "TRUE") for flag in flags)

def download_lock(fn):
    """fn() under a file lock on task_data/: the first process fills the caches, the others then read them. Not a
    barrier: it holds with a disk per node as with a shared one, and a long download times no collective out."""
    folder = os.path.join(get_base_dir(), "task_data")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".download.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return fn()

def _fetch_rows(dataset, config, split, stop):
    """(rows [0, stop) of a split (all if stop is None), total), page by page; else DataUnavailable(why). An endpoint
    that never connects is written off for the process after quick retries, so an offline eval skips tasks at once."""
    url = (os.environ.get("CHIMERA_HF_ROWS_URL") or HF_ROWS_URL).rstrip("/")
    url = url if url.endswith("/rows") else url + "/rows"
    if offline():
        raise DataUnavailable("HF_HUB_OFFLINE is set")
    if url in _unreachable:
        raise DataUnavailable(f"{url} was unreachable earlier in this run")
    where, token = f"{dataset} {config}/{split}", os.environ.get("HF_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    rows, offset, target, bar = [], 0, stop, None
    with requests.Session() as session:
        while bar is None or offset < target:
            params = {"dataset": dataset, "config": config, "split": split, "offset": offset,
                      "length": HF_PAGE if target is None else min(HF_PAGE, target - offset)}
            try:
                response = http_retry(lambda: session.get(url, params=params, headers=headers, timeout=HF_TIMEOUT),
                                      HF_RETRIES, HF_BACKOFF, log=lambda m: print0(f"{where}: {m}"),
                                      connect_retries=HF_CONNECT_RETRIES)
            except HTTPGaveUp as e:
                if isinstance(e.__cause__, requests.ConnectionError):
                    _unreachable.add(url)
                raise DataUnavailable(f"talking to {url}: {e}") from None
            if response.status_code != 200:
                raise DataUnavailable(f"HTTP {response.status_code} from {url}: {error_text(response, 200, token)}")
            try:
                page = response.json()
                if bar is None:
                    total = page["num_rows_total"]
                    target = total if stop is None else min(stop, total)
                    bar = ProgressBar(target, desc=f"fetch {where}", unit="rows")
                items = page["rows"][: target - offset]
                rows += [item["row"] for item in items if not item.get("truncated_cells")]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise DataUnavailable(f"unexpected response from {url} (no rows/num_rows_total)") from None
            if not items:
                raise DataUnavailable(f"the server returned no rows at offset {offset} of {target}" if target
                                   else "the split has no rows")
            offset += len(items)
            bar.update(len(items))
    bar.close()
    if offset > len(rows):
        print0(f"{where}: skipped {offset - len(rows)} rows with truncated cells (too large for the viewer API)")
    return rows, total

def hf_rows(dataset, config, split, stop=None, problem_of=lambda row: None):
    """The (first `stop`) rows of a Hugging Face split from the viewer API ($CHIMERA_HF_ROWS_URL, $HF_TOKEN) cached in
    task_data/{owner}--{name}/{config}/: {split}.jsonl (the whole split; how offline users and tests supply rows) wins;
    {split}.first{N}.jsonl (a prefix fetch) serves stop <= N. Written whole, then read back: problems name file:line."""
    if stop is not None and stop < 1:
        return []
    full = hf_cache_path(dataset, config, split)
    folder = os.path.dirname(full)
    prefixes = {int(m[1]): os.path.join(folder, name) for name in (os.listdir(folder) if os.path.isdir(folder) else ())
                if (m := re.fullmatch(re.escape(split) + r"\.first(\d+)\.jsonl", name))}
    usable = [n for n in prefixes if stop is not None and n >= stop]
    path = full if os.path.exists(full) else prefixes[min(usable)] if usable else None
    if path is None:
        try:
            rows, total = _fetch_rows(dataset, config, split, stop)
        except DataUnavailable as e:
            raise DataUnavailable(f"{dataset} ({config}/{split}) is not cached and could not be fetched: {e}. To work "
                                  f"offline, put its rows, one JSON object per line, in {full}", str(e),
                                  not offline()) from None
        path = full if stop is None or stop >= total else os.path.join(folder, f"{split}.first{stop}.jsonl")
        atomic_write(path, lambda f: f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        for old in prefixes.values():  # all shorter than stop (else one was usable): superseded
            os.remove(old)
    return read_jsonl(path, lambda r: problem_of(r) if isinstance(r, dict) else "expected one JSON object (a row)",
                      hint=" (delete it to fetch again)", stop=stop)

class HFTask(Task):
    """One Hugging Face split; shuffle=True: all of it in nanochat's order, else (SmolTalk) only the prefix sliced."""

    dataset, subset, title, shuffle = "", "", "{subset}/{split}", True
    required = {"question": str}  # {key: type} every row needs

    def __init__(self, subset=None, split="test", **kwargs):
        super().__init__(**kwargs)
        self.subset, self.split = subset or self.subset, split
        self.label = self.title.format(subset=self.subset, split=split)
        rows = hf_rows(self.dataset, self.subset, split, None if self.shuffle else self.stop,
                       lambda row: self.row_problem(self.prepare(row)))
        rows = [self.prepare(row) for row in rows]
        # nanochat's order: datasets' .shuffle(seed=42) is numpy's default_rng(42).permutation of the rows
        self.rows = [rows[i] for i in np.random.default_rng(42).permutation(len(rows))] if self.shuffle else rows

    def prepare(self, row):
        return row

    def row_problem(self, row):
        """What is wrong with a row: a required key missing or of another type (a bool is no int)."""
        for key, typ in self.required.items():
            if not isinstance(row.get(key), typ) or isinstance(row.get(key), bool):
                return f"{key!r} missing or not {typ.__name__}"
        return None

    def evaluate(self, conversation, response):  # the categorical tasks' grading: the letter picked is the answer
        return int(response == conversation["messages"][-1]["content"])

# Evaluation and SFT tasks with nanochat's exact renderings
def render_mc(question, letters, choices):
    """nanochat's multiple-choice prompt: "=letter" after each choice, so its letter token is the answer's token."""
    options = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{options}\nRespond only with the letter of the correct answer."

class ARC(HFTask):
    dataset, subset, eval_type = "allenai/ai2_arc", "ARC-Easy", "categorical"  # subset: ARC-Easy | ARC-Challenge

    def row_problem(self, row):
        choices = row.get("choices")
        if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) \
                or not isinstance(choices.get("label"), list) or len(choices["text"]) != len(choices["label"]):
            return "'choices' must be {'text': [...], 'label': [...]} of equal length"
        if row.get("answerKey") not in choices["label"]:
            return f"answerKey {row.get('answerKey')!r} is not one of {choices['label']}"
        return super().row_problem(row)

    def get_example(self, index):
        row = self.rows[index]
        letters = row["choices"]["label"]
        messages = [{"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
                    {"role": "assistant", "content": row["answerKey"]}]
        return {"messages": messages, "letters": letters}

class MMLU(HFTask):
    dataset, subset, title, eval_type = "cais/mmlu", "all", "MMLU/{subset}/{split}", "categorical"  # or auxiliary_train
    letters = ("A", "B", "C", "D")

    def prepare(self, row):
        return row["train"] if isinstance(row.get("train"), dict) else row  # auxiliary_train: {"train": row}

    def row_problem(self, row):
        if not isinstance(row.get("choices"), list) or len(row["choices"]) != 4:
            return "'choices' must be a list of 4"
        if type(row.get("answer")) is not int or not 0 <= row["answer"] <= 3:  # a bool is no answer
            return f"'answer' must be 0-3, got {row.get('answer')!r}"
        return super().row_problem(row)

    def get_example(self, index):
        row = self.rows[index]
        messages = [{"role": "user", "content": render_mc(row["question"], self.letters, row["choices"])},
                    {"role": "assistant", "content": self.letters[row["answer"]]}]
        return {"messages": messages, "subject": row.get("subject", ""), "letters": self.letters}

def extract_gsm8k_answer(text):
    """The number after '#### ' with commas removed, or None."""
    m = isinstance(text, str) and re.search(r"#### (\-?[0-9\.\,]+)", text)
    return m.group(1).strip().replace(",", "") if m else None

def gsm8k_parts(answer):
    """A GSM8K solution as assistant parts: <<expr=result>> becomes a python call and its output."""
    parts = []
    for piece in re.split(r"(<<[^>]+>>)", answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        else:
            parts.append({"type": "text", "text": piece})
    return parts

class GSM8K(HFTask):
    dataset, subset, title, eval_type = "openai/gsm8k", "main", "GSM8K/{subset}/{split}", "generative"  # or socratic
    required = {"question": str, "answer": str}

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": gsm8k_parts(row["answer"])}]}

    def evaluate(self, conversation, completion):  # SpellingBee's grading too
        ref = extract_gsm8k_answer("".join(part["text"] for part in conversation["messages"][-1]["content"]))
        return int(ref is not None and extract_gsm8k_answer(completion) == ref)

def extract_imports(prompt):
    """The import lines heading a HumanEval prompt (up to its first code line: a docstring's 'from ' is no import)."""
    head = itertools.takewhile(lambda line: not line or line.startswith(("import ", "from ", "#")),
                               map(str.strip, prompt.split("\n")))
    return "\n".join(line for line in head if line.startswith(("import ", "from ")))

def extract_code(completion):
    """The first ```python / ``` fenced block of a completion, else the whole completion."""
    m = re.search(r"```(?:python)?\s*\n(.*?)\n```", completion, re.DOTALL)
    return (m.group(1) if m else completion).strip()

class HumanEval(HFTask):
    dataset, subset, title, eval_type = "openai/openai_humaneval", "openai_humaneval", "HumanEval", "generative"
    timeout = 5.0  # seconds per program in the sandbox
    required = {"prompt": str, "canonical_solution": str, "entry_point": str, "test": str}

    def get_example(self, index):
        row = self.rows[index]
        messages = [{"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"}]
        return {"messages": messages, "entry_point": row["entry_point"], "test": row["test"]}

    def evaluate(self, conversation, completion):
        """1 if the dataset's check() passes. check runs here (with the prompt's helpers, e.g. poly for find_zero),
        calling the completion's function in the sandbox, which returns plain values: no exit or hook fakes a pass."""
        prompt, name = conversation["messages"][0]["content"], conversation["entry_point"]
        program = extract_imports(prompt) + "\n\n" + extract_code(completion)
        tests, state = {}, random.getstate()  # the tests may use the random module: keep ours as it was

        def check(call):
            tests[name] = call  # HumanEval/33's test also calls the function by its name
            tests["check"](call)

        try:
            exec(prompt + "\n" + conversation["test"], tests)
            result = sandbox.execute_code(program, timeout=self.timeout, serve=(name, check))
        finally:
            random.setstate(state)
        return int(result.success)

class NanochatHumanEval(HumanEval):
    """HumanEval graded as nanochat's chat_eval of `generation` grades it: imports, code, tests and check(entry point)
    run as one program in the sandbox, exit and quit None, no prompt helpers, any returned value compared. It passes
    when the program exits 0 (92d63d4) or, for 885a4f2, runs to its end, with __name__ not "__main__" (exec in {})."""

    def __init__(self, generation, **kwargs):
        super().__init__(**kwargs)
        self.generation = generation

    def evaluate(self, conversation, completion):
        program = (extract_imports(conversation["messages"][0]["content"]) + "\n\n" + extract_code(completion) + "\n\n"
                   + conversation["test"] + "\n" + f"check({conversation['entry_point']})")
        run = f"exec(compile({program!r}, '<llm>', 'exec'), {{'__name__': '__main__'}})"
        if self.generation == 2025:  # exiting early fails, even with status 0 (os._exit: a failed call, as there)
            run = f"os._exit = None\ntry:\n    exec({program!r}, {{}})\nexcept SystemExit:\n    raise SystemExit(1)"
        prelude = "import builtins, os\nbuiltins.exit = builtins.quit = None\n"
        return int(sandbox.execute_code(prelude + run, timeout=self.timeout, memory_mb=256).success)

class SmolTalk(HFTask):
    """smol-smoltalk (train 460K, test 24K): only the rows up to `stop`, in stored order, not nanochat's shuffle."""

    dataset, subset, title, shuffle = "HuggingFaceTB/smol-smoltalk", "default", "SmolTalk/{split}", False

    def __init__(self, split="train", **kwargs):
        super().__init__(None, split, **kwargs)

    def row_problem(self, row):
        return conversation_problem(row, strict=False)

    def get_example(self, index):
        return {"messages": copy.deepcopy(self.rows[index]["messages"])}

# nanochat's identity conversations and spelling tasks (as of 885a4f2): files fetched once
IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"
WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
# nanochat's SpellingBee user messages, verbatim, one per line: the same seeds give the same conversations
SPELLING_TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "spellingbee_templates.txt")

def cached_file(url):
    """A file nanochat downloads into its base dir: used from there if present, else fetched once to task_data/."""
    name = url.rsplit("/", 1)[-1]
    path = os.path.join(get_base_dir(), "task_data", name)
    for found in (os.path.join(get_base_dir(), name), path):
        if os.path.exists(found):
            return found
    why = "HF_HUB_OFFLINE is set"
    if not offline():
        try:
            response = http_retry(lambda: requests.get(url, timeout=HF_TIMEOUT), HF_RETRIES, HF_BACKOFF,
                                  log=lambda m: print0(f"{name}: {m}"), connect_retries=HF_CONNECT_RETRIES)
            response.raise_for_status()
            atomic_write(path, lambda f: f.write(response.content), binary=True)
            return path
        except (requests.RequestException, HTTPGaveUp) as e:
            why = f"{type(e).__name__} fetching {url}"
    raise DataUnavailable(f"{name} is not cached ({why}); to work offline, put {url} at {path}", why, not offline())

class IdentityConversations(Task):
    """nanochat's synthetic identity conversations: one JSON list of messages per line."""

    label = "Identity"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows = [{"messages": m} for m in read_jsonl(cached_file(IDENTITY_URL), lambda r: conversation_problem(
            {"messages": r}, strict=False) if isinstance(r, list) else "expected a JSON list of messages")]

@functools.lru_cache(maxsize=None)
def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return tuple(line.strip() for line in f)

class SpellingTask(Task):
    """Synthetic examples over nanochat's word list: example i comes from random.Random(i)."""

    eval_type = "generative"

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        self.size, self.split, self.label = size, split, f"{type(self).__name__}/{split}"
        self.words = read_lines(cached_file(WORD_LIST_URL))

    def num_examples(self):
        return self.size

    def rng(self, index):  # Chimera's test example i has seed 10,000,000 + i, past every train seed; nanochat's
        # (split "nanochat-test") has -(i + 1), which Random takes as i + 1: nanochat tests on train example i + 1
        return random.Random({"train": index, "test": 10_000_000 + index, "nanochat-test": -(index + 1)}[self.split])

class SimpleSpelling(SpellingTask):
    """'Spell the word: apple' -> 'apple:a,p,p,l,e'."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.words = list(self.words)
        random.Random(42).shuffle(self.words)  # another word order than SpellingBee's

    def get_example(self, index):
        word = self.rng(index).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}

class SpellingBee(SpellingTask):
    """'How many r are in strawberry?': counted by hand, checked with Python, answered after '#### ' as GSM8K."""

    def get_example(self, index):
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        template = rng.choice(read_lines(SPELLING_TEMPLATES))
        template = template.lower() if rng.random() < 0.3 else template
        letter_q, word_q = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])  # quotes around each, or none
        question = template.format(letter=f"{letter_q}{letter}{letter_q}", word=f"{word_q}{word}{word_q}")
        question += "?" if rng.random() < 0.5 else ""
        manual = (f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach "
                  f"first.\n\nFirst spell the word out:\n{word}:{','.join(word)}\n\nThen count the occurrences of "
                  f"'{letter}':\n")
        count = 0
        for i, char in enumerate(word, 1):
            count += char == letter
            manual += f"{i}:{char} hit! count={count}\n" if char == letter else f"{i}:{char}\n"
        parts = [{"type": "text", "text": manual + f"\nThis gives us {count}."},
                 {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
                 {"type": "python", "text": f"'{word}'.count('{letter}')"},
                 {"type": "python_output", "text": str(count)},
                 {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"}]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}

    evaluate = GSM8K.evaluate

# eval.py's default tasks: TASKS[name]() (slicing kwargs pass through)
TASKS = {
    "ARC-Easy": functools.partial(ARC, "ARC-Easy", "test"),
    "ARC-Challenge": functools.partial(ARC, "ARC-Challenge", "test"),
    "MMLU": functools.partial(MMLU, "all", "test"),
    "GSM8K": functools.partial(GSM8K, "main", "test"),
    "HumanEval": HumanEval,
    "SpellingBee": functools.partial(SpellingBee, 256, "test"),
}

# nanochat's figure per generation where Chimera scores otherwise on purpose (eval.py shows it beside Chimera's):
# SpellingBee on nanochat's test problems (885a4f2; 92d63d4 has none), HumanEval graded as nanochat grades it
NANOCHAT_TASKS = {2025: {"HumanEval": functools.partial(NanochatHumanEval, 2025),
                         "SpellingBee": functools.partial(SpellingBee, 256, "nanochat-test")},
                  2026: {"HumanEval": functools.partial(NanochatHumanEval, 2026)}}

# python tasks.py [names]: fill the caches (on a connected machine, before going offline)
PREFETCH = {
    **TASKS,
    "ARC-Easy/train": functools.partial(ARC, "ARC-Easy", "train"),
    "ARC-Challenge/train": functools.partial(ARC, "ARC-Challenge", "train"),
    "GSM8K/train": functools.partial(GSM8K, "main", "train"),
    "SmolTalk": functools.partial(SmolTalk, "train", stop=10_000),
    "SmolTalk/test": functools.partial(SmolTalk, "test"),
    "Identity": IdentityConversations,
}

class SmolTalkShuffled(SmolTalk):
    """SmolTalk in nanochat's order (the whole split, seed-42 shuffle), as its SFT mixtures take it (885a4f2: 10K)."""
    shuffle = True

def main():
    names = sys.argv[1:] or list(PREFETCH)
    if names[0] in ("-h", "--help"):
        return print(__doc__.strip() + "\n\n" + about("__main__")[1])
    if unknown := [n for n in names if n not in PREFETCH]:
        raise UserError(f"unknown task {unknown[0]!r}; known: {', '.join(PREFETCH)}")
    for name in names:
        task = PREFETCH[name]()
        print0(f"{task.name}: {len(task):,} examples")

if __name__ == "__main__":
    run_main(main)
