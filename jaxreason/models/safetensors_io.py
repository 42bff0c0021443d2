"""Minimal streaming safetensors reader/writer on numpy memory maps.

Why not `safetensors.numpy`: it cannot represent bfloat16 (we use `ml_dtypes.bfloat16`, which is
what JAX uses), and its writer needs every tensor in memory at once. Here the reader maps the file
and returns one tensor at a time without copying; the writer plans the header from shapes and then
appends tensors one by one, so exporting never holds more than one tensor on the host.
Format: 8-byte little-endian header size, a JSON header, then raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
assert sys.byteorder == "little", "safetensors_io assumes a little-endian host"


class SafetensorsFile:
  """Read-only view of one .safetensors file; `get(name)` returns a memory-mapped array."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
      (n,) = struct.unpack("<Q", raw)
      size = os.fstat(f.fileno()).st_size
      if 8 + n > size:
        raise ValueError(f"{path}: truncated safetensors file (the header needs {n} bytes, the file has "
                         f"{size - 8}); the file is incomplete: copy or export it again")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
      raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    self.metadata = header.pop("__metadata__", {}) or {}
    self.header = header
    self._offset = 8 + n
    self._size = size
    self._mmap = None

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    info = self.header[name]
    dtype_name = info["dtype"]
    if dtype_name not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype_name}")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    start, end = info["data_offsets"]
    if self._offset + end > self._size:
      raise ValueError(f"{self.path}: tensor {name!r} is truncated (its data ends at byte {self._offset + end}, "
                       f"the file has {self._size}); the file is incomplete: copy or export it again")
    expected = int(np.prod(info["shape"], dtype=np.int64)) * _DTYPES[dtype_name].itemsize
    if end - start != expected:
      raise ValueError(f"{self.path}: tensor {name!r} has {end - start} bytes of data, its shape "
                       f"{info['shape']} and dtype {dtype_name} need {expected}; the file is corrupt")
    buf = self._mmap[self._offset + start:self._offset + end]
    return buf.view(_DTYPES[dtype_name]).reshape(info["shape"])


def dtype_name(dtype) -> str:
  dtype = np.dtype(dtype)
  if dtype not in _NAMES:
    raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
  return _NAMES[dtype]


class SafetensorsWriter:
  """Writes tensors in a planned order: `plan` is [(name, shape, dtype)], then `write` each."""

  def __init__(self, path: str, plan: list[tuple[str, tuple[int, ...], np.dtype]],
               metadata: dict[str, str] | None = None):
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    self._expected = []
    for name, shape, dtype in plan:
      nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
      header[name] = {"dtype": dtype_name(dtype), "shape": list(shape),
                      "data_offsets": [offset, offset + nbytes]}
      self._expected.append((name, tuple(shape), np.dtype(dtype)))
      offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    self.path = path
    self._tmp = path + ".tmp"
    self._f = open(self._tmp, "wb")
    self._f.write(struct.pack("<Q", len(blob)))
    self._f.write(blob)
    self._i = 0

  def write(self, name: str, array: np.ndarray) -> None:
    exp_name, exp_shape, exp_dtype = self._expected[self._i]
    if name != exp_name or tuple(array.shape) != exp_shape or array.dtype != exp_dtype:
      raise ValueError(f"{self.path}: expected {exp_name} {exp_shape} {exp_dtype}, "
                       f"got {name} {tuple(array.shape)} {array.dtype}")
    self._f.write(np.ascontiguousarray(array).tobytes())  # little-endian hosts only (checked below)
    self._i += 1

  def close(self) -> None:
    if self._i != len(self._expected):
      raise ValueError(f"{self.path}: {len(self._expected) - self._i} planned tensors were not written")
    self._f.flush()
    os.fsync(self._f.fileno())
    self._f.close()
    os.replace(self._tmp, self.path)


def iter_checkpoint_files(model_dir: str) -> Iterator[str]:
  """The safetensors files of a HF model dir (single file or sharded with an index)."""
  index = os.path.join(model_dir, "model.safetensors.index.json")
  single = os.path.join(model_dir, "model.safetensors")
  if os.path.exists(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
      raise ValueError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e}); "
                       "the file is corrupt: copy or export the model again") from None
    for name in sorted(set(weight_map.values())):
      yield os.path.join(model_dir, name)
  elif os.path.exists(single):
    yield single
  else:
    found = sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else []
    raise FileNotFoundError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json (found: {found}). "
        "Save the model with `save_pretrained(..., safe_serialization=True)`; .bin checkpoints "
        "are not read.")
