"""Every entry point answers --help: what it does, its settings, the environment it reads; and does nothing else."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = ["gen.py", "sft.py", "dpo.py", "onpolicy.py", "eval.py", "report.py", "hub.py", "tasks.py", "chat.py", "run.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_what_it_does_and_does_nothing_else(script, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "NANOCHAT_BASE_DIR": str(tmp_path / "base"),
           "CHIMERA_DEMO_DIR": str(tmp_path / "demo"), "CHIMERA_PYTHON": sys.executable}
    command = ["bash"] if script.endswith(".sh") else [sys.executable]
    proc = subprocess.run(command + [os.path.join(REPO, script), "--help"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr[-2000:]
    text = proc.stdout
    assert "NANOCHAT_BASE_DIR" in text and "nvironment" in text  # the variables it reads
    assert len(text.split("\n\n")[0 if script in ("run.sh", "report.py", "tasks.py", "hub.py") else 1]) > 40  # what
    if script.endswith(".py") and script not in ("report.py", "tasks.py"):
        assert "--model_tag" in text or "--sft_examples" in text  # its settings
    assert os.listdir(tmp_path) == []  # nothing made: no base dir, no cache, no report


def test_a_missing_checkpoint_is_named_before_any_download_and_nothing_is_made(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "CHIMERA_HF_ROWS_URL": "http://127.0.0.1:9"}  # a fetch would fail
    env.pop("NANOCHAT_BASE_DIR", None)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "sft.py")], env=env, cwd=tmp_path,  # mixture
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "retry" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().endswith("base_checkpoints: no such checkpoint directory; "
                                        f"{tmp_path}/.cache/nanochat holds none")
    assert os.listdir(tmp_path) == []  # no empty ~/.cache/nanochat
