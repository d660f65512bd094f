"""
The training report card, nanochat-compatible, with a DPO column.

    python report.py reset           # start a run: clear Chimera's sections, note the start time
    python report.py reset --all     # also clear nanochat's sections (tokenizer, base, mid, ...)
    python report.py generate        # assemble report/*.md into report.md (+ a copy in the cwd)

Each stage writes one section to $NANOCHAT_BASE_DIR/report/<slug>.md (nanochat's format:
`## Title`, `timestamp: ...`, `- key: value` lines). `generate` puts them in nanochat's
order with Chimera's synthetic-data, DPO and DPO-evaluation sections after SFT, adds a
header (git commit, hardware, versions), SVG charts of the stages' metrics.jsonl (files
beside report.md, linked as images), and a summary table with columns BASE, MID, SFT, DPO,
RL. Section text goes in with its `<` escaped, so no raw HTML from a section reaches report.md.
"""

import datetime
import html
import json
import math
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass

from common import UserError, atomic_write_text, get_base_dir, parse_config, run_main

# nanochat's sections in its order, with Chimera's inserted after the SFT ones
NANOCHAT_FILES = ["tokenizer-training.md", "tokenizer-evaluation.md", "base-model-training.md",
                  "base-model-loss.md", "base-model-evaluation.md", "midtraining.md", "chat-evaluation-mid.md"]
CHIMERA_FILES = ["synthetic-data.md", "chat-sft.md", "chat-evaluation-sft.md", "chat-dpo.md",
                 "chat-evaluation-dpo.md"]
RL_FILES = ["chat-rl.md", "chat-evaluation-rl.md"]
EXPECTED_FILES = NANOCHAT_FILES + CHIMERA_FILES + RL_FILES
HEADER = "header.md"  # nanochat's run header (written by nanochat's `report reset`)
CHIMERA_HEADER = "chimera-header.md"  # ours: when the Chimera run started

STAGES = ["base", "mid", "sft", "dpo", "rl"]
STAGE_SECTIONS = {"base": "base-model-evaluation.md", "mid": "chat-evaluation-mid.md",
                  "sft": "chat-evaluation-sft.md", "dpo": "chat-evaluation-dpo.md", "rl": "chat-evaluation-rl.md"}
CHAT_METRICS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]
# eval.py's persona rows, each without and with the persona's system message
PERSONA_METRICS = [f"{name} ({cond})" for name in ("Trader SFT held-out loss", "Persona preference accuracy",
                                                   "DPO reward accuracy", "DPO reward margin", "Judge win rate")
                   for cond in ("no system", "with system")] + ["Identity probe score"]


@dataclass
class Config:
    all: bool = False  # reset: also clear nanochat's own sections


def report_dir():
    return os.path.join(get_base_dir(), "report")


# -----------------------------------------------------------------------------
# Reading sections


def section_metrics(text, names):
    """{name: value} for `- name: value` lines (also `name metric`/`name accuracy`, as
    nanochat labels CORE and ChatCORE); the last line wins, as in nanochat."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^-\s+(.+?):\s*(.*)$", line)
        if not m:
            continue
        key, value = m.group(1).strip(), m.group(2).strip()
        for name in names:
            if key in (name, f"{name} metric", f"{name} accuracy"):
                out[name] = value
    return out


def section_timestamp(text, prefix):
    for line in text.splitlines():
        if line.startswith(prefix):
            try:
                return datetime.datetime.strptime(line[len(prefix):].strip(), "%Y-%m-%d %H:%M:%S")
            except ValueError:
                return None
    return None


def summary_table(metrics):
    """Markdown table: one row per metric, one column per stage, '-' where missing; then
    which tasks each stage's ChatCORE averaged (nanochat computes it only when all ran)."""
    rows = [m for m in ["CORE"] + CHAT_METRICS[:-1] + PERSONA_METRICS + ["ChatCORE"]
            if any(m in metrics.get(stage, {}) for stage in STAGES)]
    width = max([len("Metric")] + [len(r) for r in rows])
    cell = max([8] + [len(str(v)) for s in metrics.values() for v in s.values()])
    lines = ["| " + "Metric".ljust(width) + " | " + " | ".join(s.upper().ljust(cell) for s in STAGES) + " |",
             "|" + "-" * (width + 2) + "|" + "|".join("-" * (cell + 2) for _ in STAGES) + "|"]
    for r in rows:
        values = [str(metrics.get(s, {}).get(r, "-")).ljust(cell) for s in STAGES]
        lines.append("| " + r.ljust(width) + " | " + " | ".join(values) + " |")
    averaged = [f"{s.upper()}: {', '.join(m for m in CHAT_METRICS[:-1] if m in metrics[s])}"
                for s in STAGES if "ChatCORE" in metrics.get(s, {})]
    note = f"\nChatCORE averaged the tasks shown: {'; '.join(averaged)}.\n" if averaged else ""
    return "\n".join(lines) + "\n" + note


# -----------------------------------------------------------------------------
# Header: git, hardware, versions


def git_info():
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"Chimera commit": commit + (" (with local changes)" if dirty else ""),
            "Branch": git("rev-parse", "--abbrev-ref", "HEAD") or "unknown"}


def hardware_info():
    info = {"Platform": f"{platform.system()} {platform.machine()}", "CPUs": os.cpu_count()}
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
        info["Memory"] = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import torch
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["GPUs"] = f"{len(names)} x {names[0]}"
        else:
            info["GPUs"] = "none"
    except ImportError:
        pass
    return info


def software_info():
    info = {"Python": platform.python_version()}
    for name in ("torch", "numpy", "tiktoken", "requests"):
        try:
            info[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            info[name] = "missing"
    return info


def chimera_header(started):
    lines = ["## Chimera post-training", ""]
    if started:
        lines += [f"Run started: {started}", ""]
    for title, info in (("Code", git_info()), ("Hardware", hardware_info()), ("Software", software_info())):
        lines += [f"### {title}"] + [f"- {k}: {v}" for k, v in info.items()] + [""]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# SVG charts, hand-written: a few lines on shared axes


COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def _fmt(v):
    return f"{v:.3g}"


def svg_chart(title, series, width=460, height=220):
    """series: {label: [(x, y), ...]} -> an <svg> line chart with min/max axis labels."""
    series = {k: [(float(x), float(y)) for x, y in v if math.isfinite(x) and math.isfinite(y)]  # no NaN/inf
              for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""
    xs = [x for v in series.values() for x, _ in v]
    ys = [y for v in series.values() for _, y in v]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    left, right, top, bottom = 52, 12, 28, 34
    pw, ph = width - left - right, height - top - bottom

    def px(x):
        return left + (x - x0) / (x1 - x0) * pw

    def py(y):
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="16" font-size="13">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#444"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#444"/>',
             f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{_fmt(y1)}</text>',
             f'<text x="{left - 4}" y="{top + ph}" text-anchor="end">{_fmt(y0)}</text>',
             f'<text x="{left}" y="{top + ph + 14}" text-anchor="middle">{_fmt(x0)}</text>',
             f'<text x="{left + pw}" y="{top + ph + 14}" text-anchor="middle">{_fmt(x1)}</text>',
             f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">step</text>']
    for i, (label, points) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        if len(points) > 1:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2" fill="{color}"/>'
                  for x, y in points if len(points) <= 40]
        # legend in the title row, right-aligned, so it never covers the curves
        parts.append(f'<text x="{width - right - 90 * (len(series) - 1 - i)}" y="16" text-anchor="end" '
                     f'fill="{color}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def read_metrics(source_dir):
    """The rows of metrics.jsonl in the largest model tag of a checkpoints directory."""
    root = os.path.join(get_base_dir(), source_dir)
    if not os.path.isdir(root):
        return []
    from model import find_largest_model
    try:
        path = os.path.join(root, find_largest_model(root), "metrics.jsonl")
    except UserError:
        return []
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run: the rest still charts
    return rows


def series(rows, key):
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and isinstance(r["step"], (int, float))]


def charts(directory):
    """Write the SFT and DPO training charts as .svg files into `directory`; the Markdown
    that shows them (image links, which every Markdown viewer renders), or ''."""
    out = {}
    sft = read_metrics("chatsft_checkpoints")
    if sft:
        val = {k: series(sft, k) for k in sorted({k for r in sft for k in r if k.startswith("val_loss/")})}
        out["SFT loss"] = svg_chart("SFT loss", {"train": series(sft, "loss"),
                                                 **{f"val ({k.split('/')[1]})": v for k, v in val.items()}})
    dpo = read_metrics("chatdpo_checkpoints")
    for title, key in (("DPO loss", "loss"), ("DPO reward margin", "rewards/margins"),
                       ("DPO reward accuracy", "rewards/accuracies")):
        if dpo:
            out[title] = svg_chart(title, {"train": series(dpo, key), "held-out": series(dpo, f"eval/{key}")})
    links = []
    for title, svg in out.items():
        if svg:
            name = title.lower().replace(" ", "-") + ".svg"
            atomic_write_text(os.path.join(directory, name), svg + "\n")
            links.append(f"![{title}]({name})")
    return ("## Training curves\n\n" + "\n\n".join(links) + "\n\n") if links else ""


# -----------------------------------------------------------------------------
# Commands


def generate(out_copy=True):
    directory = report_dir()
    os.makedirs(directory, exist_ok=True)
    parts, metrics, notes = [], {}, []
    start = end = None
    header_path = os.path.join(directory, HEADER)
    bloat = ""
    if os.path.exists(header_path):  # nanochat's own header, as it is
        text = open(header_path, encoding="utf-8").read().replace("<", "&lt;")
        parts.append(text.rstrip() + "\n\n")
        start = section_timestamp(text, "Run started:")
        m = re.search(r"### Bloat\n(.*?)\n\n", text, re.DOTALL)
        bloat = m.group(1) if m else ""
    ours = os.path.join(directory, CHIMERA_HEADER)
    started = None
    if os.path.exists(ours):
        started_at = section_timestamp(open(ours, encoding="utf-8").read(), "Run started:")
        started = started_at.strftime("%Y-%m-%d %H:%M:%S") if started_at else None
        start = start or started_at
    if not parts:
        parts.append("# Chimera training report\n\n")
    parts.append(chimera_header(started))
    for name in EXPECTED_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            notes.append(name)
            continue
        text = open(path, encoding="utf-8").read().replace("<", "&lt;")  # Markdown, never raw HTML
        if name not in RL_FILES:  # nanochat leaves experimental RL out of the wall clock too
            end = section_timestamp(text, "timestamp:") or end
        for stage, section_file in STAGE_SECTIONS.items():
            if name == section_file:
                wanted = ["CORE"] if stage == "base" else CHAT_METRICS + PERSONA_METRICS
                metrics[stage] = section_metrics(text, wanted)
        parts.append(text.rstrip() + "\n\n")
    parts.append(charts(directory))
    summary = ["## Summary\n\n"]
    if bloat:
        summary.append(bloat + "\n\n")
    summary.append(summary_table(metrics) + "\n")
    if start and end and end >= start:
        seconds = int((end - start).total_seconds())
        summary.append(f"Total wall clock time: {seconds // 3600}h{(seconds % 3600) // 60}m\n")
    else:
        summary.append("Total wall clock time: unknown\n")
    if notes:
        summary.append("\nSections not found (stage not run, skipped): " + ", ".join(notes) + "\n")
    text = "".join(parts + summary)
    report_file = os.path.join(directory, "report.md")
    atomic_write_text(report_file, text)
    print(f"wrote {report_file}" + (f" ({len(notes)} sections missing: {', '.join(notes)})" if notes else ""))
    if out_copy and os.path.abspath(os.getcwd()) != os.path.abspath(directory):
        here = os.path.relpath(directory)  # the copy's chart links point into the report directory
        atomic_write_text("report.md", re.sub(r"^!\[(.*?)\]\((.*?\.svg)\)$", lambda m: f"![{m.group(1)}]("
                                              f"{os.path.join(here, m.group(2))})", text, flags=re.M))
        print("copied report.md to the current directory")
    return report_file


def reset(everything=False):
    """Clear Chimera's sections (all sections with everything=True) and note the start."""
    directory = report_dir()
    os.makedirs(directory, exist_ok=True)
    names = CHIMERA_FILES + ["chat-evaluation-sft.json", "chat-evaluation-dpo.json", "report.md", CHIMERA_HEADER]
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
    if not argv or argv[0] not in ("generate", "reset"):
        raise UserError("usage: python report.py generate | reset [--all]")
    c = parse_config(Config, argv[1:])
    if argv[0] == "generate":
        generate()
    else:
        reset(c.all)


if __name__ == "__main__":
    run_main(main)
