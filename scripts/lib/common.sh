# shellcheck shell=bash
# Shared helpers for the scripts in scripts/: timestamped step headers, running a
# step while recording its outcome and duration, and fatal errors.
# Source it; it defines functions and two arrays, and runs nothing.

# Outcomes of the steps run so far, one "name: ok|FAILED (Ns)" line each.
STEP_RESULTS=()
# Names of the steps that failed.
STEP_FAILURES=()

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
    if "$@"; then
        STEP_RESULTS+=("$name: ok ($((SECONDS - started))s)")
    else
        STEP_RESULTS+=("$name: FAILED ($((SECONDS - started))s)")
        STEP_FAILURES+=("$name")
    fi
}

# Prints the outcome of every step; returns non-zero if any failed.
summarize_steps() {
    header "summary"
    local line
    for line in "${STEP_RESULTS[@]}"; do
        info "$line"
    done
    if ((${#STEP_FAILURES[@]} > 0)); then
        local joined
        joined=$(printf '%s; ' "${STEP_FAILURES[@]}")
        printf 'FAILED: %s\n' "${joined%; }" >&2
        return 1
    fi
    info "all steps passed"
}
