#!/usr/bin/env bash
# Set up (idempotent) and run the main job: the codec benchmark on real weights.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/bench_codec.py "$@"
