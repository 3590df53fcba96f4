#!/usr/bin/env bash
# The whole test suite, as CI runs it:
#   1. unit and property tests, integration tests against a real server over
#      real sockets (cargo test)
#   2. Autobahn WebSocket conformance against the real server
#   3. the JavaScript client in headless Chromium against real servers
# Installs what it needs first (scripts/install-test-deps.sh,
# scripts/install-browser-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
scripts/install-test-deps.sh

echo "== cargo test"
cargo build --quiet --bins
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee target/cargo-test.log
cargo_status=${PIPESTATUS[0]}
set -e

echo "== autobahn"
set +e
scripts/autobahn.sh target/debug/kometa 2>&1 | tee target/autobahn.log
autobahn_status=${PIPESTATUS[0]}
set -e

echo "== browser"
set +e
scripts/browser-test.sh 2>&1 | tee target/browser.log
browser_status=${PIPESTATUS[0]}
set -e

count() { grep -E '^test result:' target/cargo-test.log | sed -E "s/.* ([0-9]+) $1.*/\\1/" | awk '{ sum += $1 } END { print sum + 0 }'; }
passed=$(count passed)
failed=$(count failed)
echo
echo "== summary ($(( $(date +%s) - started )) s)"
echo "cargo test: ${passed} passed, ${failed} failed (exit ${cargo_status})"
grep -E '^autobahn: [0-9]+ cases' target/autobahn.log || echo "autobahn: no summary"
grep -E '^browser tests:' target/browser.log || echo "browser tests: no summary (exit ${browser_status})"
if [ "$cargo_status" -ne 0 ] || [ "$autobahn_status" -ne 0 ] || [ "$browser_status" -ne 0 ]; then
    echo "RESULT: FAILED"
    exit 1
fi
echo "RESULT: PASS"
