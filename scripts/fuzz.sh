#!/usr/bin/env bash
# Fuzz every Kometa parser with cargo-fuzz (libFuzzer), SECONDS each.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      # default: 30 s, every target
#   FUZZ_SANITIZER=none scripts/fuzz.sh 60     # without AddressSanitizer
#
# Targets live in fuzz/ (a cargo workspace of its own; fuzz/src/checks.rs
# has each target's input format and invariants, and the same checks run in
# CI as proptests in tests/parsers_never_panic.rs). Not part of CI: it takes
# minutes and needs the instrumented build; run it after touching a parser.
#
# Works on the stable toolchain: cargo-fuzz asks rustc for
# -Zsanitizer=address, which stable accepts with RUSTC_BOOTSTRAP=1 (set
# here only for the fuzz build; FUZZ_SANITIZER=none needs no -Z flag). Installs cargo-fuzz if it is missing.
# Builds every target once, then runs the binaries one after the other
# (one core each), so edits to src/ during a run do not trigger rebuilds.
#
# The corpus grows in fuzz/corpus/TARGET (seeded read-only from
# fuzz/seeds/TARGET, with fuzz/dicts/TARGET.dict when present); crashes land
# in fuzz/artifacts/TARGET; logs in fuzz/target/logs. Exits non-zero if any
# target crashed, timed out or ran out of memory; reproduce and minimise
# with:
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run  TARGET artifacts/TARGET/crash-…
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz tmin TARGET artifacts/TARGET/crash-…
# then add the minimised input as a regression case to
# tests/parsers_never_panic.rs.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-30}
shift || true
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2
    exit 2
fi
sanitizer=${FUZZ_SANITIZER:-address}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

echo "== building ${#targets[@]} targets (sanitizer: $sanitizer)"
if [ "${#targets[@]}" -eq 1 ]; then
    RUSTC_BOOTSTRAP=1 cargo fuzz build --sanitizer "$sanitizer" "${targets[0]}"
else
    RUSTC_BOOTSTRAP=1 cargo fuzz build --sanitizer "$sanitizer"
fi
bin_dir=target/$(rustc -vV | sed -n 's/^host: //p')/release
mkdir -p target/logs

failed=0
summary=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    log=target/logs/$target.log
    before=$(find "artifacts/$target" -type f | wc -l)
    args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
        -artifact_prefix="artifacts/$target/")
    [ -f "dicts/$target.dict" ] && args+=(-dict="dicts/$target.dict")
    dirs=("corpus/$target")
    [ -d "seeds/$target" ] && dirs+=("seeds/$target")
    echo "== $target: ${seconds}s"
    set +e
    "$bin_dir/$target" "${args[@]}" "${dirs[@]}" >"$log" 2>&1
    status=$?
    set -e
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -1)
    after=$(find "artifacts/$target" -type f | wc -l)
    if [ "$status" -ne 0 ] || [ "$after" -gt "$before" ]; then
        failed=1
        result="FAILED (exit $status; see $log and fuzz/artifacts/$target)"
        grep -m1 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer" "$log" || true
        grep -A2 -m1 "panicked at" "$log" | tail -n +2 || true
    else
        result=ok
    fi
    summary+=("$(printf '%-16s %-8s runs=%-10s exec/s=%-7s %s' "$target" "$result" "${runs:-?}" "${speed:-?}" "${cov:-}")")
done

echo
echo "== fuzz summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
    echo "RESULT: CRASHES FOUND"
    exit 1
fi
echo "RESULT: no crashes"
