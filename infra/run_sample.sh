#!/usr/bin/env bash
# `make run`: serve the sample catalog over local HTTP, build its manifest, run the pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1000}
WAREHOUSE=${WAREHOUSE:-file://$PWD/warehouse}
# A fixed port: the URLs in the manifest must be the same from run to run for the
# incremental re-crawl to recognise them.
PORT=${PORT:-8765}
for attempt in $(seq 20); do  # a server from a run that just ended may still be closing
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || break
  if [[ $attempt == 20 ]]; then
    echo "make run: port $PORT is busy; stop what listens there or run 'make run PORT=<free port>'" >&2
    exit 2
  fi
  sleep 0.5
done
mkdir -p sample

.venv/bin/catalog-index sample serve --host 127.0.0.1 --port "$PORT" > sample/server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done

.venv/bin/catalog-index sample manifest --base-url "http://127.0.0.1:$PORT" --size "$SIZE" --output sample/manifest.csv
# The sample server listens on 127.0.0.1, which the SSRF guard refuses by default.
.venv/bin/catalog-index run --manifest sample/manifest.csv --warehouse "$WAREHOUSE" --allow-private-hosts
echo "make run: the sample catalog is indexed in $WAREHOUSE; run it again to see the incremental night"
echo "  (nothing re-downloaded or re-embedded). Serve it: .venv/bin/catalog-index pull --warehouse $WAREHOUSE --dest sample/serving"
