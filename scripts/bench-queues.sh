#!/usr/bin/env bash
# Where a publication waits at the highest publish rate: the profile behind
# the "last subscriber at max rate" figure in docs/benchmarks.md.
#
# Runs the bench-peers max-rate scenario (N subscribers, `--rate max
# --window 16`) against a release Kometa server and, every half second,
# samples the three queues a publication crosses after Kometa accepted it:
#   kometa backlog  deliveries queued in the shards, not yet written
#                   (STATS fanout_backlog; bounded by limits.fanout_backlog_max)
#   server send-q   bytes written by Kometa that the kernel has not yet moved
#                   (Send-Q of the server's sockets)
#   client recv-q   bytes the kernel delivered to the load generator's
#                   sockets that it has not read yet (Recv-Q of its sockets)
# plus the CPU of the server and of the generator's processes. Writes
# queues.tsv, a summary and queues.svg to target/bench-queues/TIMESTAMP/.
#
# Usage: scripts/bench-queues.sh [-n CONNECTIONS] [--server kometa|floor] [--shards N] [--kometa PATH]
#   --kometa PATH  the server binary to profile (default: the release build;
#               e.g. an older build, to compare; the load generator stays ours)
#   --shards N  Kometa's shards (default: one per core); with 1, the server
#               has half the CPU it could use and the generator keeps up
# Bounded: about 1 minute for 15,000 connections.
set -euo pipefail
cd "$(dirname "$0")/.."

connections=15000
server=kometa
shards=()
server_binary=""
while [ $# -gt 0 ]; do
    case "$1" in
        -n) connections=$2; shift 2 ;;
        --server) server=$2; shift 2 ;;
        --shards) shards=(--shards "$2"); shift 2 ;;
        --kometa) server_binary=$2; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "bench-queues: unknown argument $1" >&2; exit 2 ;;
    esac
done
command -v ss >/dev/null 2>&1 || { echo "bench-queues: needs ss (Debian: iproute2)" >&2; exit 1; }

# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_setup bench-queues

case "$server" in
    kometa)
        "${server_binary:-$kometa}" serve --listen 127.0.0.1:0 --admin "unix:$out/admin.sock" "${shards[@]}" > "$out/server.out" 2> "$out/server.err" &
        server_pid=$!
        target=(--url "ws://127.0.0.1:PORT/ws")
        publish=(--admin "unix:$out/admin.sock")
        ;;
    floor)
        target/release/kometa-floor --listen 127.0.0.1:0 > "$out/server.out" 2> "$out/server.err" &
        server_pid=$!
        target=(--protocol raw --url "ws://127.0.0.1:PORT/sub/{channel}")
        publish=(--publish-url "http://127.0.0.1:PORT/pub/{channel}")
        ;;
    *) echo "bench-queues: --server kometa or floor" >&2; exit 2 ;;
esac
for _ in $(seq 1 100); do grep -q 'listen=' "$out/server.out" 2>/dev/null && break; sleep 0.1; done
port=$(sed -n 's/.*listen=[^ ]*:\([0-9]*\).*/\1/p' "$out/server.out" | head -1)
[ -n "$port" ] || { echo "bench-queues: the server did not start" >&2; cat "$out/server.err" >&2; exit 1; }
target=("${target[@]/PORT/$port}")
publish=("${publish[@]/PORT/$port}")
echo "== $server (pid $server_pid, port $port): $connections subscribers, --rate max --window 16"

"$kometa" load broadcast -n "$connections" "${target[@]}" "${publish[@]}" --server-pid "$server_pid" \
    --source-addresses "$(bench_sources 80)" --ramp-rate 5000 --rate max --window 16 --duration 5s --drain 30s \
    --json "$out/max.json" > "$out/max.txt" 2> "$out/max.err" &
load_pid=$!

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
descendants() {
    local pid child
    for pid in "$@"; do
        for child in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do
            echo "$child"
            descendants "$child"
        done
    done
}
ticks_per_s=$(getconf CLK_TCK)
printf 't_s\tphase\tkometa_backlog\tserver_sendq_bytes\tclient_recvq_bytes\tserver_cpu_pct\tgenerator_cpu_pct\n' > "$out/queues.tsv"
started=$(date +%s.%N)
last_server=$(cpu_ticks "$server_pid") last_gen=0 last_t=$started
while kill -0 "$load_pid" 2>/dev/null; do
    sleep 0.5
    now=$(date +%s.%N)
    phase=$(grep -ao '\[[a-z]*\]' "$out/max.err" 2>/dev/null | tail -1 | tr -d '[]' || true)
    backlog=0
    if [ "$server" = kometa ]; then
        backlog=$(timeout 2 "$kometa" stats --admin "unix:$out/admin.sock" --timeout 1 2>/dev/null | python3 -c '
import json, sys
def walk(v):
    if isinstance(v, dict):
        own = v.get("fanout_backlog")
        return (own if isinstance(own, int) else 0) + sum(walk(x) for k, x in v.items() if k != "fanout_backlog")
    if isinstance(v, list):
        return sum(walk(x) for x in v)
    return 0
try:
    print(walk(json.load(sys.stdin)))
except ValueError:
    print(0)' || echo 0)
    fi
    sendq=$(ss -tnH state established "( sport = :$port )" 2>/dev/null | awk '{ s += $2 } END { print s + 0 }')
    recvq=$(ss -tnH state established "( dport = :$port )" 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
    server_ticks=$(cpu_ticks "$server_pid")
    gen_ticks=0
    for pid in $load_pid $(descendants "$load_pid"); do gen_ticks=$((gen_ticks + $(cpu_ticks "$pid"))); done
    python3 -c "
import sys
t0, t, tl = $started, $now, $last_t
dt = max(t - tl, 1e-3)
print(f'{t - t0:.1f}\t${phase:-start}\t$backlog\t$sendq\t$recvq\t{($server_ticks - $last_server) / $ticks_per_s / dt * 100:.0f}\t{max($gen_ticks - $last_gen, 0) / $ticks_per_s / dt * 100:.0f}')
" >> "$out/queues.tsv"
    last_server=$server_ticks last_gen=$gen_ticks last_t=$now
done
wait "$load_pid" || true
bench_stop_server
grep -E '^(publications|deliveries|last subscriber|generator CPU|server CPU)' "$out/max.txt" || true

python3 - "$out" "$connections" <<'PY'
import csv, json, os, sys
out, connections = sys.argv[1], int(sys.argv[2])
rows = list(csv.DictReader(open(os.path.join(out, "queues.tsv")), delimiter="\t"))
report = json.load(open(os.path.join(out, "max.json")))
running = [r for r in rows if r["phase"] in ("run", "running", "publish", "drain", "measure")] or rows
def peak(key):
    return max((float(r[key]) for r in running), default=0.0)
per_s = report.get("deliveries", {}).get("per_s") or 0
p99 = report.get("latency_ms", {}).get("last_subscriber", {}).get("p99_ms")
frame_bytes = 2 + 100  # a 100-byte push in one unmasked frame, about
recvq, sendq, backlog = peak("client_recvq_bytes"), peak("server_sendq_bytes"), peak("kometa_backlog")
def as_ms(deliveries):
    return deliveries / per_s * 1000 if per_s else float("nan")
lines = [
    f"deliveries/s {per_s:,.0f}; last subscriber p99 {p99:,.0f} ms" if p99 is not None else f"deliveries/s {per_s:,.0f}",
    f"peak kometa backlog   {backlog:>14,.0f} deliveries  ~ {as_ms(backlog):,.0f} ms of deliveries",
    f"peak server send-q    {sendq:>14,.0f} bytes       ~ {as_ms(sendq / frame_bytes):,.0f} ms",
    f"peak client recv-q    {recvq:>14,.0f} bytes       ~ {as_ms(recvq / frame_bytes):,.0f} ms "
    f"({recvq / frame_bytes / max(connections, 1):,.0f} pushes per socket)",
    f"peak CPU: server {peak('server_cpu_pct'):.0f} %, generator {peak('generator_cpu_pct'):.0f} % (of one core each; 2 cores in all)",
]
open(os.path.join(out, "summary.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))

# queues.svg: the three queues over time, in ms of deliveries at the measured rate.
width, height, left, bottom, top = 760, 340, 70, 40, 40
series = [("client recv-q (unread by the generator)", "client_recvq_bytes", frame_bytes, "#dd6b20"),
          ("server send-q (kernel, not yet moved)", "server_sendq_bytes", frame_bytes, "#718096"),
          ("Kometa backlog (not yet written)", "kometa_backlog", 1, "#2b6cb0")]
ts = [float(r["t_s"]) for r in rows] or [0.0]
values = [[as_ms(float(r[key]) / div) if per_s else 0 for r in rows] for _, key, div, _ in series]
vmax = max([v for vs in values for v in vs] + [1])
x = lambda t: left + (t - ts[0]) / max(ts[-1] - ts[0], 1e-9) * (width - left - 20)
y = lambda v: height - bottom - v / vmax * (height - bottom - top)
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
       f'<text x="{left}" y="20" font-size="14">Where publications wait at max rate ({connections:,} subscribers), in ms of deliveries</text>',
       f'<line x1="{left}" y1="{height - bottom}" x2="{width - 20}" y2="{height - bottom}" stroke="black"/>',
       f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
       f'<text x="{left - 5}" y="{top + 4}" text-anchor="end">{vmax:,.0f}</text>',
       f'<text x="{left - 5}" y="{height - bottom + 4}" text-anchor="end">0</text>',
       f'<text x="{width - 20}" y="{height - 12}" text-anchor="end">{ts[-1] - ts[0]:.0f} s</text>']
for i, ((label, _, _, color), vs) in enumerate(zip(series, values)):
    points = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in zip(ts, vs))
    svg.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>')
    svg.append(f'<rect x="{width - 300}" y="{top + i * 18}" width="12" height="12" fill="{color}"/>')
    svg.append(f'<text x="{width - 283}" y="{top + 10 + i * 18}">{label}</text>')
svg.append("</svg>")
open(os.path.join(out, "queues.svg"), "w").write("\n".join(svg) + "\n")
print(f"bench-queues: results in {out} (queues.tsv, queues.svg)")
PY
