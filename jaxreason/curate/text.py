"""Text normalisation and n-grams shared by deduplication and decontamination."""

from __future__ import annotations

import re

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
  """Lowercased, whitespace runs collapsed to one space, stripped (as s1's decontamination)."""
  return _WS.sub(" ", str(text).lower()).strip()


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
  """Word n-grams of the normalised text; a text of fewer than n words gives one shorter gram."""
  words = normalize(text).split(" ")
  if not words or words == [""]:
    return set()
  if len(words) < n:
    return {tuple(words)}
  return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
