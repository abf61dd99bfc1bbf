#!/usr/bin/env bash
# The README's test command: set up .venv (if missing) and run the default (fast) test set.
# Extra arguments go to pytest, e.g. `bash test.sh -m slow` or `bash test.sh tests/test_gpt.py`.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh
python -m pytest "$@"
