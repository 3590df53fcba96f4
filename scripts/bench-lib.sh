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

# bench_wait_port PORT: waits until something accepts on 127.0.0.1:PORT
# (5 s at most); fails saying so otherwise.
bench_wait_port() {
    for _ in $(seq 1 50); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1',$1),1)" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "bench: nothing listens on port $1" >&2
    return 1
}

# bench_tree: the memory and CPU of $server_pid's whole process tree (JSON).
bench_tree() {
    python3 scripts/peers/proctree.py "$server_pid"
}

# bench_idle DIR RAMP_RATE SOURCES TARGET_ARGS...: `kometa load idle` with
# $connections against $server_pid (DIR/idle.{json,txt,err}), and the
# process tree sampled late in its 10 s hold, after the ramp's transient
# buffers are gone (DIR/tree-idle.json).
bench_idle() {
    local dir=$1 ramp_rate=$2 sources=$3 load_pid
    shift 3
    "$kometa" load idle -n "$connections" "$@" --server-pid "$server_pid" --source-addresses "$sources" \
        --ramp-rate "$ramp_rate" --settle 5s --duration 10s --json "$dir/idle.json" > "$dir/idle.txt" 2> "$dir/idle.err" &
    load_pid=$!
    sleep $(( connections / ramp_rate + 1 + 5 + 7 ))
    bench_tree > "$dir/tree-idle.json"
    wait "$load_pid" || true
}
