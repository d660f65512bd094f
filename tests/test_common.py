"""common.py: configs, atomic writes, collate, report sections, progress bar."""

import io
import os
from dataclasses import dataclass
from typing import Optional

import pytest

import common
from common import UserError, parse_config


@dataclass
class Cfg:
    source: str = "sft"  # checkpoint source
    beta: float = 0.1  # DPO temperature
    num_iterations: int = -1  # steps; -1 = from epochs
    ref_cache: bool = False  # cache reference log-probs
    model_tag: Optional[str] = None  # d<N>


def test_both_flag_forms_dashes_and_types():
    c = parse_config(Cfg, ["--beta=0.5", "--num-iterations", "7", "--model_tag", "d4", "--ref-cache"])
    assert c == Cfg(beta=0.5, num_iterations=7, model_tag="d4", ref_cache=True)
    c = parse_config(Cfg, ["--ref_cache=0", "--model-tag=none", "-i", "dpo"], aliases={"i": "source"})
    assert c.ref_cache is False and c.model_tag is None and c.source == "dpo"
    assert parse_config(Cfg, ["--num_iterations", "-1"]).num_iterations == -1


@pytest.mark.parametrize("argv, message", [
    (["--bta=0.5"], "unknown setting --bta; valid settings: source, beta"),
    (["--beta=high"], "--beta='high' is not a valid float"),
    (["--num_iterations=2.5"], "is not a valid int"),
    (["--ref_cache=maybe"], "is not a valid bool"),
    (["--beta"], "--beta needs a value"),
    (["stray"], "unexpected argument"),
    (["-x", "1"], "unknown setting --x"),
])
def test_bad_flags_raise_one_line_user_errors(argv, message):
    with pytest.raises(UserError) as e:
        parse_config(Cfg, argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_help_lists_fields_with_their_comments(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--beta" in out and "DPO temperature" in out and "cache reference log-probs" in out


def test_run_main_turns_user_errors_into_exit_2(capsys):
    def main():
        raise UserError("data.jsonl:3: not JSON")
    with pytest.raises(SystemExit) as e:
        common.run_main(main)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: data.jsonl:3: not JSON"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.json"
    common.atomic_write_json(str(path), {"a": 1})

    def boom(f):
        f.write("partial")
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        common.atomic_write(str(path), boom)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["f.json"]  # no temp files left behind


def test_collate_pads_and_masks_targets():
    rows = [([1, 2, 3, 4], [0, 0, 1, 1]), ([5, 6], [0, 1])]
    x, y = common.collate(rows, pad_id=9)
    assert x.tolist() == [[1, 2, 3], [5, 9, 9]]
    assert y.tolist() == [[-1, 3, 4], [6, -1, -1]]


def test_report_section_is_nanochat_format(tmp_path):
    path = common.write_report_section("Chat DPO", [{"beta": 0.1, "pairs": 12000, "steps": 3}, "extra text\n"],
                                       report_dir=str(tmp_path))
    text = open(path).read()
    assert os.path.basename(path) == "chat-dpo.md"
    lines = text.splitlines()
    assert lines[0] == "## Chat DPO" and lines[1].startswith("timestamp: ")
    assert "- beta: 0.1000" in lines and "- pairs: 12,000" in lines and "- steps: 3" in lines
    assert "extra text" in lines


def test_progress_bar_shows_done_total_rate_eta():
    out = io.StringIO()
    bar = common.ProgressBar(10, desc="gen", stream=out, enabled=True, log_every=0)
    for _ in range(4):
        bar.update(1, failed=0)
    text = out.getvalue().splitlines()[-1]
    assert "gen" in text and "4/10" in text and "/s" in text and "ETA" in text and "failed 0" in text


def test_linear_decay_and_plan_steps():
    assert common.linear_decay(0, 10) == 1.0 and common.linear_decay(5, 10) == 0.5
    assert common.plan_steps(100, 8, 2, -1) == 25
    assert common.plan_steps(100, 8, 2, 7) == 7
    assert common.grad_accum_steps(32, 4, 2) == 4
    with pytest.raises(UserError, match="multiple of"):
        common.grad_accum_steps(30, 4, 2)
