#!/usr/bin/env bash
# One million WebSocket connections on one host, measured (docs/benchmarks.md,
# "One million connections"). One command:
#   1. applies the live kernel settings a million loopback connections need
#      (tuning/apply.sh --live-only; prints what it changed, puts it back on exit);
#   2. starts a private redis-server and K cluster nodes on ONE listen address
#      (SO_REUSEPORT; a node holds at most 7/8 of the open-files hard limit,
#      17,500 here, where it is 20,000 and cannot be raised);
#   3. `kometa load broadcast --groups G`: ramps N subscribed connections (each
#      on the broadcast channel and on one of G group channels), holds them
#      idle for --hold seconds, then publishes once to everyone and once to
#      each group, and checks every push arrived exactly once;
#   4. samples host memory during the run (samples.tsv, memory.svg), asks
#      every node for its connection count during the hold, and prints a
#      summary (summary.txt, summary.json) next to the load report.
# Exit status: 0 only when all N were established and every publication
# reached every subscriber exactly once.
#
# Usage: scripts/bench-million.sh [--connections N] [options]
#   --connections N   connections to hold (default 1000000)
#   --nodes K         cluster nodes (default: N / (7/8 of the open-files hard limit), rounded up)
#   --shards S        shards per node (default 1: each node pinned to one CPU, in turn)
#   --groups G        group channels (default: one per 10,000 connections)
#   --ramp-rate R     new connections per second (default 5000: at a million, 10,000
#                     overloads two cores and nodes stop serving, see docs/benchmarks.md)
#   --hold SECONDS    idle hold after the ramp; node CPU is measured over it (default 30:
#                     a node pings each connection every 25 s)
#   --kometa PATH     the kometa binary (default: build and use target/release/kometa)
#   --out DIR         results (default target/bench-million/TIMESTAMP)
#   --no-tuning       change no kernel setting (only say what falls short)
#   --keep-tuning     leave the kernel settings applied at exit
#   --memory-floor MIB  stop the run when MemAvailable falls below this (default 1024)
#   --generator-nice N  run the load generator at this nice value (default 0); 10 keeps it
#                     from starving the nodes during the ramp, but delays its reads of a
#                     broadcast (last subscriber 3.3 s at nice 0, 12.6 s at nice 10, 300,000)
#   --ping-interval S  nodes ping a silent connection after S seconds (default: the
#                     server's 25 s up to 300,000 connections, 120 s above). Both ends
#                     share this host's CPUs: at a million, 25 s is 40,000 ping/pong
#                     rounds a second, and the generator fell behind (closed 4004).
#                     With it, the nodes wait 30 s (not 10) for a pong: a ping that
#                     arrives during the broadcast to all waits behind ~15 s of
#                     deliveries in the generator's sockets here (110 closed 4004 once)
#   --keep-going      go on when a node stops serving (by default the run stops there:
#                     its clients would only time out; see stuck.tsv)
#   --force           run even when the memory estimate says it will not fit
# Bounded: every phase has a limit derived from N (about 8 minutes for a million here).
set -euo pipefail
cd "$(dirname "$0")/.."

connections=1000000
nodes=""
shards=1
groups=""
ramp_rate=5000
hold_s=30
kometa=""
out=""
tuning=1
keep_tuning=0
memory_floor_mib=1024
generator_nice=0
ping_interval_s=""
keep_going=0
force=0
while [ $# -gt 0 ]; do
    case "$1" in
        --connections | -n) connections=$2; shift 2 ;;
        --nodes) nodes=$2; shift 2 ;;
        --shards) shards=$2; shift 2 ;;
        --groups) groups=$2; shift 2 ;;
        --ramp-rate) ramp_rate=$2; shift 2 ;;
        --hold) hold_s=$2; shift 2 ;;
        --kometa) kometa=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --no-tuning) tuning=0; shift ;;
        --keep-tuning) keep_tuning=1; shift ;;
        --memory-floor) memory_floor_mib=$2; shift 2 ;;
        --generator-nice) generator_nice=$2; shift 2 ;;
        --ping-interval) ping_interval_s=$2; shift 2 ;;
        --keep-going) keep_going=1; shift ;;
        --force) force=1; shift ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "bench-million: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
for value in "$connections" "$shards" "$ramp_rate" "$hold_s" "$memory_floor_mib" "$generator_nice" ${ping_interval_s:+"$ping_interval_s"} ${nodes:+"$nodes"} ${groups:+"$groups"}; do
    [[ $value =~ ^[0-9]+$ ]] || { echo "bench-million: '$value' is not a whole number" >&2; exit 2; }
done
((connections > 0 && shards > 0 && ramp_rate > 0 && hold_s > 0)) || { echo "bench-million: counts must be positive" >&2; exit 2; }
for tool in redis-server redis-cli python3 timeout; do
    command -v "$tool" >/dev/null || { echo "bench-million: $tool missing (scripts/install-test-deps.sh installs redis)" >&2; exit 1; }
done

say() { printf '== %s\n' "$*"; }
fail() { echo "bench-million: $*" >&2; exit 1; }

# --- sizes -------------------------------------------------------------------------

# Nodes are sized for 7/8 of the open-files hard limit each on average
# (17,500 here, where it is 20,000; the hard limit itself is the real cap): SO_REUSEPORT spreads connections by a hash, not evenly
# (within ±2.5 % of the mean over 67 nodes here), and a node needs a few
# dozen descriptors of its own. Fewer, fuller nodes: each process costs
# ~0.9 MiB once it serves (docs/benchmarks.md).
open_files_hard=$(ulimit -Hn)
if [ "$open_files_hard" = unlimited ] || ((open_files_hard > 1048576)); then open_files_hard=1048576; fi
per_node_max=$((open_files_hard * 7 / 8))
((per_node_max >= 1000)) || fail "the open-files hard limit ($open_files_hard) is too low for this run"
nodes=${nodes:-$(((connections + per_node_max - 1) / per_node_max))}
if [ -z "$ping_interval_s" ] && ((connections > 300000)); then
    ping_interval_s=120
fi
groups=${groups:-$(((connections + 9999) / 10000))}
((nodes >= 1 && groups >= 1)) || fail "--nodes and --groups must be at least 1"
# Publications: one to everyone, alone for pause_s (about 25 us of CPU per
# delivery here, both ends on the same cores), then one to each group, 10 a
# second; the summary says if the pause was too short.
publications=$((groups + 1))
publish_rate=10
pause_s=$((connections / 40000 + 2))
publish_s=$((groups / publish_rate + 2))
ramp_max_s=$((3 * connections / ramp_rate + 60))
drain_s=$((connections / 20000 + 30))
# Everything above plus node start-up and the final report.
load_limit_s=$((ramp_max_s + hold_s + pause_s + publish_s + drain_s + 120))

# --- what this host has --------------------------------------------------------------

meminfo_kib() { awk -v key="$1:" '$1 == key { print $2 }' /proc/meminfo; }
# Per connection on loopback: two sockets of ~5 KB slab each, ~1 KB of
# generator and ~0.3 KB of server user space, and one 4 KiB page per socket
# while a broadcast is queued (transient, in tcp_mem); per node ~25 MiB.
need_kib=$((connections * (2 * 5200 + 1300 + 4096) / 1024 + nodes * 25 * 1024 + 512 * 1024))
available_kib=$(meminfo_kib MemAvailable)
if ((need_kib > available_kib * 9 / 10)); then
    msg="$connections connections need about $((need_kib / 1048576)) GiB; $((available_kib / 1048576)) GiB available"
    ((force)) || fail "$msg (--force to try anyway)"
    echo "bench-million: warning: $msg" >&2
fi
# The CPUs this script may use, for pinning one-shard nodes in turn.
mapfile -t cpus < <(awk '/^Cpus_allowed_list:/ {
    n = split($2, parts, ",")
    for (i = 1; i <= n; i++) {
        m = split(parts[i], r, "-")
        for (c = r[1]; c <= (m > 1 ? r[2] : r[1]); c++) print c
    }
}' /proc/self/status)
((${#cpus[@]} > 0)) || cpus=(0)

# --- binaries and directories ---------------------------------------------------------

if [ -z "$kometa" ]; then
    say "cargo build --release --workspace --bins"
    cargo build --release --workspace --bins --quiet
    kometa=${CARGO_TARGET_DIR:-target}/release/kometa
fi
[ -x "$kometa" ] || fail "$kometa is not an executable"
out=${out:-target/bench-million/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out/hold"
out=$(cd "$out" && pwd)
# Unix socket paths are limited to 108 bytes: keep them short.
run=$(mktemp -d /tmp/kometa-million.XXXXXX)
echo "bench-million: $connections connections, $nodes nodes x $shards shard(s), $groups groups," \
    "pings after ${ping_interval_s:-25 (default)} s of silence; results in $out"

# --- cleanup: everything started here stops, bounded ----------------------------------

node_pids=()
redis_pid=""
load_pid=""
sampler_pid=""
sysctl_record=$out/sysctl-changed.tsv
# stop PID...: SIGTERM, up to 20 s to exit (a node closes its connections
# and drains for up to 5 s), then SIGKILL.
stop() {
    local pid deadline=$((SECONDS + 20))
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "$@"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    [ -n "$sampler_pid" ] && stop "$sampler_pid"
    [ -n "$load_pid" ] && stop "$load_pid"
    ((${#node_pids[@]})) && stop "${node_pids[@]}"
    [ -n "$redis_pid" ] && stop "$redis_pid"
    if [ -s "$sysctl_record" ] && ((!keep_tuning)); then
        say "putting the kernel settings back (--keep-tuning leaves them)"
        tuning/apply.sh --restore "$sysctl_record" | grep '^  restored' || true
    fi
    rm -rf "$run"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. kernel settings ---------------------------------------------------------------

# What N loopback connections need, all from tuning/sysctl-kometa.conf:
#   fs.file-max                    two descriptors per connection on this host
#   net.core.somaxconn,
#   net.ipv4.tcp_max_syn_backlog   accept queues during a ramp of thousands a second
#   net.core.netdev_max_backlog    loopback packets pass the per-CPU backlog
#                                  queue; a broadcast bursts past its 1000
#   net.ipv4.tcp_mem               one page per socket while a broadcast is queued
#                                  (the default max, ~9 % of RAM, is below a million pages)
#   net.ipv4.ip_local_port_range   ports per (source, server) pair: fewer source addresses
#   net.netfilter.nf_conntrack_*   one entry per connection if conntrack tracks loopback
keys=fs.file-max,net.core.somaxconn,net.ipv4.tcp_max_syn_backlog,net.core.netdev_max_backlog
keys+=,net.ipv4.tcp_mem,net.ipv4.ip_local_port_range,net.netfilter.nf_conntrack_max,net.netfilter.nf_conntrack_buckets
if ((tuning)) && ((EUID == 0)); then
    say "kernel settings (tuning/apply.sh --live-only)"
    tuning/apply.sh --live-only --keys "$keys" --record "$sysctl_record" | sed -n 's/^  \(changed\|keep\|ok\|skip\)/  \1/p'
else
    say "kernel settings: not changed ($( ((tuning)) && echo "not root" || echo "--no-tuning")); what falls short:"
    tuning/apply.sh --live-only --dry-run --keys "$keys" | sed -n 's/^  would change/  short/p'
fi
file_max=$(cat /proc/sys/fs/file-max)
((file_max > 2 * connections + 10000)) || fail "fs.file-max is $file_max: $connections loopback connections need $((2 * connections)) descriptors"

# --- 2. redis and the nodes -----------------------------------------------------------

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

redis_port=$(free_port)
mkdir -p "$out/redis"
# One Redis thread serves every node: among ~140 busy processes on a few
# cores its fair share is too small to keep up with the ramp's subscriber
# counts, the nodes' requests time out (cluster.request_timeout_ms) and they
# reconnect. Root runs it at nice -10, as one would on a shared host.
redis_nice=()
((EUID == 0)) && redis_nice=(nice -n -10)
"${redis_nice[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$out/redis" \
    > "$out/redis/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 1 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$redis_port" ping >/dev/null 2>&1 || fail "redis-server did not start (see $out/redis/redis.log)"

listen_port=$(free_port)
node_config=()
if [ -n "$ping_interval_s" ]; then
    printf '[timeouts]\nping_interval_ms = %s\npong_timeout_ms = 30000\n' "$((ping_interval_s * 1000))" > "$out/node.toml"
    node_config=(--config "$out/node.toml")
fi
say "starting $nodes nodes on 127.0.0.1:$listen_port (redis on $redis_port)"
: > "$out/nodes.tsv"
for i in $(seq 1 "$nodes"); do
    dir=$run/n$i
    mkdir -p "$dir" "$out/nodes"
    pin=()
    if ((shards == 1)) && command -v taskset >/dev/null; then
        # A one-shard node pins its shard to the first CPU it may use: give
        # each node its own CPU in turn, or all would share the first.
        pin=(taskset -c "${cpus[$(((i - 1) % ${#cpus[@]}))]}")
    fi
    "${pin[@]}" "$kometa" serve --listen "127.0.0.1:$listen_port" --admin "unix:$dir/admin.sock" \
        --redis "redis://127.0.0.1:$redis_port" --node-id "node$i" --shards "$shards" "${node_config[@]}" \
        > "$out/nodes/node$i.out" 2> "$out/nodes/node$i.err" &
    node_pids+=($!)
    # One at a time: a node checks at start that whoever serves the address
    # is a member of its cluster, and a node still starting cannot answer.
    for _ in $(seq 1 150); do
        grep -q '^kometa ready' "$out/nodes/node$i.out" 2>/dev/null && break
        kill -0 "${node_pids[-1]}" 2>/dev/null || break
        sleep 0.1
    done
    grep -q '^kometa ready' "$out/nodes/node$i.out" || fail "node$i did not start: $(tail -3 "$out/nodes/node$i.err")"
    printf 'node%s\t%s\t%s\n' "$i" "${node_pids[-1]}" "$dir/admin.sock" >> "$out/nodes.tsv"
    if ((i % 10 == 0 || i == nodes)); then echo "  $i/$nodes nodes ready"; fi
done
sleep 2

# Kernel counters that say why a loopback run slows down: TCP retransmits,
# accept-queue overflows, packets dropped from the per-CPU backlog queue.
kernel_counters() {
    awk '
        /^(Tcp|TcpExt):/ { if (!names[$1]) { for (i = 2; i <= NF; i++) key[$1, i] = $i; names[$1] = 1 }
                           else { for (i = 2; i <= NF; i++) print key[$1, i] "\t" $i; names[$1] = 0 } }
    ' /proc/net/snmp /proc/net/netstat |
        grep -E '^(RetransSegs|ListenOverflows|ListenDrops|TCPLossProbes|TCPTimeouts|TCPSynRetrans|TCPMemoryPressures|TCPAbortOnMemory|TCPBacklogDrop|TCPRcvQDrop)\s' || true
    local drops=0 fields
    while read -r -a fields; do drops=$((drops + 16#${fields[1]})); done < /proc/net/softnet_stat
    printf 'SoftnetBacklogDrops\t%s\n' "$drops"
}

# The empty-process baseline and the host before the load.
kernel_counters > "$out/kernel-before.tsv"
{
    printf 'mem_total_kib\t%s\nmem_available_kib\t%s\nslab_kib\t%s\nsunreclaim_kib\t%s\n' \
        "$(meminfo_kib MemTotal)" "$(meminfo_kib MemAvailable)" "$(meminfo_kib Slab)" "$(meminfo_kib SUnreclaim)"
    printf 'mem_free_kib\t%s\n' "$(meminfo_kib MemFree)"
    printf 'servers_rss_kib\t%s\n' "$(for pid in "${node_pids[@]}"; do rss_kib "$pid"; done | awk '{ s += $1 } END { print s + 0 }')"
    printf 'redis_rss_kib\t%s\n' "$(rss_kib "$redis_pid")"
} > "$out/before.tsv"

# --- 3. the load, with a sampler beside it ---------------------------------------------

# stop_load: SIGTERM to `kometa load` itself, which then stops its workers
# and still reports. Not to timeout(1) around it: that would arm its
# --kill-after and kill the load before the report.
stop_load() {
    local child
    child=$(cat /proc/"$load_pid"/task/*/children 2>/dev/null | awk '{ print $1; exit }')
    kill -TERM "${child:-$load_pid}" 2>/dev/null || true
}

# probe_nodes: asks every node for its own STATS (`--node`: its shards
# answer, nothing is asked of Redis or the other nodes) in the background
# (one probe per node in flight at most); the answer lands in
# probe/NAME.result. A node whose shards stopped serving leaves STATS
# unanswered. (Cluster-wide STATS on every node every few seconds made each
# node parse every other node's document: at a million, ~1.5 MiB stayed
# resident in each node, about half of what its 17,000 connections cost;
# docs/benchmarks.md, "The memory goal met".) (An idle io_uring
# shard waits in io_uring_enter, so a thread's wait channel says nothing.)
probe_nodes() {
    local name pid sock
    mkdir -p "$out/probe"
    while IFS=$'\t' read -r name pid sock; do
        [ -e "$out/probe/$name.running" ] && continue
        touch "$out/probe/$name.running"
        (
            if timeout 15 "$kometa" stats --node --admin "unix:$sock" --timeout 10 > /dev/null 2>&1; then
                echo ok > "$out/probe/$name.result"
            else
                echo unanswered > "$out/probe/$name.result"
            fi
            rm -f "$out/probe/$name.running"
        ) &
    done < "$out/nodes.tsv"
}

# note_stuck_nodes: a node that leaves three STATS probes in a row
# unanswered (10 s each) has stopped serving. Noted once per node in
# stuck.tsv, with its threads' kernel stacks; the load is stopped then (it
# still reports), unless --keep-going.
declare -A unanswered_for=()
note_stuck_nodes() {
    local name pid sock result task
    while IFS=$'\t' read -r name pid sock; do
        [ -e "$out/probe/$name.result" ] || continue
        result=$(cat "$out/probe/$name.result")
        rm -f "$out/probe/$name.result"
        if [ "$result" = ok ]; then
            unanswered_for[$name]=0
            continue
        fi
        unanswered_for[$name]=$((${unanswered_for[$name]:-0} + 1))
        if ((unanswered_for[$name] == 3)); then
            printf '%s\t%s\t%s\t%s\n' "$name" "$pid" "${unanswered_for[$name]}" "$((SECONDS - started))" >> "$out/stuck.tsv"
            for task in /proc/"$pid"/task/*; do
                echo "== $name pid $pid thread ${task##*/} $(cat "$task/comm" 2>/dev/null) wchan $(cat "$task/wchan" 2>/dev/null)"
                cat "$task/stack" "$task/syscall" 2>/dev/null
            done >> "$out/stuck-stacks.txt"
            echo "bench-million: $name stopped serving: three STATS probes in a row unanswered (see $out/stuck-stacks.txt)" >&2
            if ((!keep_going)); then
                echo "$name stopped serving" > "$out/aborted"
                stop_load
            fi
        fi
    done < "$out/nodes.tsv"
}

# sample_loop: one line a second (two above 200,000 connections) into
# samples.tsv; stops the load when memory runs low; notes nodes that stop
# serving; during the hold, asks every node for its STATS and notes the
# host's memory once.
sample_loop() {
    local interval=1 settle_since="" held=0 line phase established avail workers samples_taken=0
    started=$SECONDS
    ((connections > 200000)) && interval=2
    printf 't_s\tphase\testablished\tmem_free_kib\tmem_available_kib\tslab_kib\tsunreclaim_kib\tservers_rss_kib\tgenerator_rss_kib\tredis_rss_kib\n' > "$out/samples.tsv"
    while kill -0 "$load_pid" 2>/dev/null; do
        line=$(grep -a '^\[' "$out/load.err" 2>/dev/null | tail -1 || true)
        phase=start established=0
        if [[ $line =~ ^\[([a-z]+)\]\ conns\ ([0-9]+)/ ]]; then
            phase=${BASH_REMATCH[1]} established=${BASH_REMATCH[2]}
        fi
        # $load_pid is timeout(1); its child is `kometa load`, whose children are the workers.
        workers=$(for pid in $(cat /proc/"$load_pid"/task/*/children 2>/dev/null); do
            cat /proc/"$pid"/task/*/children 2>/dev/null
        done || true)
        avail=$(meminfo_kib MemAvailable)
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$((SECONDS - started))" "$phase" "$established" \
            "$(meminfo_kib MemFree)" "$avail" \
            "$(meminfo_kib Slab)" "$(meminfo_kib SUnreclaim)" \
            "$(for pid in "${node_pids[@]}"; do rss_kib "$pid"; done | awk '{ s += $1 } END { print s + 0 }')" \
            "$(for pid in $workers; do rss_kib "$pid"; done | awk '{ s += $1 } END { print s + 0 }')" \
            "$(rss_kib "$redis_pid")" >> "$out/samples.tsv"
        samples_taken=$((samples_taken + 1))
        if ((samples_taken % 5 == 1)); then probe_nodes; fi
        note_stuck_nodes
        if ((avail < memory_floor_mib * 1024)); then
            echo "bench-million: MemAvailable $((avail / 1024)) MiB is below --memory-floor $memory_floor_mib MiB: stopping the load" >&2
            echo "memory" > "$out/aborted"
            stop_load
        fi
        if [ "$phase" = settle ] && ((!held)); then
            settle_since=${settle_since:-$SECONDS}
            # Two seconds into the hold (at once in a short one): the ramp's
            # last handshakes are done.
            if ((SECONDS - settle_since >= (hold_s >= 6 ? 2 : 0))); then
                held=1
                local name pid sock
                while IFS=$'\t' read -r name pid sock; do
                    "$kometa" stats --node --admin "unix:$sock" --timeout 10 > "$out/hold/$name.json" 2>/dev/null || true
                done < "$out/nodes.tsv"
                tail -1 "$out/samples.tsv" > "$out/hold/memory.tsv"
                # Which kernel caches hold the sockets (root only).
                awk 'NR > 2 { printf "%-24s %12d objects %14.0f bytes\n", $1, $3, $3 * $4 }' /proc/slabinfo 2>/dev/null |
                    sort -k4 -n -r | head -12 > "$out/hold/slabinfo.txt" || true
                echo "  hold: STATS of $nodes nodes taken"
            fi
        fi
        sleep "$interval"
    done
}

pid_list=$(IFS=,; echo "${node_pids[*]}")
say "kometa load broadcast -n $connections --groups $groups (ramp at $ramp_rate/s, hold ${hold_s}s, one publication to everyone, ${pause_s}s later one to each group)"
load_args=(load broadcast -n "$connections" --url "ws://127.0.0.1:$listen_port/ws"
    --admin "unix:$run/n1/admin.sock" --server-pid "$pid_list" --channel million --groups "$groups"
    --ramp-rate "$ramp_rate" --ramp-max "${ramp_max_s}s" --connect-timeout 30s --settle "${hold_s}s"
    --pause-after-first "${pause_s}s" --rate "$publish_rate" --publications-max "$publications"
    --duration "${publish_s}s" --drain "${drain_s}s"
    --json "$out/report.json" --check --progress)
echo "\$ kometa ${load_args[*]}" > "$out/command.txt"
: > "$out/load.err"
timeout -k 60 "$load_limit_s" nice -n "$generator_nice" "$kometa" "${load_args[@]}" > "$out/report.txt" 2> "$out/load.err" &
load_pid=$!
sample_loop &
sampler_pid=$!
# Progress: the generator's one line a second, as it comes.
tail -n +1 -f "$out/load.err" --pid "$load_pid" >&2 &
tail_pid=$!
set +e
wait "$load_pid"
load_status=$?
set -e
load_pid=""
wait "$tail_pid" 2>/dev/null || true
stop "$sampler_pid"
sampler_pid=""
kernel_counters > "$out/kernel-after.tsv"
# What every node says after the run (publications it delivered, messages out).
mkdir -p "$out/end"
while IFS=$'\t' read -r name pid sock; do
    "$kometa" stats --node --admin "unix:$sock" --timeout 10 > "$out/end/$name.json" 2>/dev/null || true
done < "$out/nodes.tsv"
cat "$out/report.txt"

# --- 4. summary and plot ----------------------------------------------------------------

say "summary ($out/summary.txt)"
python3 - "$out" "$load_status" <<'PY'
import json, os, statistics, sys

out, load_status = sys.argv[1], int(sys.argv[2])


def tsv_pairs(path):
    try:
        with open(path) as f:
            return {k: int(v) for k, v in (line.rstrip("\n").split("\t") for line in f if "\t" in line)}
    except OSError:
        return {}


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


report = load_json(os.path.join(out, "report.json")) or {}
before = tsv_pairs(os.path.join(out, "before.tsv"))
nodes = []
with open(os.path.join(out, "nodes.tsv")) as f:
    for line in f:
        name, pid, sock = line.rstrip("\n").split("\t")
        nodes.append((name, int(pid)))
samples = []
try:
    with open(os.path.join(out, "samples.tsv")) as f:
        header = f.readline().rstrip("\n").split("\t")
        for line in f:
            row = dict(zip(header, line.rstrip("\n").split("\t")))
            samples.append({k: (v if k == "phase" else int(v)) for k, v in row.items()})
except OSError:
    pass
hold_row = None
try:
    with open(os.path.join(out, "hold", "memory.tsv")) as f:
        hold_row = dict(zip(header, f.readline().rstrip("\n").split("\t")))
        hold_row = {k: (v if k == "phase" else int(v)) for k, v in hold_row.items()}
except (OSError, NameError, ValueError):
    pass

# Connections per node from each node's own STATS during the hold.
held = {}
for name, _ in nodes:
    stats = load_json(os.path.join(out, "hold", name + ".json")) or {}
    if stats.get("node") == name:
        held[name] = stats.get("connections", 0)

c = report.get("connections", {})
requested, established = c.get("requested", 0), c.get("established", 0)
server = report.get("server", {})
processes = {p["pid"]: p for p in server.get("processes", [])}
gen = report.get("generator", {})
d = report.get("deliveries", {})
lat = report.get("latency_ms", {})
pubs = report.get("publications", {})
MIB, GIB = 1024 * 1024, 1024 ** 3

per_node = []
for name, pid in nodes:
    p = processes.get(pid)
    if p and held.get(name):
        growth = p["rss_after_ramp_bytes"] - p["rss_before_bytes"]
        per_node.append((name, held[name], growth, growth / held[name], p.get("cpu_settle_s", 0.0)))
settle_s = server.get("settle_s", 0.0) or 1.0
server_growth = server.get("rss_after_ramp_bytes", 0) - server.get("rss_before_bytes", 0)
# Summed RSS counts the executable's pages in every node (67 at a million);
# the host holds them once. PSS shares each page among the processes mapping it.
pss_growth = server.get("pss_after_ramp_bytes", 0) - server.get("pss_before_bytes", 0)


def spread(values, fmt):
    if not values:
        return "n/a"
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median_low(values), max(values)))


summary = {
    "connections_requested": requested,
    "connections_established": established,
    "connect_errors": c.get("connect_errors_total"),
    "disconnects": c.get("disconnects_total"),
    "ramp_s": c.get("ramp_s"),
    "connects_per_s": c.get("connects_per_s"),
    "nodes": len(nodes),
    "node_connections": held,
    "server_rss_growth_bytes": server_growth,
    "server_rss_growth_per_connection_bytes": server.get("rss_growth_per_connection_bytes"),
    "server_pss_growth_bytes": pss_growth,
    "server_pss_growth_per_connection_bytes": server.get("pss_growth_per_connection_bytes"),
    "node_bytes_per_connection": {n: round(b, 1) for n, _, _, b, _ in per_node},
    "node_idle_cpu_percent": {n: round(100 * cpu / settle_s, 2) for n, _, _, _, cpu in per_node},
    "servers_idle_cpu_percent": round(100 * server.get("cpu_settle_s", 0.0) / settle_s, 2),
    "hold_s": server.get("settle_s"),
    "slab_per_socket_bytes": server.get("slab_per_socket_bytes"),
    "generator_workers": gen.get("workers"),
    "generator_rss_bytes": gen.get("rss_after_ramp_bytes"),
    "generator_rss_per_connection_bytes": gen.get("rss_per_connection_bytes"),
    "generator_anon_per_connection_bytes": gen.get("anon_per_connection_bytes"),
    "deliveries": d,
    "last_subscriber_broadcast_ms": (lat.get("last_subscriber_broadcast") or {}).get("max_ms"),
    "last_subscriber_groups_ms": lat.get("last_subscriber_groups"),
    "subscribers_reported_max": pubs.get("subscribers_reported_max"),
    "load_exit_status": load_status,
    "aborted": open(os.path.join(out, "aborted")).read().strip() if os.path.exists(os.path.join(out, "aborted")) else None,
}
if hold_row:
    summary["hold_memory"] = {
        "host_used_growth_bytes": (before["mem_free_kib"] - hold_row["mem_free_kib"]) * 1024,
        "host_available_drop_bytes": (before["mem_available_kib"] - hold_row["mem_available_kib"]) * 1024,
        "slab_growth_bytes": (hold_row["slab_kib"] - before["slab_kib"]) * 1024,
        "sunreclaim_growth_bytes": (hold_row["sunreclaim_kib"] - before["sunreclaim_kib"]) * 1024,
        "servers_rss_bytes": hold_row["servers_rss_kib"] * 1024,
        "servers_rss_baseline_bytes": before["servers_rss_kib"] * 1024,
        "generator_rss_bytes": hold_row["generator_rss_kib"] * 1024,
        "redis_rss_bytes": hold_row["redis_rss_kib"] * 1024,
    }

exactly_once = bool(d) and (d.get("expected") or 0) > 0 and d.get("total") == d.get("expected") and not any(
    d.get(k) for k in ("missing", "duplicates", "gaps", "misrouted"))
lines = []
w = lines.append
cpus = os.cpu_count()
with open("/proc/meminfo") as f:
    total_kib = int(f.readline().split()[1])
w(f"machine        {cpus} CPUs, {total_kib / 1024 / 1024:.1f} GiB, Linux {os.uname().release}")
w(f"connections    {established:,}/{requested:,} established in {c.get('ramp_s', 0):.1f} s "
  f"({c.get('connects_per_s', 0):,.0f}/s); connect errors {c.get('connect_errors_total')}, "
  f"disconnects {c.get('disconnects_total')}")
ping_s = 25
try:
    with open(os.path.join(out, "node.toml")) as f:
        ping_s = int(f.read().split("ping_interval_ms = ")[1].split()[0]) // 1000
except (OSError, IndexError, ValueError):
    pass
summary["ping_interval_s"] = ping_s
pong_note = ""
try:
    with open(os.path.join(out, "node.toml")) as f:
        if "pong_timeout_ms = 30000" in f.read():
            pong_note = ", pong within 30 s"
except OSError:
    pass
w(f"nodes          {len(nodes)} on one address, pinging after {ping_s} s of silence{pong_note}; connections per node "
  "(STATS, min / median / max): "
  f"{spread(list(held.values()), '{:,}')}")
if hold_row:
    h = summary["hold_memory"]
    w(f"host memory    +{h['host_used_growth_bytes'] / GIB:.2f} GiB used at the hold (drop in MemFree; "
      f"MemAvailable -{h['host_available_drop_bytes'] / GIB:.2f} GiB, as it counts socket inodes and dentries as reclaimable)")
    w(f"  kernel slab  +{h['slab_growth_bytes'] / GIB:.2f} GiB (SUnreclaim +{h['sunreclaim_growth_bytes'] / GIB:.2f} GiB): "
      f"{server.get('slab_per_socket_bytes', 0):,.0f} B per socket, 2 sockets per connection")
    w(f"  servers      {h['servers_rss_bytes'] / MIB:,.1f} MiB RSS in {len(nodes)} nodes "
      f"({h['servers_rss_baseline_bytes'] / MIB:,.1f} MiB of it their empty-process baseline)")
    w(f"  generator    {h['generator_rss_bytes'] / MIB:,.1f} MiB RSS in {gen.get('workers')} workers")
    w(f"  redis        {h['redis_rss_bytes'] / MIB:,.1f} MiB RSS")
w(f"server memory  +{server_growth / MIB:,.1f} MiB over the empty nodes: "
  f"{server.get('rss_growth_per_connection_bytes', 0):,.0f} B per connection; per node (min / median / max) "
  f"{spread([b for _, _, _, b, _ in per_node], '{:,.0f} B')}")
if pss_growth > 0:
    w(f"  as PSS       +{pss_growth / MIB:,.1f} MiB: {server.get('pss_growth_per_connection_bytes', 0):,.0f} B per connection "
      "(the executable's pages counted once, not in every node)")
w(f"generator      {gen.get('rss_after_ramp_bytes', 0) / MIB:,.1f} MiB: {gen.get('rss_per_connection_bytes', 0):,.0f} B "
  f"per connection (anonymous {gen.get('anon_per_connection_bytes', 0):,.0f} B)")
w(f"idle CPU       servers {summary['servers_idle_cpu_percent']:.1f} % of a core over the {server.get('settle_s', 0):.0f} s hold; "
  f"per node (min / median / max) {spread(list(summary['node_idle_cpu_percent'].values()), '{:.2f} %')}")
b = lat.get("last_subscriber_broadcast") or {}
g = lat.get("last_subscriber_groups") or {}
pause_ms = (report.get("parameters") or {}).get("pause_after_first_ms") or 0
alone = "alone" if b.get("max_ms", 0) <= pause_ms else f"NOT alone: the group publications began after {pause_ms / 1000:.0f} s"
w(f"broadcast      to all {established:,}: last subscriber after {b.get('max_ms', 0):,.1f} ms ({alone}; "
  f"server counted {pubs.get('subscribers_reported_max')} subscribers)")
w(f"groups         {g.get('count', 0)} publications: last subscriber p50 {g.get('p50_ms', 0):,.1f}, "
  f"max {g.get('max_ms', 0):,.1f} ms")
w(f"deliveries     {d.get('total', 0):,}/{d.get('expected', 0):,}; missing {d.get('missing')}, duplicates "
  f"{d.get('duplicates')}, gaps {d.get('gaps')}, misrouted {d.get('misrouted')}: "
  f"{'exactly once' if exactly_once else 'NOT exactly once'}")
stuck = []
try:
    with open(os.path.join(out, "stuck.tsv")) as f:
        stuck = [line.rstrip("\n").split("\t") for line in f if line.strip()]
except OSError:
    pass
summary["stuck_nodes"] = [{"node": n, "pid": int(p), "probes_unanswered": int(u), "at_s": int(a)} for n, p, u, a in stuck]
if stuck:
    w(f"stuck nodes    {len(stuck)}: " + ", ".join(f"{n} (STATS unanswered {u} times in a row, at {a} s)" for n, _, u, a in stuck))
if not report:
    w("report         none: kometa load ended without one (see load.err)")
goal_memory = 300 * requested  # 300 MB for a million
# Judged on PSS where the kernel shows it (see above), with RSS beside it.
memory = pss_growth if pss_growth > 0 else server_growth
memory_how = (f"PSS {pss_growth / 1e6:,.1f} MB; summed RSS {server_growth / 1e6:,.1f} MB" if pss_growth > 0
              else f"RSS {server_growth / 1e6:,.1f} MB")
w("goals          "
  f"established with 0 errors: {'met' if report and established == requested and not c.get('connect_errors_total') else 'NOT met'}; "
  + (f"server memory <= {goal_memory / 1e6:,.0f} MB: {'met' if 0 < memory <= goal_memory else 'NOT met'} "
     f"({memory_how})" if requested >= 100000 else "server memory: not judged below 100,000 connections")
  + f"; broadcast exactly once: {'met' if exactly_once else 'NOT met'}")
kernel_before = tsv_pairs(os.path.join(out, "kernel-before.tsv"))
kernel_after = tsv_pairs(os.path.join(out, "kernel-after.tsv"))
kernel = {k: kernel_after[k] - kernel_before.get(k, 0) for k in kernel_after}
summary["kernel_counters"] = kernel
w("kernel         " + ", ".join(f"{k} {v:,}" for k, v in kernel.items()))
if summary["aborted"]:
    w(f"aborted        {summary['aborted']} (see --memory-floor and --keep-going)")
text = "\n".join(lines) + "\n"
sys.stdout.write(text)
with open(os.path.join(out, "summary.txt"), "w") as f:
    f.write(text)
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)

# Memory against connections, sampled during the ramp: a hand-drawn SVG.
ramp = [s for s in samples if s["phase"] in ("start", "ramp", "settle")]
if len(ramp) >= 2 and before:
    def growth(s):
        return {
            "host used": (before["mem_free_kib"] - s["mem_free_kib"]) / 1024 / 1024,
            "kernel slab": (s["slab_kib"] - before["slab_kib"]) / 1024 / 1024,
            "generator RSS": s["generator_rss_kib"] / 1024 / 1024,
            "servers RSS (growth)": (s["servers_rss_kib"] - before["servers_rss_kib"]) / 1024 / 1024,
        }
    series = {k: [] for k in growth(ramp[0])}
    for s in ramp:
        for k, v in growth(s).items():
            series[k].append((s["established"], v))
    colors = ["#2d3748", "#dd6b20", "#718096", "#2b6cb0"]
    width, height, left, right, top, bottom = 720, 400, 70, 190, 30, 50
    x_max = max(s["established"] for s in ramp)
    y_max = max(v for pts in series.values() for _, v in pts) or 1
    step = 10 ** len(str(int(y_max))) / 10 if y_max >= 1 else 0.1
    while y_max / step > 8:
        step *= 2
    y_top = step * (int(y_max / step) + 1)
    sx = lambda x: left + (width - left - right) * x / x_max
    sy = lambda y: top + (height - top - bottom) * (1 - y / y_top)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="13">Memory while {x_max:,} connections ramp up ({len(nodes)} nodes, one host)</text>']
    y = 0.0
    while y <= y_top + 1e-9:
        svg.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#e2e8f0"/>')
        svg.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
        y += step
    for i in range(6):
        x = x_max * i / 5
        svg.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x / 1000:,.0f}k</text>')
    svg.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">connections established</text>')
    svg.append(f'<text x="16" y="{(top + height - bottom) / 2}" text-anchor="middle" transform="rotate(-90 16 {(top + height - bottom) / 2})">GiB</text>')
    svg.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" stroke="#4a5568"/>')
    svg.append(f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" stroke="#4a5568"/>')
    for i, (name, pts) in enumerate(series.items()):
        path = " ".join(f"{sx(x):.1f},{sy(max(v, 0)):.1f}" for x, v in pts)
        svg.append(f'<polyline fill="none" stroke="{colors[i]}" stroke-width="2" points="{path}"/>')
        ly = top + 20 + 22 * i
        svg.append(f'<line x1="{width - right + 12}" x2="{width - right + 32}" y1="{ly}" y2="{ly}" stroke="{colors[i]}" stroke-width="2"/>')
        svg.append(f'<text x="{width - right + 38}" y="{ly + 4}">{name}</text>')
    svg.append("</svg>")
    with open(os.path.join(out, "memory.svg"), "w") as f:
        f.write("\n".join(svg) + "\n")
    print(f"plot           {os.path.join(out, 'memory.svg')}")
PY
if [ -e "$out/aborted" ]; then
    fail "stopped early: $(cat "$out/aborted")"
fi
exit "$load_status"
