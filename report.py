"""
The training report card, nanochat-compatible, with a DPO column.

    python report.py reset           # start a run: clear Chimera's sections, note the start time
    python report.py reset --all     # also clear nanochat's sections (tokenizer, base, mid, ...)
    python report.py generate        # assemble report/*.md into report/chimera-report.md (+ report.md in the cwd)
    python report.py --help          # this text

Each Chimera stage writes its section with write_report_section. `generate` orders the sections as nanochat does,
Chimera's after SFT, with a header (git, hardware, versions), training charts (.svg files beside the report,
linked as images), a summary table BASE/MID/SFT/DPO/RL and a few held-out prompts with the SFT and DPO answers.
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
# eval.py's persona rows, each without and with the persona's system message. The DPO reward and judge rows are
# measured against each checkpoint's own reference (the one it was trained from): listed apart, never side by side
PERSONA_METRICS, AGAINST_REFERENCE = ([f"{name} ({cond})" for name in names for cond in ("no system", "with system")]
                                      for names in (("Trader SFT held-out loss", "Persona preference accuracy"),
                                                    ("DPO reward accuracy", "DPO reward margin", "Judge win rate",
                                                     "Answer length", "Reference answer length")))
PERSONA_METRICS.append("Identity probe score")
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]  # the charts' series, in order
ANSWER_CHARS = 300  # where an answer shown side by side is cut
PAIRS_KEY = "On-policy pairs (onpolicy.py)"  # eval.py's line of a DPO round's pairs: kept, rejected, the judge's cost

# Writing a section (each stage, rank 0)
def write_report_section(section, data, report_dir=None):
    """report/chimera-<slug>.md in nanochat's Report.log format (`## section`, a timestamp, `- key: value`
    lines), so both reports read it; the prefix keeps nanochat's own files untouched. `data`: dicts, whose
    unset values (None, "") are left out, and strings."""
    if not is_master():
        return None
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if type(v) is int and v >= 10000 else str(v)
    out = [f"## {section}\n", f"timestamp: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}\n\n"]
    for item in filter(None, data):
        out += [item] if isinstance(item, str) else [f"- {k}: {fmt(v)}\n" for k, v in item.items()
                                                     if v not in (None, "")]
    name = "chimera-" + section.lower().replace(" ", "-") + ".md"
    path = os.path.join(report_dir or os.path.join(get_base_dir(), "report"), name)
    atomic_write_text(path, "".join(out) + "\n")
    return path

# Reading sections
def section_metrics(text, names):
    """{name: value} of `- name: value` lines (also `name metric`/`name accuracy`, nanochat's CORE, ChatCORE)."""
    out = {}
    for key, value in re.findall(r"^-\s+(.+?)[ \t]*:[ \t]*(.*)$", text, flags=re.M):
        out.update({name: value.strip() for name in names if key in (name, f"{name} metric", f"{name} accuracy")})
    return out

def section_timestamp(text, prefix):
    m = re.search(f"^{re.escape(prefix)}(.*)$", text, flags=re.M)
    with contextlib.suppress(ValueError):  # a malformed time is no time
        return datetime.datetime.strptime(m[1].strip(), "%Y-%m-%d %H:%M:%S") if m else None
    return None

def markdown_table(rows):
    widths = [max(8, *map(len, column)) for column in zip(*rows)]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines[:1] + ["|" + "|".join("-" * (w + 2) for w in widths) + "|"] + lines[1:]) + "\n"

def summary_table(metrics):
    """{stage: {metric: value}} as a table, a row per metric measured alike in every column, '-' where missing;
    which tasks each ChatCORE averaged (nanochat computes it only when all ran); then, per stage, the rows
    measured against its own reference."""
    rows = [m for m in ["CORE"] + CHAT_METRICS[:-1] + PERSONA_METRICS + ["ChatCORE"]
            if any(m in metrics[stage] for stage in STAGES)]
    def cell(stage, row):  # nanochat's own figure beside Chimera's where they differ on purpose
        nanochat = metrics[stage].get(f"{row} (nanochat)")
        return metrics[stage].get(row, "-") + (f" (nanochat: {nanochat.split(' (')[0]})" if nanochat else "")
    table = [["Metric"] + [s.upper() for s in STAGES]] + [[r] + [cell(s, r) for s in STAGES] for r in rows]
    text = markdown_table(table)
    averaged = [f"{s.upper()}: {', '.join(m for m in CHAT_METRICS[:-1] if m in metrics[s])}"
                for s in STAGES if "ChatCORE" in metrics[s]]
    text += f"\nChatCORE averaged the tasks shown: {'; '.join(averaged)}.\n" if averaged else ""
    if any(f in metrics[s] for s in STAGES for f in NANOCHAT_FIGURES):
        text += ("\n(nanochat: x) is nanochat's own figure where Chimera scores a task otherwise on purpose "
                 "(README: where Chimera and nanochat differ).\n")
    against = [f"- {s.upper()}\n" + "".join(f"  - {m}: {metrics[s][m]}\n" for m in AGAINST_REFERENCE if m in metrics[s])
               for s in STAGES if any(m in metrics[s] for m in AGAINST_REFERENCE)]
    return text + ("\nMeasured against the checkpoint each was trained from, so not comparable between "
                   "checkpoints:\n\n" + "".join(against) if against else "")

def round_files(directory, section="chat-evaluation-dpo"):
    """[(round, its section file)]: 0, DPO on gen.py's pairs, then the on-policy rounds' (by tag, d<N>_r<k>)."""
    rounds = [(int(m[1]), n) for n in os.listdir(directory)
              if (m := re.fullmatch(rf"chimera-{section}-.+_r(\d+)\.md", n))]
    return [(0, f"chimera-{section}.md")] + sorted(rounds)

def rounds_table(directory):
    """A row per DPO round from eval.py's sections: the judge's win rate against SFT with no system message (as
    onpolicy.py samples), the mean answer lengths beside it (judges favour length), the judge's pairs and cost."""
    names = [f"{m} (no system)" for m in ("Judge win rate", "Answer length", "Reference answer length")]
    rows = [["Round", "Judge win rate vs SFT", "Answer length", "SFT's", PAIRS_KEY]]
    for k, name in round_files(directory):
        found = section_metrics(read_section(directory, name) or "", names + [PAIRS_KEY])
        win, length, sft, pairs = (found.get(n, "-") for n in names + [PAIRS_KEY])
        win = re.sub(r" verdicts.*", ")", win).replace(" (no)", "")  # "0.6250 (5 of 8)"
        rows.append([f"{k} ({name[28:-3]})" if k else "0 (gen.py's pairs)", win, length.split(" (")[0],
                     sft.split(" (")[0], pairs])
    return f"## DPO rounds\n\n{markdown_table(rows)}\n" if len(rows) > 2 else ""

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

# SVG charts, hand-written: training as a line, the held-out evaluations as marked points
def ticks(lo, hi, whole=False):
    """Round axis values, 1, 2 or 5 x 10^k apart (about five steps), from lo to hi (a hair past a value counts as
    on it: a margin of -1e-6 does not stretch the axis a step down), and the decimals they need."""
    lo, hi = (lo - (abs(lo) / 10 or 1), hi + (abs(hi) / 10 or 1)) if hi == lo else (lo, hi)
    step = 10 ** math.floor(math.log10((hi - lo) / 5))
    step = max(next(m * step for m in (1, 2, 5, 10) if m * step * 5 >= hi - lo), 1 if whole else 0)
    first = math.floor(lo / step + 0.01)
    values = [(first + i) * step for i in range(math.ceil(hi / step - 0.01) - first + 1)]
    return values, max(0, -math.floor(math.log10(step) + 1e-9))

def svg_chart(title, series, y_span=(), width=460, height=220):
    """series: {label: [(x, y), ...]} -> an <svg> chart on round axes that take in y_span: "train" a line, the
    others (held-out evaluations) marked points, labelled with their values when there are a few."""
    series = {k: p for k, v in series.items()  # NaN and infinities are not drawn
              if (p := [(float(x), float(y)) for x, y in v if math.isfinite(x) and math.isfinite(y)])}
    if not series:
        return ""
    xs, ys = zip(*(p for v in series.values() for p in v))
    (x_ticks, _), (y_ticks, digits) = ticks(min(xs), max(xs), whole=True), ticks(min(ys + y_span), max(ys + y_span))
    left, right, top, bottom = 52, 12, 28, 34
    pw, ph = width - left - right, height - top - bottom
    px = lambda x: left + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * pw
    py = lambda y: top + (y_ticks[-1] - y) / (y_ticks[-1] - y_ticks[0]) * ph
    text = lambda x, y, s, anchor="middle", color="black": (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" '
                                                            f'fill="{color}">{html.escape(s)}</text>')
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>', text(left, 16, title, "start"),
             *(f'<line x1="{left}" x2="{left + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>'
               + text(left - 4, py(y) + 4, f"{round(y, digits) + 0.0:.{digits}f}", "end") for y in y_ticks),
             *(text(px(x), top + ph + 14, f"{x:.0f}") for x in x_ticks), text(left + pw / 2, height - 4, "step")]
    for i, (label, points) in enumerate(series.items()):
        color, pixels = COLORS[i % len(COLORS)], [(px(x), py(y)) for x, y in points]
        if label == "train":  # every step: a line, its points dotted when they are few enough to see
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pixels)
            parts += [f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>']
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{2 if label == "train" else 4}" fill="{color}"/>'
                  for x, y in pixels if label != "train" or len(pixels) <= 40]
        # a few: each with its value, above it (below at the top), inside the plot, two decimals past the axis's
        parts += [text(min(max(x, left + 16), left + pw - 16), y + 15 if y < top + 12 else y - 7,
                       f"{round(v, digits + 2) + 0.0:.{digits + 2}f}", color=color)
                  for (x, y), (_, v) in zip(pixels, points) if label != "train" and len(points) <= 6]
        # the legend sits in the title row, so it never covers the data
        parts.append(text(width - right - 90 * (len(series) - 1 - i), 16, label, "end", color))
    return "".join(parts) + "</svg>"

def read_metrics(source):
    """The rows with a step of metrics.jsonl in a source's default model directory ("sft", "dpo"), [] if
    none; a torn last line from a killed run is skipped, the rest still charts."""
    from checkpoint import checkpoint_dir_for
    rows = []
    with contextlib.suppress(UserError, OSError), open(os.path.join(re.sub(  # round 0's, as the summary's column
            r"_r\d+$", "", checkpoint_dir_for(source)), "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return [row for row in rows if isinstance(row, dict) and isinstance(row.get("step"), (int, float))]

def charts(directory):
    """Write the SFT and DPO training charts as .svg files into `directory`; return their image links."""
    sft, dpo = read_metrics("sft"), read_metrics("dpo")
    series = lambda rows, key, after=-1: [(r["step"], r[key]) for r in rows
                                          if isinstance(r.get(key), (int, float)) and r["step"] > after]
    val = sorted({k for r in sft for k in r if k.startswith("val_loss/")})
    lines = {"SFT loss": {"train": series(sft, "loss"), **{f"val ({k[9:]})": series(sft, k) for k in val}}}
    for title, key in (("DPO loss", "loss"), ("DPO reward margin", "rewards/margins"),
                       ("DPO reward accuracy", "rewards/accuracies")):
        # at step 0 the policy is its reference: every margin is 0 but for rounding, the accuracy undefined
        held_out = series(dpo, f"eval/{key}", after=0 if key == "rewards/accuracies" else -1)
        lines[title] = {"train": series(dpo, key), "held-out": held_out}
    links = []
    for title, lines_of in lines.items():
        if svg := svg_chart(title, lines_of, (0, 1) if "accuracy" in title else ()):  # '' when there is nothing
            name = title.lower().replace(" ", "-") + ".svg"
            atomic_write_text(os.path.join(directory, name), svg + "\n")
            links.append(f"![{title}]({name})")
    note = "\n\nThe held-out reward accuracy at step 0 is undefined (the policy is its reference) and not drawn."
    return ("## Training curves\n\n" + "\n\n".join(links) + note * any("accuracy" in l for l in links) + "\n\n"
            if links else "")

def answers_side_by_side(directory):
    """A few held-out prompts with the SFT and DPO answers that eval.py keeps in its json, a table row each: a cell
    is one line, cut at a word, with no HTML or column break of its own."""
    answers = {}
    for stage in ("sft", "dpo"):
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError), open(os.path.join(
                directory, f"chimera-chat-evaluation-{stage}.json"), encoding="utf-8") as f:
            answers[stage.upper()] = dict(json.load(f).get("answers") or {})
    prompts = list(dict.fromkeys(p for by_prompt in answers.values() for p in by_prompt))
    cut = lambda text: text if len(text) <= ANSWER_CHARS else text[:ANSWER_CHARS].rsplit(" ", 1)[0] + " …"
    cell = lambda text: html.escape(cut(" ".join(str(text).split())) or "(empty)", quote=False).replace("|", "\\|")
    table = [["Prompt", *answers]] + [[cell(p), *(cell(a.get(p, "-")) for a in answers.values())] for p in prompts]
    return (f"## Answers side by side\n\nHeld-out prompts and each checkpoint's answer (no system message, as "
            f"eval.py sampled it), cut at {ANSWER_CHARS} characters:\n\n{markdown_table(table)}\n" if prompts else "")

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
    rounds = sorted((k, n) for s in ("chat-dpo", "chat-evaluation-dpo") for k, n in round_files(directory, s) if k)
    for name in EXPECTED_FILES + [n for _, n in rounds]:  # the on-policy rounds' last: no column of the summary
        text = read_section(directory, name)
        if text is None:
            notes.append(name)
            continue
        if name not in RL_FILES:  # nanochat leaves experimental RL out of the wall clock too
            end = section_timestamp(text, "timestamp:") or end
        if stage := SECTION_STAGE.get(name):
            metrics[stage] = section_metrics(text, ["CORE"] if stage == "base" else
                                             CHAT_METRICS + NANOCHAT_FIGURES + PERSONA_METRICS + AGAINST_REFERENCE)
        parts.append(text.rstrip() + "\n\n")
    seconds = int((end - start).total_seconds()) if start and end and end >= start else None
    clock = f"{seconds // 3600}h{seconds % 3600 // 60}m" if seconds is not None else "unknown"
    missing = f"\nSections not found (stage not run, skipped): {', '.join(notes)}\n" if notes else ""
    parts += [charts(directory), "## Summary\n\n", bloat + "\n\n" if bloat else "", summary_table(metrics) + "\n",
              rounds_table(directory),
              f"Total wall clock time: {clock}\n", missing, "\n" + answers_side_by_side(directory)]
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
    names += [n for n in os.listdir(directory) if n.endswith(".svg")]  # the charts, the DPO rounds' evaluations
    names += [n[:-3] + ext for s in ("chat-dpo", "chat-evaluation-dpo") for k, n in round_files(directory, s) if k
              for ext in (".md", ".json")]
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
