"""Reading rows of data: jsonl, json, parquet and local HuggingFace `datasets` directories.

`read_rows(path)` returns a list of dicts whatever the format; `iter_rows(path)` streams jsonl line
by line (other formats are read whole, then yielded). `eval_examples(rows, path)` normalises rows
to `{"id", "question" | "prompt", "answer"}` for evaluation (SPEC §8).

Formats, chosen by extension (or by being a directory):
  .jsonl / .ndjson  one JSON object per line; blank lines are skipped
  .json             a list of JSON objects
  .parquet          read with pyarrow
  a directory       written by `datasets.Dataset.save_to_disk` or `DatasetDict.save_to_disk`
                    (a DatasetDict needs a split: `split`, else "test" if present, else its only one)

Errors (`DataError`, a ValueError) name the file, and the line or row, and say what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["DataError", "read_rows", "iter_rows", "eval_examples", "jsonl_lines", "FORMATS"]

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
_QUESTION_KEYS = ("question", "problem", "prompt")
_ANSWER_KEYS = ("answer", "solution", "ground_truth")


class DataError(ValueError):
  """A data file that cannot be read as rows: the message names the file and the line or row."""


def _name(path: str | os.PathLike) -> str:
  return os.fspath(path)


def _format(path: str | os.PathLike) -> str:
  """'jsonl' | 'json' | 'parquet' | 'datasets', or a DataError for a missing path or unknown extension."""
  p = _name(path)
  if not os.path.exists(p):
    raise DataError(f"{p}: no such file or directory; check the path (relative paths are resolved "
                    f"against {os.getcwd()})")
  if os.path.isdir(p):
    if any(os.path.exists(os.path.join(p, f)) for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
      return "datasets"
    raise DataError(f"{p}: a directory that is not a saved HuggingFace dataset (no dataset_dict.json or "
                    f"state.json); pass a .jsonl, .json or .parquet file, or a directory written by "
                    f"`save_to_disk`")
  ext = os.path.splitext(p)[1].lower()
  if ext not in FORMATS:
    raise DataError(f"{p}: unknown data format {ext or '(no extension)'!r}; supported: "
                    f"{', '.join(sorted(FORMATS))}, or a `datasets` directory written by `save_to_disk`")
  return FORMATS[ext]


def _check_limit(limit: int | None) -> None:
  if limit is not None and (not isinstance(limit, int) or limit < 0):
    raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")


def _check_object(row: Any, where: str) -> dict:
  if not isinstance(row, dict):
    raise DataError(f"{where}: expected a JSON object like {{\"question\": ..., \"answer\": ...}}, "
                    f"got {type(row).__name__}; each row must be one object")
  return row


def jsonl_lines(path: str) -> Iterator[tuple[int, Any]]:
  """(line number, parsed row) per non-blank line; a line that is not UTF-8 or not JSON gives a
  DataError in place of the row (without the file name), so callers can skip it or raise it."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield lineno, DataError(f"not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1}); "
                                "re-encode the file as UTF-8")
        continue
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        hint = ("; this looks like a JSON list: name the file .json" if lineno == 1 and line.lstrip().startswith("[")
                else "; each line must be one complete JSON object")
        yield lineno, DataError(f"not valid JSON ({e.msg} at column {e.colno}){hint}")


def _iter_jsonl(path: str) -> Iterator[dict]:
  for lineno, row in jsonl_lines(path):
    where = f"{path} line {lineno}"
    if isinstance(row, DataError):
      raise DataError(f"{where}: {row}")
    yield _check_object(row, where)


def _read_json(path: str) -> list[dict]:
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"{path} line {line}: not valid UTF-8 (byte {data[e.start:e.start + 1]!r}); "
                    "re-encode the file as UTF-8") from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}); a .json file "
                    f"must hold one list of objects (one object per line should be named .jsonl)") from e
  if not isinstance(data, list):
    keys = f" with keys {sorted(data)[:10]}" if isinstance(data, dict) else ""
    raise DataError(f"{path}: expected a JSON list of objects, got a {type(data).__name__}{keys}; "
                    f"write the rows as [{{...}}, {{...}}] or as .jsonl")
  return [_check_object(row, f"{path} item {i}") for i, row in enumerate(data)]


def _read_parquet(path: str, limit: int | None) -> list[dict]:
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    if limit is None:
      return pq.read_table(path).to_pylist()
    rows: list[dict] = []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=max(1, min(limit, 1024))):
      rows.extend(batch.to_pylist())
      if len(rows) >= limit:
        break
    return rows[:limit]
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: cannot read as parquet ({e}); is it a parquet file?") from e


def _read_datasets(path: str, split: str | None, limit: int | None) -> list[dict]:
  import datasets
  try:
    ds = datasets.load_from_disk(path)
  except Exception as e:  # datasets raises several kinds for a damaged directory
    raise DataError(f"{path}: cannot load with `datasets.load_from_disk` ({e})") from e
  if isinstance(ds, datasets.DatasetDict):
    splits = list(ds)
    if split is None:
      if "test" in ds:
        split = "test"
      elif len(splits) == 1:
        split = splits[0]
      else:
        raise DataError(f"{path}: a DatasetDict with splits {splits} and no 'test'; pick one with split=...")
    if split not in ds:
      raise DataError(f"{path}: no split {split!r}; the splits are {splits}")
    ds = ds[split]
  elif split is not None:
    raise DataError(f"{path}: a single Dataset has no splits, but split={split!r} was given; drop split")
  if limit is not None:
    ds = ds.select(range(min(limit, len(ds))))
  return ds.to_list()


def read_rows(path: str | os.PathLike, *, split: str | None = None, limit: int | None = None) -> list[dict]:
  """All rows of a jsonl/json/parquet file or a saved `datasets` directory, as dicts (first `limit`).

  `split` is for DatasetDict directories only; with a single file it is an error.
  """
  _check_limit(limit)
  if str(path).startswith("tfds:"):
    return _read_tfds(str(path), split, limit)
  fmt, p = _format(path), _name(path)
  if split is not None and fmt != "datasets":
    raise DataError(f"{p}: split={split!r} was given, but a {fmt} file has no splits; drop split")
  if fmt == "jsonl":
    return list(iter_rows(p, limit=limit))
  if fmt == "json":
    rows = _read_json(p)
  elif fmt == "parquet":
    rows = _read_parquet(p, limit)
  else:
    rows = _read_datasets(p, split, limit)
  return rows if limit is None else rows[:limit]


def _read_tfds(spec: str, split: str | None, limit: int | None) -> list[dict]:
  """`tfds:NAME[/CONFIG][:SPLIT]` through tensorflow-datasets (the optional `tfds` extra).

  Rows are the examples' features as Python values (bytes decoded as UTF-8). TFDS_DATA_DIR selects
  the data directory; nothing is downloaded unless the dataset is already prepared there.
  """
  body = spec[len("tfds:"):]
  name, _, spec_split = body.partition(":")
  split = split or spec_split or "train"
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(f"{spec}: TFDS sources need tensorflow-datasets and tensorflow: "
                    "pip install 'jaxreason[tfds]'") from None
  try:
    ds = tfds.load(name, split=split, data_dir=os.environ.get("TFDS_DATA_DIR"), download=False)
  except Exception as e:  # tfds raises many types; the message is what the user needs
    raise DataError(f"{spec}: tfds.load({name!r}, split={split!r}) failed: {e}") from None
  rows = []
  for ex in tfds.as_numpy(ds):
    rows.append({k: (v.decode("utf-8") if isinstance(v, bytes) else v.tolist() if hasattr(v, "tolist") else v)
                 for k, v in ex.items()})
    if limit is not None and len(rows) >= limit:
      break
  return rows


def iter_rows(path: str | os.PathLike, *, split: str | None = None, limit: int | None = None) -> Iterator[dict]:
  """Rows one at a time. jsonl is streamed line by line; other formats are read whole first."""
  _check_limit(limit)
  if str(path).startswith("tfds:") or _format(path) != "jsonl":
    yield from read_rows(path, split=split, limit=limit)
    return
  if split is not None:
    raise DataError(f"{_name(path)}: split={split!r} was given, but a jsonl file has no splits; drop split")
  if limit == 0:
    return
  for i, row in enumerate(_iter_jsonl(_name(path)), start=1):
    yield row
    if limit is not None and i >= limit:
      return


def _first(row: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, Any] | None:
  for k in keys:
    if row.get(k) is not None:
      return k, row[k]
  return None


def eval_examples(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike = "<rows>") -> list[dict]:
  """Rows -> `{"id", "question" | "prompt", "answer"}` for evaluation.

  question: the first of `question`, `problem` (raw text, to be put in the eval's prompt template);
            else `prompt` (a ready-made prompt string, used verbatim) is kept under "prompt".
  answer:   the first of `answer`, `solution`, `ground_truth`, as it is (a str, number or list).
  id:       the row's `id`, else its 0-based index. Ids must be unique (samples are grouped by id).
  `path` is only used in error messages.
  """
  name = _name(path)
  out: list[dict] = []
  seen: dict[Any, int] = {}
  for i, row in enumerate(rows):
    where = f"{name} row {i + 1} (index {i})"
    if not isinstance(row, Mapping):
      raise DataError(f"{where}: expected an object with question and answer, got {type(row).__name__}")
    keys = sorted(row)
    q = _first(row, _QUESTION_KEYS)
    if q is None:
      raise DataError(f"{where}: no question; expected one of {list(_QUESTION_KEYS)}, the row has keys {keys}")
    if not isinstance(q[1], str):
      raise DataError(f"{where}: {q[0]!r} must be a string, got {type(q[1]).__name__}; the row has keys {keys}")
    a = _first(row, _ANSWER_KEYS)
    if a is None:
      raise DataError(f"{where}: no answer; expected one of {list(_ANSWER_KEYS)}, the row has keys {keys}")
    ex_id = row.get("id", i)
    if ex_id is None:
      ex_id = i
    try:
      hash(ex_id)
    except TypeError:
      raise DataError(f"{where}: id must be a string or number, got {type(ex_id).__name__}") from None
    if ex_id in seen:
      raise DataError(f"{where}: id {ex_id!r} repeats row {seen[ex_id] + 1}; ids must be unique "
                      f"(remove the id column to number rows by index)")
    seen[ex_id] = i
    text_key = "prompt" if q[0] == "prompt" else "question"
    out.append({"id": ex_id, text_key: q[1], "answer": a[1]})
  return out
