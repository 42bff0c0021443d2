"""Documents of corpus files: text files (one document per file, or per blank-line-separated
block with `split_paragraphs`), or the `text` column of jsonl / json / parquet / `datasets` dirs."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

_ROW_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")


def _is_rows(path: str) -> bool:
  return os.path.isdir(path) or os.path.splitext(path)[1].lower() in _ROW_SUFFIXES


def iter_documents(files: Sequence[str], text_key: str = "text") -> Iterator[str]:
  """Every document of `files`, in order. A text file is one document; a row file gives one per row."""
  from jaxreason.data.sources import DataError, iter_rows
  for path in files:
    if not os.path.exists(path):
      raise FileNotFoundError(f"corpus file {path!r} does not exist")
    if _is_rows(path):
      for i, row in enumerate(iter_rows(path)):
        if text_key not in row or not isinstance(row[text_key], str):
          raise DataError(f"{path} row {i + 1}: no string column {text_key!r} (keys {sorted(row)}); "
                          "pass --text-key to name the text column")
        yield row[text_key]
    else:
      with open(path, encoding="utf-8", errors="replace") as f:
        yield f.read()
