#!/usr/bin/env bash
# Set up (idempotent) and run the main job: compress a real small model at 2.5 bits
# per weight, save, reload in a new process, generate, print sizes and timings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/demo.py "$@"
