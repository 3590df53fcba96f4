#!/usr/bin/env bash
# Browser tests of the JavaScript client (client/kometa.js) in Debian's
# headless Chromium, against real Kometa servers: every transport, fallback
# when WebSocket is blocked, resume after a cut or a restart, one connection
# shared by tabs with leader takeover, user messages and acks, the demo page;
# and the stock sockjs-client against /sockjs and /comet (docs/sockjs.md).
#
#   scripts/browser-test.sh [NAME_SUBSTRING...]    (runs the matching tests only)
#
# Installs what it needs first (scripts/install-browser-deps.sh). The server
# embeds the client files, so target/debug/kometa is (re)built when missing or
# older than any of them. Prints "N passed, M failed"; exits 1 on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-browser-deps.sh

bin=target/debug/kometa
if [ ! -x "$bin" ] || [ -n "$(find client src Cargo.toml Cargo.lock -newer "$bin" -type f -print -quit 2>/dev/null)" ]; then
    echo "== cargo build --bins"
    cargo build --quiet --bins
fi

echo "== browser tests (chromium $(/usr/bin/chromium --version 2>/dev/null | grep -oE '[0-9]+(\.[0-9]+)+' | head -1))"
# Bounded: the suite takes about a minute; never hang a CI run.
exec timeout --kill-after=10 300 node tests/browser/run.mjs "$@"
