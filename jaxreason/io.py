"""Atomic file writes: a temporary file in the same directory, fsynced, then `os.replace`.

An interrupted run never leaves a half-written file. `write_jsonl` is the one JSONL writer (eval
samples, rollout data, expert-iteration rounds, DPO self-pairs, materialised tasks).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any


def to_jsonable(obj: Any) -> Any:
  """`json.dumps` default: numpy scalars -> Python numbers, arrays -> lists, sets/tuples -> lists."""
  import numpy as np
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, (set, frozenset, tuple)):
    return list(obj)
  raise TypeError(f"cannot write a {type(obj).__name__} as JSON: {obj!r:.80}")


def atomic_write(path: str | os.PathLike, write) -> str:
  """Calls `write(file)` on a temporary file next to `path`, then renames it over `path`."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> str:
  """One JSON object per line (UTF-8, not ASCII-escaped), written atomically. Returns the path."""
  def write(f):
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False, default=to_jsonable))
      f.write("\n")
  return atomic_write(path, write)
