#!/usr/bin/env bash
# Installs php-cli (Debian package) when `php` is missing, for the PHP admin
# client's tests (tests/admin_clients.rs). Idempotent: does nothing when
# `php` is already on PATH. Works as root, or through sudo.
set -euo pipefail

if command -v php >/dev/null 2>&1; then
    echo "install-php: ready ($(php -r 'echo PHP_VERSION;'))"
    exit 0
fi

runner=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then runner=(sudo); else
        echo "install-php: need root or sudo to install php-cli" >&2
        exit 1
    fi
fi
"${runner[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${runner[@]}" apt-get install -y -qq --no-install-recommends php-cli
echo "install-php: ready ($(php -r 'echo PHP_VERSION;'))"
