#!/usr/bin/env bash
# Installs what Keel needs and the machine lacks: PostgreSQL's server binaries (Keel runs its own
# private clusters from them; it never uses a system-wide cluster), and the programs named as arguments
# (the Makefile names nats-server and redis-server, which the tests start on private ports).
# Idempotent and quiet when all is there.
set -euo pipefail

have_postgres() {
    for dir in /usr/lib/postgresql/*/bin /usr/local/pgsql/bin; do
        [ -x "$dir/postgres" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_isready" ] && return 0
    done
    command -v postgres >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    as_root apt-get install -y -qq --no-install-recommends "$@"
}

if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo is not on PATH; install Rust (https://rustup.rs) first" >&2
    exit 1
fi

missing=()
have_postgres || missing+=(postgresql)
for extra in "$@"; do
    command -v "$extra" >/dev/null 2>&1 || missing+=("$extra")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    apt_install "${missing[@]}"
fi

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
