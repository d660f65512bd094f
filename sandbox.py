"""
The sandbox that runs model-written code (HumanEval), Linux only. What it contains and what
it does not: README.md, section eval.py.

    execute_code(program)                        # run it: exit status, stdout, stderr
    execute_code(program, serve=(name, driver))  # driver(call) runs here, call(*a) runs name(*a) there

Before the program runs, its interpreter enters new user, mount, network, pid and IPC
namespaces, sees the file system read-only under private tmpfs mounts (/tmp, /proc, ...),
gives up its privileges over them and sets resource limits (RLIMIT_NPROC=0: no processes,
no threads). A step the OS refuses is skipped with a one-time warning. With serve, the
driver (HumanEval's check) runs in this process and only sees the plain values (Python
literals) the program's function returns, so the program cannot fake a pass.
"""

import ast
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from common import UserError

SANDBOX_FILE_BYTES = 16 << 20  # RLIMIT_FSIZE, /tmp size and longest reply: the most the program may write

# Runs first in the sandbox: isolate, limit, report, guard, run, serve. Done here rather
# than in preexec_fn, which can deadlock when the parent has threads (eval.py runs torch).
_BOOT = r"""
import ast, json, os, resource, signal, socket, sys
config = json.loads(sys.argv[1])
channel = socket.socket(fileno=config["fd"])
source = sys.stdin.buffer.read().decode("utf-8", "replace")
missing, libc, isolated = [], None, False

def check(what, result):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, what + ": " + os.strerror(errno))

try:  # CLONE_NEWUSER | NEWNS | NEWNET | NEWPID | NEWIPC, mapping only our own ids
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.geteuid(), os.getegid()
    check("unshare", libc.unshare(0x10000000 | 0x20000 | 0x40000000 | 0x20000000 | 0x8000000))
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)
    isolated = True
except (OSError, ImportError, AttributeError) as e:
    missing.append(f"no user namespace ({e}): the code can use the network, see and signal your processes, "
                   "read their environment and write wherever the user running it can")
if isolated:
    try:  # MS_REC | MS_PRIVATE, then mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, {MOUNT_ATTR_RDONLY})
        check("private mounts", libc.mount(None, b"/", None, 0x4000 | 0x40000, None))
        check("mount_setattr", libc.syscall(442, -100, b"/", 0x8000, (ctypes.c_uint64 * 4)(1), ctypes.c_size_t(32)))
    except OSError as e:
        missing.append(f"no read-only file system ({e}): the code can write wherever the user running it can")
    try:  # empty tmpfs over these, read-only (MS_RDONLY) but /tmp, all MS_NOSUID | MS_NODEV | MS_NOEXEC
        for path in ("/tmp", "/var/tmp", "/dev/shm", "/run", "/proc"):
            if os.path.isdir(path) and not os.path.islink(path):
                options = f"size={config['tmpfs']},nr_inodes=4096,mode=1777".encode()
                check("tmpfs on " + path, libc.mount(b"tmpfs", path.encode(), b"tmpfs", (path != "/tmp") | 14, options))
        os.chdir("/tmp")
    except OSError as e:
        missing.append(f"no private /tmp, /run, /proc ({e}): the code may read other processes' environment")
    child = os.fork()  # the first process of the new pid namespace: when it dies, all in it die
    if child:
        channel.close()
        signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
        code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
        if code < 0:  # die the same way
            signal.signal(-code, signal.SIG_DFL) if -code != signal.SIGKILL else None
            os.kill(os.getpid(), -code)
        os._exit(code)
    os.setsid()  # out of the top process's group: nothing here can signal it
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the top process
    check("unshare", libc.unshare(0x10000000))  # a nested user namespace: no privilege over the mounts
if libc:
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
for name, value in config["limits"].items():
    which = getattr(resource, name)
    hard = resource.getrlimit(which)[1]
    resource.setrlimit(which, (value, value) if hard == resource.RLIM_INFINITY else (min(value, hard),) * 2)
os.environ.update(HOME=os.getcwd(), TMPDIR=os.getcwd())
channel.sendall(json.dumps(missing).encode() + b"\n")
exec(config["guard"], {})
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
sys.argv = ["program.py"]
exec(compile(source, "program.py", "exec"), namespace)
if config["serve"]:
    function = namespace[config["serve"]]
    for line in channel.makefile("rb"):
        try:
            args, kwargs = ast.literal_eval(line.decode())
            reply = ["ok", repr(function(*args, **kwargs))]
        except Exception as e:
            reply = ["error", f"{type(e).__name__}: {e}"]
        channel.sendall(json.dumps(reply).encode() + b"\n")
"""

# Defence in depth only (a program can undo it): destructive and escape functions raise.
_GUARD = r"""
import os, posix, shutil, sys

def _disabled(name):
    def disabled(*args, **kwargs):
        raise PermissionError(name + " is disabled in the sandbox")
    return disabled

for _name in ("system popen kill killpg fork forkpty setsid execv execve remove unlink rmdir removedirs rename "
              "renames replace truncate chmod fchmod lchmod chown fchown lchown link symlink").split():
    for _module in (os, posix):
        if hasattr(_module, _name):
            setattr(_module, _name, _disabled("os." + _name))
shutil.rmtree, shutil.move = _disabled("shutil.rmtree"), _disabled("shutil.move")
for _name in ("ctypes", "_ctypes", "multiprocessing", "pty"):
    sys.modules[_name] = None
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


_interpreters = {}
_warned = set()


def _mapped(first, count, map_path):
    """Whether ids [first, first+count) exist in this user namespace."""
    try:
        with open(map_path) as f:
            ranges = [tuple(map(int, line.split())) for line in f if line.strip()]
    except OSError:
        return False
    return any(inside <= first and first + count <= inside + n for inside, _, n in ranges)


def _sandbox_identity():
    """A throwaway (uid, gid) when we are root, else None (the program runs as us)."""
    if os.geteuid() != 0:
        return None
    for first, count in ((2_000_000_000, 1_000_000), (60_000, 4_000)):
        if _mapped(first, count, "/proc/self/uid_map") and _mapped(first, count, "/proc/self/gid_map"):
            return (first + os.getpid() % count,) * 2
    raise SandboxUnavailable("running as root but no free uid range to drop privileges to "
                             "(/proc/self/uid_map); run evaluation as an ordinary user")


def _as_user(identity):
    return {} if identity is None else dict(user=identity[0], group=identity[1], extra_groups=[], umask=0o077)


def _sandbox_python(identity):
    """An interpreter the sandbox user can run: sys.executable if it can (a venv under
    /root cannot), else a system python3, or $CHIMERA_SANDBOX_PYTHON."""
    key = identity is not None
    if key not in _interpreters:
        wanted = os.environ.get("CHIMERA_SANDBOX_PYTHON")
        candidates = [wanted] if wanted else [sys.executable, "/usr/local/bin/python3", "/usr/bin/python3"]
        probe = "import resource, sys; print(sys.version_info >= (3, 9))"
        for exe in candidates:
            try:
                out = subprocess.run([exe, "-I", "-c", probe], cwd="/", env={"PATH": "/usr/bin:/bin"},
                                     capture_output=True, text=True, timeout=60, **_as_user(identity))
            except (OSError, subprocess.SubprocessError):
                continue
            if out.returncode == 0 and out.stdout.strip() == "True":
                _interpreters[key] = exe
                break
        else:
            who = f"uid {identity[0]}" if identity else "this user"
            raise SandboxUnavailable(f"no Python {who} can run for the code sandbox (tried {', '.join(candidates)}); "
                                     "set CHIMERA_SANDBOX_PYTHON to a python3 (3.9+) every user can execute")
    return _interpreters[key]


class _Channel:
    """One JSON line each way over the socket to the sandbox, every wait bounded by the deadline."""

    def __init__(self, sock, deadline):
        self.sock, self.deadline, self.reader = sock, deadline, sock.makefile("rb")

    def close(self):
        self.reader.close()
        self.sock.close()

    def read(self):
        self.sock.settimeout(max(self.deadline - time.monotonic(), 1e-3))
        line = self.reader.readline(SANDBOX_FILE_BYTES)
        if not line.endswith(b"\n"):
            raise CallFailed("reply too long" if line else "the program stopped")
        return json.loads(line)

    def call(self, *args, **kwargs):
        try:
            self.sock.settimeout(max(self.deadline - time.monotonic(), 1e-3))
            self.sock.sendall(repr((args, kwargs)).encode() + b"\n")
            status, text = self.read()
        except ConnectionError as e:
            raise CallFailed("the program stopped") from e
        if status != "ok":
            raise CallFailed(text)
        try:
            return ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
            raise CallFailed(f"not a plain Python value: {text[:200]}") from e


def _read_capped(path, max_output):
    with open(path, "rb") as f:
        data = f.read(max_output + 1)
    text = data[:max_output].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > max_output else "")


def _failure(returncode, stderr):
    if returncode < 0:
        name = signal.Signals(-returncode).name
        why = {"SIGXFSZ": " (file size limit: output flood?)", "SIGXCPU": " (CPU time limit)"}.get(name, "")
        return f"killed by {name}{why}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    return (lines[-1] if lines else f"exit code {returncode}") if returncode else ""


def _stop(proc, patience):
    try:
        proc.wait(patience)  # a program that ends by itself keeps its exit status
    except subprocess.TimeoutExpired:
        proc.terminate()  # the top process kills the pid namespace's first process, and with it the rest
        try:
            proc.wait(0.5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def execute_code(program, timeout=5.0, memory_mb=512, max_output=64 * 1024, guard=True, serve=None):
    """Run a Python program in the sandbox and report what happened (never raises for the
    program's faults). serve=(name, driver): after the program ran, driver(call) runs here,
    where call(*args) returns name(*args) computed in the sandbox; success means the driver
    returned. guard=False drops the prelude (tests of the OS layer)."""
    identity = _sandbox_identity()
    python = _sandbox_python(identity)
    box = tempfile.mkdtemp(prefix="chimera-sandbox-")
    ours, theirs = socket.socketpair()
    timed_out, verdict = False, ""
    try:
        workdir = os.path.join(box, "work")  # its working dir where no private /tmp could be made
        os.mkdir(workdir)
        if identity:
            os.chown(workdir, *identity)
        limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": math.ceil(timeout) + 1, "RLIMIT_NPROC": 0,
                  "RLIMIT_FSIZE": SANDBOX_FILE_BYTES, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}
        config = {"fd": theirs.fileno(), "limits": limits, "guard": _GUARD if guard else "",
                  "serve": serve[0] if serve else None, "tmpfs": SANDBOX_FILE_BYTES}
        out_path, err_path = os.path.join(box, "stdout"), os.path.join(box, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([python, "-I", "-B", "-c", _BOOT, json.dumps(config)], cwd=workdir,
                                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, pass_fds=[theirs.fileno()], start_new_session=True,
                                    **_as_user(identity))
        theirs.close()
        channel = _Channel(ours, time.monotonic() + timeout)
        try:
            try:
                proc.stdin.write(program.encode("utf-8", "replace"))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            for missing in set(channel.read()) - _warned:  # written before the program ran
                _warned.add(missing)
                print(f"warning: code sandbox: {missing}", file=sys.stderr, flush=True)
            if serve:
                serve[1](channel.call)
            else:
                proc.wait(max(channel.deadline - time.monotonic(), 0))
        except (TimeoutError, subprocess.TimeoutExpired):
            timed_out = True
        except Exception as e:  # the driver's verdict (AssertionError, CallFailed, ...)
            verdict = (type(e).__name__ + (f": {e}" if str(e) else "")).splitlines()[0]
        finally:
            channel.close()
            _stop(proc, 0 if timed_out else 0.5)
        stdout, stderr = _read_capped(out_path, max_output), _read_capped(err_path, max_output)
    finally:
        shutil.rmtree(box, ignore_errors=True)
        theirs.close()
    error = verdict or ("" if serve else _failure(proc.returncode, stderr))
    if "the program stopped" in error:
        error += f" ({_failure(proc.returncode, stderr) or 'exit code 0'})"
    error = f"timed out after {timeout:g}s" if timed_out else error
    return ExecResult(success=not error, stdout=stdout, stderr=stderr, timed_out=timed_out,
                      error=error, returncode=proc.returncode)
