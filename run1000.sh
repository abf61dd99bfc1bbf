#!/usr/bin/env bash
# run1000.sh: the whole pipeline on one 8xH100 node, depth 32 (nanochat's "$1000 tier", ~40 hours):
# venv, data (downloaded in the background), tokenizer, base pretraining, mid-training, SFT, evaluations,
# report. With --mc, MegaContext (GistNet + LensNet) is trained with the GPT in every training stage and the
# model tag becomes d32-mc, so a vanilla run and an MC run sit side by side and the report compares them.
#
# Resumable: each stage leaves a marker in $NANOCHAT_BASE_DIR/recipe_state/ when it succeeds, and a re-run
# skips stages that have one; an interrupted training stage resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")"

RECIPE=run1000
DEPTH=32
SHARDS=800                # FineWeb-edu shards (~250M chars each): 20 tokens per parameter at depth 32
BASE_BATCH=8              # base_train --device-batch-size (depth 32 at seq len 2048 fits 80 GB with 8)
MID_BATCH=8               # mid_train --device-batch-size

# shellcheck source=node8.sh
source ./node8.sh
