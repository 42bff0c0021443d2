"""The real Qwen2.5 tokenizer for tests, built offline (no hub): see jaxreason.data.tokenizer.

Tests should take the session fixture `qwen_tokenizer` (conftest.py); `qwen25_tokenizer()` is the
same thing for helpers outside fixtures, built once per process. Do not mutate the shared instance.
"""

from __future__ import annotations

import functools

from jaxreason.data.tokenizer import QWEN25_ADDED_TOKENS, QWEN25_CHAT_TEMPLATE, build_qwen25_tokenizer

__all__ = ["QWEN25_ADDED_TOKENS", "QWEN25_CHAT_TEMPLATE", "build_qwen25_tokenizer", "qwen25_tokenizer"]


@functools.cache
def qwen25_tokenizer():
  """One shared Qwen2.5 tokenizer per process (~2 s to build)."""
  return build_qwen25_tokenizer()
