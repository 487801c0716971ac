# shellcheck shell=bash
# Shared helpers for the scripts in scripts/: timestamped step headers, running a
# step while recording its outcome and duration, and fatal errors.
# Source it; it defines functions and two arrays, and runs nothing.

# Outcomes of the steps run so far, one "name: ok|FAILED (Ns)" line each.
STEP_RESULTS=()
# Names of the steps that failed.
STEP_FAILURES=()
# Set (through note_step) by a step that passed without doing all of its work, e.g.
# "NOT FUZZED: ..."; run_step puts it on the summary line, so a degraded pass never reads like a full one.
STEP_NOTE=""
# "name: note" of every step that set STEP_NOTE.
STEP_NOTES=()

# Prints a header line with the UTC time.
header() {
    printf '\n==> [%s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"
}

# Prints an informational line under the current header.
info() {
    printf '    %s\n' "$*"
}

# Prints an error and exits non-zero.
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# run_step NAME COMMAND [ARGS...]: prints a header, runs the command, records the
# outcome and duration, and carries on after a failure so one run reports every
# failing step. The caller decides the exit status from STEP_FAILURES.
run_step() {
    local name=$1
    shift
    header "$name"
    local started=$SECONDS
    STEP_NOTE=""
    local outcome=ok
    if ! "$@"; then
        outcome=FAILED
        STEP_FAILURES+=("$name")
    fi
    local line="$name: $outcome ($((SECONDS - started))s)"
    if [[ -n $STEP_NOTE ]]; then
        line+=", $STEP_NOTE"
        STEP_NOTES+=("$name: $STEP_NOTE")
    fi
    STEP_RESULTS+=("$line")
}

# note_step TEXT: called by a step that passes without doing all of its work; run_step
# shows TEXT on the step's summary line and the summary repeats it as a warning.
note_step() {
    STEP_NOTE=$*
}

# Prints the outcome of every step; returns non-zero if any failed.
summarize_steps() {
    header "summary"
    local line
    for line in "${STEP_RESULTS[@]}"; do
        info "$line"
    done
    for line in "${STEP_NOTES[@]}"; do
        printf 'WARNING: %s\n' "$line" >&2
    done
    if ((${#STEP_FAILURES[@]} > 0)); then
        local joined
        joined=$(printf '%s; ' "${STEP_FAILURES[@]}")
        printf 'FAILED: %s\n' "${joined%; }" >&2
        return 1
    fi
    if ((${#STEP_NOTES[@]} > 0)); then
        info "all steps passed, with the warnings above"
    else
        info "all steps passed"
    fi
}
