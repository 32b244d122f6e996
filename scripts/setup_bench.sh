#!/usr/bin/env bash
# Peers the benchmarks compare against (not dependencies of vc_quant): HQQ. Its sdist tries
# to build CUDA kernels unless told not to; the pure-torch path runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
DISABLE_CUDA=1 .venv/bin/python -m pip install --disable-pip-version-check -q "${FIND_LINKS[@]}" \
  "hqq==0.2.8.post1" "torch==2.13.0"
echo "setup_bench: ok (hqq $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("hqq"))'))"
