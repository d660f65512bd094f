"""report.py: nanochat-compatible assembly, the DPO column, what each figure is measured on and against,
charts, the answers side by side, reset."""

import json
import os
import re

import pytest

import report
from report import write_report_section

NANOCHAT_HEADER = """# nanochat training report

Generated: 2025-11-01 10:00:00

## Environment

Run started: 2025-11-01 10:00:00

### Bloat
- Characters: 400,000
- Lines: 8,000

"""


def nanochat_section(name, lines, stamp="2025-11-01 12:00:00"):
    return f"## {name}\ntimestamp: {stamp}\n\n" + "".join(f"- {k}: {v}\n" for k, v in lines.items()) + "\n"


@pytest.fixture
def report_base(tmp_path, monkeypatch):
    base = tmp_path / "base"
    rdir = base / "report"
    rdir.mkdir(parents=True)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    (rdir / "header.md").write_text(NANOCHAT_HEADER)
    (rdir / "tokenizer-training.md").write_text(nanochat_section("Tokenizer training", {"vocab_size": 65536}))
    (rdir / "base-model-evaluation.md").write_text(nanochat_section("Base model evaluation", {
        "Model": "base_model (step 21400)", "CORE metric": "0.2219", "hellaswag": "0.2570"}))
    (rdir / "chat-evaluation-mid.md").write_text(nanochat_section("Chat evaluation mid", {
        "source": "mid", "ARC-Easy": "0.3561", "ARC-Challenge": "0.2875", "MMLU": "0.3111", "GSM8K": "0.0250",
        "HumanEval": "0.0671", "ChatCORE metric": "0.0730"}))
    # nanochat's own SFT evaluation: kept as it is, while the SFT column shows Chimera's SFT
    (rdir / "chat-evaluation-sft.md").write_text(nanochat_section("Chat evaluation sft", {"ARC-Easy": "0.3500"}))
    rd = str(rdir)
    write_report_section("Chat SFT", [{"Training rows": 20000, "Validation loss": 1.25}], report_dir=rd)
    # as eval.py writes them: each figure with what it is measured on (and against)
    write_report_section("Chat evaluation sft", [{"source": "sft"}, {
        "ARC-Easy": 0.3876, "ARC-Challenge": 0.2807, "MMLU": 0.3151, "GSM8K": 0.0455, "HumanEval": 0.0854,
        "SpellingBee": 0.5, "Trader SFT held-out loss (no system)": 1.1,
        "Persona preference accuracy (no system)": "0.4444 (4 of 9 held-out pairs)",
        "Persona preference accuracy (with system)": 0.7, "Identity probe score": 0.4, "ChatCORE metric": 0.0884,
        "DPO reward accuracy (no system)": "undefined (every reward margin is 0, the model scoring as its reference; 9 "
                                           "held-out pairs, against base d2 step 0)",
        "DPO reward margin (no system)": "10.2749 (mean of 9 held-out pairs, against base d2 step 0)"}], report_dir=rd)
    write_report_section("Chat DPO", [{"Beta": 0.1, "Held-out reward accuracy": 0.9}], report_dir=rd)
    write_report_section("Chat evaluation dpo", [{"source": "dpo"}, {
        "ARC-Easy": 0.3901, "ARC-Challenge": 0.2790, "MMLU": 0.3140, "GSM8K": 0.0470, "HumanEval": 0.0793,
        "SpellingBee": 0.52, "Trader SFT held-out loss (no system)": 1.2,
        "Persona preference accuracy (no system)": "1.0000 (9 of 9 held-out pairs)",
        "DPO reward accuracy (no system)": "1.0000 (9 of 9 held-out pairs, against sft chimera_d2 step 14)",
        "DPO reward margin (no system)": "3.4295 (mean of 9 held-out pairs, against sft chimera_d2 step 14)",
        "Judge win rate (no system)": 0.6, "Identity probe score": 0.55, "ChatCORE metric": 0.0871,
        "HumanEval (nanochat)": "0.0732 (12 of 164 problems)", "SpellingBee (nanochat)": 0.61,
        "ChatCORE (nanochat)": 0.0902}],
        report_dir=rd)
    return base


def summary_rows(text):
    table = text.split("## Summary", 1)[1].split("\n## ")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    return rows[0], {r[0]: r[1:] for r in rows[1:]}


def test_generate_orders_sections_and_fills_the_dpo_column(report_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = report.generate()
    text = open(path).read()
    assert open(tmp_path / "report.md").read() == text  # the copy in the current directory
    order = ["# nanochat training report", "## Chimera post-training", "## Tokenizer training",
             "## Base model evaluation", "## Chat evaluation mid", "## Chat evaluation sft",  # nanochat's own
             "## Chat SFT", "## Chat DPO", "## Chat evaluation dpo", "## Summary"]
    positions = [text.index(h) for h in order]
    assert positions == sorted(positions)
    header, rows = summary_rows(text)
    assert header == ["Metric", "BASE", "MID", "SFT", "DPO", "RL"]
    assert rows["CORE"] == ["0.2219", "-", "-", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "0.3561", "0.3876", "0.3901", "-"]
    # nanochat's own figure (its value) beside Chimera's where it scores otherwise on purpose, said on the row
    assert rows["ChatCORE"] == ["-", "0.0730", "0.0884", "0.0871 (nanochat: 0.0902)", "-"]
    assert rows["HumanEval"] == ["-", "0.0671", "0.0854", "0.0793 (nanochat: 0.0732)", "-"]
    assert rows["SpellingBee"][3] == "0.5200 (nanochat: 0.6100)" and "(nanochat: x) is nanochat's own figure" in text
    # on how many items, as eval.py says it
    assert rows["Persona preference accuracy (no system)"] == [
        "-", "-", "0.4444 (4 of 9 held-out pairs)", "1.0000 (9 of 9 held-out pairs)", "-"]
    assert rows["Persona preference accuracy (with system)"] == ["-", "-", "0.7000", "-", "-"]
    assert rows["Identity probe score"] == ["-", "-", "0.4000", "0.5500", "-"]
    assert list(rows)[-1] == "ChatCORE"
    # figures measured against each checkpoint's own reference are not side by side, but listed per checkpoint,
    # each saying its reference; an undefined one says so
    assert not [row for row in rows if row.startswith(("DPO reward", "Judge"))]
    summary = text.split("## Summary", 1)[1]
    assert ("Measured against the checkpoint each was trained from, so not comparable between checkpoints:\n\n"
            "- SFT\n"
            "  - DPO reward accuracy (no system): undefined (every reward margin is 0, the model scoring as its "
            "reference; 9 held-out pairs, against base d2 step 0)\n"
            "  - DPO reward margin (no system): 10.2749 (mean of 9 held-out pairs, against base d2 step 0)\n"
            "- DPO\n"
            "  - DPO reward accuracy (no system): 1.0000 (9 of 9 held-out pairs, against sft chimera_d2 step 14)\n"
            "  - DPO reward margin (no system): 3.4295 (mean of 9 held-out pairs, against sft chimera_d2 step 14)\n"
            "  - Judge win rate (no system): 0.6000\n") in summary
    # which tasks each ChatCORE averaged: nanochat's mid run here had no SpellingBee
    assert ("MID: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval; SFT: ARC-Easy, ARC-Challenge, MMLU, GSM8K, "
            "HumanEval, SpellingBee") in text
    assert "- Characters: 400,000" in text.split("## Summary")[1]  # nanochat's bloat data carried over
    assert "Sections not found" in text and "midtraining.md" in text
    assert "Total wall clock time: " in text
    assert "## Answers side by side" not in text  # no evaluation kept any answer


def test_settings_left_unset_are_left_out(tmp_path):
    text = open(write_report_section("Chat SFT", [{"step": None, "device_type": "", "seed": 0, "compile": False,
                                                   "source": "mid"}], report_dir=str(tmp_path))).read()
    assert "- step:" not in text and "- device_type:" not in text
    assert "- seed: 0\n" in text and "- compile: False\n" in text and "- source: mid\n" in text


def test_charts_are_drawn_from_metrics(report_base):
    for d, rows in (("chatsft_checkpoints", [{"step": s, "loss": 3 - s / 10} for s in range(1, 11)]
                     + [{"step": 10, "val_loss/trader": 2.5}]),
                    ("chatdpo_checkpoints", [{"step": 0, "eval/loss": 0.6931, "eval/rewards/margins": 6.8e-07,
                                               "eval/rewards/accuracies": 0.1111}]
                     + [{"step": s, "loss": 0.69 - s / 100, "rewards/margins": s / 10,
                         "rewards/accuracies": s / 10} for s in range(1, 6)]
                     + [{"step": 5, "eval/loss": 0.6, "eval/rewards/margins": 0.3, "eval/rewards/accuracies": 0.8}])):
        os.makedirs(report_base / d / "d4")
        with open(report_base / d / "d4" / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.write('{"step": 11, "lo')  # a torn last line does not break the chart
    text = open(report.generate(out_copy=False)).read()
    charts = text.split("## Training curves", 1)[1].split("## Summary")[0]
    assert "<svg" not in text  # Markdown viewers strip inline SVG: the charts are image files
    names = ["sft-loss.svg", "dpo-loss.svg", "dpo-reward-margin.svg", "dpo-reward-accuracy.svg"]
    assert [line for line in charts.splitlines() if line] == [
        "![SFT loss](sft-loss.svg)", "![DPO loss](dpo-loss.svg)", "![DPO reward margin](dpo-reward-margin.svg)",
        "![DPO reward accuracy](dpo-reward-accuracy.svg)",
        "The held-out reward accuracy at step 0 is undefined (the policy is its reference) and not drawn."]
    svgs = [(report_base / "report" / n).read_text() for n in names]
    assert all(s.startswith("<svg") and s.rstrip().endswith("</svg>") for s in svgs)
    assert "val (trader)" in svgs[0]
    held_out_points = [s.count(' r="4"') for s in svgs]  # the evaluations' marked points
    assert held_out_points == [1, 2, 2, 1]  # SFT's one validation; step 0's accuracy left out
    report.reset()
    assert not [n for n in os.listdir(report_base / "report") if n.endswith(".svg")]


def test_copy_in_the_current_directory_links_the_charts(report_base, tmp_path, monkeypatch):
    os.makedirs(report_base / "chatsft_checkpoints" / "d4")
    (report_base / "chatsft_checkpoints" / "d4" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 3 - s / 10}) + "\n" for s in range(1, 4)))
    monkeypatch.chdir(tmp_path)
    report.generate()
    link = next(l for l in open(tmp_path / "report.md") if l.startswith("![SFT loss]("))
    assert os.path.isfile(tmp_path / link[len("![SFT loss]("):].strip().rstrip(")"))


def test_section_html_is_escaped_and_infinity_is_not_charted(report_base):
    write_report_section("Chat SFT", [{"Note": "<script>alert(1)</script> <img src=x onerror=alert(2)>"}],
                         report_dir=str(report_base / "report"))
    os.makedirs(report_base / "chatsft_checkpoints" / "d4")
    (report_base / "chatsft_checkpoints" / "d4" / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": Infinity}\n{"step": 3, "loss": -Infinity}\n'
        '{"step": 4, "loss": NaN}\n{"step": 5, "loss": 1.5}\n')
    text = open(report.generate(out_copy=False)).read()
    assert "<script" not in text and "<img" not in text and "&lt;script>alert(1)&lt;/script>" in text
    svg = (report_base / "report" / "sft-loss.svg").read_text()
    assert "nan" not in svg and "inf" not in svg.lower() and svg.count("<circle") == 2


def chart_text(svg, anchor):
    return re.findall(f'text-anchor="{anchor}" fill="black">([^<]*)</text>', svg)


def test_charts_mark_held_out_points_on_round_axes():
    """Training is a line; the held-out evaluations are marked points with their values, never joined (two points
    a line apart read as steady progress); the axes are round numbers, not the data's extremes."""
    svg = report.svg_chart("DPO reward margin", {"train": [(1, -1.14e-06), (2, 0.75), (3, 7.75)],
                                                 "held-out": [(0, 6.8e-07), (35, 3.43)]})
    assert svg.count("<polyline") == 1  # the training line
    assert svg.count(' r="4"') == 2 and ">3.43</text>" in svg and ">0.00</text>" in svg
    assert chart_text(svg, "end") == ["0", "2", "4", "6", "8"] and "e-0" not in "".join(chart_text(svg, "end"))
    assert chart_text(svg, "middle") == ["0", "10", "20", "30", "40", "step"]
    one = report.svg_chart("SFT loss", {"train": [(s, 3 - s / 10) for s in range(1, 15)],
                                        "val (trader)": [(14, 2.5344)]})
    assert one.count(' r="4"') == 1 and ">2.534</text>" in one  # a single validation: marked and labelled
    assert chart_text(report.svg_chart("acc", {"train": [(1, 0.25), (2, 1.0)]}, y_span=(0, 1)), "end")[::2] == [
        "0.0", "0.4", "0.8"]


def test_svg_chart_handles_flat_single_and_nan_series():
    svg = report.svg_chart("flat", {"a": [(1, 2.0)], "b": [(1, float("nan")), (2, 2.0)]})
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "nan" not in svg
    assert report.svg_chart("empty", {"a": []}) == ""


def table_rows(text):
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] for line in text.splitlines()
            if line.startswith("| ")]


def test_answers_side_by_side(report_base):
    """A few held-out prompts with the SFT and DPO answers eval.py kept, one row each: one line per cell,
    long answers cut at a word, no HTML or column break from the model; the summary ends before them."""
    rdir = report_base / "report"
    (rdir / "chimera-chat-evaluation-sft.json").write_text(json.dumps({"answers": {
        "Size my trade?": "All in | now", "Who are you?": "word " * 100, "Stop?": "<b>no</b>\n\nnever"}}))
    (rdir / "chimera-chat-evaluation-dpo.json").write_text(json.dumps({"answers": {
        "Size my trade?": "Risk 1%, with a stop.", "Who are you?": "Vex, the Master's student.", "Stop?": ""}}))
    text = open(report.generate(out_copy=False)).read()
    answers = text.split("## Answers side by side", 1)[1]
    assert "## Answers side by side" not in text.split("## Summary", 1)[1].split("\n## ")[0]
    rows = table_rows(answers)
    assert rows[0] == ["Prompt", "SFT", "DPO"]
    assert rows[1] == ["Size my trade?", "All in \\| now", "Risk 1%, with a stop."]
    assert rows[2][0] == "Who are you?" and rows[2][1] == ("word " * 60).strip() + " …" and len(rows[2][1]) <= 302
    assert rows[3] == ["Stop?", "&lt;b&gt;no&lt;/b&gt; never", "(empty)"] and len(rows) == 4


def test_reset_keeps_nanochat_sections_unless_all(report_base):
    rdir = report_base / "report"
    report.reset()
    left = set(os.listdir(rdir))
    assert {"header.md", "tokenizer-training.md", "base-model-evaluation.md", "chat-evaluation-mid.md",
            "chat-evaluation-sft.md"} <= left
    assert not left & {"chimera-chat-sft.md", "chimera-chat-evaluation-sft.md", "chimera-chat-dpo.md",
                       "chimera-chat-evaluation-dpo.md", "chimera-report.md"}
    assert "Run started: " in (rdir / "chimera-header.md").read_text()
    report.reset(everything=True)
    assert os.listdir(rdir) == ["chimera-header.md"]


def test_cli_rejects_unknown_command(report_base, capsys):
    import sys
    from common import run_main
    sys_argv = sys.argv
    try:
        sys.argv = ["report.py", "publish"]
        with pytest.raises(SystemExit) as e:
            run_main(report.main)
    finally:
        sys.argv = sys_argv
    assert e.value.code == 2 and "usage: python report.py generate | reset" in capsys.readouterr().err


def test_dpo_charts_are_round_0s_like_the_summarys_dpo_column(tmp_path, monkeypatch):
    """After on-policy rounds, `-i dpo` finds the last round (d2_r1), but the charts beside the summary's DPO column
    (DPO on gen.py's pairs) come from that run's metrics, not the round's."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for tag, loss in (("d2", 0.5), ("d2_r1", 0.1)):
        os.makedirs(tmp_path / "chatdpo_checkpoints" / tag)
        (tmp_path / "chatdpo_checkpoints" / tag / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": loss}))
    assert report.read_metrics("dpo") == [{"step": 1, "loss": 0.5}]
