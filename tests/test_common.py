"""common.py: configs, atomic writes, report sections, progress bar; model.py's training batches and schedule."""

import io
import math
import os
import random
import stat
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import common
import report
import dataloader
from common import UserError, parse_config


@dataclass
class Cfg:
    source: str = "sft"  # checkpoint source
    beta: float = 0.1  # DPO temperature
    num_iterations: int = -1  # steps; -1 = from epochs
    ref_cache: bool = False  # cache reference log-probs
    model_tag: Optional[str] = None  # d<N>
    compile: Optional[bool] = None  # None = by device


def test_both_flag_forms_dashes_and_types():
    c = parse_config(Cfg, ["--beta=0.5", "--num-iterations", "7", "--model_tag", "d4", "--ref-cache"])
    assert c == Cfg(beta=0.5, num_iterations=7, model_tag="d4", ref_cache=True)
    c = parse_config(Cfg, ["--ref_cache=0", "--model-tag=none", "-i", "dpo"], aliases={"i": "source"})
    assert parse_config(Cfg, ["-i=mid"], aliases={"i": "source"}).source == "mid"
    assert c.ref_cache is False and c.model_tag is None and c.source == "dpo"
    assert parse_config(Cfg, ["--num_iterations", "-1"]).num_iterations == -1
    assert parse_config(Cfg, ["--compile", "--beta=1"]).compile is True  # a bare Optional[bool] flag too
    assert parse_config(Cfg, ["--compile=0"]).compile is False and parse_config(Cfg, []).compile is None


@pytest.mark.parametrize("argv, message", [
    (["--bta=0.5"], "unknown setting --bta; valid settings: source, beta"),
    (["--beta=high"], "--beta='high' is not a valid float"),
    (["--num_iterations=2.5"], "is not a valid int"),
    (["--ref_cache=maybe"], "is not a valid bool"),
    (["--beta"], "argument --beta: expected one argument"),
    (["--beta=nan"], "--beta=nan: must be a finite number"),
    (["--beta", "inf"], "--beta=inf: must be a finite number"),
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


def test_atomic_write_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        common.atomic_write_text(str(tmp_path / "f.txt"), "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.txt").st_mode) == 0o644


def test_collate_pads_and_masks_targets():
    rows = [([1, 2, 3, 4], [0, 0, 1, 1]), ([5, 6], [0, 1])]
    x, y = dataloader.collate(rows, 9, "cpu")
    assert x.tolist() == [[1, 2, 3], [5, 9, 9]]
    assert y.tolist() == [[-1, 3, 4], [6, -1, -1]]


def test_report_section_is_nanochat_format(tmp_path):
    path = report.write_report_section("Chat DPO", [{"beta": 0.1, "pairs": 12000, "steps": 3}, "extra text\n"],
                                       report_dir=str(tmp_path))
    text = open(path).read()
    assert os.path.basename(path) == "chimera-chat-dpo.md"
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


def lognormal_lengths(n, seed=0):
    """A long-tailed set: lognormal lengths between 50 and 2,000 tokens."""
    rng = random.Random(seed)
    return [min(2000, max(50, int(rng.lognormvariate(math.log(300), 0.9)))) for _ in range(n)]


def test_schedule_sees_every_row_once_per_epoch_and_wastes_few_positions():
    lengths = lognormal_lengths(1024)
    s = dataloader.Schedule(lengths, per_step=32, batch_size=4, world_size=1, num_epochs=2, num_iterations=-1)
    assert s.num_iterations == 64 and s.lr_multiplier(0) == 1.0 and s.lr_multiplier(32) == 0.5
    for epoch in range(2):
        seen = [i for step in range(32 * epoch, 32 * (epoch + 1)) for mb in s.micro_batches(step, 0) for i in mb]
        assert sorted(seen) == list(range(1024))
    real = computed = 0
    for step in range(32):
        for mb in s.micro_batches(step, 0):
            real += sum(lengths[i] for i in mb)
            computed += len(mb) * max(lengths[i] for i in mb)
    assert real / computed >= 0.9


def test_an_epoch_that_ends_inside_a_window_sees_no_row_twice():
    """1,000 rows, 32 a step: 31 steps, the last window of 16 cut at 15; its rows are those 15 steps' (once each),
    not a full window's wrapped to the first rows and shuffled over steps that never run."""
    s = dataloader.Schedule(lognormal_lengths(1000), per_step=32, batch_size=4, world_size=1, num_epochs=1,
                            num_iterations=-1)
    seen = [i for step in range(s.num_iterations) for mb in s.micro_batches(step, 0) for i in mb]
    assert s.num_iterations == 31 and sorted(seen) == list(range(992))


def test_schedule_global_batch_does_not_depend_on_processes():
    lengths = lognormal_lengths(200, seed=1)
    one = dataloader.Schedule(lengths, 16, 2, 1, 1, 5)
    two = dataloader.Schedule(lengths, 16, 2, 2, 1, 5)
    for step in range(5):
        mine = [two.micro_batches(step, rank) for rank in (0, 1)]
        assert sorted(map(sorted, mine[0] + mine[1])) == sorted(map(sorted, one.micro_batches(step, 0)))
        assert len(mine[0]) == len(mine[1]) == 4
    with pytest.raises(UserError, match="multiple of"):
        dataloader.Schedule(lengths, 30, 4, 2, 1, -1)


def test_check_settings_one_line_per_bad_value():
    @dataclass
    class C:
        num_iterations: int = -1
        out_tag: Optional[str] = None
        beta: float = 0.1
    for value, ok in ((-1, True), (3, True), (0, False), (-2, False)):
        if ok:
            common.check_settings(C(num_iterations=value), steps=("num_iterations",))
        else:
            with pytest.raises(UserError, match=f"--num_iterations={value}"):
                common.check_settings(C(num_iterations=value), steps=("num_iterations",))
    for tag in ("../..", "a/b", "..", ""):
        with pytest.raises(UserError, match="plain directory name"):
            common.check_settings(C(out_tag=tag), tags=("out_tag",))
    common.check_settings(C(out_tag="chimera_d4"), tags=("out_tag",))
    with pytest.raises(UserError, match="--beta=0.0: must be > 0"):
        common.check_settings(C(beta=0.0), positive=("beta",))
    with pytest.raises(UserError, match="--beta=0.5: must be at most 0.2"):
        common.check_settings(C(beta=0.5), at_most={"beta": 0.2})
    with pytest.raises(UserError, match=r"--beta=3.0: must be at most --num_iterations=2"):
        common.check_settings(C(beta=3.0, num_iterations=2), at_most={"beta": "num_iterations"})
    common.check_settings(C(beta=0.2, num_iterations=2), at_most={"beta": 0.2, "num_iterations": 2})
    with pytest.raises(UserError, match=r"--out_tag='x': expected one of a, b$"):
        common.check_settings(C(out_tag="x"), one_of={"out_tag": ("", "a", "b")})  # "" (a default) is not listed
    common.check_settings(C(out_tag=""), one_of={"out_tag": ("", "a", "b")})


def test_dist_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv("CHIMERA_DIST_TIMEOUT", raising=False)
    assert common.dist_timeout().total_seconds() == 1800  # not NCCL's 10 minutes
    monkeypatch.setenv("CHIMERA_DIST_TIMEOUT", "7200")
    assert common.dist_timeout().total_seconds() == 7200
    for bad in ("0", "-5", "soon", "nan"):
        monkeypatch.setenv("CHIMERA_DIST_TIMEOUT", bad)
        with pytest.raises(UserError, match="CHIMERA_DIST_TIMEOUT"):
            common.dist_timeout()


def test_sums_never_put_float64_on_the_device():
    """MPS has no float64: the reduce's float64 lives on the CPU (the meta device stands in for MPS here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoFloat64OffCPU(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type != "cpu":
                    raise AssertionError(f"{func} made float64 on {t.device}")
            return out

    with NoFloat64OffCPU():
        assert common.all_reduce_sum([1, 2.5], torch.device("meta")) == [1.0, 2.5]


def test_sums_under_nccl_go_on_this_ranks_gpu_also_when_no_device_is_given(monkeypatch):
    """NCCL reduces CUDA tensors only: a sum asked without a device (the data check of every SFT/DPO run, the
    reference cache's vote, onpolicy's stop vote) goes on the GPU init_dist set, not the CPU (a traceback on each
    rank of every multi-GPU run). No GPU here: torch.tensor stands in, saying where it was asked to put the sum."""
    asked, real = [], torch.tensor
    monkeypatch.setattr(common.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(common.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(common.dist, "all_reduce", lambda t, op: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch, "tensor", lambda data, dtype, device: asked.append(torch.device(device)) or real(
        data, dtype=dtype))
    assert common.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    assert common.all_reduce_sum([1], torch.device("cuda", 1)) == [1.0]
    assert asked == [torch.device("cuda", 3), torch.device("cuda", 1)]
