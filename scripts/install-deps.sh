#!/usr/bin/env bash
# Installs what Keel needs and the machine lacks. Idempotent, and quiet when all is there.
#
#   scripts/install-deps.sh          what `keel up` runs on: PostgreSQL's server binaries (Keel runs its
#                                     own private clusters from them; it never uses a system-wide one)
#   scripts/install-deps.sh --test   also the test suite's peers: nats-server and redis-server (the tests
#                                     start their own on private ports), a Python virtualenv in
#                                     target/python with an SMTP server and the Standard Webhooks library,
#                                     curl and jq for README's example flow, openssl for the TLS tests,
#                                     and Node with npm for the benchmark's queue peer (graphile-worker)
#
# Servers installed only for the tests are never left running or enabled as system services: apt is
# told not to start them while installing, and they are disabled for boot afterwards.
set -euo pipefail

test_peers=false
case "${1:-}" in
    "") ;;
    --test) test_peers=true ;;
    *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac

have_postgres() {
    for dir in /usr/lib/postgresql/*/bin /usr/local/pgsql/bin; do
        [ -x "$dir/postgres" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_isready" ] && return 0
    done
    command -v postgres >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian's maintainer scripts start (and enable) a packaged server as they install it. A
# policy-rc.d that answers 101 ("action forbidden") keeps them from starting anything during this
# install; an existing policy of the machine's own is left as it was.
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    local policy=/usr/sbin/policy-rc.d ours=false
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
        ours=true
    fi
    local status=0
    { as_root apt-get update -qq && as_root apt-get install -y -qq --no-install-recommends "$@"; } || status=$?
    if $ours; then as_root rm -f "$policy"; fi
    return $status
}

# A server the tests start on their own ports must not also run as a system service at boot.
disable_service() {
    local unit=$1
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        as_root systemctl disable --now "$unit" >/dev/null 2>&1 || true
    elif command -v update-rc.d >/dev/null 2>&1 && [ -e "/etc/init.d/$unit" ]; then
        as_root update-rc.d "$unit" disable >/dev/null 2>&1 || true
    fi
}

if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo is not on PATH; install Rust (https://rustup.rs) first" >&2
    exit 1
fi

missing=()
have_postgres || missing+=(postgresql)
if $test_peers; then
    for server in nats-server redis-server; do
        command -v "$server" >/dev/null 2>&1 || missing+=("$server")
    done
    # README's example flow, which make test runs, is written with curl and jq; the TLS tests make
    # their certificates with openssl.
    for tool in curl jq python3 openssl; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
    # The benchmark's queue peer (S4-peer) is graphile-worker, installed with npm and run by Node.
    command -v node >/dev/null 2>&1 || missing+=(nodejs)
    command -v npm >/dev/null 2>&1 || missing+=(npm)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    apt_install "${missing[@]}"
    # Every server installed here runs only as Keel's child; none is left as a boot-time service
    # (Debian's postgresql package also makes a system-wide cluster, which Keel never uses).
    for package in "${missing[@]}"; do
        case "$package" in nats-server|redis-server|postgresql) disable_service "$package" ;; esac
    done
fi

$test_peers || exit 0

# The test suite's real protocol peers that Debian does not package: an SMTP server (aiosmtpd) and the
# Standard Webhooks reference library (to verify signatures independently), in a virtualenv under target/.
venv="$(dirname "$0")/../target/python"
requirements="$(dirname "$0")/test-requirements.txt"
if ! cmp -s "$requirements" "$venv/installed-requirements.txt" 2>/dev/null; then
    echo "install-deps: creating the test virtualenv in target/python"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/installed-requirements.txt"
fi
