#!/usr/bin/env bash
# Runs the Autobahn WebSocket conformance cases (through kosoku, which
# drives the Autobahn case files under Python 3) against a real Kometa
# server's echo endpoint. Compression cases (12.*, 13.*) are excluded:
# permessage-deflate is declined. Fails on any case whose verdict is not
# OK, NON-STRICT or INFORMATIONAL.
#
# Usage: scripts/autobahn.sh [path/to/kometa]   (default: target/debug/kometa)
set -euo pipefail
cd "$(dirname "$0")/.."

binary="${1:-target/debug/kometa}"
[ -x "$binary" ] || { echo "autobahn: $binary not built (run cargo build)" >&2; exit 1; }
[ -x .venv/bin/kosoku ] || scripts/install-test-deps.sh

work="$(mktemp -d)"
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/autobahn.toml" <<'TOML'
# The conformance suite needs an echo endpoint and messages up to 16 MiB.
echo_path = "/"
[limits]
client_message_bytes_max = 20000000
outbox_bytes_max = 67108864
outbox_messages_max = 100000
TOML

KOMETA_LOG=warn "$binary" serve --config "$work/autobahn.toml" --listen 127.0.0.1:0 \
    --admin "unix:$work/admin.sock" --shards 2 > "$work/stdout" 2> "$work/stderr" &
server_pid=$!
for _ in $(seq 1 100); do
    grep -q '^kometa ready' "$work/stdout" 2>/dev/null && break
    sleep 0.1
done
address="$(sed -n 's/^kometa ready listen=\([^ ]*\).*/\1/p' "$work/stdout")"
[ -n "$address" ] || { echo "autobahn: server did not start" >&2; cat "$work/stderr" >&2; exit 1; }

report="${AUTOBAHN_REPORT_DIR:-target/autobahn}"
rm -rf "$report"
echo "autobahn: running cases against ws://$address/ (12.* and 13.* excluded)"
set +e
.venv/bin/kosoku -x '12.*' -x '13.*' -o "$report" "$address" > "$work/kosoku.log" 2>&1
kosoku_status=$?
set -e
tail -n 3 "$work/kosoku.log"

.venv/bin/python - "$report/index.json" "$kosoku_status" <<'PY'
import collections, json, sys
index_path, kosoku_status = sys.argv[1], int(sys.argv[2])
try:
    index = json.load(open(index_path))
except (OSError, ValueError) as error:
    print(f"autobahn: no report ({error}); kosoku exited {kosoku_status}")
    sys.exit(1)
accepted = {"OK", "NON-STRICT", "INFORMATIONAL"}
verdicts = collections.Counter()
bad = []
for agent, cases in index.items():
    for case, result in sorted(cases.items()):
        behavior, close = result.get("behavior"), result.get("behaviorClose")
        verdicts[behavior] += 1
        if behavior not in accepted or close not in accepted:
            bad.append(f"  {case}: behavior={behavior} behaviorClose={close}")
total = sum(verdicts.values())
summary = ", ".join(f"{count} {verdict}" for verdict, count in sorted(verdicts.items()))
import os
driver = os.environ.get("KOMETA_IO_DRIVER", "auto")
print(f"autobahn: {total} cases: {summary} (io.driver = {driver})")
if bad or total == 0:
    print("autobahn: FAILED cases:")
    print("\n".join(bad) or "  (no cases ran)")
    sys.exit(1)
print("autobahn: PASS")
PY
