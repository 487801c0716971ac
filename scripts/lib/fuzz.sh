# shellcheck shell=bash
# The fuzz step of scripts/test: installs cargo-fuzz (pinned) when it is missing, builds every
# fuzz target of fuzz/ once, then runs each for a bounded time on a scratch copy of its
# committed corpus (fuzz/corpus/<target>/), so a run never adds files to the repository.
#
# libFuzzer's output goes to a log file per target; the step prints only each run's final
# statistics, and on a failure the failing input (path and base64), the log's path and the
# command that reproduces it.
#
# When cargo-fuzz cannot be installed (no registry), the step says so and replays the committed
# corpora through the plain tests instead; its summary line then reads "NOT FUZZED". Set
# FUZZ_REQUIRED=1 to make that a failure.
#
# Settings (environment):
#   FUZZ_SECONDS               seconds of fuzzing per target (default 20; 0 replays the corpora only)
#   FUZZ_INPUT_TIMEOUT_SECONDS one input running longer is a failure (default 10)
#   FUZZ_TARGET_DIR            cargo target directory of the sanitizer build (default fuzz/target)
#   FUZZ_SANITIZER             cargo fuzz's --sanitizer: none (default: catches panics, aborts,
#                              overflows and hangs) or address (also memory errors in the
#                              dependencies' unsafe code; the workspace forbids its own)
#   FUZZ_REQUIRED              1: fail instead of falling back when cargo-fuzz is unavailable
# Source it after common.sh, then run `run_step NAME fuzz_step`.

# Pinned: the version the targets were written and measured with.
CARGO_FUZZ_VERSION=0.13.2

# Prints the installed cargo-fuzz version, or nothing.
cargo_fuzz_version() {
    cargo fuzz --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n 1 || true
}

# Installs the pinned cargo-fuzz unless it is there; returns non-zero when it cannot.
ensure_cargo_fuzz() {
    local installed
    installed=$(cargo_fuzz_version)
    if [[ $installed == "$CARGO_FUZZ_VERSION" ]]; then
        info "cargo-fuzz: $CARGO_FUZZ_VERSION up to date"
        return 0
    fi
    info "cargo-fuzz: ${installed:-missing}, installing $CARGO_FUZZ_VERSION (cargo install cargo-fuzz --locked --version $CARGO_FUZZ_VERSION; log $FUZZ_WORK_DIR/cargo-install.log)"
    local started=$SECONDS
    if ! cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" >"$FUZZ_WORK_DIR/cargo-install.log" 2>&1; then
        tail -n 5 "$FUZZ_WORK_DIR/cargo-install.log" | sed 's/^/    | /'
        return 1
    fi
    installed=$(cargo_fuzz_version)
    if [[ $installed != "$CARGO_FUZZ_VERSION" ]]; then
        info "cargo install succeeded but \`cargo fuzz --version\` says '${installed:-nothing}'"
        return 1
    fi
    info "cargo-fuzz: installed $CARGO_FUZZ_VERSION in $((SECONDS - started))s"
}

# The plain-test replay of every committed corpus: the WAL targets' through prism-wal's
# integration test, the codec target's through the fuzz package's own test.
replay_fuzz_corpora() {
    local target_dir=${CARGO_TARGET_DIR:-$repo_root/target}
    info "replaying fuzz/corpus/{record_decode,recovery} (cargo test -p prism-wal --test it corpus::)"
    cargo test -q -p prism-wal --test it corpus:: || return 1
    # The same target directory as the workspace's tests: the fuzz package's lock file pins the
    # workspace's versions, so most dependencies are already built.
    info "replaying fuzz/corpus/codec_decode (cargo test --manifest-path fuzz/Cargo.toml --test corpus)"
    cargo test -q --manifest-path fuzz/Cargo.toml --target-dir "$target_dir" --test corpus || return 1
}

# Prints a file as base64 when it is small enough to paste back from a CI log.
print_input_base64() {
    local file=$1 size
    size=$(stat -c %s "$file")
    if ((size <= 4096)); then
        info "input ($size bytes, base64; restore with: base64 -d > crash.bin):"
        base64 -w 100 "$file" | sed 's/^/      /'
    else
        info "input: $size bytes (too large to print)"
    fi
}

# fuzz_one TARGET BINARY: fuzzes one target for FUZZ_SECONDS; returns non-zero on a finding.
fuzz_one() {
    local target=$1 binary=$2
    local corpus=$FUZZ_WORK_DIR/corpus/$target
    local artifacts=$FUZZ_WORK_DIR/artifacts/$target/
    local log=$FUZZ_WORK_DIR/$target.log
    mkdir -p "$corpus" "$artifacts"
    if [[ -d fuzz/corpus/$target ]]; then
        cp -a "fuzz/corpus/$target/." "$corpus/"
    fi
    local status=0
    # detect_odr_violation=0 as cargo-fuzz sets it: instrumented and uninstrumented copies of
    # one global are not a bug of ours.
    ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0 \
        "$binary" "$corpus" \
        -max_total_time="$FUZZ_SECONDS" \
        -timeout="$FUZZ_INPUT_TIMEOUT_SECONDS" \
        -artifact_prefix="$artifacts" \
        -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    # The final statistics (-print_final_stats), one line per target; the rest stays in the log.
    local runs speed new_units rss coverage
    runs=$(sed -n 's/^stat::number_of_executed_units:[[:space:]]*//p' "$log" | tail -n 1)
    speed=$(sed -n 's/^stat::average_exec_per_sec:[[:space:]]*//p' "$log" | tail -n 1)
    new_units=$(sed -n 's/^stat::new_units_added:[[:space:]]*//p' "$log" | tail -n 1)
    rss=$(sed -n 's/^stat::peak_rss_mb:[[:space:]]*//p' "$log" | tail -n 1)
    coverage=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [^ ]+' || true)
    if ((status == 0)); then
        info "$target: ok, ${runs:-?} runs (${speed:-?}/s), ${new_units:-?} new units, ${coverage:-no DONE line}, peak ${rss:-?} MB"
        rm -rf "$corpus"
        return 0
    fi
    info "$target: FAILED (libFuzzer exit $status) after ${runs:-?} runs; log: $log"
    # The panic (with its message, on the next line) or the sanitizer's report.
    grep -E -A1 '^thread .* panicked at' "$log" | head -n 4 | sed 's/^/    | /' || true
    grep -E '^(==[0-9]+==ERROR|SUMMARY:)' "$log" | head -n 3 | sed 's/^/    | /' || true
    local found=0 input
    for input in "$artifacts"*; do
        [[ -f $input ]] || continue
        found=1
        info "failing input: $input"
        print_input_base64 "$input"
        info "reproduce: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $FUZZ_SANITIZER_USED $target $input)"
        info "       or: $binary $input"
    done
    ((found == 1)) || info "no failing input was written; see the log"
    return 1
}

fuzz_step() {
    local seconds=${FUZZ_SECONDS:-20}
    if ! [[ $seconds =~ ^[0-9]+$ ]]; then
        info "FUZZ_SECONDS must be a whole number of seconds, not '$seconds'"
        return 1
    fi
    FUZZ_INPUT_TIMEOUT_SECONDS=${FUZZ_INPUT_TIMEOUT_SECONDS:-10}
    FUZZ_WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/prism-fuzz.XXXXXX") || return 1
    info "work directory (logs, scratch corpora, failing inputs): $FUZZ_WORK_DIR"

    if ((seconds == 0)); then
        note_step "NOT FUZZED (FUZZ_SECONDS=0): committed corpora replayed only"
        info "FUZZ_SECONDS=0: replaying the committed corpora through the plain tests, no fuzzing"
        replay_fuzz_corpora
        return
    fi
    if ! ensure_cargo_fuzz; then
        note_step "NOT FUZZED: cargo-fuzz $CARGO_FUZZ_VERSION could not be installed; committed corpora replayed only"
        info "WARNING: cargo-fuzz $CARGO_FUZZ_VERSION is missing and could not be installed (no registry?)."
        info "WARNING: nothing is fuzzed; replaying the committed corpora through the plain tests instead."
        if [[ ${FUZZ_REQUIRED:-0} == 1 ]]; then
            info "FUZZ_REQUIRED=1: failing"
            return 1
        fi
        replay_fuzz_corpora
        return
    fi
    FUZZ_SECONDS=$seconds

    local target_dir=${FUZZ_TARGET_DIR:-$repo_root/fuzz/target}
    local triple
    triple=$(rustc -vV | sed -n 's/^host: //p')
    # No sanitizer by default: the workspace forbids unsafe code, so AddressSanitizer only
    # watches the dependencies' unsafe code, and it cost this step a third more build time
    # (354 s against 248 s, cold, on the 2-core machine) and seven eighths of its executions
    # (codec_decode 26,000 against 204,000 inputs a second).
    local sanitizer=${FUZZ_SANITIZER:-none}
    local build_log=$FUZZ_WORK_DIR/build.log
    local started=$SECONDS
    info "building every target (RUSTC_BOOTSTRAP=1 cargo fuzz build --sanitizer $sanitizer; target dir $target_dir; log $build_log)"
    # RUSTC_BOOTSTRAP: the sanitizer and coverage flags are nightly-only, and the machine has
    # one stable toolchain.
    if ! (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build --sanitizer "$sanitizer" --target-dir "$target_dir") >"$build_log" 2>&1; then
        info "build FAILED; last lines of $build_log:"
        tail -n 20 "$build_log" | sed 's/^/    | /'
        return 1
    fi
    info "built in $((SECONDS - started))s"
    FUZZ_SANITIZER_USED=$sanitizer

    local targets
    targets=$(cd fuzz && cargo fuzz list) || return 1
    local target failed=0 count=0
    for target in $targets; do
        fuzz_one "$target" "$target_dir/$triple/release/$target" || failed=1
        count=$((count + 1))
    done
    ((count > 0)) || { info "cargo fuzz list named no target"; return 1; }
    info "fuzzed $count targets for ${FUZZ_SECONDS}s each"
    return "$failed"
}
