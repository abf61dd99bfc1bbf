#!/usr/bin/env bash
# The embedded-default pipeline on CPU, no internet needed: offline corpus -> tokenizer -> base model
# -> bits per byte -> report. About 10-20 minutes on 2 cores; --quick runs the same stages at toy
# scale in under 5 minutes.
#
#   bash runcpu.sh [--quick] [--core]
#
#   --quick   toy scale (small tokenizer sample, fewer and shorter steps)
#   --core    also run the CORE evaluation (downloads the eval bundle once; needs internet)
#
# Artifacts go to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat); the report is printed at the end
# and copied to ./report.md.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

QUICK=0
CORE=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        --core) CORE=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "runcpu.sh: unknown option '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
# shellcheck disable=SC1091
source ./setup_env.sh

if [ "$QUICK" = 1 ]; then
    TOK_CHARS=5000000
    TRAIN=(--depth 4 --max-seq-len 256 --device-batch-size 4 --total-batch-size 1024 --num-iterations 200
        --eval-every 100 --eval-tokens 8192 --sample-every 200)
    SPLIT_TOKENS=8192
else
    TOK_CHARS=20000000
    TRAIN=(--depth 4 --max-seq-len 512 --device-batch-size 8 --total-batch-size 4096 --num-iterations 1000
        --eval-every 250 --eval-tokens 65536 --sample-every 500)
    SPLIT_TOKENS=65536
fi

python -m nanochat.report reset

# 1. Corpus: this Python's standard library sources + 20% synthetic long-context documents
python -m nanochat.dataset --local --synthetic-longctx 0.2

# 2. Tokenizer
python -m scripts.tok_train --vocab-size 4096 --max-chars "$TOK_CHARS"
python -m scripts.tok_eval --max-chars "$TOK_CHARS"

# 3. Base model (dtype auto: bf16 only if this CPU runs it faster than fp32)
python -m scripts.base_train "${TRAIN[@]}" --model-tag d4 --device-type cpu --run dummy
python -m scripts.base_loss --model-tag d4 --device-batch-size 4 --split-tokens "$SPLIT_TOKENS" --device-type cpu

# 4. CORE (optional on CPU: it downloads the eval bundle)
if [ "$CORE" = 1 ]; then
    python -m scripts.base_eval --model-tag d4 --max-per-task 100 --device-type cpu
fi

python -m nanochat.report generate
cat report.md
