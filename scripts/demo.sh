#!/usr/bin/env bash
# Set up (idempotent) and run the main job: a real small model as shipped (bf16), RTN
# 4-bit and vc_quant at 4.0 and 2.5 bits/weight, each saved, reloaded in a fresh process
# and measured the same way (size, load time, memory, perplexity, generated text).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/demo.py "$@"
