#!/usr/bin/env bash
# The cluster figures in docs/benchmarks.md ("Cluster"), one command: the
# same load against one node (no Redis) and against N nodes sharing one
# private redis-server, in one run on this machine. Subscribers are spread
# over every node; publications go through the first node's admin socket.
# Reports land in target/bench-cluster/TIMESTAMP/{single,cluster}-NAME.txt
# (plus .json), and Redis's CPU time per scenario in NAME.redis.
#
# Usage: scripts/bench-cluster.sh [-n CONNECTIONS] [--nodes N] [--only "broadcast-10 ..."]
# Scenarios: broadcast-10 (10/s: last-subscriber and publish-ack latency),
#            broadcast-max (as fast as taken: deliveries/s),
#            publish-max (10 subscribers, 512 publications in flight:
#            acknowledged publications/s)
# Bounded: each scenario has a duration and a drain; all take about 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

connections=15000
nodes=3
only="broadcast-10 broadcast-max publish-max"
while [ $# -gt 0 ]; do
    case "$1" in
        -n) connections=$2; shift 2 ;;
        --nodes) nodes=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "bench-cluster: unknown argument $1" >&2; exit 2 ;;
    esac
done
command -v redis-server >/dev/null || { echo "bench-cluster: redis-server missing (scripts/install-test-deps.sh installs it)" >&2; exit 1; }

# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_setup bench-cluster

pids=()
redis_pid=""
stop_all() {
    for pid in "${pids[@]}" $redis_pid; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}" $redis_pid; do wait "$pid" 2>/dev/null || true; done
    pids=()
    redis_pid=""
}
trap stop_all EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_node DIR [EXTRA ARGS]: a release node on a free port; sets
# $node_port and adds its pid to $pids (not in a subshell, for that).
start_node() {
    local dir=$1
    shift
    mkdir -p "$dir"
    "$kometa" serve --listen 127.0.0.1:0 --admin "unix:$dir/admin.sock" "$@" > "$dir/stdout" 2> "$dir/stderr" &
    pids+=($!)
    local port=""
    for _ in $(seq 1 100); do
        port=$(sed -n 's/.*listen=[^ ]*:\([0-9]*\).*/\1/p' "$dir/stdout" | head -1)
        [ -n "$port" ] && break
        sleep 0.1
    done
    [ -n "$port" ] || { echo "bench-cluster: node did not start" >&2; cat "$dir/stderr" >&2; exit 1; }
    node_port=$port
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

run() {
    local topology=$1 name=$2 scenario=$3
    shift 3
    local dir="$out/$topology-$name"
    mkdir -p "$dir"
    local urls=() node_pids=() redis_args=()
    if [ "$topology" = cluster ]; then
        local redis_port
        redis_port=$(free_port)
        redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" > "$dir/redis.log" 2>&1 &
        redis_pid=$!
        for _ in $(seq 1 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
        redis_args=(--redis "redis://127.0.0.1:$redis_port")
        for i in $(seq 1 "$nodes"); do
            start_node "$dir/node$i" "${redis_args[@]}" --node-id "node$i" ${cluster_shards:+--shards "$cluster_shards"}
            urls+=("ws://127.0.0.1:$node_port/ws")
            node_pids+=("${pids[-1]}")
        done
    else
        start_node "$dir/node1"
        urls+=("ws://127.0.0.1:$node_port/ws")
        node_pids+=("${pids[-1]}")
    fi
    sleep 1
    local url_list pid_list redis_before=0
    url_list=$(IFS=,; echo "${urls[*]}")
    pid_list=$(IFS=,; echo "${node_pids[*]}")
    [ -n "$redis_pid" ] && redis_before=$(cpu_ticks "$redis_pid")
    echo "== $topology $name"
    echo "\$ kometa load $scenario --url $url_list --admin unix:$dir/node1/admin.sock $*" > "$out/$topology-$name.txt"
    "$kometa" load "$scenario" --url "$url_list" --server-pid "$pid_list" --admin "unix:$dir/node1/admin.sock" \
        --source-addresses "$(bench_sources 120)" "$@" --json "$out/$topology-$name.json" \
        >> "$out/$topology-$name.txt" 2> "$dir/load.err" || true
    if [ -n "$redis_pid" ]; then
        local ticks=$(( $(cpu_ticks "$redis_pid") - redis_before ))
        local hz
        hz=$(getconf CLK_TCK)
        echo "redis CPU      $(awk -v t="$ticks" -v hz="$hz" 'BEGIN { printf "%.2f", t / hz }') s during the scenario" | tee "$out/$topology-$name.redis" >> "$out/$topology-$name.txt"
    fi
    stop_all
    grep -E '^(connections|publications|deliveries|last subscriber|publish ack|server CPU|redis CPU)' "$out/$topology-$name.txt" || tail -5 "$out/$topology-$name.txt"
    sleep 2
}

n=$connections
for name in $only; do
    for topology in single cluster; do
        case "$name" in
            broadcast-10) run "$topology" broadcast-10 broadcast -n "$n" --ramp-rate 5000 --rate 10 --duration 20s ;;
            broadcast-max) run "$topology" broadcast-max broadcast -n "$n" --ramp-rate 5000 --rate max --window 16 --duration 5s --drain 30s ;;
            publish-max) run "$topology" publish-max broadcast -n "$nodes" --rate max --window 512 --duration 5s --drain 30s ;;
            *) echo "bench-cluster: unknown scenario $name" >&2; exit 2 ;;
        esac
    done
done
echo "bench-cluster: reports in $out"
