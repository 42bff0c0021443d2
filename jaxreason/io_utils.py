"""Crash-safe file writes: a reader sees the old file or the new one, never half of one.

`atomic_write_text/bytes/json` write a temporary file beside the target, fsync it and rename it
over the target (POSIX rename is atomic on one file system). `atomic_dir(path)` yields a fresh
temporary directory to fill and then puts it in place of `path` as a whole (the old one, if any,
is removed after the swap). `append_jsonl` appends one row per call with a single write, and
`repair_jsonl` drops a half-written last line and rows past a step (used on resume). `write_jsonl`
is the one whole-file JSONL writer (eval samples, rollout data, expert-iteration rounds, DPO
self-pairs, materialised tasks), through `atomic_write(path, write)`.
Temporary names end in `.tmp.<host>.<pid>` so concurrent writers (other hosts, other runs) never share one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["atomic_write", "write_jsonl", "to_jsonable", "atomic_write_text", "atomic_write_bytes", "atomic_write_json", "atomic_dir", "json_safe",
           "dumps_row", "append_jsonl", "repair_jsonl"]


def _tmp_name(path: str) -> str:
  d, name = os.path.split(os.path.abspath(path))
  return os.path.join(d, f".{name}.tmp.{socket.gethostname()}.{os.getpid()}")


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and a rename (parents created)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _tmp_name(path)
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
  """`value` with NaN / inf floats replaced by the strings "nan", "inf", "-inf" (valid JSON)."""
  if isinstance(value, float):
    if math.isnan(value):
      return "nan"
    if math.isinf(value):
      return "inf" if value > 0 else "-inf"
    return value
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def atomic_write_json(path: str, value: Any, indent: int | None = 2) -> None:
  atomic_write_text(path, json.dumps(json_safe(value), indent=indent, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str):
  """Yields an empty temporary directory beside `path`; on success it replaces `path` whole.

  On an exception the temporary directory is removed and `path` is left as it was.
  """
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = _tmp_name(path)
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.lexists(path):
    old = _tmp_name(path) + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
  os.replace(tmp, path)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def dumps_row(row: dict) -> str:
  """One JSONL line; NaN / inf become "nan" / "inf" / "-inf" strings so every line is valid JSON."""
  return json.dumps(json_safe(row), allow_nan=False) + "\n"


def append_jsonl(f, row: dict) -> None:
  """Appends `row` to the open text file `f` in one write and flushes it."""
  f.write(dumps_row(row))
  f.flush()


def repair_jsonl(path: str, max_step: int | None = None, key: str = "step") -> int:
  """Makes `path` safe to append to: drops a half-written last line (no newline or not JSON)
  and, with `max_step`, every row whose `key` is past it (they are logged again on resume).
  Returns the number of lines dropped. Rewrites atomically only when something changes."""
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")
  tail = lines.pop()  # b"" when the file ends with a newline, else a half-written line
  keep, dropped = [], 1 if tail.strip() else 0
  for line in lines:
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      dropped += 1
      continue
    if max_step is not None and isinstance(row, dict) and isinstance(row.get(key), (int, float)) \
        and row[key] > max_step:
      dropped += 1
      continue
    keep.append(line)
  if dropped:
    atomic_write_bytes(path, b"".join(line + b"\n" for line in keep))
  return dropped


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
