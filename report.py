"""
The training report card, nanochat-compatible, with a DPO column.

    python report.py reset           # start a run: clear Chimera's sections, note the start time
    python report.py reset --all     # also clear nanochat's sections (tokenizer, base, mid, ...)
    python report.py generate        # assemble report/*.md into report/chimera-report.md (+ report.md in the cwd)
    python report.py --help          # this text

Each Chimera stage writes its section with write_report_section. `generate` orders the sections as nanochat does,
Chimera's after SFT, with a header (git, hardware, versions), training charts (.svg files beside the report,
linked as images) and a summary table BASE/MID/SFT/DPO/RL.
"""

import contextlib
import datetime
import html
import json
import math
import os
import platform
import re
import subprocess
import sys

from common import UserError, about, atomic_write_text, get_base_dir, is_master, run_main

# nanochat's sections in its order (its own SFT's included, as they are), then Chimera's, which carry a
# chimera- prefix so that nanochat's files of the same stage are never overwritten
NANOCHAT_FILES = ["tokenizer-training.md", "tokenizer-evaluation.md", "base-model-training.md", "base-model-loss.md",
                  "base-model-evaluation.md", "midtraining.md", "chat-evaluation-mid.md", "chat-sft.md",
                  "chat-evaluation-sft.md"]
CHIMERA_FILES = ["chimera-" + n for n in ("synthetic-data.md", "chat-sft.md", "chat-evaluation-sft.md", "chat-dpo.md",
                                          "chat-evaluation-dpo.md")]
RL_FILES = ["chat-rl.md", "chat-evaluation-rl.md"]
EXPECTED_FILES = NANOCHAT_FILES + CHIMERA_FILES + RL_FILES
HEADER = "header.md"  # nanochat's run header (written by nanochat's `report reset`)
CHIMERA_HEADER = "chimera-header.md"  # ours: when the Chimera run started

STAGES = ["base", "mid", "sft", "dpo", "rl"]  # the summary table's columns, read from these sections; a later
SECTION_STAGE = {"base-model-evaluation.md": "base", "chat-evaluation-mid.md": "mid",  # one wins: Chimera's SFT
                 "chat-evaluation-sft.md": "sft", "chimera-chat-evaluation-sft.md": "sft",  # over nanochat's
                 "chimera-chat-evaluation-dpo.md": "dpo", "chat-evaluation-rl.md": "rl"}
CHAT_METRICS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]
NANOCHAT_FIGURES = [f"{m} (nanochat)" for m in CHAT_METRICS]  # eval.py's, where Chimera scores otherwise on purpose
# eval.py's persona rows, each without and with the persona's system message
PERSONA_METRICS = [f"{name} ({cond})" for name in ("Trader SFT held-out loss", "Persona preference accuracy",
                                                   "DPO reward accuracy", "DPO reward margin", "Judge win rate")
                   for cond in ("no system", "with system")] + ["Identity probe score"]
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]  # the charts' lines, in order


# Writing a section (each stage, rank 0)
def write_report_section(section, data, report_dir=None):
    """report/chimera-<slug>.md in nanochat's Report.log format (`## section`, a timestamp, `- key: value`
    lines), so both reports read it; the prefix keeps nanochat's own files untouched. `data`: dicts, strings."""
    if not is_master():
        return None
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if type(v) is int and v >= 10000 else str(v)
    out = [f"## {section}\n", f"timestamp: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}\n\n"]
    for item in filter(None, data):
        out += [item] if isinstance(item, str) else [f"- {k}: {fmt(v)}\n" for k, v in item.items()]
    name = "chimera-" + section.lower().replace(" ", "-") + ".md"
    path = os.path.join(report_dir or os.path.join(get_base_dir(), "report"), name)
    atomic_write_text(path, "".join(out) + "\n")
    return path


# Reading sections
def section_metrics(text, names):
    """{name: value} for `- name: value` lines (also `name metric`/`name accuracy`, as
    nanochat labels CORE and ChatCORE); the last line wins, as in nanochat."""
    out = {}
    for key, value in re.findall(r"^-\s+(.+?)[ \t]*:[ \t]*(.*)$", text, flags=re.M):
        out.update({name: value.strip() for name in names if key in (name, f"{name} metric", f"{name} accuracy")})
    return out


def section_timestamp(text, prefix):
    m = re.search(f"^{re.escape(prefix)}(.*)$", text, flags=re.M)
    with contextlib.suppress(ValueError):  # a malformed time is no time
        return datetime.datetime.strptime(m[1].strip(), "%Y-%m-%d %H:%M:%S") if m else None
    return None


def summary_table(metrics):
    """Markdown table of {stage: {metric: value}}: one row per metric, one column per stage, '-' where missing; then
    which tasks each stage's ChatCORE averaged (nanochat computes it only when all ran)."""
    rows = [m for m in ["CORE"] + CHAT_METRICS[:-1] + PERSONA_METRICS + ["ChatCORE"]
            if any(m in metrics[stage] for stage in STAGES)]
    header = ["Metric"] + [s.upper() for s in STAGES]
    def cell(stage, row):  # nanochat's figure beside Chimera's where they differ on purpose
        nanochat = metrics[stage].get(f"{row} (nanochat)")
        return str(metrics[stage].get(row, "-")) + (f" (nanochat: {nanochat})" if nanochat else "")
    table = [header] + [[r] + [cell(s, r) for s in STAGES] for r in rows]
    widths = [max(8, *map(len, column)) for column in zip(*table)]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    averaged = [f"{s.upper()}: {', '.join(m for m in CHAT_METRICS[:-1] if m in metrics[s])}"
                for s in STAGES if "ChatCORE" in metrics[s]]
    note = f"\nChatCORE averaged the tasks shown: {'; '.join(averaged)}.\n" if averaged else ""
    if any(f in metrics[s] for s in STAGES for f in NANOCHAT_FIGURES):
        note += ("\n(nanochat: x) is nanochat's own figure where Chimera scores a task otherwise on purpose "
                 "(README: where Chimera and nanochat differ).\n")
    return "\n".join(lines) + "\n" + note


# Header: git, hardware, versions
def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def chimera_header(started):
    """Our header: when the Chimera run started (a datetime or None), code, hardware, versions."""
    import torch
    dirty = " (with local changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    memory = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"  # Linux, macOS
    facts = {"Code": {"Chimera commit": (git("rev-parse", "--short", "HEAD") or "unknown") + dirty,
                      "Branch": git("rev-parse", "--abbrev-ref", "HEAD") or "unknown"},
             "Hardware": {"Platform": f"{platform.system()} {platform.machine()}", "CPUs": os.cpu_count(),
                          "Memory": memory, "GPUs": f"{len(gpus)} x {gpus[0]}" if gpus else "none"},
             "Software": {"Python": platform.python_version(), **{
                 name: __import__(name).__version__ for name in ("torch", "numpy", "tiktoken", "requests")}}}
    lines = ["## Chimera post-training", ""] + ([f"Run started: {started:%Y-%m-%d %H:%M:%S}", ""] if started else [])
    for title, info in facts.items():
        lines += [f"### {title}"] + [f"- {k}: {v}" for k, v in info.items()] + [""]
    return "\n".join(lines) + "\n"


# SVG charts, hand-written: a few lines on shared axes
def svg_chart(title, series, width=460, height=220):
    """series: {label: [(x, y), ...]} -> an <svg> line chart with min/max axis labels."""
    series = {k: p for k, v in series.items()  # NaN and infinities are not drawn
              if (p := [(float(x), float(y)) for x, y in v if math.isfinite(x) and math.isfinite(y)])}
    if not series:
        return ""
    xs, ys = zip(*(p for v in series.values() for p in v))
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    left, right, top, bottom = 52, 12, 28, 34
    pw, ph = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="16" font-size="13">{html.escape(title)}</text>',
             f'<polyline points="{left},{top} {left},{top + ph} {left + pw},{top + ph}" fill="none" stroke="#444"/>',
             *(f'<text x="{x}" y="{y}" text-anchor="{anchor}">{text}</text>' for x, y, anchor, text in (
                 (left - 4, top + 4, "end", f"{y1:.3g}"), (left - 4, top + ph, "end", f"{y0:.3g}"),
                 (left, top + ph + 14, "middle", f"{x0:.3g}"), (left + pw, top + ph + 14, "middle", f"{x1:.3g}"),
                 (left + pw / 2, height - 4, "middle", "step")))]
    for i, (label, points) in enumerate(series.items()):
        pixels = [(f"{left + (x - x0) / (x1 - x0) * pw:.1f}", f"{top + (1 - (y - y0) / (y1 - y0)) * ph:.1f}")
                  for x, y in points]  # data to pixels
        color, path = COLORS[i % len(COLORS)], " ".join(map(",".join, pixels))
        # a one-point polyline draws nothing; the legend sits in the title row, so it never covers the curves
        parts += [f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>',
                  f'<text x="{width - right - 90 * (len(series) - 1 - i)}" y="16" text-anchor="end" '
                  f'fill="{color}">{html.escape(label)}</text>']
        parts += [f'<circle cx="{x}" cy="{y}" r="2" fill="{color}"/>' for x, y in pixels if len(pixels) <= 40]
    return "".join(parts) + "</svg>"


def read_metrics(source):
    """The rows with a step of metrics.jsonl in a source's default model directory ("sft", "dpo"), [] if
    none; a torn last line from a killed run is skipped, the rest still charts."""
    from checkpoint import checkpoint_dir_for
    rows = []
    try:
        with open(os.path.join(checkpoint_dir_for(source), "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    rows.append(json.loads(line))
    except (UserError, OSError):
        return []
    return [row for row in rows if isinstance(row, dict) and isinstance(row.get("step"), (int, float))]


def series(rows, key):
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def charts(directory):
    """Write the SFT and DPO training charts as .svg files into `directory`; return their image links."""
    sft, dpo = read_metrics("sft"), read_metrics("dpo")
    val = sorted({k for r in sft for k in r if k.startswith("val_loss/")})
    lines = {"SFT loss": {"train": series(sft, "loss"), **{f"val ({k.split('/')[1]})": series(sft, k) for k in val}}}
    for title, key in (("DPO loss", "loss"), ("DPO reward margin", "rewards/margins"),
                       ("DPO reward accuracy", "rewards/accuracies")):
        lines[title] = {"train": series(dpo, key), "held-out": series(dpo, f"eval/{key}")}
    links = []
    for title, svg in ((t, svg_chart(t, s)) for t, s in lines.items()):
        if svg:  # '' when there is nothing to draw
            name = title.lower().replace(" ", "-") + ".svg"
            atomic_write_text(os.path.join(directory, name), svg + "\n")
            links.append(f"![{title}]({name})")
    return ("## Training curves\n\n" + "\n\n".join(links) + "\n\n") if links else ""


# Commands
def read_section(directory, name):
    """A section's text with `<` escaped (Markdown goes in, raw HTML never does); None if missing."""
    with contextlib.suppress(FileNotFoundError), open(os.path.join(directory, name), encoding="utf-8") as f:
        return f.read().replace("<", "&lt;")
    return None


def generate(out_copy=True):
    directory = os.path.join(get_base_dir(), "report")
    os.makedirs(directory, exist_ok=True)
    nanochat = read_section(directory, HEADER) or ""  # nanochat's own header, as it is
    started = section_timestamp(read_section(directory, CHIMERA_HEADER) or "", "Run started:")
    start, end = section_timestamp(nanochat, "Run started:") or started, None
    bloat = (re.search(r"### Bloat\n(.*?)\n\n", nanochat, re.DOTALL) or [None, ""])[1]
    parts = [nanochat.rstrip() + "\n\n" if nanochat else "# Chimera training report\n\n", chimera_header(started)]
    metrics, notes = {stage: {} for stage in STAGES}, []
    for name in EXPECTED_FILES:
        text = read_section(directory, name)
        if text is None:
            notes.append(name)
            continue
        if name not in RL_FILES:  # nanochat leaves experimental RL out of the wall clock too
            end = section_timestamp(text, "timestamp:") or end
        if stage := SECTION_STAGE.get(name):
            metrics[stage] = section_metrics(text, ["CORE"] if stage == "base" else
                                             CHAT_METRICS + NANOCHAT_FIGURES + PERSONA_METRICS)
        parts.append(text.rstrip() + "\n\n")
    seconds = int((end - start).total_seconds()) if start and end and end >= start else None
    clock = f"{seconds // 3600}h{seconds % 3600 // 60}m" if seconds is not None else "unknown"
    missing = f"\nSections not found (stage not run, skipped): {', '.join(notes)}\n" if notes else ""
    parts += [charts(directory), "## Summary\n\n", bloat + "\n\n" if bloat else "", summary_table(metrics) + "\n",
              f"Total wall clock time: {clock}\n", missing]
    text, report_file = "".join(parts), os.path.join(directory, "chimera-report.md")
    atomic_write_text(report_file, text)
    print(f"wrote {report_file}" + (f" ({len(notes)} sections missing: {', '.join(notes)})" if notes else ""))
    if out_copy and os.path.abspath(os.getcwd()) != os.path.abspath(directory):
        here = os.path.relpath(directory)  # the copy's chart links point into the report directory
        atomic_write_text("report.md", re.sub(r"^(!\[.*?\]\()(.*?\.svg\))$", lambda m: m[1] + os.path.join(here, m[2]),
                                              text, flags=re.M))
        print("copied report.md to the current directory")
    return report_file


def reset(everything=False):
    """Clear Chimera's sections (all sections with everything=True) and note the start."""
    directory = os.path.join(get_base_dir(), "report")
    os.makedirs(directory, exist_ok=True)
    names = CHIMERA_FILES + [f"chimera-chat-evaluation-{s}.json" for s in ("sft", "dpo")] + ["chimera-report.md"]
    if everything:
        names += NANOCHAT_FILES + RL_FILES + [HEADER, "chat-evaluation-mid.json"]
    names += [n for n in os.listdir(directory) if n.endswith(".svg")]  # the charts
    removed = [n for n in names if os.path.exists(os.path.join(directory, n))]
    for n in removed:
        os.remove(os.path.join(directory, n))
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    atomic_write_text(os.path.join(directory, CHIMERA_HEADER), f"Run started: {now}\n")
    print(f"reset {directory}: removed {len(removed)} file(s)" + ("" if everything else "; nanochat's sections kept"))


def main():
    argv = sys.argv[1:]
    if argv in (["-h"], ["--help"]):
        return print(__doc__.strip() + "\n\n" + about("__main__")[1])
    if argv not in (["generate"], ["reset"], ["reset", "--all"]):
        raise UserError("usage: python report.py generate | reset [--all]")
    generate() if argv[0] == "generate" else reset(everything=argv[1:] == ["--all"])


if __name__ == "__main__":
    run_main(main)
