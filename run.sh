#!/usr/bin/env bash
# Chimera: the whole post-training pipeline in one command.
#
#   bash run.sh
#
# With a nanochat checkpoint (mid, else base) in $NANOCHAT_BASE_DIR (default ~/.cache/nanochat):
#   gen.py (needs OPENROUTER_API_KEY unless both data files exist) -> SFT on trader + SmolTalk
#   -> eval sft -> DPO -> eval dpo -> report.md
# With no checkpoint and no OPENROUTER_API_KEY: an offline demo of the same pipeline on a
# tiny fresh model and the small persona data in data/, in its own base dir
# ($CHIMERA_DEMO_DIR, default ~/.cache/chimera-demo), minutes on a laptop CPU.
#
# Environment:
#   NANOCHAT_BASE_DIR   nanochat's base dir (checkpoints, tokenizer, datasets, report)
#   OPENROUTER_API_KEY  for gen.py; OPENROUTER_MODELS picks the model(s)
#   NPROC_PER_NODE      processes per stage (default: the number of GPUs, 1 on CPU)
#   CHIMERA_DEMO=1      run the offline demo even when a checkpoint or key is present
#   CHIMERA_REDO=1      redo every stage instead of skipping the ones whose output exists
#   SFT_EXAMPLES, DPO_EXAMPLES   how many conversations / pairs gen.py makes (5000 / 10000)
#   SFT_EXTRA_ARGS, DPO_EXTRA_ARGS, EVAL_EXTRA_ARGS   more --key=value flags for a stage (they win)
#   CHIMERA_DEMO_DEPTH  depth of the demo's fresh model (default 4)
#   CHIMERA_PYTHON      use this Python instead of the .venv that run.sh creates
#
# Stages whose output exists are skipped, so after a failure a re-run resumes where it
# stopped; the run stops at the first failing stage and names it.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD

say() { printf '\n=== %s ===\n' "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

# -----------------------------------------------------------------------------
# Python environment: a venv beside the code, with the project installed into it

PY=${CHIMERA_PYTHON:-}
if [ -z "$PY" ]; then
    if [ ! -x .venv/bin/python ]; then
        say "creating .venv"
        python3 -m venv .venv || die "could not create a virtual environment (python3 -m venv)"
    fi
    PY=$ROOT/.venv/bin/python
fi
if ! "$PY" -c "import torch, numpy, requests, tiktoken" 2>/dev/null; then
    say "installing Chimera and its dependencies into .venv"
    "$PY" -m pip install -q --disable-pip-version-check -e . || die "pip install failed"
fi

# -----------------------------------------------------------------------------
# Which run: real (a nanochat checkpoint is there) or the offline demo

BASE=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
has_model() { compgen -G "$1/*/model_*.pt" >/dev/null; }
if has_model "$BASE/mid_checkpoints"; then START=mid
elif has_model "$BASE/base_checkpoints"; then START=base
else START=""; fi

DEMO=0
if [ "${CHIMERA_DEMO:-0}" = 1 ]; then DEMO=1
elif [ -z "$START" ] && [ -z "${OPENROUTER_API_KEY:-}" ]; then DEMO=1
elif [ -z "$START" ]; then
    die "no nanochat checkpoint in $BASE/{mid,base}_checkpoints. Train one with nanochat's speedrun.sh (or put a
published one there), set NANOCHAT_BASE_DIR to its base dir, or run the offline demo with CHIMERA_DEMO=1."
fi

if [ "$DEMO" = 1 ]; then
    BASE=${CHIMERA_DEMO_DIR:-$HOME/.cache/chimera-demo}
    START=base
    cat <<EOF

################################################################################
  OFFLINE DEMO: no nanochat checkpoint and no OPENROUTER_API_KEY were found, so
  this runs the whole pipeline on a tiny fresh model (byte-level tokenizer,
  random init) and the small hand-written persona data in data/, in its own
  base dir: $BASE
  Your real checkpoints are not touched. For a real run, see README.md.
################################################################################
EOF
    export HF_HUB_OFFLINE=1  # the demo never fetches datasets: the chat benchmarks are skipped
fi
export NANOCHAT_BASE_DIR=$BASE
mkdir -p "$BASE/datasets" "$BASE/report"
SFT_DATA=$BASE/datasets/trader_sft_data.jsonl
DPO_DATA=$BASE/datasets/trader_dpo_data.jsonl

if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
launch() {  # launch SCRIPT ARGS...: torchrun over the GPUs, plain python on one process
    if [ "$NPROC_PER_NODE" -gt 1 ]; then
        "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" "$@"
    else
        "$PY" "$@"
    fi
}
stage() {  # stage NAME DONE_TEST COMMAND...: skip when DONE_TEST succeeds, stop on failure
    local name=$1 done_test=$2
    shift 2
    if [ "${CHIMERA_REDO:-0}" != 1 ] && eval "$done_test"; then
        say "$name: output exists, skipped (CHIMERA_REDO=1 to redo)"
        return
    fi
    say "$name"
    local t0=$SECONDS
    "$@" || die "stage '$name' failed (exit $?). Fix the cause and run 'bash run.sh' again: finished stages are skipped."
    printf '%s done in %ss\n' "$name" $((SECONDS - t0))
}

# -----------------------------------------------------------------------------
# The stages

if [ "$DEMO" = 1 ]; then
    # the demo's model is tiny so it trains in minutes; its settings are here, in one place
    DEMO_DEPTH=${CHIMERA_DEMO_DEPTH:-4}
    SFT_ARGS=(--sft_dataset=trader --trader_val_fraction=0.1 --num_epochs=12 --device_batch_size=4
              --target_examples_per_step=8 --init_lr_frac=1.0 --eval_every=20 --eval_batches=4)
    DPO_ARGS=(--val_fraction=0.2 --num_epochs=4 --device_batch_size=4 --target_examples_per_step=8
              --init_lr_frac=0.1 --eval_every=10)
    EVAL_ARGS=(--max_new_tokens=64 --dpo_val_fraction=0.2)
    stage "demo base model" "has_model '$BASE/base_checkpoints'" \
        "$PY" -c "import model; model.fresh_base('$BASE', depth=$DEMO_DEPTH, sequence_len=2048)"
    stage "demo data" "[ -s '$SFT_DATA' ] && [ -s '$DPO_DATA' ]" \
        bash -c "cp '$ROOT/data/demo_sft.jsonl' '$SFT_DATA' && cp '$ROOT/data/demo_dpo.jsonl' '$DPO_DATA'"
else
    SFT_ARGS=(--sft_dataset=trader_mix --sft_mix_trader=1 --sft_mix_smoltalk=1 --source="$START")
    DPO_ARGS=()
    EVAL_ARGS=()
    if [ -z "${OPENROUTER_API_KEY:-}" ] && ! { [ -s "$SFT_DATA" ] && [ -s "$DPO_DATA" ]; }; then
        die "found a $START checkpoint in $BASE but no OPENROUTER_API_KEY to generate the persona data, and
$SFT_DATA / $DPO_DATA are not both there. Export OPENROUTER_API_KEY (https://openrouter.ai/keys) or supply
the two files; for the offline demo instead, run CHIMERA_DEMO=1 bash run.sh."
    fi
    # gen.py tops the files up to the requested counts and does nothing when they are full
    stage "generate persona data (gen.py)" '[ -z "${OPENROUTER_API_KEY:-}" ]' \
        "$PY" gen.py --sft-examples "${SFT_EXAMPLES:-5000}" --dpo-examples "${DPO_EXAMPLES:-10000}"
fi

# shellcheck disable=SC2206  # the extra flags are meant to split on spaces
SFT_ARGS+=(${SFT_EXTRA_ARGS:-}); DPO_ARGS+=(${DPO_EXTRA_ARGS:-}); EVAL_ARGS+=(${EVAL_EXTRA_ARGS:-})

if ! has_model "$BASE/chatsft_checkpoints"; then
    "$PY" report.py reset  # a fresh run: clear Chimera's old sections (nanochat's stay)
fi
stage "SFT (sft.py)" "has_model '$BASE/chatsft_checkpoints'" launch sft.py "${SFT_ARGS[@]}"
stage "evaluate SFT (eval.py -i sft)" "[ -s '$BASE/report/chat-evaluation-sft.md' ]" \
    launch eval.py -i sft "${EVAL_ARGS[@]}"
stage "DPO (dpo.py)" "has_model '$BASE/chatdpo_checkpoints'" launch dpo.py "${DPO_ARGS[@]}"
stage "evaluate DPO (eval.py -i dpo)" "[ -s '$BASE/report/chat-evaluation-dpo.md' ]" \
    launch eval.py -i dpo "${EVAL_ARGS[@]}"
CHIMERA_REDO=1 stage "report (report.py generate)" "false" "$PY" report.py generate

say "done: $BASE/report/report.md (and ./report.md)"
