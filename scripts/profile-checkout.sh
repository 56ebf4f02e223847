#!/usr/bin/env bash
# Profiles POST /v1/checkout of a release `keel up` under wrk (one buyer, unique keys); needs wrk and linux-perf.
set -euo pipefail
dir=/tmp/keel-prof3; rm -rf $dir; mkdir -p $dir
ADMIN=prof-admin-token-0123456789
KEEL_LOG=warn KEEL_RATE_LIMIT=off KEEL_ADMIN_TOKEN=$ADMIN KEEL_DB_POOL_SIZE=32 "$(dirname "$0")/../target/release/keel" up --data-dir $dir/data --listen 127.0.0.1:18092 2>$dir/keel.log &
KEEL=$!
until curl -sf localhost:18092/readyz >/dev/null; do sleep 0.1; done
H='content-type: application/json'
P=$(curl -s -XPOST localhost:18092/v1/products -H "authorization: Bearer $ADMIN" -H "$H" -d '{"sku":"P1","name":"Profiled","price_cents":1,"stock":1000000000}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
T=$(curl -s -XPOST localhost:18092/v1/users -H "$H" -d '{"name":"Buyer","email":"buyer@example.org"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
U=${T%%.*}  # a user's token starts with the user's id
curl -sf -XPOST localhost:18092/v1/admin/users/$U/deposits -H "authorization: Bearer $ADMIN" -H "idempotency-key: d" -H "$H" -d '{"amount_cents":10000000000}' >/dev/null
curl -s -XPUT localhost:18092/v1/cart/items/$P -H "authorization: Bearer $T" -H "$H" -d '{"quantity":1}' >/dev/null
cat > $dir/checkout.lua <<LUA
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("POST", "/v1/checkout", {["Authorization"] = "Bearer $T", ["Idempotency-Key"] = "k" .. counter .. "-" .. math.random(1000000000)}, nil)
end
LUA
wrk -t2 -c32 -d25s --latency -s $dir/checkout.lua http://127.0.0.1:18092 > $dir/wrk.txt &
WRK=$!
sleep 5
perf record -a -g -e cpu-clock -F 499 -o $dir/perf.data -- sleep 15 2>/dev/null
wait $WRK
kill -INT $KEEL; wait $KEEL || true
grep -E "Requests/sec|50%|99%|Non-2xx" $dir/wrk.txt
perf report -i $dir/perf.data --sort comm,dso --stdio --no-children -g none 2>/dev/null | grep -E "^ +[0-9]" | head -10
