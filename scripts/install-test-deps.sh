#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, idempotently:
#   - python3 with venv (Debian: python3, python3-venv) when missing
#   - a project-local virtualenv (.venv) with the Autobahn runner (kosoku),
#     the `websockets` client used by cross-implementation tests and the
#     SockJS conformance tests (tests/sockjs), and the Prometheus project's
#     `prometheus_client`, whose text parsers check /metrics
#     (tests/metrics.rs through tests/parse_metrics.py)
#   - php-cli (scripts/install-php.sh) for the PHP admin client's tests
#   - redis-server (Debian) for the cluster tests, which start their own
#     instances on free ports.
# Nothing is installed system-wide except missing Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

KOSOKU_VERSION="0.1.0"
WEBSOCKETS_VERSION="15.0.1"
PROMETHEUS_CLIENT_VERSION="0.26.0"

apt_install() {
    local runner=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then runner=(sudo); else
            echo "install-test-deps: need root or sudo to install Debian packages: $*" >&2
            exit 1
        fi
    fi
    "${runner[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${runner[@]}" apt-get install -y -qq "$@"
}

if ! command -v python3 >/dev/null 2>&1; then
    apt_install python3 python3-venv
fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
want="kosoku==${KOSOKU_VERSION} websockets==${WEBSOCKETS_VERSION} prometheus-client==${PROMETHEUS_CLIENT_VERSION}"
if ! .venv/bin/python -c "import kosoku, websockets, prometheus_client" >/dev/null 2>&1; then
    echo "install-test-deps: installing ${want} into .venv"
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install --quiet --disable-pip-version-check ${want}
fi
# PHP for the PHP admin client's tests.
scripts/install-php.sh
# Redis for the cluster tests (they start private instances themselves).
if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
fi
echo "install-test-deps: ready (.venv: $(.venv/bin/python --version))"
