#!/usr/bin/env bash
# run10.sh: the whole pipeline on one GPU, a few hours: FineWeb-edu shards (downloaded in the background),
# tokenizer, base model (depth 10-12, Chinchilla tokens), bits per byte, CORE, the long-context suite,
# mid-training, SFT, chat evals, one chat answer, report. Same scripts as speedrun.sh, each stage through
# torchrun on a single process. With --mc, MegaContext is trained with the GPT in every training stage and
# the model tag gets -mc, so a vanilla run and an MC run sit side by side and the report compares them.
#
# Resumable: each stage leaves a marker in $NANOCHAT_BASE_DIR/recipe_state/ when it succeeds, and a re-run
# skips stages that have one; an interrupted training stage resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
    cat <<EOF
Usage: bash run10.sh --gpu 5090|h100 [options] [-- extra flags for every training stage]

Tokenizer, base, base_loss, CORE, mc_eval, mid, SFT, chat evals, chat_cli and the report on one GPU.

Options:
  --gpu 5090      RTX 5090 (32 GB): depth 10, device batch 8, 60 data shards
  --gpu h100      H100/H200 (80 GB+): depth 12, device batch 32, 80 data shards
  --mc            train MegaContext with the GPT in base, mid and SFT (model tag d<depth>-mc;
                  the MC recipe is base_train's default at this sequence length)
  --shards N      FineWeb-edu shards to download (default: per --gpu; fewer for a smoke run)
  --run NAME      wandb run name for the training stages (default: dummy = no wandb; the key
                  comes from \$WANDB_API_KEY only)
  --dry-run       print the commands each stage would run (skipped stages as comments), run nothing
  -h, --help      show this help

Everything after -- goes to base_train, mid_train and chat_sft, e.g. MC flags (-- --mc-wc-budget 256)
or, for a smoke run, a tiny iteration override (-- --num-iterations 20).
Needs internet for the data and the CORE bundle. Artifacts go to \$NANOCHAT_BASE_DIR (default
~/.cache/nanochat); the report to report.md, whose summary is printed at the end.
EOF
}

GPU="" MC=0 DRY=0 RUN=dummy SHARDS=""
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --gpu) GPU=${2:?--gpu needs a value (5090 or h100)}; shift ;;
        --mc) MC=1 ;;
        --shards) SHARDS=${2:?--shards needs a number}; shift ;;
        --run) RUN=${2:?--run needs a name}; shift ;;
        --dry-run) DRY=1 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

case "$GPU" in
    5090)
        DEPTH=10
        DEVICE_BATCH=8          # the fp32 logits of 8 x 2048 x 65536 tokens alone are 4 GiB per copy
        SHARDS=${SHARDS:-60}    # ~2.7B Chinchilla tokens for ~133M parameters, at ~250M chars per shard
        ;;
    h100)
        DEPTH=12
        DEVICE_BATCH=32
        SHARDS=${SHARDS:-80}    # ~3.7B tokens for ~185M parameters
        ;;
    *)
        echo "error: --gpu must be 5090 or h100 (see --help)" >&2
        exit 2
        ;;
esac
HEAD_SHARDS=$((SHARDS < 8 ? SHARDS : 8))

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
TORCHRUN=(torchrun --standalone --nproc-per-node 1)

MARK=$TAG
# shellcheck source=recipe_lib.sh
source ./recipe_lib.sh

# ---- set-up: venv (skipped for a dry run), a fresh report on a first run
recipe_setup

# ---- data and tokenizer: the first shards now, the rest in the background while the tokenizer trains
stage data-head python -m nanochat.dataset -n "$HEAD_SHARDS"
data_start "$SHARDS"
stage tok-train python -m scripts.tok_train --vocab-size 65536 --max-chars 2000000000
stage tok-eval python -m scripts.tok_eval
data_wait

# ---- base model: --num-iterations -1 = 20 tokens per parameter (Chinchilla)
read -r -a RESUME <<<"$(resume "$NANOCHAT_BASE_DIR/base_checkpoints/$TAG")"
stage base-train "${TORCHRUN[@]}" -m scripts.base_train -- --depth "$DEPTH" --device-batch-size "$DEVICE_BATCH" \
    --max-seq-len 2048 --total-batch-size 524288 --target-param-data-ratio 20 --save-every 1000 \
    "${TRAIN_FLAGS[@]}" "${RESUME[@]}"
stage base-loss "${TORCHRUN[@]}" -m scripts.base_loss -- --model-tag "$TAG" --device-batch-size "$DEVICE_BATCH"
stage base-eval "${TORCHRUN[@]}" -m scripts.base_eval -- --model-tag "$TAG"

# ---- the long-context suite: all five views for MC; a vanilla model has only full and window
VIEWS=()
if [ "$MC" -eq 0 ]; then
    VIEWS=(--views "full,window")
fi
stage longctx-eval "${TORCHRUN[@]}" -m scripts.mc_eval -- --task all --n 50 --model-tag "$TAG" "${VIEWS[@]}"

# ---- mid-training and SFT (conversations, loss on assistant tokens), each followed by the chat evals
read -r -a RESUME <<<"$(resume "$NANOCHAT_BASE_DIR/mid_checkpoints/$TAG")"
stage mid-train "${TORCHRUN[@]}" -m scripts.mid_train -- --device-batch-size "$DEVICE_BATCH" --save-every 500 \
    "${TRAIN_FLAGS[@]}" "${RESUME[@]}"
stage mid-eval "${TORCHRUN[@]}" -m scripts.chat_eval -- -i mid --model-tag "$TAG"
read -r -a RESUME <<<"$(resume "$NANOCHAT_BASE_DIR/chatsft_checkpoints/$TAG")"
stage sft-train "${TORCHRUN[@]}" -m scripts.chat_sft -- --save-every 200 "${TRAIN_FLAGS[@]}" "${RESUME[@]}"
stage sft-eval "${TORCHRUN[@]}" -m scripts.chat_eval -- -i sft --model-tag "$TAG"
if [ "$MC" -eq 1 ]; then
    stage sft-eval-plain "${TORCHRUN[@]}" -m scripts.chat_eval -- -i sft --model-tag "$TAG" -a LongDoc \
        --memory plain
fi

# ---- one question to the chat model, then the report (both always run: cheap, and they show the result)
ASK=(python -m scripts.chat_cli -p "Why is the sky blue?" --source sft --model-tag "$TAG")
if [ "$DRY" -eq 1 ]; then
    printf '%q ' "${ASK[@]}"
    echo
    echo "python -m nanochat.report generate"
    exit 0
fi
"${ASK[@]}"
python -m nanochat.report generate
echo
print_summary
print_times
