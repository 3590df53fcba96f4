#!/usr/bin/env bash
# Kometa side by side with what users would otherwise pick, in one run on
# one machine, on loopback:
#   kometa-io_uring, kometa-epoll
#            Kometa, release build, --shards = cores, with each I/O driver
#            (io.driver; plain "kometa" runs the default driver)
#   nchan    Nginx with the Nchan module (Debian: nginx-light, libnginx-mod-nchan), 2 workers
#   node-ws  a Node `ws` broadcast server (npm ws, scripts/peers/node-ws)
#   floor    kometa-floor: a plain loop writing one pre-encoded frame to every socket
# Each gets the same `kometa load` scenarios:
#   idle       N connections held: memory per connection (server process tree)
#   broadcast  N subscribers, 10 publications/s: latency to the last subscriber
#   max        N subscribers, publish as fast as the server takes: deliveries/s
#   connect    handshakes per second (not for the floor)
# then scripts/peers/report.py prints the figures and the ratios the
# performance targets are about, and draws SVG plots.
#
# Usage: scripts/bench-peers.sh [-n CONNECTIONS] [--servers "kometa-io_uring kometa-epoll nchan node-ws floor"] [--docs]
#   --docs  also copy the plots and the summary into docs/ (docs/img/peers-*.svg)
# Bounded: every scenario has a duration and a drain; the whole run takes
# about 10 minutes for 15,000 connections. Needs root or sudo only to install
# missing Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

connections=15000
servers="kometa-io_uring kometa-epoll nchan node-ws floor"
docs=false
while [ $# -gt 0 ]; do
    case "$1" in
        -n) connections=$2; shift 2 ;;
        --servers) servers=$2; shift 2 ;;
        --docs) docs=true; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "bench-peers: unknown argument $1" >&2; exit 2 ;;
    esac
done

apt_install() {
    local runner=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then runner=(sudo); else
            echo "bench-peers: need root or sudo to install $*" >&2; exit 1
        fi
    fi
    "${runner[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${runner[@]}" apt-get install -y -qq --no-install-recommends "$@"
}

missing=()
[ -e /usr/lib/nginx/modules/ngx_nchan_module.so ] || missing+=(nginx-light libnginx-mod-nchan)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench-peers: installing ${missing[*]}"
    apt_install "${missing[@]}"
    # Debian starts the packaged nginx on port 80; we run our own.
    (service nginx stop || true) >/dev/null 2>&1
fi
if [ ! -d scripts/peers/node-ws/node_modules/ws ]; then
    (cd scripts/peers/node-ws && npm ci --no-audit --no-fund --loglevel=error)
fi
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_setup bench-peers

# Waits for "… ready listen=ADDR:PORT" in a server's stdout file.
wait_ready() {
    local file=$1
    for _ in $(seq 1 100); do
        if grep -q 'listen=' "$file" 2>/dev/null; then
            port=$(sed -n 's/.*listen=[^ ]*:\([0-9]*\).*/\1/p' "$file" | head -1)
            return 0
        fi
        sleep 0.1
    done
    echo "bench-peers: server did not start:" >&2
    cat "$file" >&2
    return 1
}

start_server() {
    local name=$1 dir="$out/$1"
    mkdir -p "$dir"
    case "$name" in
        kometa|kometa-*)
            local driver=auto
            [ "$name" = kometa ] || driver=${name#kometa-}
            "$kometa" serve --io-driver "$driver" --listen 127.0.0.1:0 --admin "unix:$dir/admin.sock" > "$dir/stdout" 2> "$dir/stderr" &
            server_pid=$!
            wait_ready "$dir/stdout"
            target=(--url "ws://127.0.0.1:$port/ws")
            publish=(--admin "unix:$dir/admin.sock")
            ;;
        floor)
            target/release/kometa-floor --listen 127.0.0.1:0 > "$dir/stdout" 2> "$dir/stderr" &
            server_pid=$!
            wait_ready "$dir/stdout"
            target=(--protocol raw --url "ws://127.0.0.1:$port/sub/{channel}")
            publish=(--publish-url "http://127.0.0.1:$port/pub/{channel}")
            ;;
        node-ws)
            node scripts/peers/node-ws/server.mjs 0 > "$dir/stdout" 2> "$dir/stderr" &
            server_pid=$!
            wait_ready "$dir/stdout"
            target=(--protocol raw --url "ws://127.0.0.1:$port/sub/{channel}")
            publish=(--publish-url "http://127.0.0.1:$port/pub/{channel}")
            ;;
        nchan)
            port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
            mkdir -p "$dir/nginx"
            sed -e "s#@PREFIX@#$PWD/$dir/nginx#g" -e "s#@PORT@#$port#g" scripts/peers/nchan.conf.template > "$dir/nginx/nginx.conf"
            nginx -p "$PWD/$dir/nginx" -c "$PWD/$dir/nginx/nginx.conf" > "$dir/stdout" 2> "$dir/stderr" &
            server_pid=$!
            bench_wait_port "$port"
            target=(--protocol raw --url "ws://127.0.0.1:$port/sub/{channel}")
            publish=(--publish-url "http://127.0.0.1:$port/pub/{channel}")
            ;;
    esac
    echo "== $name (pid $server_pid, port $port)"
}

for name in $servers; do
    start_server "$name"
    dir="$out/$name"
    sleep 1
    bench_tree > "$dir/tree-before.json"

    # Idle: memory per connection, sampled over the whole process tree in the hold.
    bench_idle "$dir" 5000 "$(bench_sources 40)" "${target[@]}"
    sleep 2

    # Broadcast at 10/s: latency to the last subscriber.
    before=$(bench_tree)
    "$kometa" load broadcast -n "$connections" "${target[@]}" "${publish[@]}" --server-pid "$server_pid" --source-addresses "$(bench_sources 40)" \
        --ramp-rate 5000 --rate 10 --duration 20s --json "$dir/broadcast.json" > "$dir/broadcast.txt" 2> "$dir/broadcast.err" || true
    after=$(bench_tree)
    printf '{"before":%s,"after":%s}\n' "$before" "$after" > "$dir/tree-broadcast.json"
    sleep 2

    # As fast as the server takes publications: deliveries per second.
    before=$(bench_tree)
    "$kometa" load broadcast -n "$connections" "${target[@]}" "${publish[@]}" --server-pid "$server_pid" --source-addresses "$(bench_sources 40)" \
        --ramp-rate 5000 --rate max --window 16 --duration 5s --drain 30s --json "$dir/max.json" > "$dir/max.txt" 2> "$dir/max.err" || true
    after=$(bench_tree)
    printf '{"before":%s,"after":%s}\n' "$before" "$after" > "$dir/tree-max.json"
    sleep 2

    # Handshakes per second. The floor is a send loop, not a WebSocket
    # server (it never answers a close), so it has no handshake figure.
    [ "$name" = floor ] || "$kometa" load connect -n 20000 "${target[@]}" --server-pid "$server_pid" --source-addresses "$(bench_sources 40)" \
        --in-flight 64 --duration 20s --json "$dir/connect.json" > "$dir/connect.txt" 2> "$dir/connect.err" || true

    bench_stop_server
    grep -E '^(deliveries|last subscriber|server RSS)' "$dir/broadcast.txt" || true
done

report_flags=()
[ "$docs" = true ] && report_flags+=(--docs)
python3 scripts/peers/report.py "$out" "${report_flags[@]}"
