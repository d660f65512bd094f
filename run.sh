#!/usr/bin/env bash
# Chimera: the whole post-training pipeline in one command.
#
#   bash run.sh            (bash run.sh --help: this text)
#
# With a nanochat checkpoint in $NANOCHAT_BASE_DIR (default ~/.cache/nanochat): gen.py (needs OPENROUTER_API_KEY
# unless both data files exist) -> SFT on trader + SmolTalk from mid (2025 nanochat) if there is one, else base
# (2026 nanochat has no mid) -> DPO -> eval sft, eval dpo -> on-policy DPO rounds (each: onpolicy.py -> DPO -> eval)
# -> the report; nanochat's files are only read. It ends by printing the command that chats with the model it made
# (the last round's), and the report's path (a copy: report.md in the cwd).
# With no checkpoint and no OPENROUTER_API_KEY: an offline demo of the same on a tiny fresh model and data/.
#
# Environment:
#   NANOCHAT_BASE_DIR   nanochat's base dir (checkpoints, tokenizer, datasets, report)
#   OPENROUTER_API_KEY  for gen.py; OPENROUTER_MODELS picks the model(s)
#   NPROC_PER_NODE      processes per stage (default: the number of GPUs, 1 on CPU)
#   CHIMERA_START       mid|base|sft: SFT's start (default mid if present, else base, else nanochat's sft d<N>)
#   CHIMERA_FROM        a Hugging Face repo id: pull that nanochat model first (hub.py pull) and start from it;
#                       CHIMERA_FROM_ARGS adds pull flags (--revision=..., --source=...)
#   CHIMERA_DEMO=1      run the offline demo even when a checkpoint or key is present
#   CHIMERA_REDO=1      redo every stage instead of skipping the ones Chimera finished
#   SFT_EXAMPLES, DPO_EXAMPLES   how many conversations / pairs gen.py makes (5000 / 10000)
#   ONPOLICY_ROUNDS     rounds of on-policy DPO (1 with OPENROUTER_API_KEY, else 0 as in the demo): onpolicy.py pairs
#                       from the latest DPO model, DPO from it into chatdpo_checkpoints/d<N>_r<round> (README);
#                       a round that keeps no pairs ends them
#   SFT_EXTRA_ARGS, DPO_EXTRA_ARGS, EVAL_EXTRA_ARGS, ONPOLICY_EXTRA_ARGS   more --key=value flags for a stage (they win)
#   CHIMERA_DEMO_DIR, CHIMERA_DEMO_DEPTH   the demo's base dir (~/.cache/chimera-demo) and model depth (2, 128 wide)
#   CHIMERA_PYTHON      use this Python instead of the .venv that run.sh creates
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0;; esac
[ $# -eq 0 ] || { echo "run.sh takes no arguments; its settings are environment variables (bash run.sh --help)" >&2
                  exit 2; }
CALLER=$PWD  # report.md's copy goes here
cd "$(dirname "$0")"

say() { printf '\n=== %s ===\n' "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }
if command -v sha256sum >/dev/null; then SHA=(sha256sum); else SHA=(shasum -a 256); fi
step() {  # step NAME COMMAND...: run it, time it, stop the run if it fails
    local name=$1 t0=$SECONDS; shift; say "$name"
    "$@" || die "stage '$name' failed (exit $?). Fix the cause and run 'bash run.sh' again:" \
                "finished stages are skipped."
    printf '%s done in %ss\n' "$name" $((SECONDS - t0))
}
# stage NAME INPUT_FILE... -- OUTPUT_DIR... -- COMMAND...: skipped when its stamp (chimera/<stage>.stamp: command line,
# sha256 of its inputs and of the files it wrote) matches, so a re-run resumes and a change redoes what depends on it
stage() {
    local name=$1 ins=() outs=() stamp key written f; shift
    while [ "$1" != -- ]; do ins+=("$1"); shift; done; shift
    while [ "$1" != -- ]; do outs+=("$1"); shift; done; shift
    stamp=$STAMPS/$(printf %s "${name%% (*}" | tr -c 'A-Za-z0-9' _).stamp
    key=$(printf 'command:'; printf ' %q' "$@"; echo  # then a sha256 line per input file (missing ones say so)
          for f in ${ins[@]+"${ins[@]}"}; do if [ -f "$f" ]; then "${SHA[@]}" "$f"; else echo "missing $f"; fi; done)
    written=$(sed '1,/^outputs:$/d' "$stamp" 2>/dev/null || true)  # none: it wrote nothing (a pull found it all)
    if [ "${CHIMERA_REDO:-0}" != 1 ] && [ -s "$stamp" ] && [ "$(sed '/^outputs:$/,$d' "$stamp")" = "$key" ] &&
        { [ -z "$written" ] || "${SHA[@]}" -c --status <<<"$written" 2>/dev/null; }; then
        say "$name: finished before with these settings and inputs, skipped (CHIMERA_REDO=1 to redo)"; return
    fi
    rm -f "$stamp" && touch "$STAMPS/started" && FOR_NOW=
    [ "${CHIMERA_REDO:-0}" != 1 ] && [ "$(cat "$stamp.inputs" 2>/dev/null)" = "$(sed 1d <<<"$key")" ] ||
        for f in "${outs[@]}"; do [ ! -f "$f" ] || rm "$f"; done  # other inputs (not flags), or REDO: its output
    sed 1d <<<"$key" >"$stamp.inputs"  # files go, not topped up; a kill's, or a raised --max_cost's, are resumed
    step "$name" "$@"
    [ -z "$FOR_NOW" ] || { say "$name: not stamped ($FOR_NOW skipped for now): the next run redoes it"; return; }
    { printf '%s\noutputs:\n' "$key"  # then a sha256 line per file the stage wrote (but optimizer states)
      { find "${outs[@]}" -type f -newer "$STAMPS/started" ! -name 'optim_*' -print0 2>/dev/null || true; } |
          sort -z | xargs -0 -r "${SHA[@]}"; } >"$stamp.tmp" && mv "$stamp.tmp" "$stamp"
}
evaluate() {  # evaluate NAME SOURCE ARGS...: eval.py -i SOURCE, its json chimera-chat-evaluation-NAME.json; FOR_NOW
    launch eval.py -i "${@:2}" || return  # names what it skipped for now (not when offline)
    FOR_NOW=$("$PY" -c 'import json, sys; print(", ".join(json.load(open(sys.argv[1])).get("skipped_for_now", [])))' \
        "$REPORT_DIR/chimera-chat-evaluation-$1.json")
}

# Python environment: a venv beside the code, with the project installed into it
PY=${CHIMERA_PYTHON:-$PWD/.venv/bin/python}
if [ -z "${CHIMERA_PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    python3 -m venv .venv || die "could not create a virtual environment (python3 -m venv)"
fi
if ! "$PY" -c "import torch, numpy, requests, tiktoken" 2>/dev/null; then
    say "installing Chimera and its dependencies into .venv"
    "$PY" -m pip install -q --disable-pip-version-check -e . || die "pip install failed"
fi

STAMPS=
lock_base() {  # STAMPS: Chimera's record of the stages it finished in $BASE, and the lock of the run on it
    [ "${STAMPS:-}" != "$BASE/chimera" ] || return 0  # held since the pull
    STAMPS=$BASE/chimera && mkdir -p "$STAMPS"
    exec 9>>"$STAMPS/run.lock"  # locked on the open file, so held until this run and its stages have all exited
    "$PY" -c 'import fcntl; fcntl.flock(9, fcntl.LOCK_EX | fcntl.LOCK_NB)' 2>/dev/null ||
        die "another run.sh is running on $BASE ($(cat "$STAMPS/run.lock"), or a stage it started):" \
            "wait for it or stop it"
    echo "pid $$, started $(date '+%F %T')" >"$STAMPS/run.lock"
}

# Which run: real (a nanochat checkpoint is there) or the offline demo
BASE=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
if [ -n "${CHIMERA_FROM:-}" ]; then  # start from a published nanochat model: pull it into $BASE first
    lock_base
    # shellcheck disable=SC2086  # CHIMERA_FROM_ARGS: more pull flags (--revision=..., --source=...)
    stage "pull $CHIMERA_FROM (hub.py pull)" -- "$BASE"/{tokenizer,{base,mid,chatsft}_checkpoints} -- \
        "$PY" hub.py pull "$CHIMERA_FROM" ${CHIMERA_FROM_ARGS:-}
fi
latest() { { compgen -G "$1/model_*.pt" || true; } | sort | tail -n 1; }  # latest DIR: its newest step's model
# SFT's start as checkpoint.py decides it: START, START_DIR and TAG, nanochat's largest d<N> there ("" if none)
START_VARS=$("$PY" checkpoint.py start "$BASE" "${CHIMERA_START:-}") || die "$START_VARS"
eval "$START_VARS"

DEMO=${CHIMERA_DEMO:-0}
if [ "$DEMO" != 1 ] && [ -z "$TAG" ] && [ -n "${OPENROUTER_API_KEY:-}${CHIMERA_START:-}${CHIMERA_FROM:-}" ]; then
    die "no nanochat checkpoint in $START_DIR/d<N>. Train one with nanochat's speedrun.sh (or put a
published one there), set NANOCHAT_BASE_DIR to its base dir, or run the offline demo with CHIMERA_DEMO=1.${CHIMERA_FROM:+
If what was pulled from $CHIMERA_FROM was deleted since, remove $BASE/chimera/pull_*.stamp to pull it again.}"
elif [ -z "$TAG" ]; then DEMO=1
fi
ROUNDS=${ONPOLICY_ROUNDS:-$([ "$DEMO" != 1 ] && [ -n "${OPENROUTER_API_KEY:-}" ] && echo 1 || echo 0)}
[[ $ROUNDS =~ ^(0|[1-9][0-9]?)$ ]] || die "ONPOLICY_ROUNDS=$ROUNDS: expected a number of rounds from 0 to 99"
[ "$ROUNDS" = 0 ] || [ -n "${OPENROUTER_API_KEY:-}" ] || die "ONPOLICY_ROUNDS=$ROUNDS needs OPENROUTER_API_KEY"

if [ "$DEMO" = 1 ]; then
    BASE=${CHIMERA_DEMO_DIR:-$HOME/.cache/chimera-demo} DEMO_DEPTH=${CHIMERA_DEMO_DEPTH:-2}
    START=base START_DIR=$BASE/base_checkpoints TAG=d$DEMO_DEPTH
    printf '\n%s\n%s\n%s\n' \
        "OFFLINE DEMO: no nanochat checkpoint and no OPENROUTER_API_KEY, so the whole pipeline runs" \
        "on a tiny fresh model (byte-level tokenizer, random init) and the hand-written persona data in" \
        "data/, in its own base dir $BASE. Your checkpoints are not touched; a real run: README.md."
    export HF_HUB_OFFLINE=1  # the demo never fetches datasets: the chat benchmarks are skipped
fi
export NANOCHAT_BASE_DIR=$BASE
say "Chimera's SFT starts from $START_DIR/$TAG"
lock_base
mkdir -p "$BASE/datasets" "$BASE/report"
HEADER=$BASE/report/chimera-header.md  # when Chimera's first run here started: the report's wall clock (a new demo
[ -s "$HEADER" ] || echo "Run started: $(date '+%F %T')" >"$HEADER"  # model starts anew: report.reset)
SFT_DATA=$BASE/datasets/trader_sft_data.jsonl DPO_DATA=$BASE/datasets/trader_dpo_data.jsonl
SFT_TAG=chimera_$TAG  # Chimera's SFT beside nanochat's chatsft_checkpoints/d<N>, never in it
SFT_DIR=$BASE/chatsft_checkpoints/$SFT_TAG DPO_DIR=$BASE/chatdpo_checkpoints/$TAG REPORT_DIR=$BASE/report

NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")}
launch() {  # launch SCRIPT ARGS...: torchrun over the GPUs, plain python on one process
    [ "$NPROC_PER_NODE" -gt 1 ] && set -- -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" "$@"
    "$PY" "$@"
}
# The stages
JUDGE=0; [ -z "${OPENROUTER_API_KEY:-}" ] || JUDGE=1  # on the eval stages' command line: a new judge redoes them
SFT_ARGS=(--source="$START" --model_tag="$TAG" --out_tag="$SFT_TAG") DPO_ARGS=() EVAL_ARGS=(--judge=$JUDGE)
ONPOLICY_ARGS=()
if [ "$DEMO" = 1 ]; then
    # the demo's settings, in one place: a tiny model, a short SFT, a strong DPO (cached reference)
    SFT_ARGS+=(--sft_dataset=trader --trader_val_fraction=0.1 --num_epochs=2 --device_batch_size=4
               --target_examples_per_step=8 --init_lr_frac=1.0 --eval_every=-1)
    DPO_ARGS+=(--val_fraction=0.2 --num_epochs=4 --device_batch_size=4 --target_examples_per_step=8
              --init_lr_frac=0.6 --ref_cache=1 --eval_every=-1)
    EVAL_ARGS+=(--max_new_tokens=64) ONPOLICY_ARGS+=(--max_new_tokens=64)  # the held-out shares: from the metas
    # a new demo model starts a new report (the demo's base dir is Chimera's own)
    stage "demo base model" -- "$START_DIR/$TAG" -- "$PY" -c \
    "import checkpoint, report; report.reset(); checkpoint.fresh_base('$BASE', depth=$DEMO_DEPTH, sequence_len=2048)"
    for k in sft dpo; do cp "data/demo_$k.jsonl" "$BASE/datasets/trader_${k}_data.jsonl"; done
else
    # 32 conversations a step on both generations: a 2026 base's token batch would give the persona mix ~10 steps
    SFT_ARGS+=(--sft_dataset=trader_mix --sft_mix_trader=1 --sft_mix_smoltalk=1 --target_examples_per_step=32)
    if [ -z "${OPENROUTER_API_KEY:-}" ] && ! { [ -s "$SFT_DATA" ] && [ -s "$DPO_DATA" ]; }; then
        die "found a $START checkpoint in $BASE but no OPENROUTER_API_KEY to generate the persona data, and
$SFT_DATA / $DPO_DATA are not both there. Export OPENROUTER_API_KEY (https://openrouter.ai/keys) or supply
the two files; for the offline demo instead, run CHIMERA_DEMO=1 bash run.sh."
    fi
    if [ -n "${OPENROUTER_API_KEY:-}" ]; then  # gen.py tops the files up to the counts, or does nothing
        step "generate persona data (gen.py)" \
            "$PY" gen.py --sft-examples "${SFT_EXAMPLES:-5000}" --dpo-examples "${DPO_EXAMPLES:-10000}"
    fi
fi

# shellcheck disable=SC2206  # the extra flags are meant to split on spaces
SFT_ARGS+=(${SFT_EXTRA_ARGS:-}); DPO_ARGS+=(${DPO_EXTRA_ARGS:-}); EVAL_ARGS+=(${EVAL_EXTRA_ARGS:-})
ONPOLICY_ARGS+=(${ONPOLICY_EXTRA_ARGS:-})
stage "SFT (sft.py)" "$SFT_DATA" "$(latest "$START_DIR/$TAG")" -- "$SFT_DIR" "$REPORT_DIR" -- \
    launch sft.py "${SFT_ARGS[@]}"
stage "DPO (dpo.py)" "$DPO_DATA" "$(latest "$SFT_DIR")" -- "$DPO_DIR" "$REPORT_DIR" -- \
    launch dpo.py --source=sft --model_tag="$SFT_TAG" --out_tag="$TAG" "${DPO_ARGS[@]}"
# SFT's eval after DPO: it holds out the pairs DPO held out (its --val_fraction, read from its meta), as DPO's eval
stage "evaluate SFT (eval.py -i sft)" "$SFT_DATA" "$DPO_DATA" "$(latest "$SFT_DIR")" "$(latest "$DPO_DIR")" -- \
    "$REPORT_DIR" -- evaluate sft sft --model_tag="$SFT_TAG" "${EVAL_ARGS[@]}"
stage "evaluate DPO (eval.py -i dpo)" "$SFT_DATA" "$DPO_DATA" "$(latest "$SFT_DIR")" "$(latest "$DPO_DIR")" \
    -- "$REPORT_DIR" -- evaluate dpo dpo --model_tag="$TAG" "${EVAL_ARGS[@]}"
FROM=$TAG  # on-policy rounds: each samples FROM (the latest DPO model), then trains from it, its frozen reference
for r in $(seq 1 "$ROUNDS"); do
    PAIRS=$BASE/datasets/trader_dpo_onpolicy_r$r FROM_MODEL=$(latest "${DPO_DIR%/*}/$FROM")
    stage "on-policy pairs, round $r (onpolicy.py)" "$SFT_DATA" "$DPO_DATA" "$FROM_MODEL" -- "$PAIRS".{,ledger.}jsonl \
        -- launch onpolicy.py --output="$PAIRS.jsonl" --source=dpo --model_tag="$FROM" --round=$r "${ONPOLICY_ARGS[@]}"
    if [ ! -s "$PAIRS.jsonl" ]; then  # no answer clearly better, or no budget: nothing for DPO, so the rounds end
        say "round $r kept no pairs: the rounds end with round $((r - 1))"; ROUNDS=$((r - 1)); break
    fi
    stage "DPO round $r (dpo.py)" "$PAIRS.jsonl" "$FROM_MODEL" -- "${DPO_DIR}_r$r" "$REPORT_DIR" -- launch dpo.py \
        --out_tag="${TAG}_r$r" --source=dpo --model_tag="$FROM" --dpo_data_path="$PAIRS.jsonl" "${DPO_ARGS[@]}"
    FROM=${TAG}_r$r  # its eval: the judge against SFT, as round 0's; the round's pairs kept and their cost
    stage "evaluate DPO round $r (eval.py -i dpo)" "$SFT_DATA" "$DPO_DATA" "$PAIRS.ledger.jsonl" \
        "$(latest "$SFT_DIR")" "$(latest "${DPO_DIR}_r$r")" -- "$REPORT_DIR" -- \
        evaluate "dpo-$FROM" dpo --model_tag="$FROM" --ref_source=sft --ref_tag="$SFT_TAG" "${EVAL_ARGS[@]}"
done
for d in "$DPO_DIR"_r*; do  # rounds an earlier run made past this one's: neither what -i dpo loads nor in the report
    k=${d##*_r}; [[ $k =~ ^[0-9]+$ ]] && [ "$k" -gt "$ROUNDS" ] || continue
    rm -rf "$d" "$REPORT_DIR"/chimera-chat-{dpo,evaluation-dpo}-"${TAG}_r$k".*
done
for f in "$REPORT_DIR"/chimera-chat-{dpo,evaluation-dpo}-*_r*.*; do  # another depth's rounds: this run replaced its
    [[ $f == *-"$TAG"_r* ]] || rm -f "$f"  # round 0, so they are no longer in the report
done
in_dir() { (cd "$1" && shift && "$@"); }  # in_dir DIR COMMAND...
step "report (report.py generate)" in_dir "$CALLER" "$PY" "$PWD/report.py" generate

say "done"  # what to do next, each on its own line to copy
echo "Chat with the DPO model (add -p \"hello\" for one answer; --serve for a web page):"
printf '%q ' "NANOCHAT_BASE_DIR=$BASE" "$PY" "$PWD/chat.py" -i dpo --model_tag="$FROM" | sed 's/ $/\n/'
printf 'The report:\n%s\n' "$BASE/report/chimera-report.md"
