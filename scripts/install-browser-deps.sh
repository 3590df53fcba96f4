#!/usr/bin/env bash
# Installs what the browser tests (tests/browser) need, idempotently:
#   - Debian's chromium (apt-get), only when /usr/bin/chromium is missing
#   - node and npm (Debian: nodejs, npm), only when missing
#   - playwright-core and sockjs-client into tests/browser/node_modules with
#     `npm ci`, from the committed package.json + package-lock.json (pinned).
#     playwright-core drives the system Chromium; no browser is ever
#     downloaded (PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD). sockjs-client is the
#     stock SockJS browser library the SockJS tests load (never committed).
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
    local runner=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then runner=(sudo); else
            echo "install-browser-deps: need root or sudo to install Debian packages: $*" >&2
            exit 1
        fi
    fi
    "${runner[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${runner[@]}" apt-get install -y -qq --no-install-recommends "$@"
}

missing=()
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-browser-deps: installing ${missing[*]}"
    apt_install "${missing[@]}"
fi

cd tests/browser
# "name@version" of each pinned package: as locked (lock) or as installed.
versions() {
    node -e '
        const lock = process.argv[1] === "lock";
        const version = (name) => {
            try {
                return lock ? require("./package-lock.json").packages["node_modules/" + name].version
                            : require("./node_modules/" + name + "/package.json").version;
            } catch (e) { return ""; }
        };
        console.log(["playwright-core", "sockjs-client"].map((name) => name + "@" + version(name)).join(" "));
    ' "$1"
}
want=$(versions lock)
if [ "$want" != "$(versions installed)" ]; then
    echo "install-browser-deps: npm ci (${want})"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
fi
echo "install-browser-deps: ready ($(/usr/bin/chromium --version 2>/dev/null | head -1), node $(node --version), ${want})"
