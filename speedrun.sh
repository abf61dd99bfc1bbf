#!/usr/bin/env bash
# speedrun.sh: the whole pipeline on one 8xH100 node, depth 20 (nanochat's "$100 speedrun", ~4 hours):
# venv, data (downloaded in the background), tokenizer, base pretraining, mid-training, SFT, evaluations,
# report. With --mc, MegaContext (GistNet + LensNet) is trained with the GPT in every training stage and the
# model tag becomes d20-mc, so a vanilla run and an MC run sit side by side and the report compares them.
#
# Resumable: each stage leaves a marker in $NANOCHAT_BASE_DIR/recipe_state/ when it succeeds, and a re-run
# skips stages that have one; an interrupted training stage resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")"

RECIPE=speedrun
DEPTH=20
SHARDS=240                # FineWeb-edu shards (~250M chars each): 20 tokens per parameter at depth 20
BASE_BATCH=32             # base_train --device-batch-size (fits 80 GB at depth 20, seq len 2048)
MID_BATCH=32              # mid_train --device-batch-size

# shellcheck source=node8.sh
source ./node8.sh
