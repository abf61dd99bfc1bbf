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

# print_times [T_START]: the wall time of each stage run by this invocation (and the total since T_START).
print_times() {
    echo "Stage wall times (s), this invocation:"
    if [ "${#TIMES[@]}" -gt 0 ]; then
        printf '  %s\n' "${TIMES[@]}"
    fi
    if [ -n "${1:-}" ]; then
        awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "  %-26s %8.1f\n", "total", b - a }'
    fi
}

# print_summary: the headline tables of report.md (summary, results by stage, MegaContext vs vanilla).
print_summary() {
    awk '/^## /{ show = ($0 ~ /^## (Summary|Results by stage|MegaContext vs vanilla)$/) } show' report.md
}
