#!/usr/bin/env bash
# Every GPU test and the short GPU benchmarks in one command (< 8 minutes on one H100/H200).
#
#   bash scripts/gpu_check.sh prepare   # here, with network to the registry: wheels for the GPU machine
#   bash scripts/gpu_check.sh [OUT]     # on the GPU machine: tests + scripts/bench_gpu.py -> OUT (results/gpu)
#
# The GPU machine's image has torch, Triton, numpy, safetensors, pytest and a C compiler, but
# an older transformers and neither PyAV nor PyNvVideoCodec: `prepare` downloads those (and
# the rest vc_quant imports) as Python 3.12 wheels into .whl/ (git-ignored; carry it). The
# native rANS kernels are built in place for that machine's Python. GPU tests run with
# VC_QUANT_REQUIRE_GPU=1, so a GPU path that cannot run fails instead of skipping.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "prepare" ]; then
  mkdir -p .whl
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  for pkg in "transformers==5.24.0" "huggingface_hub>=1.3,<2" "av==18.1.0" "PyNvVideoCodec==2.2.0" "accelerate==1.15.0" \
             "pyyaml" "tqdm" "safetensors" "tokenizers>=0.22,<0.24"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$pkg" || echo "prepare: could not fetch $pkg"
  done
  ls -la .whl
  exit 0
fi
OUT=${1:-results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 VC_QUANT_REQUIRE_GPU=1
"$PY" setup.py -q build_ext --inplace 2>&1 | tail -3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
status=0
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/codec tests/hf 2>&1 | tee "$OUT/gpu_tests.log" || status=1
timeout 300 "$PY" scripts/bench_gpu.py --out "$OUT" 2>&1 | tee "$OUT/bench_gpu.log" || status=1
echo "gpu_check: exit $status (results in $OUT)"
exit $status
