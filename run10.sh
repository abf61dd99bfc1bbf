#!/usr/bin/env bash
# One GPU, a few hours: FineWeb-edu shards -> tokenizer -> base model (depth 10-12, Chinchilla tokens)
# -> bits per byte -> CORE -> report. Same scripts as runcpu.sh, at GPU scale.
#
#   bash run10.sh --gpu 5090|h100 [--run NAME]
#
#   --gpu 5090   RTX 5090 (32 GB): depth 10, device batch 8
#   --gpu h100   H100/H200 (80 GB+): depth 12, device batch 32
#   --run NAME   log to wandb as NAME (key from $WANDB_API_KEY only; offline without it)
#
# Needs internet for the data and the CORE bundle. Artifacts go to $NANOCHAT_BASE_DIR
# (default ~/.cache/nanochat); the report is printed at the end and copied to ./report.md.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

GPU=""
RUN=dummy
while [ $# -gt 0 ]; do
    case "$1" in
        --gpu)
            GPU="${2:-}"
            shift 2 || { echo "run10.sh: --gpu needs a value (5090 or h100)" >&2; exit 2; }
            ;;
        --run)
            RUN="${2:-}"
            shift 2 || { echo "run10.sh: --run needs a name" >&2; exit 2; }
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "run10.sh: unknown option '$1' (try --help)" >&2
            exit 2
            ;;
    esac
done

case "$GPU" in
    5090)
        DEPTH=10
        DEVICE_BATCH=8 # the fp32 logits of 8 x 2048 x 65536 tokens alone are 4 GiB per copy
        SHARDS=60 # ~2.7B Chinchilla tokens for ~133M parameters, at ~250M chars per shard
        ;;
    h100)
        DEPTH=12
        DEVICE_BATCH=32
        SHARDS=80 # ~3.7B tokens for ~185M parameters
        ;;
    *)
        echo "run10.sh: --gpu must be 5090 or h100 (try --help)" >&2
        exit 2
        ;;
esac

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export OMP_NUM_THREADS=1
# shellcheck disable=SC1091
source ./setup_env.sh

python -m nanochat.report reset

# 1. Data: 8 shards for the tokenizer now, the rest in the background while it trains
python -m nanochat.dataset -n 8
python -m nanochat.dataset -n "$SHARDS" &
DATASET_PID=$!

# 2. Tokenizer
python -m scripts.tok_train --vocab-size 65536 --max-chars 2000000000
python -m scripts.tok_eval

echo "waiting for the data download (pid $DATASET_PID)"
wait "$DATASET_PID"

# 3. Base model: --num-iterations -1 = 20 tokens per parameter (Chinchilla)
python -m scripts.base_train --depth "$DEPTH" --device-batch-size "$DEVICE_BATCH" --max-seq-len 2048 \
    --total-batch-size 524288 --target-param-data-ratio 20 --save-every 1000 --model-tag "d$DEPTH" --run "$RUN"
python -m scripts.base_loss --model-tag "d$DEPTH" --device-batch-size "$DEVICE_BATCH"
python -m scripts.base_eval --model-tag "d$DEPTH"

python -m nanochat.report generate
cat report.md
