#!/usr/bin/env bash
# Installs jaxreason with its dev extra into ./.venv (from scratch when absent), builds the separate
# vLLM venv ./.venv-vllm for the vLLM-backend test (skip with JAXREASON_SKIP_VLLM=1), and runs the
# whole test suite, slow end-to-end tests included. This is the README's test command and what
# .ci/run calls. Extra arguments go to pytest (e.g. -m "not slow" for the quick subset).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || exit 1
fi
.venv/bin/python -m pip install -q --upgrade pip || exit 1
.venv/bin/python -m pip install -q -e ".[dev]" || exit 1
if [ "${JAXREASON_SKIP_VLLM:-0}" != "1" ]; then
  bash tools/setup_vllm_venv.sh || exit 1
  export JAXREASON_REQUIRE_VLLM=1
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m pytest -n 2 --dist worksteal "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests"
  exit 0
fi
exit "$rc"
