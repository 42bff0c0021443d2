"""Preference pairs for DPO and reward models: rows -> token ids with response masks -> batches of pairs.

Rows (data format `preference`):
  text            {"prompt": str, "chosen": str, "rejected": str}; `prompt` is the whole text the
                  model continues from (already templated), chosen/rejected are the two responses.
  conversational  TRL's layout: "chosen" and "rejected" are lists of {role, content} messages ending
                  with an assistant turn, with the prompt either inside them (implicit prompt: the
                  turns before the last) or in "prompt" (a list of messages). Each conversation is
                  rendered with the tokenizer's chat template (`formats.render_chat`); the response
                  is the final assistant turn with its end-of-turn token, the prompt everything before.

Tokenisation as CS336 `tokenize_prompt_and_output`: prompt and response are tokenised separately
(no special tokens added) and concatenated; the response mask is 1 on response tokens only.
End of sequence: a text response gets the tokenizer's eos appended unless its tokens already end
with it (as TRL's DPOTrainer, which appends eos to every response, so the model learns where a
response stops); a chat response already ends with the template's end-of-turn token, and nothing
is appended.

Truncation (at most `max_tokens` per sequence): `truncation="right"` cuts the end of the response
(and its eos); `"drop"` drops the pair. A pair whose prompt alone has `seq_len` tokens or more is
always dropped (it would train at most one response token). All are counted in `stats`.

Batches are dicts of numpy arrays; axis 1 is (chosen, rejected):
  tokens         int32   [P_local, 2, max_tokens]  0 on padding (right-padded)
  response_mask  float32 [P_local, 2, max_tokens]  1 where the token is a response token
  valid          int32   [P_local, 2, max_tokens]  1 on tokens, 0 on padding
  index          int32   [P_local]                 the pair's index (e.g. into precomputed log-probs)
Order: one stream of pairs over all epochs, each epoch a seeded permutation (seed, epoch) of the
epoch's pairs (source weights repeat pairs as in `pipeline`); a global batch is the next
`global_batch_size` pairs of the stream, and process p keeps pairs [p * P_local, (p + 1) * P_local)
of it. Only the stream's last partial batch is dropped. No packing: each sequence is its own row. `iter(batches).get_state()` is
{"epoch", "index"} (the next pair); `set_state` resumes exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxreason.data import formats as F
from jaxreason.data.examples import _messages
from jaxreason.data.pipeline import _LOG_BAD_ROWS, Source, _epoch_order, _located_rows
from jaxreason.data.sources import DataError

__all__ = ["encode_pair", "encode_response", "PreferenceBatches", "build_preference_batches"]

logger = logging.getLogger(__name__)
FORMAT = "preference"


def _keys(row: Mapping[str, Any]) -> list[str]:
  return sorted(map(str, row))


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
  return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _eos(tokenizer: Any) -> int:
  eos = getattr(tokenizer, "eos_token_id", None)
  if eos is None:
    raise ValueError("preference data appends the eos token to text responses, but the tokenizer has none; "
                     "set tokenizer.eos_token")
  return int(eos)


def _with_eos(ids: list[int], eos: int) -> list[int]:
  return ids if ids and ids[-1] == eos else ids + [eos]


def encode_response(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], int]:
  """A text (prompt, response) as the trainer sees it: (prompt ids + response ids [+ eos], prompt length)."""
  p, r = _encode(tokenizer, [prompt, response])
  return p + _with_eos(r, _eos(tokenizer)), len(p)


def _chat_split(messages: list[dict[str, str]], tokenizer: Any, key: str) -> tuple[str, str]:
  """(prompt text, final assistant turn with its end-of-turn token) of a conversation."""
  if messages[-1]["role"] != "assistant":
    raise DataError(f"format {FORMAT!r}: {key!r} must end with an assistant message (the response), "
                    f"got roles {[m['role'] for m in messages]}")
  try:
    rendered = F.render_chat(messages, tokenizer)
  except ValueError as e:
    raise DataError(f"format {FORMAT!r}: cannot render {key!r} with the chat template ({e})") from e
  start, end = rendered.assistant_spans[-1]
  return rendered.text[:start], rendered.text[start:end]


def encode_pair(row: Mapping[str, Any], tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
  """A preference row -> (prompt ids, chosen response ids, rejected response ids). DataError if bad."""
  if not isinstance(row, Mapping):
    raise DataError(f"format {FORMAT!r}: expected a row object, got {type(row).__name__}")
  for key in ("chosen", "rejected"):
    if row.get(key) is None:
      raise DataError(f"format {FORMAT!r}: missing {key!r} (a string, or a list of chat messages); "
                      f"the row has keys {_keys(row)}")
  chosen, rejected = row["chosen"], row["rejected"]
  if isinstance(chosen, str) and isinstance(rejected, str):
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
      what = "missing" if prompt is None else f"a {type(prompt).__name__}, not a string,"
      raise DataError(f"format {FORMAT!r}: 'prompt' is {what} (text rows need the prompt text the responses "
                      f"continue); the row has keys {_keys(row)}")
    eos = _eos(tokenizer)
    p, c, r = _encode(tokenizer, [prompt, chosen, rejected])
    return p, _with_eos(c, eos), _with_eos(r, eos)
  if isinstance(chosen, str) or isinstance(rejected, str):
    raise DataError(f"format {FORMAT!r}: 'chosen' and 'rejected' must both be strings or both be message lists, "
                    f"got {type(chosen).__name__} and {type(rejected).__name__}")
  prompt = row.get("prompt") or []
  for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
    if not isinstance(value, (list, tuple)):
      raise DataError(f"format {FORMAT!r}: {key!r} must be a list of {{role, content}} messages in a conversational "
                      f"row, got {type(value).__name__}")
  texts = {}
  for key in ("chosen", "rejected"):
    msgs = _messages({key: [*prompt, *row[key]]}, key, FORMAT)  # checked with the prompt's turns in front
    texts[key] = _chat_split(msgs, tokenizer, key)
  if texts["chosen"][0] != texts["rejected"][0]:
    raise DataError(f"format {FORMAT!r}: 'chosen' and 'rejected' differ before their final assistant turn; "
                    "they must share the prompt (put it in 'prompt' or repeat it in both)")
  p, c, r = _encode(tokenizer, [texts["chosen"][0], texts["chosen"][1], texts["rejected"][1]])
  return p, c, r  # the end-of-turn token closes each response: no eos appended


# ----------------------------------------------------------------------------------------------


class PreferenceBatches:
  """Batches of pairs of this process (see the module docstring). `iter(self)` has get/set_state.

  pairs: [(prompt_len, chosen ids, rejected ids)] with ids truncated to max_tokens.
  """

  def __init__(self, pairs: list[tuple[int, np.ndarray, np.ndarray]], order: np.ndarray, stats: dict[str, Any], *,
               max_tokens: int, global_batch_size: int, num_epochs: int, shuffle: bool, seed: int,
               process_index: int, process_count: int):
    self.pairs, self._order, self.stats = pairs, order, stats
    self.max_tokens, self.global_batch_size, self.num_epochs = max_tokens, global_batch_size, num_epochs
    self.shuffle, self.seed = shuffle, seed
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.pairs_per_epoch = len(order)
    self.num_batches = self.pairs_per_epoch * num_epochs // global_batch_size
    self.steps_per_epoch = max(1, self.pairs_per_epoch // global_batch_size)
    self._last_epoch: tuple[int, np.ndarray | None] = (-1, None)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Pair indices of `epoch`, in order (a seeded permutation when shuffling)."""
    if not self.shuffle:
      return self._order
    if self._last_epoch[0] != epoch:
      self._last_epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self._order))
    return self._last_epoch[1]

  def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The pairs `indices` as padded arrays [len(indices), 2, max_tokens]."""
    n, width = len(indices), self.max_tokens
    tokens = np.zeros((n, 2, width), np.int32)
    resp = np.zeros((n, 2, width), np.float32)
    valid = np.zeros((n, 2, width), np.int32)
    for i, k in enumerate(indices):
      prompt_len, *seqs = self.pairs[k]
      for j, ids in enumerate(seqs):
        tokens[i, j, :len(ids)] = ids
        valid[i, j, :len(ids)] = 1
        resp[i, j, prompt_len:len(ids)] = 1.0
    return {"tokens": tokens, "response_mask": resp, "valid": valid, "index": np.asarray(indices, np.int32)}

  def __iter__(self) -> PreferenceIterator:
    return PreferenceIterator(self)


class PreferenceIterator:

  def __init__(self, batches: PreferenceBatches):
    self.b = batches
    self.position = 0  # pairs of the stream consumed (all processes)

  def get_state(self) -> dict[str, int]:
    epoch, index = divmod(self.position, self.b.pairs_per_epoch)
    return {"epoch": epoch, "index": index}

  def set_state(self, state: Mapping[str, int]) -> None:
    self.position = int(state["epoch"]) * self.b.pairs_per_epoch + int(state["index"])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    b = self.b
    if self.position // b.global_batch_size >= b.num_batches:
      raise StopIteration
    lo = self.position + b.process_index * b.local_batch_size
    ids = [int(b.epoch_order(g // b.pairs_per_epoch)[g % b.pairs_per_epoch]) for g in range(lo, lo + b.local_batch_size)]
    self.position += b.global_batch_size
    return b.batch(ids)


def _encode_sources(srcs: Sequence[Source], tokenizer: Any, *, seq_len: int, max_tokens: int, on_bad_row: str,
                    truncation: str):
  pairs, origin, bad_rows = [], [], []
  stats = {"rows": 0, "pairs": 0, "bad_rows_skipped": 0, "truncated": 0, "dropped_too_long": 0,
           "dropped_prompt_too_long": 0, "tokens": 0}
  for si, src in enumerate(srcs):
    for where, row in _located_rows(src.path):
      stats["rows"] += 1
      try:
        if isinstance(row, DataError):
          raise row
        p, c, r = encode_pair(row, tokenizer)
      except DataError as e:
        if on_bad_row == "error":
          raise DataError(f"{where}: {e}; fix the row, or set data.on_bad_row: skip to skip bad rows") from None
        stats["bad_rows_skipped"] += 1
        if len(bad_rows) < _LOG_BAD_ROWS:
          bad_rows.append(f"{where}: {e}")
          logger.warning("skipping bad row %s: %s", where, e)
        continue
      if len(p) >= seq_len:
        stats["dropped_prompt_too_long"] += 1
        continue
      cut = len(p) + max(len(c), len(r)) > max_tokens
      if cut and truncation == "drop":
        stats["dropped_too_long"] += 1
        continue
      seqs = [np.asarray(p + x, np.int32)[:max_tokens] for x in (c, r)]
      stats["truncated"] += cut
      stats["tokens"] += sum(len(s) for s in seqs)
      pairs.append((len(p), *seqs))
      origin.append(si)
  stats["pairs"] = len(pairs)
  stats["skipped_rows"] = bad_rows
  if not pairs:
    raise DataError(f"no usable preference pairs in {[s.path for s in srcs]}: "
                    f"{ {k: v for k, v in stats.items() if k != 'skipped_rows'} }")
  return pairs, origin, stats


def build_preference_batches(
  sources: Sequence[Any], tokenizer: Any, *, seq_len: int, max_tokens: int, global_batch_size: int,
  shuffle: bool = True, seed: int = 0, num_epochs: int = 1, on_bad_row: str = "error", truncation: str = "right",
  process_index: int = 0, process_count: int = 1,
) -> PreferenceBatches:
  """Pairs from `sources` ((path, "preference"[, weight]) tuples or `Source`s) in batches of
  `global_batch_size` pairs; sequences hold at most `max_tokens` tokens (DPO: seq_len + 1, so the
  model sees seq_len inputs; a reward model: seq_len)."""
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be divisible by process_count {process_count}")
  srcs = []
  for s in sources:
    src = s if isinstance(s, Source) else Source(*s)  # fmt `preference` is not an SFT row format
    if src.fmt != FORMAT:
      raise ValueError(f"{src.path}: DPO and reward-model training read preference rows, but this source has "
                       f"format {src.fmt!r}; set data.format: preference (rows with prompt, chosen, rejected)")
    srcs.append(src)
  if not srcs:
    raise ValueError("no preference data sources given")
  pairs, origin, stats = _encode_sources(srcs, tokenizer, seq_len=seq_len, max_tokens=max_tokens,
                                         on_bad_row=on_bad_row, truncation=truncation)
  order = _epoch_order(origin, [s.weight for s in srcs], seed)
  stats["pairs_per_epoch"] = len(order)
  if len(order) * num_epochs < global_batch_size:
    raise DataError(f"{len(order)} preference pairs per epoch x {num_epochs} epoch(s) do not fill one batch of "
                    f"{global_batch_size} pairs (train.global_batch_size counts pairs); add data or lower it")
  logger.info("preference data: %d pairs (%d per epoch), %d truncated to %d tokens, %d dropped (prompt too long), "
              "%d dropped as too long, %d bad rows skipped", len(pairs), len(order), stats["truncated"], max_tokens,
              stats["dropped_prompt_too_long"], stats["dropped_too_long"], stats["bad_rows_skipped"])
  return PreferenceBatches(pairs, order, stats, max_tokens=max_tokens, global_batch_size=global_batch_size,
                           num_epochs=num_epochs, shuffle=shuffle, seed=seed, process_index=process_index,
                           process_count=process_count)
