"""The small layer every Chimera stage shares: errors, files, `--key=value` configs, torch.distributed,
rank-0 printing, bf16 autocast and a progress bar; nothing about models or data (JSONL and HTTP: tasks.py)."""

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import hashlib
import inspect
import json
import math
import os
import re
import sys
import time
import typing

import torch
import torch.distributed as dist

# Errors a user can cause (one line, exit 2), files, and configs: a dataclass per stage, its fields the flags
class UserError(Exception):
    """A problem with the user's input (a flag, a file, a missing key): shown as one line."""

def run_main(main):
    """Run a stage's main(): a UserError becomes `error: ...` on stderr and exit code 2. A process group main()
    left up is destroyed here, while the interpreter is whole: torn down at exit, gloo's threads can abort it."""
    try:
        main()
    except (UserError, KeyboardInterrupt) as e:
        stopped = isinstance(e, KeyboardInterrupt)
        print(f"error: {'interrupted' if stopped else e}", file=sys.stderr, flush=True)
        sys.exit(130 if stopped else 2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

def get_base_dir():  # nanochat's: $NANOCHAT_BASE_DIR, default ~/.cache/nanochat (made by what writes into it)
    return os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")

def about(module):  # --help: what a module does (its doc's first paragraph), the environment its modules read
    here, doc = os.path.dirname(os.path.abspath(__file__)), (sys.modules[module].__doc__ or "").strip()
    files = {os.path.join(here, n + ".py") for n in sys.modules} | {os.path.abspath(sys.argv[0] or "/")}
    sources = [open(f, encoding="utf-8").read() for f in files if os.path.isfile(f) and os.path.dirname(f) == here]
    names = set(re.findall(r'(?<!replace\()"((?:NANOCHAT|OPENROUTER|HF|CHIMERA)_[A-Z_]+)"', "".join(sources)))
    return " ".join(doc.split("\n\n")[0].split()), "environment: " + ", ".join(sorted(names))

def atomic_write(path, write_fn, binary=False):
    """Write `.{name}.{pid}.tmp` beside the file, then rename: a killed process leaves the old file or the new one."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    f = open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8")  # mode 0o666 less the umask
    try:
        with f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise

def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text))

def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")

def _convert(key, typ, base, text):
    """Command-line text -> the field's type ("none" for an Optional), else a UserError."""
    if base is not typ and text.lower() in ("none", "null", ""):
        return None
    bools = dict.fromkeys(("1", "true", "yes", "on"), True) | dict.fromkeys(("0", "false", "no", "off"), False)
    try:
        value = bools[text.lower()] if base is bool else base(text)
    except (KeyError, ValueError):
        raise UserError(f"--{key}={text!r} is not a valid {base.__name__}") from None
    if base is float and not math.isfinite(value):  # no setting means NaN or infinity
        raise UserError(f"--{key}={text}: must be a finite number")
    return value

def parse_config(cls, argv=None, aliases=None):
    """The dataclass `cls` from its defaults and the command line: `--key=value` or `--key value`,
    dashes or underscores, a bare `--flag` for booleans, short aliases ({"i": "source"}: `-i sft`);
    --help lists each field, its default and its end-of-line comment. Bad input: a one-line UserError."""
    argv = [re.sub(r"^--[\w-]+", lambda m: "--" + m[0][2:].replace("-", "_"), a)
            for a in (sys.argv[1:] if argv is None else argv)]
    comments = {}  # each field's end-of-line comment: its --help
    with contextlib.suppress(OSError, TypeError):  # no source file (python -c ...): --help without the comments
        comments = dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    short, hints = {v: k for k, v in (aliases or {}).items()}, typing.get_type_hints(cls)
    summary, environment = about(cls.__module__)  # settings: --key=value or --key value
    parser = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False, epilog=environment, description=summary)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        base = next(t for t in typing.get_args(typ) or [typ] if t is not type(None))  # Optional[X] -> X
        parser.add_argument(f"--{f.name}", *(["-" + short[f.name]] if f.name in short else []), metavar=base.__name__,
                            default=f.default, type=functools.partial(_convert, f.name, typ, base),
                            nargs="?" if base is bool else None, const=True if base is bool else None,
                            help=f"{comments.get(f.name, '')} (default {f.default!r})".replace("%", "%%"))
    try:
        values, extra = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise UserError(str(e)) from None
    if extra and not extra[0].startswith("-"):
        raise UserError(f"unexpected argument {extra[0]!r}; settings look like --key=value")
    if extra:
        raise UserError(f"unknown setting --{extra[0].lstrip('-').partition('=')[0]}; valid settings: "
                        + ", ".join(f.name for f in dataclasses.fields(cls)))
    return cls(**vars(values))

def check_settings(config, at_least_1=(), positive=(), not_negative=(), steps=(), tags=(), at_most=None, one_of=None):
    """The stages' range checks, one line naming the flag. at_most: {key: its largest value, or the key that holds
    it}; one_of: {key: the values it may take}."""
    rules = [(at_least_1, lambda v: v < 1, "must be at least 1"), (positive, lambda v: v <= 0, "must be > 0"),
             (not_negative, lambda v: v < 0, "must be >= 0"),
             (steps, lambda v: v == 0 or v < -1, "expected a number of steps, or -1 for num_epochs' worth"),
             (tags, lambda v: v is not None and (v in ("", ".", "..") or os.path.basename(v) != v),
              "a tag is a plain directory name")]
    for key, most in (at_most or {}).items():
        limit = getattr(config, most) if isinstance(most, str) else most
        shown = f"--{most}={limit!r}" if isinstance(most, str) else most
        rules.append(([key], lambda v, limit=limit: v > limit, f"must be at most {shown}"))
    for key, values in (one_of or {}).items():
        rules.append(([key], lambda v, values=values: v not in values,
                      "expected one of " + ", ".join(str(v) for v in values if v != "")))
    for keys, bad, need in rules:
        for key in (k for k in keys if bad(getattr(config, k))):
            raise UserError(f"--{key}={getattr(config, key)!r}: {need}")

# Devices and torch.distributed: one code path for 1 or N processes
@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device
    master = property(lambda self: self.rank == 0)

def dist_timeout():
    """How long a collective waits for the slowest rank: $CHIMERA_DIST_TIMEOUT s, default 30 min (NCCL's is 10)."""
    text = os.environ.get("CHIMERA_DIST_TIMEOUT", "1800")
    if not re.fullmatch(r"\d+(\.\d*)?", text.strip()) or not float(text) > 0:
        raise UserError(f"CHIMERA_DIST_TIMEOUT={text!r}: expected a number of seconds > 0")
    return datetime.timedelta(seconds=float(text))

def init_dist(device_type=""):
    """The device and, under torchrun, the process group (nccl on CUDA, gloo else) with dist_timeout()."""
    have = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    device_type = device_type or next(k for k, ok in have.items() if ok)
    if not have.get(device_type):
        raise UserError(f"--device_type={device_type!r}: " + ("no such device on this machine"
                                                             if device_type in have else "expected cuda, mps or cpu"))
    cuda = device_type == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device(device_type)
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None, timeout=dist_timeout())
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), device)

def rank0_value(value):
    """Rank 0's value on every rank: a decision all must take alike (else collectives stop matching), or work once."""
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]

def differs_from_rank0(value):
    """Whether any rank's value (by its repr's digest: data each rank read itself) is not rank 0's, said on every
    rank, so all stop together and none waits in a collective."""
    digest = hashlib.sha256(repr(value).encode()).hexdigest()
    return bool(all_reduce_sum([rank0_value(digest) != digest])[0])

def cleanup_dist():
    if dist.is_initialized():
        gc.collect()  # async works kept alive by reference cycles go now, not in the interpreter's teardown
        dist.barrier()
        dist.destroy_process_group()

def is_master():  # rank 0, or the only process
    return not dist.is_initialized() or dist.get_rank() == 0

def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)

def autocast(device):
    """bf16 autocast on CUDA; full float32 elsewhere (CPU bf16 is slow and not what users run)."""
    cuda = torch.device(device).type == "cuda"
    return torch.amp.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()

def all_reduce_sum(values, device=None):
    """Sum numbers over ranks in float64, on the CPU but under NCCL (CUDA tensors only; `device`, else this rank's
    GPU): MPS has no float64."""
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    device = (device or torch.device("cuda", torch.cuda.current_device())) if nccl else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()

# Progress bar (rank 0)
class ProgressBar:
    """done/total, rate, ETA and the caller's extras on stderr: redrawn in place on a terminal, one line every
    `log_every` seconds in a log file (so CI logs stay readable). `done`: work found done (resumed), not in the rate."""

    def __init__(self, total, desc="", unit="it", stream=None, enabled=None, log_every=10.0, done=0):
        self.total, self.desc, self.unit, self.log_every = total, desc, unit, log_every
        self.stream, self.enabled = stream or sys.stderr, is_master() if enabled is None else enabled
        self.tty, self.done, self.initial = self.stream.isatty(), done, done
        self.start, self.last_draw, self.extra, self.drawn = time.time(), 0.0, "", None

    def update(self, n=1, **extra):
        self.done += n
        self.extra = "  ".join(f"{k} {v}" for k, v in extra.items()) or self.extra
        if time.time() - self.last_draw >= (0.1 if self.tty else self.log_every) or self.done >= self.total:
            self.draw()

    def draw(self):
        if not self.enabled:
            return
        rate = (self.done - self.initial) / max(time.time() - self.start, 1e-9)
        eta = str(datetime.timedelta(seconds=int((self.total - self.done) / rate))) if rate > 0 else "?"
        filled = int(24 * min(1.0, self.done / self.total)) if self.total else 24
        text = " ".join(p for p in (self.desc, f"[{'#' * filled}{'-' * (24 - filled)}]", f"{self.done}/{self.total}",
                                    f"{rate:.2f} {self.unit}/s", f"ETA {eta.removeprefix('0:')}", self.extra) if p)
        self.stream.write("\r" + text + "\033[K" if self.tty else text + "\n")
        self.stream.flush()
        self.last_draw, self.drawn = time.time(), (self.done, self.extra)

    def close(self):
        if self.tty or self.drawn != (self.done, self.extra):  # a log gets no repeated last line
            self.draw()
        if self.enabled and self.tty:
            self.stream.write("\n")
