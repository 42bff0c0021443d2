#!/usr/bin/env bash
# Installs jaxreason into ./.venv (when needed) and runs the quickstart, the project's main job:
# s1-style SFT of a tiny Qwen2 on a procedural reasoning task, then accuracy per thinking budget.
# Extra arguments go to `python -m jaxreason.train` (e.g. --set output_dir=runs/mine).
# JAXREASON_VENV picks another venv directory (CI uses a fresh one to prove the base install works).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${JAXREASON_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
export HF_HUB_OFFLINE=1
exec "$VENV/bin/python" -m jaxreason.train --config configs/quickstart.yaml "$@"
