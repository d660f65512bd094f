"""
The small layer every Chimera stage shares: where files live, `--key=value` configs,
torch.distributed setup, rank-0 printing, bf16 autocast, a progress bar, atomic writes,
report sections and the bits of a training loop that SFT and DPO both need.

Nothing here knows about models or data; model.py and the stages build on it.
"""

import dataclasses
import datetime
import email.utils
import inspect
import json
import math
import os
import random
import re
import sys
import tempfile
import time
import typing
from contextlib import nullcontext

import requests
import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Errors a user can cause end in one line and exit code 2


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a missing key): shown as one line."""


def die(message, code=2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run_main(main):
    """Run a stage's main(): a UserError becomes one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        die(str(e))
    except KeyboardInterrupt:
        die("interrupted", code=130)


# -----------------------------------------------------------------------------
# Paths and files


def get_base_dir():
    """nanochat's base directory: $NANOCHAT_BASE_DIR, default ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def atomic_write(path, write_fn, binary=False):
    """Write a file through a temp file in the same directory and rename it into place,
    so a killed process leaves either the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path, record):
    """Append one record as one whole line (a single write), flushed to disk."""
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


# -----------------------------------------------------------------------------
# HTTP with retries (gen.py's OpenRouter client, tasks.py's Hugging Face rows)


class HTTPGaveUp(Exception):
    """Transient failures (408, 429, 5xx, timeouts, dropped connections) outlasted every retry."""


def http_retry(send, retries, backoff, max_wait=120.0, log=None, connect_retries=None):
    """send() -> requests.Response, retried on 408, 429, 5xx, timeouts and dropped connections
    (at most connect_retries times when nothing answers) with exponential backoff and jitter,
    Retry-After (seconds or an HTTP date) honoured. Returns any other response: the caller decides
    what its status means. A malformed URL raises at once; HTTPGaveUp(reason) when retries run out."""
    for attempt in range(retries + 1):
        response = None
        try:
            response = send()
            if response.status_code not in (408, 429) and response.status_code < 500:
                return response
            reason = f"HTTP {response.status_code}"
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema):
            raise
        except requests.RequestException as e:
            reason = type(e).__name__
            if isinstance(e, requests.ConnectionError) and attempt >= min(retries, connect_retries or retries):
                raise HTTPGaveUp(f"{reason} (gave up after {attempt + 1} tries)") from e
        if attempt == retries:
            raise HTTPGaveUp(f"{reason} (gave up after {retries + 1} tries)")
        wait = backoff * 2**attempt * random.uniform(0.5, 1.0)  # jitter spreads the herd that failed together
        asked = response.headers.get("Retry-After", "") if response is not None else ""
        try:
            wait = float(asked) if asked.strip().replace(".", "", 1).isdigit() else \
                email.utils.parsedate_to_datetime(asked).timestamp() - time.time()
        except (TypeError, ValueError):
            pass  # no Retry-After, or one that is neither seconds nor a date
        wait = min(max_wait, max(0.0, wait))
        if log:
            log(f"{reason}; retry {attempt + 1}/{retries} in {wait:.1f}s")
        time.sleep(wait)


def error_text(response, limit=300):
    """The error message of an API response ({"error": {"message": ...}} or {"error": ...}) or its body."""
    try:
        error = response.json().get("error", "")
        error = error.get("message", error) if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        error = response.text
    return str(error)[:limit]


# -----------------------------------------------------------------------------
# Configs: a dataclass per stage, overridden by --key=value / --key value


def _field_help(cls):
    """The end-of-line comment of each field in the dataclass source, used as --help text."""
    helps = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return helps
    for line in source.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            helps[m.group(1)] = m.group(2).strip()
    return helps


def _parse_value(key, text, typ):
    """Turn a command-line string into the field's declared type, or raise UserError."""
    optional = typing.get_origin(typ) is typing.Union and type(None) in typing.get_args(typ)
    if optional:
        if text.lower() in ("none", "null", ""):
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        if typ is str:
            return text
    except ValueError:
        pass
    else:
        raise UserError(f"--{key}: unsupported config type {typ}")
    name = getattr(typ, "__name__", str(typ))
    raise UserError(f"--{key}={text!r} is not a valid {name}")


def parse_config(cls, argv=None, aliases=None):
    """Build the dataclass `cls` from its defaults and command-line overrides.

    Accepts `--key=value`, `--key value`, dashes or underscores in keys, a bare `--flag`
    for booleans, and short aliases such as {"i": "source"} for `-i sft`. An unknown key
    or a value of the wrong type raises UserError listing what is valid.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    aliases = aliases or {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(config_help(cls, aliases))
            sys.exit(0)
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
        elif arg.startswith("-") and len(arg) > 1 and not arg[1].isdigit():
            key, eq, text = arg[1:].partition("=")
            key = aliases.get(key, "\0" + key)
        else:
            raise UserError(f"unexpected argument {arg!r}; settings look like --key=value")
        key = key.replace("-", "_")
        if key not in hints:
            shown = key.lstrip("\0")
            raise UserError(f"unknown setting --{shown}; valid settings: " + ", ".join(names))
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if hints[key] is bool and (nxt is None or nxt.startswith("-")):
                text = "1"
            elif nxt is None:
                raise UserError(f"--{key} needs a value")
            else:
                text = nxt
                i += 1
        values[key] = _parse_value(key, text, hints[key])
        i += 1
    return cls(**values)


def config_help(cls, aliases=None):
    helps = _field_help(cls)
    hints = typing.get_type_hints(cls)
    short = {v: k for k, v in (aliases or {}).items()}
    lines = ["settings (--key=value or --key value):"]
    for f in dataclasses.fields(cls):
        flag = f"--{f.name}" + (f", -{short[f.name]}" if f.name in short else "")
        typ = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
        lines.append(f"  {flag:<28} {typ:<14} default {f.default!r:<12} {helps.get(f.name, '')}")
    return "\n".join(lines)


def config_dict(config):
    return dataclasses.asdict(config)


# -----------------------------------------------------------------------------
# Devices and torch.distributed: one code path for 1 or N processes


@dataclasses.dataclass
class Dist:
    ddp: bool  # launched by torchrun with a process group
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def master(self):
        return self.rank == 0


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def init_dist(device_type=""):
    """Set up the device and, under torchrun, the process group (nccl on CUDA, gloo else)."""
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device_type={device_type!r}: expected cuda, mps or cpu")
    ddp = int(os.environ.get("RANK", -1)) != -1 and int(os.environ.get("WORLD_SIZE", 1)) >= 1
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
    if ddp and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None)
    return Dist(ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_dist():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


def autocast(device):
    """bf16 autocast on CUDA; full float32 elsewhere (CPU bf16 is slow and not what users run)."""
    if torch.device(device).type == "cuda":
        return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def all_reduce_sum(values, device):
    """Sum a list of numbers over ranks (a no-op on one process)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_initialized():
        if t.device.type != "cpu" and dist.get_backend() == "gloo":
            t = t.cpu()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def master_first(fn):
    """Run fn on rank 0 first (it may download and fill a cache), then on the other ranks,
    so N processes do not fetch the same data N times."""
    if not dist.is_initialized():
        return fn()
    if dist.get_rank() == 0:
        try:
            return fn()
        finally:
            dist.barrier()
    dist.barrier()
    return fn()


def shard(items, rank, world_size):
    """This rank's share of a list: every world_size-th item starting at rank."""
    return items[rank::world_size]


# -----------------------------------------------------------------------------
# Training-loop pieces shared by SFT and DPO


def step_rows(step, examples_per_step, num_rows, rank, world_size):
    """The rows this rank trains on at `step`: the step's slice of the (cycled) training
    order, dealt round-robin across ranks, so the global batch is the same for any N."""
    start = step * examples_per_step
    return [(start + i) % num_rows for i in range(rank, examples_per_step, world_size)]


def linear_decay(step, num_iterations):
    """nanochat's SFT schedule: the lr multiplier falls linearly from 1 to 0 over the run."""
    return 1.0 - step / max(1, num_iterations)


def scale_initial_lr(optimizers, frac):
    """nanochat's init_lr_frac: every group starts at a fraction of its default lr."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["lr"] * frac
            group["initial_lr"] = group["lr"]


def plan_steps(num_examples, examples_per_step, num_epochs, num_iterations):
    """Steps in the run: num_iterations if given (> 0), else enough for num_epochs."""
    if num_iterations > 0:
        return num_iterations
    return max(1, (num_examples * num_epochs) // examples_per_step)


def grad_accum_steps(target_examples_per_step, device_batch_size, world_size, what="examples"):
    per_pass = device_batch_size * world_size
    if target_examples_per_step % per_pass != 0:
        raise UserError(
            f"--target_examples_per_step={target_examples_per_step} must be a multiple of "
            f"device_batch_size*world_size = {device_batch_size}*{world_size} = {per_pass} {what}")
    return target_examples_per_step // per_pass


class MetricsLog:
    """metrics.jsonl beside the checkpoints: one JSON object per step, rank 0 only."""

    def __init__(self, path, fresh=True):
        self.path = path
        if is_master():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if fresh and os.path.exists(path):
                os.remove(path)

    def log(self, record):
        if is_master():
            append_jsonl(self.path, record)


def collate(rows, pad_id, device=None):
    """Pad rendered conversations into a batch.

    rows: list of (ids, mask). Returns inputs [B, T-1] and targets [B, T-1] where a target
    is -1 wherever the mask of the predicted token is 0 or the row is padding.
    """
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        ids_t = torch.tensor(ids, dtype=torch.long)
        mask_t = torch.tensor(mask[1:], dtype=torch.bool)
        inputs[i, :n] = ids_t[:-1]
        targets[i, :n] = torch.where(mask_t, ids_t[1:], torch.full_like(ids_t[1:], -1))
    if device is not None:
        inputs, targets = inputs.to(device), targets.to(device)
    return inputs, targets


# -----------------------------------------------------------------------------
# Progress bar (rank 0, stderr): done/total, rate, ETA and whatever the caller adds


def _fmt_seconds(s):
    if s is None or math.isinf(s) or math.isnan(s):
        return "?"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class ProgressBar:
    """A small progress bar. On a terminal it redraws one line; in a log file it prints a
    line every `log_every` seconds so CI logs stay readable."""

    def __init__(self, total, desc="", unit="it", stream=None, enabled=None, log_every=10.0, width=24):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.enabled = is_master() if enabled is None else enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every, self.width = log_every, width
        self.done, self.start = 0, time.time()
        self.last_draw, self.extra = 0.0, ""
        self.initial, self.drawn = 0, None

    def set_initial(self, done):
        """Count work found already done (a resumed run) without counting it in the rate."""
        self.done = self.initial = done

    def update(self, n=1, **extra):
        self.done += n
        if extra:
            self.extra = "  ".join(f"{k} {v}" for k, v in extra.items())
        now = time.time()
        if now - self.last_draw >= (0.1 if self.tty else self.log_every) or self.done >= self.total:
            self.draw()

    def text(self):
        elapsed = max(time.time() - self.start, 1e-9)
        rate = (self.done - self.initial) / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        parts = [self.desc, f"[{bar}]", f"{self.done}/{self.total}", f"{rate:.2f} {self.unit}/s",
                 f"ETA {_fmt_seconds(left)}"]
        if self.extra:
            parts.append(self.extra)
        return " ".join(p for p in parts if p)

    def draw(self):
        if not self.enabled:
            return
        self.last_draw, self.drawn = time.time(), (self.done, self.extra)
        if self.tty:
            self.stream.write("\r" + self.text() + "\033[K")
        else:
            self.stream.write(self.text() + "\n")
        self.stream.flush()

    def close(self):
        if not self.enabled:
            return
        if self.tty:
            self.draw()
            self.stream.write("\n")
        elif self.drawn != (self.done, self.extra):  # a log gets no repeated last line
            self.draw()
        self.stream.flush()


# -----------------------------------------------------------------------------
# Report sections, in nanochat's format (report/<slug>.md)


def slugify(text):
    return text.lower().replace(" ", "-")


def format_value(v):
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int) and not isinstance(v, bool) and v >= 10000:
        return f"{v:,.0f}"
    return str(v)


def write_report_section(section, data, report_dir=None):
    """Write `## section`, a timestamp and one `- key: value` line per item, as nanochat's
    Report.log does, so nanochat's report and ours both read it. `data` is a list of
    dicts (one line per key) and strings (written as they are)."""
    if not is_master():
        return None
    report_dir = report_dir or os.path.join(get_base_dir(), "report")
    path = os.path.join(report_dir, slugify(section) + ".md")
    out = [f"## {section}\n", f"timestamp: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}\n\n"]
    for item in data:
        if not item:
            continue
        if isinstance(item, str):
            out.append(item)
        else:
            out.extend(f"- {k}: {format_value(v)}\n" for k, v in item.items())
    out.append("\n")
    atomic_write_text(path, "".join(out))
    return path


# -----------------------------------------------------------------------------
# Peak memory on CPU, for the benchmarks (Linux: /proc/self)


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(field="VmRSS"):
    """Current (VmRSS) or peak since the last reset (VmHWM) resident memory, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")
