#!/usr/bin/env bash
# The Kometa figures in docs/benchmarks.md ("Measurements"), one command:
# each scenario runs against a fresh release server (--shards = cores,
# default configuration) on loopback, and its report lands in
# target/bench-kometa/TIMESTAMP/NAME.txt (plus NAME.json).
#
# Usage: scripts/bench-kometa.sh [-n CONNECTIONS] [--only "idle broadcast-10 ..."]
#                               [--drivers "io_uring epoll"]
# Each scenario runs once per I/O driver (io.driver), side by side; reports
# are NAME-DRIVER.txt/json.
# Scenarios: idle idle-4ch broadcast-10 broadcast-max broadcast-2 broadcast-5k
#            broadcast-10subs churn connect connect-subscribe
# Bounded: every scenario has a duration and a drain; all of them take about
# 10 minutes (both drivers) for 15,000 connections. Run on a quiet machine: before each
# scenario the script measures how busy the CPUs were over one second and
# warns above 10% (the load average would still count the previous scenario).
set -euo pipefail
cd "$(dirname "$0")/.."

connections=15000
drivers="io_uring epoll"
only="idle idle-4ch broadcast-10 broadcast-max broadcast-2 broadcast-5k broadcast-10subs churn connect connect-subscribe"
while [ $# -gt 0 ]; do
    case "$1" in
        -n) connections=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --drivers) drivers=$2; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "bench-kometa: unknown argument $1" >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_setup bench-kometa

# Percent of CPU time not idle over the next second, all CPUs.
cpu_busy_percent() {
    local a b
    read -ra a < /proc/stat
    sleep 1
    read -ra b < /proc/stat
    local total=0 idle i
    for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
    idle=$((b[4] - a[4] + b[5] - a[5]))
    echo $(( total > 0 ? 100 * (total - idle) / total : 0 ))
}

run() {
    local name=$1-$driver scenario=$2
    shift 2
    local busy
    busy=$(cpu_busy_percent)
    echo "== $name (CPUs ${busy}% busy just before)"
    if [ "$busy" -gt 10 ]; then
        echo "bench-kometa: warning: the machine is not quiet (${busy}% busy); figures will be low" >&2
    fi
    local dir="$out/$name"
    mkdir -p "$dir"
    "$kometa" serve --io-driver "$driver" --listen 127.0.0.1:0 --admin "unix:$dir/admin.sock" > "$dir/stdout" 2> "$dir/stderr" &
    server_pid=$!
    local port=""
    for _ in $(seq 1 100); do
        port=$(sed -n 's/.*listen=[^ ]*:\([0-9]*\).*/\1/p' "$dir/stdout" | head -1)
        [ -n "$port" ] && break
        sleep 0.1
    done
    [ -n "$port" ] || { echo "bench-kometa: server did not start" >&2; cat "$dir/stderr" >&2; exit 1; }
    sleep 1
    local admin=()
    [ "$scenario" = idle ] || [ "$scenario" = connect ] || admin=(--admin "unix:$dir/admin.sock")
    echo "\$ kometa load $scenario $* ${admin[*]}" > "$out/$name.txt"
    "$kometa" load "$scenario" --url "ws://127.0.0.1:$port/ws" --server-pid "$server_pid" \
        --source-addresses "$(bench_sources 80)" "${admin[@]}" "$@" --json "$out/$name.json" >> "$out/$name.txt" 2> "$dir/load.err" || true
    bench_stop_server
    grep -E '^(established|deliveries|last subscriber|server RSS|bytes|handshake|resumes|publications)' "$out/$name.txt" || tail -5 "$out/$name.txt"
    sleep 2
}

n=$connections
for name in $only; do
  for driver in $drivers; do
    case "$name" in
        idle) run idle idle -n "$n" --ramp-rate 5000 --settle 5s --duration 10s ;;
        idle-4ch) run idle-4ch idle -n "$n" --channels 4 --channel-pool 1000 --ramp-rate 5000 --settle 5s --duration 10s ;;
        broadcast-10) run broadcast-10 broadcast -n "$n" --ramp-rate 5000 --rate 10 --duration 20s ;;
        broadcast-max) run broadcast-max broadcast -n "$n" --ramp-rate 5000 --rate max --window 16 --duration 5s --drain 30s ;;
        broadcast-2) run broadcast-2 broadcast -n "$n" --ramp-rate 5000 --rate 2 --duration 10s ;;
        broadcast-5k) run broadcast-5k broadcast -n 5000 --ramp-rate 5000 --rate 10 --duration 10s ;;
        broadcast-10subs) run broadcast-10subs broadcast -n 10 --rate 10 --duration 5s ;;
        churn) run churn churn -n 5000 --rate 20 --churn-rate 200 --duration 10s ;;
        connect) run connect connect -n 20000 --in-flight 64 --duration 20s ;;
        connect-subscribe) run connect-subscribe connect -n 20000 --in-flight 64 --duration 20s --subscribe ;;
        *) echo "bench-kometa: unknown scenario $name" >&2; exit 2 ;;
    esac
  done
done
echo "bench-kometa: reports in $out"
