#!/usr/bin/env bash
# TLS figures, Kometa next to Nginx+Nchan (OpenSSL), in one run on one
# machine, on loopback, with one ECDSA P-256 certificate from a test CA:
#   kometa-plain  Kometa without TLS (the baseline of the idle figure)
#   kometa        Kometa with tls.cert_file/tls.key_file (rustls)
#   nchan         Nginx + Nchan, `listen ... ssl`, 2 workers
# Each gets the same `kometa load` scenarios:
#   idle     N wss:// (ws:// for kometa-plain) connections held: memory per
#            connection of the server's process tree
#   connect  full TLS handshakes + WebSocket upgrades per second, 2 generator
#            processes (a client's side of a handshake costs more than the
#            server's: one process would be the bottleneck; the
#            generator never resumes a session)
# and the summary (table + target/bench-tls/RUN/summary.json) says what one
# idle TLS connection costs over a plain one.
#
# Usage: scripts/bench-tls.sh [-n CONNECTIONS] [--servers "kometa-plain kometa nchan"]
# Bounded: about 3 minutes for 15,000 connections. Needs root or sudo only to
# install missing Debian packages (nginx-light, libnginx-mod-nchan).
set -euo pipefail
cd "$(dirname "$0")/.."

connections=15000
servers="kometa-plain kometa nchan"
while [ $# -gt 0 ]; do
    case "$1" in
        -n) connections=$2; shift 2 ;;
        --servers) servers=$2; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "bench-tls: unknown argument $1" >&2; exit 2 ;;
    esac
done

if [[ " $servers " == *" nchan "* ]] && [ ! -e /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
    runner=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "bench-tls: need root or sudo to install nginx" >&2; exit 1; }
        runner=(sudo)
    fi
    echo "bench-tls: installing nginx-light libnginx-mod-nchan"
    "${runner[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${runner[@]}" apt-get install -y -qq --no-install-recommends nginx-light libnginx-mod-nchan
    # Debian starts the packaged nginx on port 80; we run our own.
    (service nginx stop || true) >/dev/null 2>&1
fi
command -v openssl >/dev/null 2>&1 || { echo "bench-tls: needs the openssl command" >&2; exit 1; }

# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_setup bench-tls

# A test CA and a leaf for 127.0.0.1 it signed (a self-signed leaf is not a
# valid trust anchor for webpki).
pki="$out/pki"
mkdir -p "$pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=kometa-bench-ca \
    -keyout "$pki/ca.key" -out "$pki/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$pki/key.pem" -out "$pki/leaf.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$pki/leaf.ext"
openssl x509 -req -in "$pki/leaf.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" -CAcreateserial -days 2 \
    -extfile "$pki/leaf.ext" -out "$pki/cert.pem" 2>/dev/null

start_server() {
    local name=$1 dir="$out/$1"
    mkdir -p "$dir"
    case "$name" in
        kometa|kometa-plain)
            local tls=()
            [ "$name" = kometa ] && tls=(--tls-cert-file "$pki/cert.pem" --tls-key-file "$pki/key.pem")
            "$kometa" serve --listen 127.0.0.1:0 --admin "unix:$dir/admin.sock" "${tls[@]}" > "$dir/stdout" 2> "$dir/stderr" &
            server_pid=$!
            for _ in $(seq 1 100); do grep -q 'listen=' "$dir/stdout" 2>/dev/null && break; sleep 0.1; done
            port=$(sed -n 's/.*listen=[^ ]*:\([0-9]*\).*/\1/p' "$dir/stdout" | head -1)
            [ -n "$port" ] || { echo "bench-tls: $name did not start" >&2; cat "$dir/stderr" >&2; exit 1; }
            if [ "$name" = kometa ]; then
                target=(--url "wss://127.0.0.1:$port/ws" --tls-ca "$pki/ca.pem")
            else
                target=(--url "ws://127.0.0.1:$port/ws")
            fi
            ;;
        nchan)
            port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
            mkdir -p "$dir/nginx"
            sed -e "s#@PREFIX@#$PWD/$dir/nginx#g" -e "s#@PORT@#$port ssl#g" scripts/peers/nchan.conf.template \
                | sed -e "s#^\(        listen .*\)\$#\1\n        ssl_certificate $PWD/$pki/cert.pem;\n        ssl_certificate_key $PWD/$pki/key.pem;\n        ssl_protocols TLSv1.2 TLSv1.3;#" \
                > "$dir/nginx/nginx.conf"
            nginx -p "$PWD/$dir/nginx" -c "$PWD/$dir/nginx/nginx.conf" > "$dir/stdout" 2> "$dir/stderr" &
            server_pid=$!
            bench_wait_port "$port"
            target=(--protocol raw --url "wss://127.0.0.1:$port/sub/{channel}" --tls-ca "$pki/ca.pem")
            ;;
        *) echo "bench-tls: unknown server $name" >&2; exit 2 ;;
    esac
    echo "== $name (pid $server_pid, port $port)"
}

for name in $servers; do
    start_server "$name"
    dir="$out/$name"
    sleep 1
    bench_tree > "$dir/tree-before.json"

    # Idle: memory per connection, sampled late in the 10 s hold.
    bench_idle "$dir" 2000 "$(bench_sources 60)" "${target[@]}"
    grep -E '^(connections|server)' "$dir/idle.txt" || true
    sleep 2

    # Handshakes per second: a full TLS handshake and an upgrade each.
    "$kometa" load connect -n 20000 --workers 2 "${target[@]}" --server-pid "$server_pid" --source-addresses "$(bench_sources 60)" \
        --in-flight 64 --duration 20s --json "$dir/connect.json" > "$dir/connect.txt" 2> "$dir/connect.err" || true
    grep -E '^connections' "$dir/connect.txt" || true
    bench_stop_server
done

python3 - "$out" $servers <<'PY'
import json, os, sys
run, servers = sys.argv[1], sys.argv[2:]
def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
rows = {}
for name in servers:
    base = os.path.join(run, name)
    idle, connect = load(f"{base}/idle.json") or {}, load(f"{base}/connect.json") or {}
    before, held = load(f"{base}/tree-before.json"), load(f"{base}/tree-idle.json")
    established = idle.get("connections", {}).get("established") or 0
    per_conn = (held["rss_bytes"] - before["rss_bytes"]) / established if before and held and established else None
    rows[name] = {
        "connections": established,
        "idle_errors": idle.get("connections", {}).get("connect_errors_total"),
        "bytes_per_connection": per_conn,
        "slab_per_socket_bytes": idle.get("server", {}).get("slab_per_socket_bytes"),
        "handshakes_per_s": connect.get("connections", {}).get("connects_per_s"),
        "handshake_p99_ms": connect.get("latency_ms", {}).get("handshake", {}).get("p99_ms"),
        "connect_errors": connect.get("connections", {}).get("connect_errors_total"),
    }
fmt = lambda v, d=0: "-" if v is None else f"{v:,.{d}f}"
print(f"\n{'server':14} {'idle conns':>10} {'B/conn (tree)':>14} {'handshakes/s':>13} {'hs p99 ms':>10} {'errors':>7}")
for name, r in rows.items():
    errors = (r["idle_errors"] or 0) + (r["connect_errors"] or 0)
    print(f"{name:14} {fmt(r['connections']):>10} {fmt(r['bytes_per_connection']):>14} "
          f"{fmt(r['handshakes_per_s']):>13} {fmt(r['handshake_p99_ms'], 1):>10} {errors:>7}")
summary = {"rows": rows}
plain, tls, nchan = rows.get("kometa-plain"), rows.get("kometa"), rows.get("nchan")
if plain and tls and plain["bytes_per_connection"] is not None and tls["bytes_per_connection"] is not None:
    summary["tls_idle_overhead_bytes"] = tls["bytes_per_connection"] - plain["bytes_per_connection"]
    print(f"\nidle TLS connection: {tls['bytes_per_connection']:,.0f} B, "
          f"{summary['tls_idle_overhead_bytes']:,.0f} B more than a plain one (goal: at most 1 KiB)")
if tls and nchan and tls["handshakes_per_s"] and nchan["handshakes_per_s"]:
    summary["handshakes_vs_nchan"] = tls["handshakes_per_s"] / nchan["handshakes_per_s"]
    print(f"TLS handshakes/s: Kometa {summary['handshakes_vs_nchan']:.2f}x Nginx+Nchan's (goal: at least 1x)")
with open(os.path.join(run, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(f"\nbench-tls: results in {run}")
PY
