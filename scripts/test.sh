#!/usr/bin/env bash
# The whole test suite, as CI runs it:
#   1. unit and property tests, integration tests against a real server over
#      real sockets (cargo test), once with each I/O driver (io_uring, epoll);
#      these include the SockJS conformance tests (tests/sockjs, Python, run
#      by tests/sockjs.rs)
#   2. Autobahn WebSocket conformance against the real server, each driver
#   3. the JavaScript client in headless Chromium against real servers
#   4. 100,000 connections over several nodes and a Redis
#      (scripts/bench-million.sh; applies live sysctls as root, restores them)
# Installs what it needs first (scripts/install-test-deps.sh,
# scripts/install-browser-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
scripts/install-test-deps.sh

cargo build --quiet --bins
cargo_status=0
autobahn_status=0
: > target/cargo-test.log
: > target/autobahn.log
# The servers the tests start take KOMETA_IO_DRIVER from the environment.
for driver in io_uring epoll; do
    echo "== cargo test (io.driver = $driver)"
    set +e
    KOMETA_IO_DRIVER=$driver cargo test --workspace --no-fail-fast 2>&1 | tee -a target/cargo-test.log
    status=${PIPESTATUS[0]}
    set -e
    [ "$status" -eq 0 ] || cargo_status=$status

    echo "== autobahn (io.driver = $driver)"
    set +e
    KOMETA_IO_DRIVER=$driver scripts/autobahn.sh target/debug/kometa 2>&1 | tee -a target/autobahn.log
    status=${PIPESTATUS[0]}
    set -e
    [ "$status" -eq 0 ] || autobahn_status=$status
done

echo "== browser"
set +e
scripts/browser-test.sh 2>&1 | tee target/browser.log
browser_status=${PIPESTATUS[0]}
set -e

echo "== million (100,000 connections)"
set +e
scripts/bench-million.sh --connections 100000 --hold 5 --kometa target/debug/kometa 2>&1 | tee target/million.log
million_status=${PIPESTATUS[0]}
set -e

count() { grep -E '^test result:' target/cargo-test.log | sed -E "s/.* ([0-9]+) $1.*/\\1/" | awk '{ sum += $1 } END { print sum + 0 }'; }
passed=$(count passed)
failed=$(count failed)
echo
echo "== summary ($(( $(date +%s) - started )) s)"
echo "cargo test: ${passed} passed, ${failed} failed over both I/O drivers (exit ${cargo_status})"
grep -E '^autobahn: [0-9]+ cases' target/autobahn.log || echo "autobahn: no summary (exit ${autobahn_status}; see target/autobahn.log)"
grep -E '^browser tests:' target/browser.log || echo "browser tests: no summary (exit ${browser_status})"
grep -E '^goals' target/million.log || echo "million: no summary (exit ${million_status})"
if [ "$cargo_status" -ne 0 ] || [ "$autobahn_status" -ne 0 ] || [ "$browser_status" -ne 0 ] || [ "$million_status" -ne 0 ]; then
    echo "RESULT: FAILED"
    exit 1
fi
echo "RESULT: PASS"
