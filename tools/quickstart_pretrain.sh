#!/usr/bin/env bash
# Pre-training quickstart (offline): corpus from the installed Python packages' documentation ->
# byte-level BPE tokenizer (4,096 tokens) -> memory-mapped token stream -> a 2.4M-parameter
# Llama-style model trained from scratch (configs/quickstart_pretrain.yaml) -> continuations.
# Extra arguments go to `python -m jaxreason.train` (e.g. --set train.max_steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1
D=runs/pretrain_data
mkdir -p "$D"
[ -f "$D/corpus.jsonl" ] || "$PY" -m jaxreason.data.pydoc_corpus --out "$D/corpus.jsonl" --max-mb 10
[ -f "$D/tok/tokenizer.json" ] || "$PY" -m jaxreason.tokenizer train --corpus "$D/corpus.jsonl" --vocab-size 4096 --out "$D/tok"
[ -f "$D/meta.json" ] || "$PY" -m jaxreason.data.prepare --corpus "$D/corpus.jsonl" --tokenizer "$D/tok" --out "$D" \
  --workers 2 --heldout-fraction 0.02
"$PY" -m jaxreason.train --config configs/quickstart_pretrain.yaml "$@"
"$PY" tools/continue_text.py --model runs/quickstart_pretrain --max-new-tokens 48 \
  --prompt "def read_file(path):" --prompt "Return the number of" --prompt "This module provides"
