#!/usr/bin/env bash
# Runs README's worked example (the ```sh block between `<!-- example-flow:start -->` and
# `<!-- example-flow:end -->`) exactly as written, against a `keel up` of its own over a temporary data
# directory, and fails if any step of it fails or if keel does not then stop cleanly (exit 0).
#
#   scripts/example-flow.sh path/to/keel        (`make example-flow` builds the debug binary and runs this)
#
# Needs curl, jq and python3 (to find a free port), besides what `keel up` needs.
set -euo pipefail

usage() {
    echo "usage: $0 path/to/keel" >&2
    exit 2
}
[ $# -eq 1 ] || usage
keel=$(realpath -e -- "$1" 2>/dev/null) || { echo "example-flow: no keel binary at $1" >&2; usage; }
[ -x "$keel" ] || { echo "example-flow: $keel is not executable" >&2; exit 2; }
readme="$(cd "$(dirname "$0")/.." && pwd)/README.md"
for tool in curl jq python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "example-flow: needs $tool (apt-get install $tool)" >&2; exit 2; }
done

START_TIMEOUT=120 # seconds: a debug build over a fresh initdb takes a while
STOP_TIMEOUT=60   # seconds: keel drains requests, finishes its jobs, then stops PostgreSQL

tmp=$(mktemp -d)
# As root, keel up runs PostgreSQL as an unprivileged user (`postgres`, or `nobody`), which must be able
# to traverse every ancestor of the data directory; mktemp -d makes a mode-700 directory that user
# could not enter. 711 lets it pass through without listing what is here.
chmod 711 "$tmp"
keel_pid=

cleanup() {
    local status=$?
    if [ -n "$keel_pid" ] && kill -0 "$keel_pid" 2>/dev/null; then
        # Only on failure or interruption: keel is killed, and its PostgreSQL follows it (the cluster
        # is told by the kernel to shut down when its owner dies). Wait for both before deleting.
        kill -KILL "$keel_pid" 2>/dev/null || true
        wait "$keel_pid" 2>/dev/null || true
    fi
    for _ in $(seq 50); do
        rm -rf "$tmp" 2>/dev/null && break
        sleep 0.2 # a dying PostgreSQL may still be removing its files
    done
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log="$tmp/keel.log"
fail() {
    echo "example-flow: $*" >&2
    if [ -s "$log" ]; then
        echo "--- last lines of keel's log ($log) ---" >&2
        tail -n 40 "$log" >&2
    fi
    exit 1
}

# A port that was free a moment ago. Another process may take it before keel binds it; then keel exits
# saying it cannot listen, and we try again on another port.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Starts keel up in the background, isolated from the caller's configuration: no KEEL_* variable from
# the environment, and a working directory without a keel.toml. Its log goes to $log.
start_keel() {
    port=$(free_port)
    KEEL="http://127.0.0.1:$port"
    (
        cd "$tmp"
        for var in $(compgen -e | grep '^KEEL_' || true); do unset "$var"; done
        export KEEL_LOG=warn
        exec "$keel" up --data-dir "$tmp/data" --listen "127.0.0.1:$port"
    ) >>"$log" 2>&1 &
    keel_pid=$!
}

# Waits until keel answers /readyz with 200 (0), or has exited (1), or START_TIMEOUT has passed (2).
wait_ready() {
    local deadline=$((SECONDS + START_TIMEOUT))
    while [ $SECONDS -lt $deadline ]; do
        if ! kill -0 "$keel_pid" 2>/dev/null; then
            wait "$keel_pid" 2>/dev/null || true
            keel_pid=
            return 1
        fi
        if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$KEEL/readyz" || true)" = 200 ]; then
            return 0
        fi
        sleep 0.5
    done
    return 2
}

attempt=1
while :; do
    start_keel
    ready=0
    wait_ready || ready=$?
    case $ready in
        0) break ;;
        2) fail "keel up did not answer $KEEL/readyz with 200 within ${START_TIMEOUT}s" ;;
    esac
    if [ $attempt -lt 3 ] && grep -q "cannot listen on" "$log"; then
        echo "example-flow: port $port was taken meanwhile; trying another" >&2
        attempt=$((attempt + 1))
        continue
    fi
    fail "keel up exited before it was ready"
done

# The block: the lines inside the ```sh fence between the markers.
flow="$tmp/flow.sh"
block_start=$(grep -n -m1 -F '<!-- example-flow:start -->' "$readme" | cut -d: -f1 || true)
[ -n "$block_start" ] || fail "README.md has no <!-- example-flow:start --> marker"
awk '
    /<!-- example-flow:start -->/ { inside = 1; next }
    /<!-- example-flow:end -->/   { inside = 0; next }
    inside && /^```sh[[:space:]]*$/ && !fence { fence = 1; first = NR; next }
    inside && fence == 1 && /^```[[:space:]]*$/ { fence = 2; next }
    inside && fence == 1 { print }
    END { if (fence != 2) exit 1 }
' "$readme" >"$flow.body" || fail "README.md has no closed \`\`\`sh block between the example-flow markers"
[ -s "$flow.body" ] || fail "README.md's example-flow block is empty"
# Line numbers in the README of the block's first line, so that a failure names the README's line.
first_line=$(awk -v from="$block_start" 'NR > from && /^```sh/ { print NR + 1; exit }' "$readme")
steps=$(grep -cE '^# [0-9]+\.' "$flow.body" || true)
{
    echo "trap 'echo \"example-flow: README.md line \$((LINENO + $first_line - 2)) failed: \$BASH_COMMAND\" >&2' ERR"
    cat "$flow.body"
} >"$flow"

# Run it as README shows it, from a directory of its own; KEEL, KEEL_DATA and ADMIN_TOKEN come from here.
ADMIN_TOKEN=$(cat "$tmp/data/admin-token") || fail "keel up kept no admin token in $tmp/data/admin-token"
out="$tmp/flow.out"
flow_status=0
(cd "$tmp" && KEEL="$KEEL" KEEL_DATA="$tmp/data" ADMIN_TOKEN="$ADMIN_TOKEN" bash -euo pipefail "$flow") >"$out" 2>&1 || flow_status=$?

# Stop keel as a terminal's Ctrl-C or a service manager would, and expect a clean exit.
kill -TERM "$keel_pid"
deadline=$((SECONDS + STOP_TIMEOUT))
while kill -0 "$keel_pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
if kill -0 "$keel_pid" 2>/dev/null; then
    fail "keel did not stop within ${STOP_TIMEOUT}s of SIGTERM"
fi
keel_status=0
wait "$keel_pid" || keel_status=$?
keel_pid=

if [ $flow_status -ne 0 ]; then
    echo "--- the example's output ---" >&2
    tail -n 60 "$out" >&2
    fail "README's example failed (exit $flow_status)"
fi
[ $keel_status -eq 0 ] || fail "keel up exited $keel_status after SIGTERM, not 0"
echo "example-flow: README's example ran against keel up ($steps steps)"
