"""The sandbox for model-written code (HumanEval), Linux only; README.md (eval.py) says what it contains, what not.

    execute_code(program)                        # run it: exit status, stdout, stderr
    execute_code(program, serve=(name, driver))  # driver(call) runs here, call(*a) runs name(*a) there
"""

import ast
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from common import UserError, get_base_dir

SANDBOX_FILE_BYTES = 16 << 20  # RLIMIT_FSIZE and /tmp size: the most the program may write
REPLY_BYTES = 1 << 20  # longest reply the driver parses (literal_eval's tree is many times the text)
_warned = set()  # the sandbox's warnings already printed: each once per process

# Runs first in the sandbox: isolate, limit, report, guard, run, serve. Done here rather
# than in preexec_fn, which can deadlock when the parent has threads (eval.py runs torch).
_BOOT = r"""
import ast, json, os, resource, signal, socket, sys
config = json.loads(sys.argv[1])
channel = socket.socket(fileno=config["fd"])
reader = channel.makefile("rb")
source = json.loads(reader.readline())
missing, libc = [], None
def check(what, result):
    if result != 0:
        raise OSError(errno := ctypes.get_errno(), what + ": " + os.strerror(errno))
try:  # CLONE_NEWUSER | NEWNS | NEWNET | NEWPID | NEWIPC, mapping only our own ids
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.geteuid(), os.getegid()
    check("unshare", libc.unshare(0x10000000 | 0x20000 | 0x40000000 | 0x20000000 | 0x8000000))
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)
except (OSError, ImportError, AttributeError) as e:
    missing.append(f"no user namespace ({e}): the code can use the network, see and signal your processes, "
                   "read their environment and write wherever the user running it can")
else:
    try:  # MS_REC | MS_PRIVATE, then mount_setattr (442, Linux 5.12+) with AT_RECURSIVE, MOUNT_ATTR_RDONLY
        check("private mounts", libc.mount(None, b"/", None, 0x4000 | 0x40000, None))
        check("mount_setattr", libc.syscall(442, -100, b"/", 0x8000, (ctypes.c_uint64 * 4)(1), ctypes.c_size_t(32)))
    except OSError as e:
        missing.append(f"no read-only file system ({e}): the code can write wherever the user running it can")
    options = f"size={config['tmpfs']},nr_inodes=4096,mode=1777".encode()
    try:  # empty read-only tmpfs (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC) over the user's own (home, base dir,
        # HF cache), where a copy of this Python's own files, if there, is put back
        prefix = os.path.realpath(sys.base_prefix)
        for path in config["hide"]:
            if os.path.isdir(path) and not os.path.islink(path):
                inside = os.path.commonpath([path, prefix]) == path
                if inside:  # open_tree (428): OPEN_TREE_CLONE | AT_RECURSIVE, a detached copy
                    check("copying " + prefix, min(copy := libc.syscall(428, -100, prefix.encode(), 0x8001), 0))
                check("tmpfs on " + path, libc.mount(b"tmpfs", path.encode(), b"tmpfs", 14 | (not inside), options))
                if inside:  # read-only (MS_REMOUNT | MS_BIND) once it holds the copy's mount point, then move_mount
                    os.makedirs(prefix, exist_ok=True)  # (429): MOVE_MOUNT_F_EMPTY_PATH
                    check("read-only " + path, libc.mount(None, path.encode(), None, 0x1020 | 15, None))
                    check("keeping " + prefix, libc.syscall(429, copy, b"", -100, prefix.encode(), 4))
                    os.close(copy)
    except OSError as e:
        missing.append(f"your home and base dir not hidden ({e}): the code can read them, HumanEval's solutions too")
    try:  # empty tmpfs over these, read-only but /tmp, all MS_NOSUID | MS_NODEV | MS_NOEXEC
        for path in ("/tmp", "/var/tmp", "/dev/shm", "/run", "/proc"):
            if os.path.isdir(path) and not os.path.islink(path):
                check("tmpfs on " + path, libc.mount(b"tmpfs", path.encode(), b"tmpfs", (path != "/tmp") | 14, options))
        os.chdir("/tmp")
    except OSError as e:
        missing.append(f"no private /tmp, /run and /proc ({e}): the code may read other processes' environment")
    child = os.fork()  # the first process of the new pid namespace: when it dies, all in it die
    if child:
        channel.close()
        signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
        code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
        if code < 0 and code != -signal.SIGKILL:  # die the same way
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code) if code < 0 else os._exit(code)
    os.setsid()  # out of the top process's group: nothing here can signal it
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the top process
    check("unshare", libc.unshare(0x10000000))  # a nested user namespace: no privilege over the mounts
libc and libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
for name, value in config["limits"].items():
    which = getattr(resource, name)
    hard = resource.getrlimit(which)[1]  # RLIM_INFINITY is -1
    resource.setrlimit(which, (value if hard < 0 else min(value, hard),) * 2)
channel.sendall(json.dumps(missing).encode() + b"\n")
if config["guard"]:  # defence in depth only (a program can undo it): destructive and escape functions raise
    import posix, shutil
    def disabled(name):
        def refuse(*args, **kwargs):
            raise PermissionError(name + " is disabled in the sandbox")
        return refuse
    for name in ("system popen kill killpg fork forkpty setsid execv execve remove unlink rmdir removedirs rename "
                 "renames replace truncate chmod fchmod lchmod chown fchown lchown link symlink").split():
        for module in (os, posix):
            hasattr(module, name) and setattr(module, name, disabled("os." + name))
    shutil.rmtree, shutil.move = disabled("shutil.rmtree"), disabled("shutil.move")
exec(compile(source, "program.py", "exec"), namespace := {"__name__": "__main__"})
if config["serve"]:
    for line in reader:
        try:
            args, kwargs = ast.literal_eval(line.decode())
            reply = ["ok", repr(namespace[config["serve"]](*args, **kwargs))]
        except Exception as e:
            reply = ["error", f"{type(e).__name__}: {e}"]
        channel.sendall(json.dumps(reply).encode() + b"\n")
"""

class SandboxUnavailable(UserError):
    pass

class CallFailed(Exception):
    """A call into the program raised, returned something not a plain value, or got no reply."""

@dataclasses.dataclass
class ExecResult:
    success: bool  # with serve: the driver returned; else: the program exited 0 in time
    stdout: str
    stderr: str
    timed_out: bool = False
    error: str = ""  # one line: why it failed
    returncode: int | None = None

def _sandbox_identity():
    """A throwaway (uid, gid) that this user namespace maps when we are root, else None."""
    if os.geteuid() != 0:
        return None
    with open("/proc/self/uid_map") as uids, open("/proc/self/gid_map") as gids:
        maps = [[tuple(map(int, line.split())) for line in f if line.strip()] for f in (uids, gids)]
    for first, count in ((2_000_000_000, 1_000_000), (60_000, 4_000)):
        if all(any(inside <= first and first + count <= inside + n for inside, _, n in m) for m in maps):
            return (first + os.getpid() % count,) * 2
    raise SandboxUnavailable("running as root but no free uid range to drop privileges to "
                             "(/proc/self/uid_map); run evaluation as an ordinary user")

def _as_user(identity):
    return {} if identity is None else dict(user=identity[0], group=identity[1], extra_groups=[], umask=0o077)

@functools.cache
def _sandbox_python(identity):
    """sys.executable if the sandbox user can run it (not a venv under /root), else a system python3."""
    wanted = os.environ.get("CHIMERA_SANDBOX_PYTHON")
    candidates = [wanted] if wanted else [sys.executable, "/usr/local/bin/python3", "/usr/bin/python3"]
    for exe in candidates:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run([exe, "-I", "-c", "import sys; assert sys.version_info >= (3, 9)"], cwd="/",
                              env={}, capture_output=True, timeout=60, **_as_user(identity)).returncode == 0:
                return exe
    who = f"uid {identity[0]}" if identity else "this user"
    raise SandboxUnavailable(f"no Python {who} can run for the code sandbox (tried {', '.join(candidates)}); "
                             "set CHIMERA_SANDBOX_PYTHON to a python3 (3.9+) every user can execute")

def _time_left(deadline):  # one deadline for the whole exchange: a socket timeout restarts at every recv
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left

def _hidden_dirs():
    """What the sandbox sees empty: the base dir (task_data holds HumanEval's solutions), the user's home and the
    Hugging Face cache (its token), as real paths; never / (a home of /)."""
    hf = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return sorted({os.path.realpath(os.path.expanduser(p)) for p in (get_base_dir(), "~", hf)} - {"/"})

def _receive(sock, pending, deadline):
    """The next JSON line from the sandbox by the deadline, however it trickles in; pending: what came after it."""
    while (end := pending.find(b"\n")) < 0:
        if len(pending) > REPLY_BYTES:
            raise CallFailed("reply too long")
        sock.settimeout(_time_left(deadline))
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise CallFailed("the program stopped")
        pending += chunk
    line = bytes(pending[:end])
    del pending[:end + 1]
    return json.loads(line)

def _read_capped(f, max_output):
    f.seek(0)
    data = f.read(max_output + 1)
    return data[:max_output].decode("utf-8", "replace") + ("\n[output truncated]" if len(data) > max_output else "")

def execute_code(program, timeout=5.0, memory_mb=512, max_output=64 * 1024, guard=True, serve=None):
    """Run a Python program in the sandbox and report what happened (never raises for its faults).
    serve=(name, driver): driver(call) runs here, call(*args) returning name(*args) computed there as a
    plain value, so only the right values pass; success: it returned. guard=False: no prelude (OS tests)."""
    identity = _sandbox_identity()
    limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": math.ceil(timeout) + 1, "RLIMIT_NPROC": 0,
              "RLIMIT_FSIZE": SANDBOX_FILE_BYTES, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}
    ours, theirs = socket.socketpair()
    config = {"fd": theirs.fileno(), "limits": limits, "guard": guard, "hide": _hidden_dirs(),
              "serve": serve[0] if serve else None, "tmpfs": SANDBOX_FILE_BYTES}
    timed_out, verdict = False, ""
    with (ours, theirs, tempfile.TemporaryDirectory(prefix="chimera-sandbox-", ignore_cleanup_errors=True) as workdir,
          tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err):
        if identity:
            os.chown(workdir, *identity)  # its working dir where no private /tmp could be made
        proc = subprocess.Popen([_sandbox_python(identity), "-I", "-B", "-c", _BOOT, json.dumps(config)], cwd=workdir,
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"},
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=[theirs.fileno()],
                                start_new_session=True, **_as_user(identity))
        theirs.close()
        pending, deadline = bytearray(), time.monotonic() + timeout

        def call(*args, **kwargs):
            """The driver's call: the program's function's value, as a Python literal."""
            nonlocal timed_out
            try:
                ours.settimeout(_time_left(deadline))
                ours.sendall(repr((args, kwargs)).encode() + b"\n")
                status, text = _receive(ours, pending, deadline)
            except ConnectionError as e:
                raise CallFailed("the program stopped") from e
            except TimeoutError:
                timed_out = True  # also when the driver catches it
                raise
            if status != "ok":
                raise CallFailed(text)
            try:
                return ast.literal_eval(text)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
                raise CallFailed(f"not a plain Python value: {text[:200]}") from e
        try:
            ours.settimeout(timeout)
            ours.sendall(json.dumps(program).encode() + b"\n")
            for missing in set(_receive(ours, pending, deadline)) - _warned:  # sent before the program ran
                _warned.add(missing)
                print(f"warning: code sandbox: {missing}", file=sys.stderr, flush=True)
            if serve:
                serve[1](call)
            else:
                proc.wait(max(deadline - time.monotonic(), 0))
        except (TimeoutError, subprocess.TimeoutExpired):
            timed_out = True
        except Exception as e:  # the driver's verdict (AssertionError, CallFailed, ...)
            verdict = (type(e).__name__ + (f": {e}" if str(e) else "")).splitlines()[0]
        finally:
            ours.close()  # the program's serving loop ends
            # let it end by itself (keeping its exit status), else SIGTERM (the top process then kills
            # the pid namespace's first process, and with it the rest), else SIGKILL
            for stop, wait in ((lambda: None, 0 if timed_out else 0.5), (proc.terminate, 0.5), (proc.kill, None)):
                stop()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)
                    break
        stdout, stderr = _read_capped(out, max_output), _read_capped(err, max_output)
    lines = [line for line in stderr.splitlines() if line.strip()] or [f"exit code {proc.returncode}"]
    if proc.returncode < 0:
        lines.append("killed by " + next((s.name for s in signal.Signals if s == -proc.returncode), "a signal"))
    error = verdict or ("" if serve or not proc.returncode else lines[-1])
    return ExecResult(success=not (error or timed_out), stdout=stdout, stderr=stderr, timed_out=timed_out,
                      error=f"timed out after {timeout:g}s" if timed_out else error, returncode=proc.returncode)
