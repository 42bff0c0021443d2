"""One training row -> token ids and per-token loss weights (SPEC §1-§2).

`encode_example(row, fmt, tokenizer, tag_weights=None)` returns `(ids, weights)`, both [N]:
`weights[i]` is the loss weight for PREDICTING `ids[i]` (0 for prompt tokens, 1 for trained
response tokens, a tag's weight for the tokens of a tag string inside the trained part). For
next-token training use inputs = ids[:-1], targets = ids[1:], weights = weights[1:].

Row formats (`fmt`):
  s1               {question, thinking | thinking_trajectories | deepseek_thinking_trajectory,
                    attempt | answer}; thinking is a string or a list of strings joined by "\\n"
                    (s1K's columns). s1 prompt (chat template) + s1 assistant turn.
  think            {question, thinking, answer}: chat prompt + MiniMind <think>/<answer> turn.
  r1_zero          {question, thinking, answer}: CS336 R1-Zero prompt + " {thinking} </think>
                   <answer> {answer} </answer>" (no end token, as CS336).
  minimind         {conversations: [{role, content}, ...]}: MiniMind's r1 data (assistant content
                   already holds the tags); every assistant turn trained.
  chat_messages    {messages: [{role, content}, ...]}: every assistant turn trained.
  prompt_response  {prompt, response}: response + eos trained (CS336 layout).
  pretrain_text    {text}: every token trained, eos appended.

Tokenisation follows CS336 (`tokenize.tokenize_prompt_and_output`): the prompt and the trained
pieces are tokenised separately, with no special tokens added, and concatenated; chat turns are
located with `formats.render_chat`, and an assistant turn's end-of-turn token (`<|im_end|>`) is
trained. No BOS is added (Qwen has none; a chat template that wants one writes it itself).
Tag weights: every token whose character span (fast-tokenizer offsets) overlaps an occurrence of a
tag string inside a trained piece gets that tag's weight (the largest if several); Qwen splits
`<think>` into several tokens and they all get it, as does a token like ">\n" that ends a tag.
Prompt tags are never weighted.

A bad row raises `DataError` naming the format, what is missing or mistyped and the row's keys;
the caller adds the file and line.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxreason.data import formats as F
from jaxreason.data.sources import DataError

__all__ = ["ROW_FORMATS", "encode_example", "check_format"]

ROW_FORMATS = ("s1", "think", "r1_zero", "minimind", "chat_messages", "prompt_response", "pretrain_text")

# s1K / s1K-1.1 column names, in order of preference.
_S1_THINKING = ("thinking", "thinking_trajectories", "deepseek_thinking_trajectory")
_S1_ANSWER = ("attempt", "answer", "deepseek_attempt")

Piece = tuple[Any, bool]  # (text: str, or token ids: list[int]; trained?)


def check_format(fmt: str) -> str:
  """`fmt` if it is a row format; a ValueError naming the nearest valid one otherwise."""
  if fmt in ROW_FORMATS:
    return fmt
  near = difflib.get_close_matches(str(fmt), ROW_FORMATS, n=1)
  hint = f" Did you mean {near[0]!r}?" if near else ""
  raise ValueError(f"Unknown training data format {fmt!r}.{hint} Valid formats: {list(ROW_FORMATS)}.")


# ----------------------------------------------------------------------------------------------
# Reading fields


def _keys(row: Mapping[str, Any]) -> list[str]:
  return sorted(map(str, row))


def _text(row: Mapping[str, Any], keys: Sequence[str], fmt: str) -> str:
  """The first of `keys` present (not None) in `row`, which must be a string."""
  for k in keys:
    v = row.get(k)
    if v is None:
      continue
    if not isinstance(v, str):
      raise DataError(f"format {fmt!r}: {k!r} must be a string, got {type(v).__name__}; "
                      f"the row has keys {_keys(row)}")
    return v
  names = " or ".join(repr(k) for k in keys)
  raise DataError(f"format {fmt!r}: missing {names} (a string); the row has keys {_keys(row)}")


def _thinking(row: Mapping[str, Any], keys: Sequence[str], fmt: str) -> str | list[str]:
  for k in keys:
    v = row.get(k)
    if v is None:
      continue
    if isinstance(v, str):
      return v
    if isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v):
      return list(v)
    raise DataError(f"format {fmt!r}: {k!r} must be a string or a list of strings, got "
                    f"{type(v).__name__}; the row has keys {_keys(row)}")
  names = " or ".join(repr(k) for k in keys)
  raise DataError(f"format {fmt!r}: missing {names} (the reasoning trace: a string or a list of "
                  f"strings); the row has keys {_keys(row)}")


def _messages(row: Mapping[str, Any], key: str, fmt: str) -> list[dict[str, str]]:
  msgs = row.get(key)
  if msgs is None:
    raise DataError(f"format {fmt!r}: missing {key!r} (a list of {{role, content}} messages); "
                    f"the row has keys {_keys(row)}")
  if not isinstance(msgs, (list, tuple)) or not msgs:
    raise DataError(f"format {fmt!r}: {key!r} must be a non-empty list of {{role, content}} messages, "
                    f"got {type(msgs).__name__ if not isinstance(msgs, (list, tuple)) else 'an empty list'}")
  out = []
  for i, m in enumerate(msgs):
    if not isinstance(m, Mapping):
      raise DataError(f"format {fmt!r}: {key}[{i}] must be an object {{role, content}}, got {type(m).__name__}")
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or not isinstance(content, str):
      raise DataError(f"format {fmt!r}: {key}[{i}] needs string 'role' and 'content'; it has keys "
                      f"{_keys(m)} (role={type(role).__name__}, content={type(content).__name__})")
    out.append({"role": role, "content": content})
  if not any(m["role"] == "assistant" for m in out):
    roles = [m["role"] for m in out]
    raise DataError(f"format {fmt!r}: {key!r} has no assistant message (roles {roles}); nothing to train")
  return out


# ----------------------------------------------------------------------------------------------
# Rows -> pieces


_EOT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _end_of_turn(tokenizer: Any) -> str:
  """formats.end_of_turn, cached per tokenizer (and chat template): it renders the template twice."""
  template = getattr(tokenizer, "chat_template", None)
  try:
    hit = _EOT_CACHE.get(tokenizer)
  except TypeError:  # not weak-referenceable
    return F.end_of_turn(tokenizer)
  if hit is None or hit[0] != template:
    hit = (template, F.end_of_turn(tokenizer))
    _EOT_CACHE[tokenizer] = hit
  return hit[1]


def _eos_ids(tokenizer: Any, fmt: str) -> list[int]:
  eos = getattr(tokenizer, "eos_token_id", None)
  if eos is None:
    raise ValueError(f"format {fmt!r} appends the eos token, but the tokenizer has none; set tokenizer.eos_token")
  return [int(eos)]


def _chat_pieces(messages: list[dict[str, str]], tokenizer: Any, fmt: str) -> list[Piece]:
  try:
    return F.render_chat(messages, tokenizer).segments()
  except ValueError as e:  # e.g. a role the template cannot render
    raise DataError(f"format {fmt!r}: cannot render the conversation with the chat template ({e})") from e


def _pieces(row: Mapping[str, Any], fmt: str, tokenizer: Any) -> list[Piece]:
  """The row as consecutive (text | ids, trained) pieces."""
  if fmt in ("s1", "think"):
    question = _text(row, ("question",), fmt)
    keys = _S1_THINKING if fmt == "s1" else ("thinking",)
    thinking = _thinking(row, keys, fmt)
    answer = _text(row, _S1_ANSWER if fmt == "s1" else ("answer",), fmt)
    form = F.get_format(fmt)
    response = form.build_response(thinking, answer, eot=_end_of_turn(tokenizer))
    return [(form.prompt(question, tokenizer), False), (response, True)]
  if fmt == "r1_zero":
    question = _text(row, ("question",), fmt)
    thinking = _thinking(row, ("thinking",), fmt)
    answer = _text(row, ("answer",), fmt)
    return [(F.r1_zero_prompt(question), False), (F.r1_zero_response(thinking, answer), True)]
  if fmt == "minimind":
    return _chat_pieces(_messages(row, "conversations", fmt), tokenizer, fmt)
  if fmt == "chat_messages":
    return _chat_pieces(_messages(row, "messages", fmt), tokenizer, fmt)
  if fmt == "prompt_response":
    prompt, response = _text(row, ("prompt",), fmt), _text(row, ("response",), fmt)
    return [(prompt, False), (response, True), (_eos_ids(tokenizer, fmt), True)]
  if fmt == "pretrain_text":
    return [(_text(row, ("text",), fmt), True), (_eos_ids(tokenizer, fmt), True)]
  check_format(fmt)
  raise AssertionError(fmt)


# ----------------------------------------------------------------------------------------------
# Pieces -> ids and weights


def _tag_token_weights(text: str, offsets: Sequence[tuple[int, int]], tag_weights: Mapping[str, float]) -> np.ndarray:
  """Per-token weight: 1, or the largest weight of a tag whose occurrence in `text` overlaps the token."""
  w = np.ones(len(offsets), np.float32)
  if not offsets:
    return w
  starts = np.asarray([s for s, _ in offsets])  # [n]
  ends = np.asarray([e for _, e in offsets])  # [n]
  for tag, weight in tag_weights.items():
    pos = text.find(tag)
    while pos >= 0:
      hit = (starts < pos + len(tag)) & (ends > pos)  # token span overlaps [pos, pos + len(tag))
      w[hit] = np.maximum(w[hit], np.float32(weight))
      pos = text.find(tag, pos + 1)
  return w


def _check_tag_weights(tag_weights: Mapping[str, float] | None) -> dict[str, float]:
  if not tag_weights:
    return {}
  out = {}
  for tag, weight in tag_weights.items():
    if not isinstance(tag, str) or not tag:
      raise ValueError(f"tag_weights keys must be non-empty strings, got {tag!r}")
    if not isinstance(weight, (int, float)) or weight < 0:
      raise ValueError(f"tag_weights[{tag!r}] must be a number >= 0, got {weight!r}")
    out[tag] = float(weight)
  return out


def encode_example(
  row: Mapping[str, Any], fmt: str, tokenizer: Any, *, tag_weights: Mapping[str, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """A row -> (ids int32 [N], weights float32 [N]); weights[i] weighs the prediction of ids[i].

  Raises DataError for a bad row (missing fields, wrong types), ValueError for an unknown format.
  """
  check_format(fmt)
  tags = _check_tag_weights(tag_weights)
  if not isinstance(row, Mapping):
    raise DataError(f"format {fmt!r}: expected a row object, got {type(row).__name__}")
  pieces = _pieces(row, fmt, tokenizer)
  texts = [p for p, _ in pieces if isinstance(p, str)]
  offsets = None
  if texts:
    if tags:
      if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tag_weights need a fast tokenizer (character offsets of tokens); "
                         "load the tokenizer with use_fast=True or drop tag_weights")
      enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
      offsets = iter(enc["offset_mapping"])
    else:
      enc = tokenizer(texts, add_special_tokens=False)
    encoded = iter(enc["input_ids"])
  ids: list[np.ndarray] = []
  weights: list[np.ndarray] = []
  for piece, trained in pieces:
    if isinstance(piece, str):
      tok = np.asarray(next(encoded), np.int32)
      offs = next(offsets) if offsets is not None else None
    else:
      tok, offs = np.asarray(piece, np.int32), None
    if not trained:
      w = np.zeros(len(tok), np.float32)
    elif offs is not None:
      w = _tag_token_weights(piece, offs, tags)
    else:
      w = np.ones(len(tok), np.float32)
    ids.append(tok)
    weights.append(w)
  return np.concatenate(ids).astype(np.int32), np.concatenate(weights).astype(np.float32)
