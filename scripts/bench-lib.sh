# shellcheck shell=bash
# Shared by scripts/bench-*.sh (sourced, not run): release build, a results
# directory, a server that is stopped on exit, fresh source addresses.

# bench_setup NAME: builds the release binaries, sets $kometa and $out
# (target/NAME/TIMESTAMP), and stops $server_pid on exit.
bench_setup() {
    echo "== cargo build --release --workspace --bins"
    cargo build --release --workspace --bins --quiet
    # shellcheck disable=SC2034 # used by the sourcing script
    kometa=target/release/kometa
    out="target/$1/$(date +%Y%m%d-%H%M%S)"
    mkdir -p "$out"
    echo "$1: results in $out"
    server_pid=""
    trap bench_stop_server EXIT
}

bench_stop_server() {
    if [ -n "${server_pid:-}" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}

# bench_sources FIRST_OCTET: a fresh 127.X.0.2-127.X.0.20 range per call,
# X counting up from FIRST_OCTET (closed connections sit in TIME_WAIT, so
# reusing addresses would run out of ports).
bench_run_number=0
bench_sources() {
    bench_run_number=$((bench_run_number + 1))
    echo "127.$(($1 + bench_run_number)).0.2-127.$(($1 + bench_run_number)).0.20"
}
