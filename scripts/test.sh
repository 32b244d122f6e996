#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite plus the linter. This is the
# command the README gives and the one CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VC_QUANT_REQUIRE_ASSETS=1  # real-model tests must run, not skip
.venv/bin/python -m ruff check vc_quant tests scripts _vc_quant_autoload.py setup.py
.venv/bin/python -m pytest -q "$@"
