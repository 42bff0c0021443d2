"""Training batches: rows -> encoded examples (once, in memory) -> a Grain pipeline of packed batches.

`build_train_batches(sources, tokenizer, seq_len=..., global_batch_size=...)` reads every row of
every source, encodes it once (`examples.encode_example`), and returns `TrainBatches`: iterate it
for batches of this process, each a dict of numpy arrays [B_local, seq_len]:

  inputs   int32    ids[:-1] of the examples in the row (0 on padding)
  targets  int32    ids[1:]  (0 on padding)
  weights  float32  loss weight of each target (0 on prompt tokens and padding)
  positions int32   position within its example, from 0 (0 on padding)
  segments int32    1, 2, 3, ... for the examples of a row, 0 on padding

Each example is shifted on its own (inputs ids[:-1], targets ids[1:]) before packing, so no token
ever predicts a token of another example; attention must still be masked by `segments`.

Pipeline (grain 0.2.18), the same on every process:
  MapDataset.source(epoch_order).shuffle(seed).repeat(num_epochs)  # a new seeded order per epoch
  .map(example lookup) .to_iter_dataset(num_threads=0)               # examples are in memory
  packing=True:  FirstFitPackIterDataset(num_packing_bins=global_batch_size)
  packing=False: each example right-padded to seq_len
  .batch(global_batch_size) -> pad the last batch with empty rows -> rows of this process
Packing is Grain's online first-fit: examples, in shuffled order, go to the first of
`global_batch_size` rows with room; when one fits in none, those rows are emitted as one global
batch and a new set of rows starts with it. An example never straddles rows. Epochs are not
separated: the last rows of epoch e may hold examples of epoch e + 1.
Multi-host: every process builds the same global batch and keeps rows
[p * B_local, (p + 1) * B_local), so processes get disjoint rows and the same number of steps.

Checkpointing: `it = iter(batches)`; `it.get_state()` is a JSON-serialisable dict (Grain's
iterator state: the index into the shuffled order plus the packer's position in its current set of
rows); `iter(batches).set_state(state)` resumes exactly, packing the current rows again.

Source weights are repeats per epoch: 1 = every example once, 2 = twice, 0.5 = a seeded half
(the same half every epoch), 1.5 = all once plus a seeded half.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxreason.data.examples import check_format, encode_example
from jaxreason.data.sources import DataError, read_rows

__all__ = ["Source", "TrainBatches", "build_train_batches", "encode_sources"]

logger = logging.getLogger(__name__)
_LOG_BAD_ROWS = 20  # skipped rows logged (and kept in stats) one by one; the rest are counted


@dataclasses.dataclass(frozen=True)
class Source:
  """A training data file: `path`, row format `fmt` (examples.ROW_FORMATS), repeats per epoch `weight`."""

  path: str
  fmt: str
  weight: float = 1.0

  @classmethod
  def of(cls, spec: Any) -> Source:
    """From a Source, a (path, fmt[, weight]) tuple, or a {path, fmt | format, weight} mapping."""
    if isinstance(spec, Source):
      return spec
    if isinstance(spec, Mapping):
      fmt = spec.get("fmt", spec.get("format"))
      src = cls(os.fspath(spec["path"]), fmt, float(spec.get("weight", 1.0)))
    elif isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
      src = cls(os.fspath(spec[0]), spec[1], float(spec[2]) if len(spec) == 3 else 1.0)
    else:
      raise ValueError(f"a data source is (path, fmt[, weight]) or {{path, fmt, weight}}, got {spec!r}")
    check_format(src.fmt)
    if not (src.weight >= 0 and math.isfinite(src.weight)):
      raise ValueError(f"{src.path}: source weight must be a finite number >= 0 (repeats per epoch), got {src.weight}")
    return src


# ----------------------------------------------------------------------------------------------
# Reading and encoding (once, up front)


def _located_rows(path: str) -> list[tuple[str, Any]]:
  """(where, row) for every row; jsonl keeps line numbers and turns bad JSON into a bad row."""
  if os.path.isfile(path) and os.path.splitext(path)[1].lower() in (".jsonl", ".ndjson"):
    from jaxreason.data.sources import jsonl_lines  # bad UTF-8 or JSON: a bad row (issue 16)
    return [(f"{path} line {lineno}", row) for lineno, row in jsonl_lines(path)]
  rows = read_rows(path)
  unit = "item" if path.lower().endswith(".json") else "row"
  start = 0 if unit == "item" else 1
  return [(f"{path} {unit} {i + start}", row) for i, row in enumerate(rows)]


def encode_sources(
  sources: Sequence[Any], tokenizer: Any, *, seq_len: int, on_bad_row: str = "error",
  tag_weights: Mapping[str, float] | None = None, truncation: str = "right",
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int], dict[str, Any]]:
  """Encode every row of every source: (examples [(ids, weights)], source index of each, stats).

  An example longer than seq_len + 1 tokens is cut on the right (truncation="right") or dropped
  ("drop"); an example left with no trained token is dropped. Bad rows raise DataError naming the
  file and line (on_bad_row="error") or are skipped, logged and counted ("skip").
  """
  if on_bad_row not in ("error", "skip"):
    raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
  if truncation not in ("right", "drop"):
    raise ValueError(f"truncation must be 'right' or 'drop', got {truncation!r}")
  srcs = [Source.of(s) for s in sources]
  if not srcs:
    raise ValueError("no training data sources given")
  examples: list[tuple[np.ndarray, np.ndarray]] = []
  origin: list[int] = []
  per_source = []
  bad_rows: list[str] = []
  for si, src in enumerate(srcs):
    st = {"path": src.path, "fmt": src.fmt, "weight": src.weight, "rows": 0, "examples": 0,
          "bad_rows_skipped": 0, "truncated": 0, "dropped_too_long": 0, "dropped_no_trained_tokens": 0,
          "tokens": 0, "trained_tokens": 0}  # fmt: skip
    for where, row in _located_rows(src.path):
      st["rows"] += 1
      try:
        if isinstance(row, DataError):
          raise row
        ids, w = encode_example(row, src.fmt, tokenizer, tag_weights=tag_weights)
      except DataError as e:
        if on_bad_row == "error":
          raise DataError(f"{where}: {e}; fix the row, or pass on_bad_row='skip' to skip bad rows") from None
        st["bad_rows_skipped"] += 1
        if len(bad_rows) < _LOG_BAD_ROWS:
          bad_rows.append(f"{where}: {e}")
          logger.warning("skipping bad row %s: %s", where, e)
        continue
      cut = len(ids) > seq_len + 1
      if cut and truncation == "drop":
        st["dropped_too_long"] += 1
        continue
      ids, w = ids[: seq_len + 1], w[: seq_len + 1]
      trained = int(np.count_nonzero(w[1:] > 0))
      if trained == 0:
        st["dropped_no_trained_tokens"] += 1
        continue
      st["truncated"] += cut
      examples.append((ids, w))
      origin.append(si)
      st["examples"] += 1
      st["tokens"] += len(ids) - 1
      st["trained_tokens"] += trained
    per_source.append(st)
  totals = {k: sum(s[k] for s in per_source) for k in per_source[0] if isinstance(per_source[0][k], int)}
  stats = {**totals, "sources": per_source, "skipped_rows": bad_rows}
  if totals["bad_rows_skipped"] > len(bad_rows):
    logger.warning("skipped %d bad rows in all (the first %d logged)", totals["bad_rows_skipped"], len(bad_rows))
  if not examples:
    raise DataError(f"no trainable examples in {[s.path for s in srcs]}: {totals}")
  return examples, origin, stats


def _epoch_order(origin: Sequence[int], weights: Sequence[float], seed: int) -> np.ndarray:
  """Example indices of one epoch: each source's examples repeated floor(weight) times, plus a
  seeded subset of round(frac(weight) * n) of them."""
  origin = np.asarray(origin)
  parts = []
  for si, weight in enumerate(weights):
    idx = np.flatnonzero(origin == si)
    whole, frac = int(weight), weight - int(weight)
    parts += [idx] * whole
    extra = int(round(frac * len(idx)))
    if extra:
      rng = np.random.default_rng([seed, si])
      parts.append(np.sort(rng.choice(idx, size=extra, replace=False)))
  return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------------------------
# Grain transforms (plain callables: they hold no iteration state, so Grain's state is all)


@dataclasses.dataclass(frozen=True)
class _Lookup:
  """Example index -> {inputs, targets, weights}, each [n] (views of the encoded example)."""

  examples: Sequence[tuple[np.ndarray, np.ndarray]]

  def __call__(self, i: int) -> dict[str, np.ndarray]:
    ids, w = self.examples[int(i)]
    return {"inputs": ids[:-1], "targets": ids[1:], "weights": w[1:]}


@dataclasses.dataclass(frozen=True)
class _PadRow:
  """One example -> one row of length seq_len, right padded (segments 1 on tokens, 0 on padding)."""

  seq_len: int

  def __call__(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(ex["inputs"])
    row = {k: np.zeros(self.seq_len, v.dtype) for k, v in ex.items()}
    for k, v in ex.items():
      row[k][:n] = v
    row["positions"] = np.zeros(self.seq_len, np.int32)
    row["positions"][:n] = np.arange(n, dtype=np.int32)
    row["segments"] = np.zeros(self.seq_len, np.int32)
    row["segments"][:n] = 1
    return row


def _rename_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Grain's packed names -> ours (`inputs_segment_ids` -> `segments`, `inputs_positions` -> `positions`)."""
  return {"inputs": row["inputs"], "targets": row["targets"], "weights": row["weights"],
          "positions": row["inputs_positions"], "segments": row["inputs_segment_ids"]}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _LocalRows:
  """A global batch (the last may be short) -> padded to global_batch_size rows -> this process's rows."""

  global_batch_size: int
  process_index: int
  process_count: int

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    local = self.global_batch_size // self.process_count
    lo, hi = self.process_index * local, (self.process_index + 1) * local
    out = {}
    for k, v in batch.items():
      if v.shape[0] < self.global_batch_size:
        v = np.concatenate([v, np.zeros((self.global_batch_size - v.shape[0], *v.shape[1:]), v.dtype)])
      out[k] = np.ascontiguousarray(v[lo:hi])
    return out


def _count_first_fit_batches(lengths: Sequence[int], bins: int, seq_len: int) -> int:
  """Number of global batches Grain's FirstFitPackIterDataset makes from examples of `lengths`."""
  batches, free = 0, None
  for n in lengths:
    if free is not None:
      fits = np.flatnonzero(free >= n)
      if len(fits):
        free[fits[0]] -= n
        continue
    batches += 1
    free = np.full(bins, seq_len, np.int64)
    free[0] -= n
  return batches


# ----------------------------------------------------------------------------------------------
# The pipeline


class TrainBatches:
  """Batches of this process. `iter(self)` gives a Grain DatasetIterator (get_state / set_state).

  stats: counts from encoding (rows, examples, bad_rows_skipped, truncated, dropped_too_long,
  dropped_no_trained_tokens, tokens, trained_tokens, per source) and examples_per_epoch.
  num_batches: batches over all epochs, exact (for packing, by replaying the first-fit packer on
  the example lengths in the shuffled order). steps_per_epoch: ceil(num_batches / num_epochs); with
  packing an approximation, since rows are not cut at epoch boundaries.
  """

  def __init__(self, dataset: grain.IterDataset, *, stats: dict[str, Any], order: grain.MapDataset,
               lengths: np.ndarray, packing: bool, seq_len: int, global_batch_size: int, process_count: int,
               num_epochs: int):
    self.dataset = dataset
    self.stats = stats
    self.packing = packing
    self.seq_len = seq_len
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.num_epochs = num_epochs
    self._order = order  # example index of each element, all epochs
    self._lengths = lengths  # [num_examples] input tokens of each example

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.dataset)

  @functools.cached_property
  def num_batches(self) -> int:
    if not self.packing:
      return -(-len(self._order) // self.global_batch_size)
    lengths = self._lengths[[self._order[i] for i in range(len(self._order))]]
    return _count_first_fit_batches(lengths, self.global_batch_size, self.seq_len)

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.num_batches // self.num_epochs)


def build_train_batches(
  sources: Sequence[Any], tokenizer: Any, *, seq_len: int, global_batch_size: int, packing: bool = True,
  shuffle: bool = True, seed: int = 0, num_epochs: int = 1, on_bad_row: str = "error",
  tag_weights: Mapping[str, float] | None = None, process_index: int = 0, process_count: int = 1,
  truncation: str = "right",
) -> TrainBatches:
  """Training batches of process `process_index` of `process_count` (see the module docstring).

  sources: (path, fmt[, weight]) tuples, {path, fmt, weight} mappings or `Source`s.
  Batches are [global_batch_size // process_count, seq_len]; the last global batch is padded with
  empty rows (weights 0) to keep shapes fixed.
  """
  for name, v in (("seq_len", seq_len), ("global_batch_size", global_batch_size), ("num_epochs", num_epochs),
                  ("process_count", process_count)):  # fmt: skip
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be an int >= 1, got {v!r}")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be divisible by process_count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  srcs = [Source.of(s) for s in sources]
  examples, origin, stats = encode_sources(srcs, tokenizer, seq_len=seq_len, on_bad_row=on_bad_row,
                                           tag_weights=tag_weights, truncation=truncation)  # fmt: skip
  order = _epoch_order(origin, [s.weight for s in srcs], seed)
  if not len(order):
    raise DataError(f"an epoch is empty: the source weights {[s.weight for s in srcs]} select no example")
  stats["examples_per_epoch"] = len(order)
  logger.info("training data: %d examples (%d per epoch), %d truncated to %d tokens, %d dropped as too long, "
              "%d bad rows skipped, %d trained tokens", stats["examples"], len(order), stats["truncated"],
              seq_len + 1, stats["dropped_too_long"], stats["bad_rows_skipped"], stats["trained_tokens"])  # fmt: skip

  indices = grain.MapDataset.source(order.tolist())
  if shuffle:
    indices = indices.shuffle(seed=seed)
  indices = indices.repeat(num_epochs)  # reseeds the shuffle each epoch (seed + epoch)
  ds = indices.map(_Lookup(examples))
  if not packing:
    ds = ds.map(_PadRow(seq_len))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if packing:
    it = grain.experimental.FirstFitPackIterDataset(
      it, length_struct={"inputs": seq_len, "targets": seq_len, "weights": seq_len},
      num_packing_bins=global_batch_size, seed=seed, shuffle_bins=shuffle,
      meta_features=("targets", "weights"),  # packed alongside, without their own segment ids
    ).map(_rename_packed)
  it = it.batch(global_batch_size, drop_remainder=False).map(
    _LocalRows(global_batch_size, process_index, process_count)
  )
  lengths = np.asarray([len(ids) - 1 for ids, _ in examples])
  return TrainBatches(it, stats=stats, order=indices, lengths=lengths, packing=packing, seq_len=seq_len,
                      global_batch_size=global_batch_size, process_count=process_count, num_epochs=num_epochs)
