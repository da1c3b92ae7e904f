#!/usr/bin/env bash
# Second night vs first: `catalog-index run` twice on the same sample manifest, fresh warehouse.
#   bash bench/incremental/run.sh [SIZE]      (default 1000, the make run sample; "all" for ~6,750)
# Times the command alone (the sample server and the manifest are made once, before).
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE=${1:-1000}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench-incremental-XXXX")
PORT=${PORT:-8787}
.venv/bin/catalog-index sample serve --host 127.0.0.1 --port "$PORT" > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
.venv/bin/catalog-index sample manifest --base-url "http://127.0.0.1:$PORT" --size "$SIZE" --output "$WORK/manifest.csv"
declare -a SECONDS_OF
for night in 1 2; do
  start=$(date +%s.%N)
  .venv/bin/catalog-index run --manifest "$WORK/manifest.csv" --warehouse "file://$WORK/warehouse" \
    --allow-private-hosts > "$WORK/run-$night.log" 2>&1
  SECONDS_OF[$night]=$(echo "$(date +%s.%N) - $start" | bc)
  grep "✓" "$WORK/run-$night.log" | sed "s/^/night $night /"
done
echo "first run ${SECONDS_OF[1]} s, second run ${SECONDS_OF[2]} s: $(echo "scale=1; 100 * ${SECONDS_OF[2]} / ${SECONDS_OF[1]}" | bc)% (goal < 20%)"
