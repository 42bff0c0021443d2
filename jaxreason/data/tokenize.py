"""Tokenisation with loss masks: prompt/response pairs (CS336 a5) and multi-turn chats.

Layout (CS336 assignment 5, `tokenize_prompt_and_output`): prompt and output are tokenised
separately without special tokens and concatenated (the prompt is tokenised alone, as a sampler
sees it, and the response tokens follow); the batch is right-padded with the pad id to the longest
sequence; then

  input_ids = full[:, :-1]        # [B, L-1]
  labels    = full[:, 1:]         # [B, L-1]
  response_mask[b, t] = 1 iff labels[b, t] is a response token (0 for prompt and padding)

Nothing is truncated here: callers that cap the length report how many samples they cut (SPEC §2).
Arrays are numpy int32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxreason.data.formats import Message, render_chat


def pad_id_of(tokenizer: Any) -> int:
  """The pad id: the tokenizer's pad token, else its eos token."""
  for name in ("pad_token_id", "eos_token_id"):
    value = getattr(tokenizer, name, None)
    if value is not None:
      return int(value)
  raise ValueError("The tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token.")


def _encode(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
  if not texts:
    return []
  return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]


def shift_and_pad(
  sequences: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad_id: int
) -> dict[str, np.ndarray]:
  """Right-pad token sequences (and their per-token loss masks) to the longest one, then shift.

  `masks[b][t]` = 1 when token t of sequence b is trained. Returns input_ids, labels and
  response_mask, each [B, L-1] int32, with response_mask aligned with labels.
  """
  if len(sequences) != len(masks):
    raise ValueError(f"{len(sequences)} sequences but {len(masks)} masks")
  width = max((len(s) for s in sequences), default=0)
  full = np.full((len(sequences), width), pad_id, dtype=np.int32)  # [B, L]
  mask = np.zeros((len(sequences), width), dtype=np.int32)  # [B, L]
  for b, (ids, m) in enumerate(zip(sequences, masks, strict=True)):
    if len(ids) != len(m):
      raise ValueError(f"sequence {b}: {len(ids)} tokens but {len(m)} mask entries")
    full[b, : len(ids)] = ids
    mask[b, : len(m)] = m
  return {"input_ids": full[:, :-1], "labels": full[:, 1:], "response_mask": mask[:, 1:]}


def tokenize_prompt_and_output(
  prompt_strs: Sequence[str], output_strs: Sequence[str], tokenizer: Any, add_special_tokens: bool = False
) -> dict[str, np.ndarray]:
  """CS336 a5 `tokenize_prompt_and_output`: {input_ids, labels, response_mask}, each [B, L-1] int32,
  L = max over the batch of len(prompt ids) + len(output ids).

  `add_special_tokens=True` lets the tokenizer add its special tokens (e.g. Llama's BOS) to the
  prompt; the output never gets any (put the end-of-turn token in the output string).
  """
  if len(prompt_strs) != len(output_strs):
    raise ValueError(f"{len(prompt_strs)} prompts but {len(output_strs)} outputs")
  prompts = _encode(tokenizer, prompt_strs, add_special_tokens)
  outputs = _encode(tokenizer, output_strs)
  seqs = [p + o for p, o in zip(prompts, outputs, strict=True)]
  masks = [[0] * len(p) + [1] * len(o) for p, o in zip(prompts, outputs, strict=True)]
  return shift_and_pad(seqs, masks, pad_id_of(tokenizer))


def tokenize_chat(messages: Sequence[Message], tokenizer: Any) -> dict[str, np.ndarray]:
  """One multi-turn conversation as {input_ids [T], loss_mask [T]} (int32, not shifted).

  loss_mask[t] = 1 when token t belongs to an assistant turn (its content and end-of-turn token,
  e.g. `<|im_end|>`), so every assistant turn is trained in one forward pass. The rendered text is
  tokenised segment by segment (prompt pieces and assistant pieces separately, no special tokens
  added), like `tokenize_prompt_and_output`. For next-token loss use loss_mask[1:] with
  input_ids[:-1] -> input_ids[1:].
  """
  segments = render_chat(messages, tokenizer).segments()
  pieces = _encode(tokenizer, [text for text, _ in segments])
  ids = [t for p in pieces for t in p]
  mask = [int(trained) for p, (_, trained) in zip(pieces, segments, strict=True) for _ in p]
  return {"input_ids": np.asarray(ids, dtype=np.int32), "loss_mask": np.asarray(mask, dtype=np.int32)}


def tokenize_chats(conversations: Sequence[Sequence[Message]], tokenizer: Any) -> dict[str, np.ndarray]:
  """A batch of conversations in the layout of `tokenize_prompt_and_output` ([B, L-1] each)."""
  items = [tokenize_chat(c, tokenizer) for c in conversations]
  return shift_and_pad([x["input_ids"] for x in items], [x["loss_mask"] for x in items], pad_id_of(tokenizer))
