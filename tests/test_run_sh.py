"""run.sh: the offline demo profile end to end on the smallest settings, stage skipping on a
re-run, and the clear stops when a real run lacks what it needs."""

import os
import subprocess
import sys

from conftest import REPO, make_tiny_base


def run_sh(env, timeout=400):
    full = {k: v for k, v in os.environ.items() if k not in ("OPENROUTER_API_KEY", "CHIMERA_DEMO")}
    full.update(CHIMERA_PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", os.path.join(REPO, "run.sh")], env=full, capture_output=True, text=True,
                          timeout=timeout)


def test_demo_profile_end_to_end_then_resumes(tmp_path):
    demo = tmp_path / "demo"
    env = {
        "CHIMERA_DEMO_DIR": str(demo), "NANOCHAT_BASE_DIR": str(tmp_path / "real"), "CHIMERA_DEMO_DEPTH": "1",
        "SFT_EXTRA_ARGS": "--num_iterations=3 --max_seq_len=256 --eval_every=-1 --eval_batches=1",
        "DPO_EXTRA_ARGS": "--num_iterations=3 --max_length=256 --eval_every=-1",
        "EVAL_EXTRA_ARGS": "--max_new_tokens=8",
    }
    proc = run_sh(env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OFFLINE DEMO" in proc.stdout
    for directory in ("base_checkpoints/d1", "chatsft_checkpoints/d1", "chatdpo_checkpoints/d1"):
        assert any(n.startswith("model_") for n in os.listdir(demo / directory)), directory
    assert not (tmp_path / "real").exists()  # the demo never touches the real base dir
    report = (demo / "report" / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| Metric"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["Metric", "BASE", "MID", "SFT", "DPO", "RL"]
    row = next(line for line in report.splitlines() if line.startswith("| Persona preference accuracy"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] != "-" and cells[4] != "-"  # measured after SFT and after DPO
    again = run_sh(env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("output exists, skipped") == 6  # base, data, sft, eval sft, dpo, eval dpo


def test_a_checkpoint_without_key_or_data_stops_with_a_message(tmp_path):
    make_tiny_base(tmp_path)
    proc = run_sh({"NANOCHAT_BASE_DIR": str(tmp_path)}, timeout=60)
    assert proc.returncode != 0
    assert "no OPENROUTER_API_KEY" in proc.stderr and "CHIMERA_DEMO=1" in proc.stderr
    assert not (tmp_path / "chatsft_checkpoints").exists()


def test_a_key_without_a_checkpoint_stops_with_a_message(tmp_path):
    proc = run_sh({"NANOCHAT_BASE_DIR": str(tmp_path), "OPENROUTER_API_KEY": "sk-or-x"}, timeout=60)
    assert proc.returncode != 0 and "no nanochat checkpoint" in proc.stderr
