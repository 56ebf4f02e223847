#!/usr/bin/env bash
# Usage: scripts/profile-read.sh inventory|product (needs a release build, wrk and linux-perf).
# Profiles one endpoint of a release `keel up` under wrk: CPU share per process, then keel's hottest symbols.
set -euo pipefail
path_kind="$1"   # inventory | product | checkout
dir=/tmp/keel-prof; rm -rf $dir; mkdir -p $dir
KEEL_LOG=warn KEEL_RATE_LIMIT=off KEEL_ADMIN_TOKEN=prof-admin-token-0123456789 KEEL_DB_POOL_SIZE=32 "$(dirname "$0")/../target/release/keel" up --data-dir $dir/data --listen 127.0.0.1:18090 2>$dir/keel.log &
KEEL=$!
until curl -sf localhost:18090/readyz >/dev/null; do sleep 0.1; done
P=$(curl -s -XPOST localhost:18090/v1/products -H 'authorization: Bearer prof-admin-token-0123456789' -H 'content-type: application/json' -d '{"sku":"P1","name":"Profiled","price_cents":100,"stock":1000000000}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
case "$path_kind" in
  inventory) URL="http://127.0.0.1:18090/v1/products/$P/inventory" ;;
  product) URL="http://127.0.0.1:18090/v1/products/$P" ;;
esac
wrk -t2 -c64 -d25s --latency "$URL" > $dir/wrk.txt &
WRK=$!
sleep 5
perf record -a -g -e cpu-clock -F 499 -o $dir/perf.data -- sleep 15 2>/dev/null
wait $WRK
kill -INT $KEEL; wait $KEEL || true
cat $dir/wrk.txt | grep -E "Requests/sec|99%|50%"
perf report -i $dir/perf.data --sort comm --stdio --no-children 2>/dev/null | grep -E "^ +[0-9]" | head -12
echo "--- keel symbols (self) ---"
perf report -i $dir/perf.data --comm tokio-runtime-w,keel --sort dso,symbol --stdio --no-children -g none 2>/dev/null | grep -E "^ +[0-9]" | head -30
