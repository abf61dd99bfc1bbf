#!/usr/bin/env bash
# node8.sh: the shared body of speedrun.sh and run1000.sh (the whole pipeline on one 8-GPU node).
# Not run directly: the caller cds to the repo, sets RECIPE, DEPTH, SHARDS, BASE_BATCH and MID_BATCH, then
# sources this file with its own arguments.
# shellcheck disable=SC2154  # the variables above come from the caller
usage() {
    cat <<EOF
Usage: bash $RECIPE.sh [options] [-- extra flags for every training stage]

The depth-$DEPTH pipeline on one node of 8 GPUs: tokenizer, base, mid, SFT, chat evals, report.

Options:
  --mc            train MegaContext with the GPT in base, mid and SFT (model tag d$DEPTH-mc;
                  the MC recipe is base_train's default at this sequence length), and also evaluate
                  long documents through an MC session
  --rl            also run GSM8K reinforcement learning after SFT, and evaluate it
  --nproc N       GPUs (torchrun processes) to use (default: 8)
  --run NAME      wandb run name for the training stages (default: dummy = no wandb)
  --dry-run       print the commands each stage would run (skipped stages as comments), run nothing
  -h, --help      show this help

Everything after -- goes to base_train, mid_train and chat_sft (e.g. -- --mc-wc-budget 256).
Artifacts go to \$NANOCHAT_BASE_DIR (default ~/.cache/nanochat); the report to report.md.
EOF
}

MC=0 RL=0 DRY=0 NGPU=8 RUN=dummy
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --mc) MC=1 ;;
        --rl) RL=1 ;;
        --nproc) NGPU=${2:?--nproc needs a number}; shift ;;
        --run) RUN=${2:?--run needs a name}; shift ;;
        --dry-run) DRY=1 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
STATE_DIR="$NANOCHAT_BASE_DIR/recipe_state"
TAG="d$DEPTH"
MC_FLAGS=()
if [ "$MC" -eq 1 ]; then
    TAG="d$DEPTH-mc"
    MC_FLAGS=(--mc)  # the recipe is the defaults: base_train scales it to the sequence length
fi
TRAIN_FLAGS=(--model-tag "$TAG" --run "$RUN" "${MC_FLAGS[@]}" "${EXTRA[@]}")
TORCHRUN=(torchrun --standalone --nproc-per-node "$NGPU")

MARK=$TAG
# shellcheck source=recipe_lib.sh
source ./recipe_lib.sh

# ---- set-up: venv (skipped for a dry run), a fresh report on a first run
recipe_setup

# ---- data and tokenizer: the first shards now, the rest in the background while the tokenizer trains
stage data-head python -m nanochat.dataset -n 8
data_start "$SHARDS"
stage tok-train python -m scripts.tok_train --max-chars 2000000000
stage tok-eval python -m scripts.tok_eval
data_wait

# ---- base model
read -r -a RESUME <<<"$(resume "$NANOCHAT_BASE_DIR/base_checkpoints/$TAG")"
stage base-train "${TORCHRUN[@]}" -m scripts.base_train -- --depth "$DEPTH" --device-batch-size "$BASE_BATCH" \
    --save-every 1000 "${TRAIN_FLAGS[@]}" "${RESUME[@]}"
stage base-loss "${TORCHRUN[@]}" -m scripts.base_loss -- --model-tag "$TAG" --device-batch-size "$BASE_BATCH"
stage base-eval "${TORCHRUN[@]}" -m scripts.base_eval -- --model-tag "$TAG"

# ---- mid-training and SFT (conversations, loss on assistant tokens), each followed by the chat evals
read -r -a RESUME <<<"$(resume "$NANOCHAT_BASE_DIR/mid_checkpoints/$TAG")"
stage mid-train "${TORCHRUN[@]}" -m scripts.mid_train -- --device-batch-size "$MID_BATCH" --save-every 500 \
    "${TRAIN_FLAGS[@]}" "${RESUME[@]}"
stage mid-eval "${TORCHRUN[@]}" -m scripts.chat_eval -- -i mid --model-tag "$TAG"
read -r -a RESUME <<<"$(resume "$NANOCHAT_BASE_DIR/chatsft_checkpoints/$TAG")"
stage sft-train "${TORCHRUN[@]}" -m scripts.chat_sft -- --save-every 200 "${TRAIN_FLAGS[@]}" "${RESUME[@]}"
stage sft-eval "${TORCHRUN[@]}" -m scripts.chat_eval -- -i sft --model-tag "$TAG"
if [ "$MC" -eq 1 ]; then
    stage sft-eval-plain "${TORCHRUN[@]}" -m scripts.chat_eval -- -i sft --model-tag "$TAG" -a LongDoc \
        --memory plain
fi

# ---- optional: reinforcement learning on GSM8K
if [ "$RL" -eq 1 ]; then
    read -r -a RESUME <<<"$(resume "$NANOCHAT_BASE_DIR/chatrl_checkpoints/$TAG")"
    stage rl-train "${TORCHRUN[@]}" -m scripts.chat_rl -- --model-tag "$TAG" "${RESUME[@]}"
    stage rl-eval "${TORCHRUN[@]}" -m scripts.chat_eval -- -i rl --model-tag "$TAG" -a GSM8K
fi

# ---- the report (always regenerated: cheap, and it should show every stage so far)
if [ "$DRY" -eq 1 ]; then
    echo "python -m nanochat.report generate"
else
    python -m nanochat.report generate
    print_summary
    print_times
fi
