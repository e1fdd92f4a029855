#!/usr/bin/env bash
# One-step set-up on a fresh machine with only python3: a .venv with corrpo and its dependencies.
# On machines that carry the local CPU torch wheel folder (/opt/wheels, as on the project's CI), install
# the pinned CPU set from requirements/cpu.txt with uv (fast); elsewhere a normal pip install of corrpo[all]
# (every extra but vllm; GPU users get the default CUDA torch from PyPI, and add corrpo[vllm] if they want it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ -d /opt/wheels ] && ls /opt/wheels/torch-2.13.0* >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "uv==0.13.9"
  .venv/bin/python -m uv pip install -q --python .venv/bin/python --compile-bytecode -r requirements/cpu.txt -e .
else
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[all]"
fi
