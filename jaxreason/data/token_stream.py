"""Pre-training batches from a token stream written by `jaxreason.data.prepare`.

Windows: the stream of a split (N tokens) is cut into W = (N - 1) // seq_len windows of
seq_len + 1 tokens, window w = tokens[w * seq_len : w * seq_len + seq_len + 1]: consecutive windows
share one token, so every token but the first is a target exactly once; the last
(N - 1) % seq_len tokens are not used. A window gives the same row structure as the SFT pipeline
(`pipeline.build_train_batches`), each [seq_len]:

  inputs  window[:-1]   targets  window[1:]   weights  1.0 everywhere (every token trained)
  segments / positions: with reset=1 (the default), a new segment starts at every eos in the
    inputs (the eos acts as the next document's BOS: documents never attend to each other),
    segments 1, 2, ... and positions restarting at 0 at each eos; without it, one segment
    (all 1) and positions 0 .. seq_len - 1.

Pipeline (grain 0.2.18): MapDataset.source(windows).shuffle(seed)   # a global shuffle of windows
  .repeat(num_epochs)  [:num_batches * global_batch_size]            # whole global batches only
  [process_index::process_count]  .map(window -> row)  .batch(global_batch_size // process_count)
Global batch b is elements [b * G, (b + 1) * G) of the shuffled order; process p keeps every
process_count-th of them, so processes get disjoint windows and the same number of steps.
`iter(batches).get_state()` is Grain's {"next_index"}: resume is exact.

Data spec in `data.train`: `tokens:DIR` with options after a colon,
  tokens:DIR:reset=0,eval_every=100,eval_batches=8
reset (1): reset attention at document boundaries; eval_every (100): held-out perplexity of
`val` every so many steps and at the end (0: never); eval_batches (8): global batches of `val` used.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import numpy as np

__all__ = ["TokenBatches", "TokenStream", "build_token_batches", "parse_tokens_spec"]

_OPTIONS = {"reset": 1, "eval_every": 100, "eval_batches": 8}


class TokenStream:
  """A split of a prepared directory: `tokens` (memory-mapped) and `doc_starts` [num_docs + 1]."""

  def __init__(self, directory: str, split: str = "train"):
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.exists(meta_path):
      raise FileNotFoundError(f"{directory}: no meta.json; write the token stream with "
                              "`python -m jaxreason.data.prepare --corpus ... --tokenizer ... --out DIR`")
    self.meta = json.load(open(meta_path))
    self.directory, self.split = directory, split
    path = os.path.join(directory, f"{split}.bin")
    size = os.path.getsize(path)
    self.tokens = np.memmap(path, dtype=self.meta["dtype"], mode="r") if size else np.zeros(0, self.meta["dtype"])
    self.doc_starts = np.load(os.path.join(directory, f"{split}.idx.npy"))
    self.eos_id = int(self.meta["eos_id"])

  def __len__(self) -> int:
    return len(self.tokens)

  def document(self, i: int) -> np.ndarray:
    """Document i's ids with its trailing eos."""
    return np.asarray(self.tokens[self.doc_starts[i]:self.doc_starts[i + 1]])

  def num_windows(self, seq_len: int) -> int:
    return max(0, (len(self.tokens) - 1) // seq_len)


@dataclasses.dataclass(frozen=True)
class _Windows:
  """Random access to windows of seq_len + 1 tokens (a Grain data source)."""

  stream: TokenStream
  seq_len: int

  def __len__(self) -> int:
    return self.stream.num_windows(self.seq_len)

  def __getitem__(self, w: int) -> np.ndarray:
    lo = int(w) * self.seq_len
    return np.asarray(self.stream.tokens[lo:lo + self.seq_len + 1], np.int32)


@dataclasses.dataclass(frozen=True)
class _WindowRow:
  """A window [seq_len + 1] -> one training row (see the module docstring)."""

  eos_id: int
  reset: bool

  def __call__(self, window: np.ndarray) -> dict[str, np.ndarray]:
    inputs, targets = window[:-1], window[1:]
    n = len(inputs)
    if self.reset:
      starts = inputs == self.eos_id  # a segment starts at each eos (and at 0)
      starts[0] = True
      segments = np.cumsum(starts).astype(np.int32)
      first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
      positions = (np.arange(n) - first).astype(np.int32)
    else:
      segments = np.ones(n, np.int32)
      positions = np.arange(n, dtype=np.int32)
    return {"inputs": inputs, "targets": targets, "weights": np.ones(n, np.float32), "positions": positions,
            "segments": segments}


def parse_tokens_spec(spec: str) -> tuple[str, dict[str, int]]:
  """`tokens:DIR[:k=v,...]` -> (DIR, options)."""
  body = spec[len("tokens:"):]
  opts = dict(_OPTIONS)
  head, sep, tail = body.rpartition(":")
  if sep and "=" in tail:
    body = head
    for part in filter(None, tail.split(",")):
      key, eq, value = part.partition("=")
      if not eq or key.strip() not in _OPTIONS:
        raise ValueError(f"data spec {spec!r}: unknown option {part!r}; options: "
                         + ", ".join(f"{k}=INT (default {v})" for k, v in _OPTIONS.items()))
      try:
        opts[key.strip()] = int(value)
      except ValueError:
        raise ValueError(f"data spec {spec!r}: option {key!r} wants an integer, got {value!r}") from None
  if not body:
    raise ValueError(f"data spec {spec!r}: expected tokens:DIR (a directory written by jaxreason.data.prepare)")
  return body, opts


def _pipeline(stream: TokenStream, *, seq_len: int, global_batch_size: int, shuffle: bool, seed: int,
              num_epochs: int, process_index: int, process_count: int, reset: bool):
  windows = _Windows(stream, seq_len)
  ds = grain.MapDataset.source(windows)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  num_batches = len(ds) // global_batch_size
  ds = ds[:num_batches * global_batch_size][process_index::process_count]
  ds = ds.map(_WindowRow(stream.eos_id, reset)).batch(global_batch_size // process_count, drop_remainder=True)
  return ds.to_iter_dataset(), num_batches


class TokenBatches:
  """Batches of this process, with the same interface as `pipeline.TrainBatches` (iter with
  get_state / set_state, num_batches, steps_per_epoch, stats), plus `heldout` (batches of `val`,
  one pass, unshuffled) and `eval_every`."""

  def __init__(self, dataset, *, num_batches: int, num_epochs: int, stats: dict[str, Any], global_batch_size: int,
               process_count: int, seq_len: int, heldout=None, eval_every: int = 0, heldout_batches: int = 0):
    self.dataset = dataset
    self.num_batches = num_batches
    self.num_epochs = num_epochs
    self.stats = stats
    self.packing = True
    self.seq_len = seq_len
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.heldout = heldout
    self.heldout_batches = heldout_batches
    self.eval_every = eval_every

  def __iter__(self):
    return iter(self.dataset)

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.num_batches // self.num_epochs)


def build_token_batches(sources, tokenizer: Any = None, *, seq_len: int, global_batch_size: int, shuffle: bool = True,
                        seed: int = 0, num_epochs: int = 1, process_index: int = 0,
                        process_count: int = 1) -> TokenBatches:
  """Batches from one `tokens:DIR[:opts]` source (a path string, or an object with `.path`)."""
  specs = [getattr(s, "path", s) for s in sources]
  if len(specs) != 1 or not str(specs[0]).startswith("tokens:"):
    raise ValueError(f"a token-stream run takes exactly one data.train source tokens:DIR, got {specs}")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be divisible by process_count {process_count}")
  directory, opts = parse_tokens_spec(specs[0])
  stream = TokenStream(directory, "train")
  if tokenizer is not None:
    if stream.meta["eos_id"] != tokenizer.eos_token_id or stream.meta["vocab_size"] > len(tokenizer):
      raise ValueError(f"{directory} was tokenised with eos id {stream.meta['eos_id']} and {stream.meta['vocab_size']} "
                       f"tokens, but the run's tokenizer has eos id {tokenizer.eos_token_id} and {len(tokenizer)} "
                       f"tokens; set `tokenizer: {os.path.join(directory, 'tokenizer')}`")
  common = dict(seq_len=seq_len, global_batch_size=global_batch_size, process_index=process_index,
                process_count=process_count, reset=bool(opts["reset"]))
  ds, num_batches = _pipeline(stream, shuffle=shuffle, seed=seed, num_epochs=num_epochs, **common)
  if num_batches == 0:
    raise ValueError(f"{directory}: {len(stream)} train tokens make {stream.num_windows(seq_len)} windows of "
                     f"{seq_len} + 1, fewer than one global batch of {global_batch_size}")
  heldout, n_val = None, 0
  val = TokenStream(directory, "val")
  if opts["eval_every"] > 0 and val.num_windows(seq_len) >= global_batch_size:
    heldout, n_val = _pipeline(val, shuffle=False, seed=seed, num_epochs=1, **common)
    n_val = min(n_val, opts["eval_batches"])
  stats = {"tokens": len(stream), "documents": len(stream.doc_starts) - 1, "windows": stream.num_windows(seq_len),
           "heldout_tokens": len(val), "heldout_batches": n_val}
  return TokenBatches(ds, num_batches=num_batches, num_epochs=num_epochs, stats=stats,
                      global_batch_size=global_batch_size, process_count=process_count, seq_len=seq_len,
                      heldout=heldout, eval_every=opts["eval_every"] if heldout is not None else 0,
                      heldout_batches=n_val)
