"""Shared test fixtures: the golden nanochat fixtures and tiny fresh base dirs."""

import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
GENERATIONS = {2025: "nanochat_d2", 2026: "nanochat2026_d2"}


def golden_dir(generation=2025):
    """A nanochat base dir with golden outputs made by that generation of nanochat's own code
    (tests/fixtures/; see its golden.json)."""
    return os.path.join(FIXTURES, GENERATIONS[generation])


def clone_status():
    """What `git status` shows in the clone (untracked and ignored included), Python's bytecode caches aside."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True, text=True)
    return {line for line in out.stdout.splitlines() if "__pycache__" not in line}


@pytest.fixture(scope="session", autouse=True)
def nothing_written_into_the_clone():
    """Tests write into their temporary directories only: neither the clone nor the working directory changes."""
    before, cwd = clone_status(), set(os.listdir("."))
    yield
    assert clone_status() - before == set() and set(os.listdir(".")) - cwd == set()


@pytest.fixture(scope="session")
def golden():
    return golden_dir(2025)


def make_tiny_base(base_dir, depth=2, n_embd=32, n_head=2, sequence_len=128, seed=0, zero_out=False, generation=2025):
    import checkpoint

    checkpoint.fresh_base(str(base_dir), depth=depth, sequence_len=sequence_len, n_embd=n_embd,
                          n_head=n_head, seed=seed, zero_out=zero_out, generation=generation)
    return str(base_dir)


@pytest.fixture
def tiny_base(tmp_path, monkeypatch):
    """A fresh nanochat base dir (byte tokenizer, random d2 model) as $NANOCHAT_BASE_DIR."""
    base = make_tiny_base(tmp_path / "base")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    return base


def per_token_loss(model, x, y):
    """The plain cross-entropy per position, [B*T] (0 where the target is -1): the reference the fused heads match."""
    import torch.nn.functional as F

    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), ignore_index=-1, reduction="none")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script_args, nproc=2, env=None, timeout=240, cwd=REPO):
    """Run `torchrun --nproc_per_node=nproc` on CPU (gloo) and return the completed process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}"] + list(script_args)
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **(env or {}))
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_python(script_args, env=None, timeout=240, cwd=REPO, check=True):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **(env or {}))
    proc = subprocess.run([sys.executable] + list(script_args), cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"python failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
