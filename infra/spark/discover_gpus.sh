#!/usr/bin/env bash
# Spark GPU discovery script: prints {"name": "gpu", "addresses": ["0", "1", ...]}.
# Spark calls it on each executor/worker to learn which GPUs it may hand to tasks.
set -euo pipefail
if command -v nvidia-smi >/dev/null 2>&1; then
  addresses=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed 's/^/"/; s/$/"/' | paste -sd, -)
else
  addresses=""
fi
echo "{\"name\": \"gpu\", \"addresses\": [${addresses}]}"
