#!/usr/bin/env bash
# runcpu.sh: the whole pipeline on CPU, no internet needed (the embedded default): offline corpus with
# synthetic long-context documents, tokenizer, a vanilla base model (d4) and a MegaContext one (d4-mc) of
# equal tokens, bits per byte, the long-context suite (mc_eval), mid-training and SFT on the offline chat
# mixture, chat evals, one chat answer, report. About 42 minutes on 2 idle cores with native bf16 (about an
# hour in fp32); --quick runs the same stages at toy scale in about 5 minutes.
#
# Resumable: each stage leaves a marker in $NANOCHAT_BASE_DIR/recipe_state/ when it succeeds, and a re-run
# skips stages that have one; an interrupted training stage resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
    cat <<EOF
Usage: bash runcpu.sh [options] [-- extra flags for the MC training stages]

Tokenizer, base (vanilla d4 and MegaContext d4-mc), base_loss, mc_eval, mid, SFT, chat evals, one
chat_cli answer and the report, on CPU (OMP_NUM_THREADS=2 unless set).

Options:
  --quick         toy scale (few steps, small evals): the same stages in about 5 minutes
  --core          also run the CORE evaluation of both base models (downloads the eval bundle once)
  --mega          also train d4-mega, the MegaAttention zoom model (rows of 256, W 32, K 16, top-4 chunks),
                  and score it with base_loss and the long-context suite through its own attention (what
                  chat_cli --model-tag d4-mega --source base runs); about 30 minutes more in fp32
  --dry-run       print the commands each stage would run (skipped stages as comments), run nothing
  -h, --help      show this help

Everything after -- goes to the MC base, mid and SFT training (e.g. -- --mc-wc-budget 256).
Artifacts go to \$NANOCHAT_BASE_DIR (default ~/.cache/nanochat); use a separate one for --quick, since
both scales write the same checkpoint directories. The report goes to report.md and its summary is printed.
EOF
}

QUICK=0 CORE=0 DRY=0 MEGA=0
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --core) CORE=1 ;;
        --mega) MEGA=1 ;;
        --dry-run) DRY=1 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
STATE_DIR="$NANOCHAT_BASE_DIR/recipe_state"
CPU=(--device-type cpu)
PREFIX=cpu  # stage markers: recipe_state/cpu-*.done, or cpu-quick-*.done for --quick

# Scale. Full: ~1.4 s per vanilla step on 2 idle cores in fp32, an MC step ~2.4x that; equal tokens for both
# models so the report compares like with like. No --dtype: every stage takes its default, bf16 autocast on a
# CPU whose bf16 matmuls measure faster than fp32 (nanochat/device.py, pick_dtype; 1.3-1.5x per step), else fp32.
if [ "$QUICK" -eq 1 ]; then
    PREFIX=cpu-quick
    TOK_CHARS=5000000
    SEQ=256
    BASE=(--depth 4 --max-seq-len "$SEQ" --device-batch-size 4 --total-batch-size 1024 --num-iterations 30
        --eval-every -1 --eval-tokens 8192 --sample-every -1 --mc-eval-rows 2)
    SPLIT_TOKENS=8192
    CHAT=(--max-seq-len "$SEQ" --device-batch-size 4 --total-batch-size 1024 --num-iterations 10
        --eval-every -1 --eval-tokens 4096 --offline-size 200)
    MCEVAL=(--n 4 --distances "1,4")
    CHATEVAL=(--max-problems 4 --max-new-tokens 32)
    MEGA_BASE=(--depth 4 --max-seq-len 256 --device-batch-size 4 --total-batch-size 1024 --num-iterations 30
        --eval-every -1 --eval-tokens 8192 --sample-every -1)
    MEGA_EVAL=(--n 4 --distances "1,16")
else
    TOK_CHARS=20000000
    SEQ=512
    BASE=(--depth 4 --max-seq-len "$SEQ" --device-batch-size 8 --total-batch-size 4096 --num-iterations 500
        --eval-every 250 --eval-tokens 65536 --sample-every -1 --save-every 100)
    SPLIT_TOKENS=65536
    CHAT=(--max-seq-len "$SEQ" --device-batch-size 8 --total-batch-size 4096 --num-iterations 100
        --eval-every -1 --eval-tokens 32768 --save-every 50)
    MCEVAL=(--n 20)
    CHATEVAL=(--max-problems 50)
    # the zoom's measured recipe (docs/mega_attention.md, "The zoom"): 800 steps x 4096 tokens in rows of 256
    MEGA_BASE=(--depth 4 --max-seq-len 256 --device-batch-size 16 --total-batch-size 4096 --num-iterations 800
        --eval-every 400 --eval-tokens 32768 --sample-every -1 --save-every 100)
    MEGA_EVAL=(--n 20 --distances "1,4,16,64")
fi
# The recipe is the defaults: --mc alone trains MegaContext as measured best (megacontext/config.py; at
# --max-seq-len 512: K 16, budget 128, recent 32), with half the rows long-context rows, the token shift and
# the copy warm-up (nanochat/tasks/schedule.py). The vanilla twin sees the same rows (--longctx-frac 0.5) and
# its window view is scored at the MC model's budget.
WC=$((SEQ / 4))
MC=(--mc)

MARK=$PREFIX
# shellcheck source=recipe_lib.sh
source ./recipe_lib.sh

# ---- set-up: venv (skipped for a dry run), a fresh report on a first run
recipe_setup

# ---- corpus (this Python's standard library + 20% synthetic long-context documents) and tokenizer
stage data python -m nanochat.dataset --local --synthetic-longctx 0.2
stage tok-train python -m scripts.tok_train --vocab-size 4096 --max-chars "$TOK_CHARS"
stage tok-eval python -m scripts.tok_eval --max-chars "$TOK_CHARS"

# ---- base models: vanilla and MegaContext, same tokens; half the rows are long-context tasks
for TAG in d4 d4-mc; do
    FLAGS=()
    if [ "$TAG" = d4-mc ]; then
        FLAGS=("${MC[@]}" "${EXTRA[@]}")
    else
        FLAGS=(--longctx-frac 0.5)
    fi
    read -r -a RESUME <<<"$(resume "$NANOCHAT_BASE_DIR/base_checkpoints/$TAG")"
    stage "$TAG-base-train" python -m scripts.base_train "${BASE[@]}" --model-tag "$TAG" \
        "${CPU[@]}" --run dummy "${FLAGS[@]}" "${RESUME[@]}"
    stage "$TAG-base-loss" python -m scripts.base_loss --model-tag "$TAG" --device-batch-size 4 \
        --split-tokens "$SPLIT_TOKENS" "${CPU[@]}"
    if [ "$CORE" -eq 1 ]; then
        stage "$TAG-base-eval" python -m scripts.base_eval --model-tag "$TAG" --max-per-task 100 "${CPU[@]}"
    fi
done

# ---- with --mega: the MegaAttention zoom model (its attention is the mode the checkpoint records), scored
# through its own attention over the whole prompt, the window at its W of 32 for comparison
if [ "$MEGA" -eq 1 ]; then
    read -r -a RESUME <<<"$(resume "$NANOCHAT_BASE_DIR/base_checkpoints/d4-mega")"
    stage d4-mega-base-train python -m scripts.base_train "${MEGA_BASE[@]}" --attention mega \
        --model-tag d4-mega "${CPU[@]}" --run dummy "${RESUME[@]}"
    stage d4-mega-base-loss python -m scripts.base_loss --model-tag d4-mega --device-batch-size 4 \
        --split-tokens "$SPLIT_TOKENS" "${CPU[@]}"
fi

# ---- the long-context suite: the default views for MC; a vanilla model has only full and window. MC runs last:
# the report keeps one "Long-context eval (base)" section (the latest), and the MC table is the headline.
stage d4-longctx-eval python -m scripts.mc_eval --task all "${MCEVAL[@]}" --model-tag d4 --views "full,window" \
    --wc-budget "$WC" "${CPU[@]}"
if [ "$MEGA" -eq 1 ]; then
    stage d4-mega-longctx-eval python -m scripts.mc_eval --task all "${MEGA_EVAL[@]}" --model-tag d4-mega \
        --views "full,window" --wc-budget 32 "${CPU[@]}"
fi
stage d4-mc-longctx-eval python -m scripts.mc_eval --task all "${MCEVAL[@]}" --model-tag d4-mc "${CPU[@]}"

# ---- mid-training and SFT on the offline chat mixture, then the chat evals
for TAG in d4 d4-mc; do
    FLAGS=()
    if [ "$TAG" = d4-mc ]; then
        FLAGS=(--mc "${EXTRA[@]}")  # MC config comes from the base checkpoint
    fi
    read -r -a RESUME <<<"$(resume "$NANOCHAT_BASE_DIR/mid_checkpoints/$TAG")"
    stage "$TAG-mid-train" python -m scripts.mid_train --dataset offline --model-tag "$TAG" "${CHAT[@]}" \
        "${CPU[@]}" --run dummy "${FLAGS[@]}" "${RESUME[@]}"
    read -r -a RESUME <<<"$(resume "$NANOCHAT_BASE_DIR/chatsft_checkpoints/$TAG")"
    stage "$TAG-sft-train" python -m scripts.chat_sft --dataset offline --model-tag "$TAG" "${CHAT[@]}" \
        "${CPU[@]}" --run dummy "${FLAGS[@]}" "${RESUME[@]}"
    stage "$TAG-sft-eval" python -m scripts.chat_eval -i sft --dataset offline --model-tag "$TAG" \
        "${CHATEVAL[@]}" "${CPU[@]}"
done
# the MC model's chat evals above ran through its memory (the chat session); LongDoc again without it
stage d4-mc-sft-eval-plain python -m scripts.chat_eval -i sft --dataset offline --model-tag d4-mc \
    -a LongDoc --memory plain "${CHATEVAL[@]}" "${CPU[@]}"

# ---- one question to the chat model (always run: it is the point of the whole exercise)
ASK=(python -m scripts.chat_cli -p "Why is the sky blue?" --source sft --model-tag d4-mc --device-type cpu)
if [ "$DRY" -eq 1 ]; then
    printf '%q ' "${ASK[@]}"
    echo
    echo "python -m nanochat.report generate"
    exit 0
fi
echo "==> chat-cli: $(printf '%q ' "${ASK[@]}")"
"${ASK[@]}"

# ---- the report (always regenerated), its summary, and the wall time of each stage run this time
python -m nanochat.report generate
echo
print_summary
print_times
