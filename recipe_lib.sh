#!/usr/bin/env bash
# recipe_lib.sh: the stage runner shared by runcpu.sh, run10.sh and node8.sh (speedrun.sh, run1000.sh).
# Not run directly: a recipe sets STATE_DIR (where stage markers live), MARK (the markers' name prefix) and
# DRY (1 = print the commands, run nothing), then sources this file.
# shellcheck disable=SC2154  # the variables above come from the caller

# stage NAME CMD...: run CMD unless NAME is done; mark it done when CMD succeeds; record its wall time in
# TIMES (print them with print_times). A re-run of the recipe skips the stages that have a marker.
TIMES=()
stage() {
    local name=$1 marker t0 t1
    shift
    marker="$STATE_DIR/$MARK-$name.done"
    if [ -f "$marker" ]; then
        echo "# skip $name (done): $(printf '%q ' "$@")"
        return 0
    fi
    if [ "$DRY" -eq 1 ]; then
        printf '%q ' "$@"
        echo
        return 0
    fi
    echo "==> $name: $(printf '%q ' "$@")"
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    mkdir -p "$STATE_DIR"
    touch "$marker"
    TIMES+=("$(awk -v n="$name" -v a="$t0" -v b="$t1" 'BEGIN { printf "%-26s %8.1f", n, b - a }')")
    echo "<== $name done in ${TIMES[-1]##* } s"
}

# resume DIR: "--resume-from-step N" when DIR holds checkpoints of an interrupted run (N = the newest).
resume() {
    local f step=""
    for f in "$1"/meta_*.json; do
        [ -e "$f" ] || continue
        f=${f##*/meta_}
        step=$((10#${f%.json}))
    done
    if [ -n "$step" ]; then
        echo "--resume-from-step $step"
    fi
}

# recipe_setup: start the clock (T_START), set up and activate the venv (not for a dry run: it prints, it does
# not install), and reset the report when no stage has run yet.
recipe_setup() {
    T_START=$(date +%s.%N)
    if [ "$DRY" -eq 0 ]; then
        # shellcheck disable=SC1091
        source ./setup_env.sh
    fi
    if [ ! -d "$STATE_DIR" ]; then
        stage report-reset python -m nanochat.report reset
    fi
}

# data_start SHARDS: download the pretraining shards in the background (unless done), so the tokenizer can
# train on the first ones meanwhile; data_wait: wait for it and mark it done.
DATA_PID=""
data_start() {
    if [ -f "$STATE_DIR/$MARK-data.done" ]; then
        return 0
    fi
    if [ "$DRY" -eq 1 ]; then
        echo "python -m nanochat.dataset -n $1 &"
    else
        python -m nanochat.dataset -n "$1" &
        DATA_PID=$!
    fi
}
data_wait() {
    if [ -n "$DATA_PID" ]; then
        echo "waiting for the data download (pid $DATA_PID)"
        wait "$DATA_PID"
        mkdir -p "$STATE_DIR"
        touch "$STATE_DIR/$MARK-data.done"
    fi
}

# print_times: the wall time of each stage run by this invocation, and the total since recipe_setup.
print_times() {
    echo "Stage wall times (s), this invocation:"
    if [ "${#TIMES[@]}" -gt 0 ]; then
        printf '  %s\n' "${TIMES[@]}"
    fi
    awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN { printf "  %-26s %8.1f\n", "total", b - a }'
}

# print_summary: the headline tables of report.md (summary, results by stage, MegaContext vs vanilla, memory).
print_summary() {
    awk '/^## /{ show = ($0 ~ /^## (Summary|Results by stage|MegaContext vs vanilla|Memory)$/) } show' report.md
}
