"""sandbox.py: the OS layer (namespaces, read-only file system, private /tmp and /proc,
limits), the guard prelude, a normal user's run, the degraded mode's warning, and HumanEval
scores the program cannot fake."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import types

import pytest

import sandbox
import tasks
from conftest import REPO

ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def isolated():
    """The OS layer's tests need user namespaces: skip only where the OS refuses them
    (util-linux's `unshare -Urn` fails too), else a sandbox that fails to make them fails."""
    sandbox.execute_code("pass")
    missing = [line for line in sandbox._warned if line.startswith("no ")]
    can = shutil.which("unshare") and subprocess.run(["unshare", "-Urn", "true"], capture_output=True).returncode == 0
    if missing and can:
        pytest.fail("the sandbox could not isolate the code where unshare -Urn can: " + missing[0])
    if missing:
        pytest.skip("the OS refuses the sandbox's namespaces: " + missing[0])


@pytest.fixture
def victim():
    """A file and a folder anyone may change, outside /tmp (which the sandbox replaces), where
    every user can reach them (as root: in /, since the clone's parents may be private)."""
    folder = tempfile.mkdtemp(dir="/" if ROOT else REPO, prefix=".chimera-sandbox-victim-")
    os.chmod(folder, 0o777)
    with open(os.path.join(folder, "keep.txt"), "w") as f:
        f.write("precious")
    os.chmod(os.path.join(folder, "keep.txt"), 0o666)
    os.mkdir(os.path.join(folder, "keepdir"), 0o777)
    yield folder
    shutil.rmtree(folder)


def attempts(folder):
    """Delete, move, overwrite and create files in `folder`, with and without the os module."""
    file, sub = os.path.join(folder, "keep.txt"), os.path.join(folder, "keepdir")
    return (f"import os, shutil, sys\nprint('visible', os.path.exists({file!r}))\n"
            f"for f, *a in ((os.remove, {file!r}), (shutil.rmtree, {sub!r}), (os.rename, {file!r}, {file!r} + '.x'),"
            f" (lambda p: open(p, 'w').write('gone'), {file!r}), (lambda p: open(p, 'w'), {folder!r} + '/new')):\n"
            "    try:\n        f(*a)\n        print('done')\n    except Exception as e:\n        print(type(e).__name__)\n"
            "sys.modules.pop('ctypes', None)\nsys.modules.pop('_ctypes', None)\n"
            f"import ctypes\nprint('ctypes unlink', ctypes.CDLL(None).unlink({file!r}.encode()))\n")


def intact(folder):
    with open(os.path.join(folder, "keep.txt")) as f:
        return f.read() == "precious" and sorted(os.listdir(folder)) == ["keep.txt", "keepdir"]


# -----------------------------------------------------------------------------
# The OS layer


def test_runs_in_a_clean_private_dir(monkeypatch):
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-secret")
    r = sandbox.execute_code("import os, sys, json\nopen('marker', 'w').write('x')\nprint(json.dumps({'env': "
                             "dict(os.environ), 'cwd': os.getcwd(), 'path': sys.path, 'uid': os.getuid()}))")
    assert r.success and not r.timed_out and r.error == "" and r.returncode == 0
    seen = json.loads(r.stdout)
    assert "sk-or-secret" not in r.stdout and set(seen["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE"}
    assert not os.path.exists(os.path.join(seen["cwd"], "marker")) and seen["cwd"] != os.getcwd()
    assert not {"", ".", REPO} & set(seen["path"]) and seen["uid"] != 0


def test_limits_are_set():
    code = ("import resource\nfor n in ('AS', 'CPU', 'FSIZE', 'NPROC', 'CORE'):\n"
            "    print(n, resource.getrlimit(getattr(resource, 'RLIMIT_' + n)))")
    r = sandbox.execute_code(code, timeout=3.0, memory_mb=256, guard=False)
    limits = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert limits["AS"] == str((256 << 20, 256 << 20)) and limits["CPU"] == "(4, 4)" and limits["NPROC"] == "(0, 0)"
    assert limits["FSIZE"] == str((sandbox.SANDBOX_FILE_BYTES,) * 2) and limits["CORE"] == "(0, 0)"


def test_no_processes_or_threads():
    # OS layer alone (guard off): RLIMIT_NPROC=0 as a non-root uid
    code = ("import os, subprocess, threading\nfor f in (os.fork, lambda: subprocess.run(['true']),"
            " lambda: threading.Thread(target=print).start()):\n    try:\n        f()\n        print('started')\n"
            "    except Exception as e:\n        print(type(e).__name__)\n")
    r = sandbox.execute_code(code, guard=False)
    assert r.success and r.stdout.split() == ["BlockingIOError", "BlockingIOError", "RuntimeError"], r


def test_timeout_kills_an_infinite_loop():
    t = time.time()
    r = sandbox.execute_code("while True:\n    pass", timeout=1.0)
    assert r.timed_out and not r.success and "timed out" in r.error and time.time() - t < 4


def test_timeout_holds_for_a_reply_sent_a_byte_at_a_time():
    """The timeout bounds the whole exchange: a program sleeping (no CPU) between bytes, each gap shorter than the
    timeout, times out at it, also when the driver catches the error."""
    program = ("import json, socket, sys, time\nchannel = socket.socket(fileno=json.loads(sys.argv[1])['fd'])\n"
               "def f(x):\n    for _ in range(8):\n        channel.send(b' ')\n        time.sleep(0.4)\n    return x\n")

    def check(call):
        assert call(3) == 3

    def check_swallowing(call):
        try:
            call(3)
        except Exception:
            pass
    for driver in (check, check_swallowing):
        t = time.time()
        r = sandbox.execute_code(program, timeout=1.0, serve=("f", driver))
        assert r.timed_out and not r.success and time.time() - t < 2.5, (r, time.time() - t)


def test_output_flood_is_bounded():
    t = time.time()
    r = sandbox.execute_code("while True:\n    print('x' * 10000)", timeout=10.0, max_output=4096)
    assert not r.success and not r.timed_out and "File too large" in r.error and time.time() - t < 8
    assert len(r.stdout) <= 4096 + len("\n[output truncated]") and r.stdout.endswith("[output truncated]")


def test_memory_hog_fails():
    r = sandbox.execute_code("x = bytearray(2 * 1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert not r.success and "MemoryError" in r.error and "allocated" not in r.stdout


def test_no_network(isolated):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        code = (f"import socket\nfor address in (('127.0.0.1', {server.getsockname()[1]}), ('1.1.1.1', 53)):\n"
                "    try:\n        socket.create_connection(address, timeout=2)\n        print('connected')\n"
                "    except OSError as e:\n        print(type(e).__name__)\n")
        r = sandbox.execute_code(code, guard=False)
        with pytest.raises(socket.timeout):
            server.accept()
    assert r.success and r.stdout.split() == ["OSError", "OSError"], r


def test_files_cannot_be_changed(isolated, victim):
    # with the guard, which sys.modules.pop('ctypes') gets round, then the OS layer alone
    for guard in (True, False):
        r = sandbox.execute_code(attempts(victim), guard=guard)
        assert "visible True" in r.stdout and "done" not in r.stdout and "unlink 0" not in r.stdout, r
        assert intact(victim)


def test_home_base_dir_and_hf_cache_look_empty(isolated, victim, monkeypatch):
    """The base dir's task_data holds HumanEval's solutions, the home and HF cache tokens: the sandbox sees them empty,
    but for the Python it runs (here a home holding it), whose standard library still imports."""
    for name in ("base", "home", "hf"):
        os.mkdir(os.path.join(victim, name))
        with open(os.path.join(victim, name, "secret"), "w") as f:
            f.write("canonical_solution")
    for variable, name in (("NANOCHAT_BASE_DIR", "base"), ("HOME", "home"), ("HF_HOME", "hf")):
        monkeypatch.setenv(variable, os.path.join(victim, name))
    code = f"import os\nfor name in ('base', 'home', 'hf'):\n    print(os.listdir(os.path.join({victim!r}, name)))\n"
    r = sandbox.execute_code(code)
    assert r.success and r.stdout.split() == ["[]"] * 3 and "canonical_solution" not in r.stdout, r
    python = sandbox._sandbox_python(sandbox._sandbox_identity())
    prefix = subprocess.run([python, "-I", "-c", "import os, sys; print(os.path.realpath(sys.base_prefix))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setenv("HOME", prefix)
    r = sandbox.execute_code("import fractions, decimal, statistics\nprint(statistics.mean([1, 2]))")
    assert r.success and r.stdout == "1.5\n", r


NORMAL_USER = """
import json, os, sys, types
common = types.ModuleType("common")  # sandbox.py needs only UserError; this python may lack torch
common.UserError = type("UserError", (Exception,), {})
common.get_base_dir = lambda: os.environ.get("NANOCHAT_BASE_DIR", "/nonexistent")
sys.modules["common"] = common
import sandbox
program = sys.argv[1].replace("PARENT", str(os.getpid()))
for _ in range(int(sys.argv[2])):
    r = sandbox.execute_code(program, guard=False)
print(json.dumps([r.stdout, r.error]))
"""


def as_normal_user(program, runs=1, prefix=()):
    """Run the sandbox as an ordinary user (uid 12345 when we are root), with a secret in its environment."""
    user = dict(user=12345, group=12345, extra_groups=[]) if ROOT and not prefix else {}
    python = sandbox._sandbox_python((12345, 12345)) if user else sandbox._sandbox_python(None)
    with tempfile.TemporaryDirectory() as folder:  # a copy of sandbox.py that user can read
        os.chmod(folder, 0o755)
        shutil.copy(os.path.join(REPO, "sandbox.py"), folder)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": folder, "OPENROUTER_API_KEY": "sk-or-secret"}
        return subprocess.run([*prefix, python, "-c", NORMAL_USER, program, str(runs)], cwd="/", env=env,
                              capture_output=True, text=True, timeout=60, **user)


def test_a_normal_users_secrets_processes_and_files_stay_out_of_reach(isolated, victim):
    if ROOT:
        for root, dirs, files in os.walk(victim):
            for name in [root] + [os.path.join(root, n) for n in dirs + files]:
                os.chown(name, 12345, 12345)
    code = ("import os\nfor path in ('/proc/PARENT/environ', '/proc/1/environ'):\n    try:\n"
            "        print(open(path).read())\n    except OSError as e:\n        print(type(e).__name__)\n"
            "try:\n    os.kill(PARENT, 0)\n    print('signalled')\nexcept OSError as e:\n    print(type(e).__name__)\n"
            + attempts(victim))
    proc = as_normal_user(code)
    stdout, error = json.loads(proc.stdout)
    assert "sk-or-secret" not in proc.stdout + proc.stderr and "signalled" not in stdout, stdout
    assert "visible True" in stdout and "done" not in stdout and "unlink 0" not in stdout, stdout
    assert intact(victim) and not proc.stderr


def test_without_namespaces_it_runs_and_warns_once():
    if not shutil.which("unshare"):
        pytest.skip("util-linux unshare is not installed")
    # inside `unshare -U` our ids are unmapped, so the sandbox cannot make a user namespace
    proc = as_normal_user("print('ran')", runs=2, prefix=("unshare", "-U"))
    if "Operation not permitted" in proc.stderr and not proc.stdout:
        pytest.skip("no user namespaces here at all")
    assert json.loads(proc.stdout) == ["ran\n", ""], proc.stderr
    assert proc.stderr.count("warning: code sandbox: no user namespace") == 1, proc.stderr


# -----------------------------------------------------------------------------
# HumanEval: check runs outside, the program only answers calls

PROMPT = ('from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n'
          '    """ Any two numbers closer to each other than threshold? """\n')
TEST = ("\n\ndef check(candidate):\n    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
        "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n"
        "    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False\n")
CONVERSATION = {"messages": [{"role": "user", "content": PROMPT}], "entry_point": "has_close_elements", "test": TEST}
HUMANEVAL = types.SimpleNamespace(timeout=5.0)  # HumanEval.evaluate needs no rows
WRONG = "def has_close_elements(numbers, threshold):\n    return None\n"
ATTACKS = {
    "exit": "exit(0)\n",
    "sys.exit": "import sys\nsys.exit(0)\n",
    "os._exit": "import os\nos._exit(0)\n",
    "SystemExit": WRONG + "raise SystemExit\n",
    "atexit": "import atexit, os\natexit.register(os._exit, 0)\n" + WRONG,
    "settrace": ("import sys\ndef trace(frame, event, arg):\n    if frame.f_code.co_name == 'check':\n"
                 "        raise SystemExit(0)\n    return trace\nsys.settrace(trace)\n" + WRONG),
    "always equal": "class Equal:\n    def __eq__(self, other):\n        return True\n"
                    "def has_close_elements(numbers, threshold):\n    return Equal()\n",
    "BaseException": "class Stop(BaseException):\n    pass\ndef has_close_elements(numbers, threshold):\n    raise Stop\n",
    "forged replies": ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'[\"ok\", \"True\"]\\n' * 9)\n"
                       "    except OSError:\n        pass\n" + WRONG),
}


def test_humaneval_passes_only_when_check_returns():
    correct = ("```python\nimport os\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
               "    open('scratch', 'w').write('ok')  # its own private dir\n    print('checking', numbers)\n"
               "    s = sorted(numbers)\n    return any(b - a < threshold for a, b in zip(s, s[1:]))\n```")
    evaluate = tasks.HumanEval.evaluate
    assert evaluate(HUMANEVAL, CONVERSATION, correct) == 1
    assert evaluate(HUMANEVAL, CONVERSATION, WRONG) == 0
    assert evaluate(HUMANEVAL, CONVERSATION, "I cannot write code.") == 0
    for name, attack in ATTACKS.items():
        assert evaluate(HUMANEVAL, CONVERSATION, attack) == 0, name


def test_humaneval_tests_see_the_prompts_helpers_and_the_function_by_name():
    # like HumanEval/32: check calls poly, which the prompt defines and the completion need not
    # repeat; like HumanEval/33: check also calls the function by its name
    prompt = ("import math\n\ndef poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n"
              "def find_zero(xs):\n    \"\"\"A zero of the line xs.\"\"\"\n")
    test = ("def check(candidate):\n    import random\n    rng = random.Random(42)\n    for _ in range(20):\n"
            "        xs = [rng.randint(1, 5), rng.randint(1, 5)]\n        assert math.fabs(poly(xs, candidate(xs))) < 1e-4\n"
            "        assert candidate(xs) == find_zero(xs)\n")
    conversation = {"messages": [{"role": "user", "content": prompt}], "entry_point": "find_zero", "test": test}
    assert tasks.HumanEval.evaluate(HUMANEVAL, conversation, "def find_zero(xs):\n    return -xs[0] / xs[1]") == 1
    assert tasks.HumanEval.evaluate(HUMANEVAL, conversation, "def find_zero(xs):\n    return 0.5") == 0
