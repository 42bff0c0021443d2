"""Data sources: every format round trips through a file written here; errors name file and line."""

import json

import pytest

from jaxreason.data import sources as S

ROWS = [{"question": "1+1?", "answer": "2", "level": 1},
        {"question": "2+3?", "answer": "5", "level": 2},
        {"question": "√4?", "answer": "2", "level": 3}]


def _jsonl(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def test_jsonl_round_trip_skips_blank_lines(tmp_path):
  path = _jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1], ensure_ascii=False),
                                       json.dumps(ROWS[2], ensure_ascii=False)])
  assert S.read_rows(path) == ROWS
  assert S.read_rows(str(path), limit=2) == ROWS[:2]
  assert S.read_rows(path, limit=0) == []
  assert list(S.iter_rows(path, limit=1)) == ROWS[:1]


def test_iter_rows_streams(tmp_path):
  # a broken line after the limit is never read
  path = _jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), "{broken"])
  it = S.iter_rows(path)
  assert next(it) == ROWS[0]
  assert list(S.iter_rows(path, limit=1)) == ROWS[:1]
  with pytest.raises(S.DataError, match="line 2"):
    next(it)


def test_json_round_trip(tmp_path):
  path = tmp_path / "d.json"
  path.write_text(json.dumps(ROWS, indent=1), encoding="utf-8")
  assert S.read_rows(path) == ROWS
  assert S.read_rows(path, limit=1) == ROWS[:1]
  assert list(S.iter_rows(path)) == ROWS


def test_parquet_round_trip(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  path = tmp_path / "d.parquet"
  pq.write_table(pa.Table.from_pylist(ROWS), path)
  assert S.read_rows(path) == ROWS
  assert S.read_rows(path, limit=2) == ROWS[:2]


def test_datasets_dir_round_trip(tmp_path):
  import datasets
  datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
  assert S.read_rows(tmp_path / "ds") == ROWS
  assert S.read_rows(tmp_path / "ds", limit=1) == ROWS[:1]
  with pytest.raises(S.DataError, match="single Dataset has no splits"):
    S.read_rows(tmp_path / "ds", split="test")


def test_datasets_dict_splits(tmp_path):
  import datasets
  dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                             "test": datasets.Dataset.from_list(ROWS[2:])})
  dd.save_to_disk(str(tmp_path / "dd"))
  assert S.read_rows(tmp_path / "dd") == ROWS[2:]  # "test" by default
  assert S.read_rows(tmp_path / "dd", split="train") == ROWS[:2]
  with pytest.raises(S.DataError, match=r"no split 'validation'; the splits are \['train', 'test'\]"):
    S.read_rows(tmp_path / "dd", split="validation")

  datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "one"))
  assert S.read_rows(tmp_path / "one") == ROWS  # the only split

  datasets.DatasetDict({"a": datasets.Dataset.from_list(ROWS), "b": datasets.Dataset.from_list(ROWS)}).save_to_disk(
      str(tmp_path / "two"))
  with pytest.raises(S.DataError, match=r"splits \['a', 'b'\] and no 'test'; pick one with split="):
    S.read_rows(tmp_path / "two")


# ----------------------------------------------------------------------------------------------
# errors


def test_jsonl_invalid_line_names_file_and_line(tmp_path):
  lines = [json.dumps(r) for r in ROWS] + ["", "", '{"question": "x", "answer": }']
  path = _jsonl(tmp_path / "data.jsonl", lines)
  with pytest.raises(S.DataError, match=r"data\.jsonl line 6: not valid JSON \(Expecting value at column 29\); each line must be one complete JSON object"):
    S.read_rows(path)


def test_jsonl_holding_a_json_list(tmp_path):
  path = _jsonl(tmp_path / "data.jsonl", ["[", json.dumps(ROWS[0]), "]"])
  with pytest.raises(S.DataError, match=r"data\.jsonl line 1: not valid JSON .* looks like a JSON list: name the file \.json"):
    S.read_rows(path)


def test_jsonl_row_not_an_object(tmp_path):
  path = _jsonl(tmp_path / "data.jsonl", [json.dumps(ROWS[0]), "[1, 2]"])
  with pytest.raises(S.DataError, match=r"data\.jsonl line 2: expected a JSON object .* got list"):
    S.read_rows(path)


def test_json_errors(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text('[\n  {"a": 1},\n  {"a": 2,}\n]')
  with pytest.raises(S.DataError, match=r"bad\.json line 3: not valid JSON"):
    S.read_rows(bad)
  obj = tmp_path / "obj.json"
  obj.write_text(json.dumps({"data": ROWS}))
  with pytest.raises(S.DataError, match=r"obj\.json: expected a JSON list of objects, got a dict with keys \['data'\]"):
    S.read_rows(obj)
  items = tmp_path / "items.json"
  items.write_text(json.dumps([ROWS[0], "oops"]))
  with pytest.raises(S.DataError, match=r"items\.json item 1: expected a JSON object .* got str"):
    S.read_rows(items)


def test_path_errors(tmp_path):
  with pytest.raises(S.DataError, match=r"missing\.jsonl: no such file or directory"):
    S.read_rows(tmp_path / "missing.jsonl")
  (tmp_path / "d.csv").write_text("a,b\n")
  with pytest.raises(S.DataError, match=r"d\.csv: unknown data format '\.csv'; supported: \.json, \.jsonl"):
    S.read_rows(tmp_path / "d.csv")
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(S.DataError, match="not a saved HuggingFace dataset"):
    S.read_rows(tmp_path / "empty_dir")
  (tmp_path / "x.parquet").write_text("not parquet")
  with pytest.raises(S.DataError, match=r"x\.parquet: cannot read as parquet"):
    S.read_rows(tmp_path / "x.parquet")
  _jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0])])
  with pytest.raises(S.DataError, match="has no splits; drop split"):
    S.read_rows(tmp_path / "d.jsonl", split="test")
  with pytest.raises(ValueError, match="limit"):
    S.read_rows(tmp_path / "d.jsonl", limit=-1)


# ----------------------------------------------------------------------------------------------
# eval_examples


def test_eval_examples_normalises_keys():
  rows = [{"question": "q0", "answer": "1"},
          {"problem": "q1", "solution": "long", "answer": 2, "id": "p1"},
          {"prompt": "<|im_start|>user q2", "ground_truth": ["3", "3.0"]},
          {"question": "q3", "prompt": "ignored", "solution": "\\boxed{4}"}]
  assert S.eval_examples(rows, "d.jsonl") == [
      {"id": 0, "question": "q0", "answer": "1"},
      {"id": "p1", "question": "q1", "answer": 2},
      {"id": 2, "prompt": "<|im_start|>user q2", "answer": ["3", "3.0"]},
      {"id": 3, "question": "q3", "answer": "\\boxed{4}"},
  ]


def test_eval_examples_errors():
  with pytest.raises(S.DataError, match=r"d\.jsonl row 2 \(index 1\): no answer; expected one of "
                                        r"\['answer', 'solution', 'ground_truth'\], the row has keys \['gt', 'question'\]"):
    S.eval_examples([{"question": "a", "answer": "1"}, {"question": "b", "gt": "2"}], "d.jsonl")
  with pytest.raises(S.DataError, match=r"row 1 \(index 0\): no question; .* the row has keys \['answer', 'text'\]"):
    S.eval_examples([{"text": "a", "answer": "1"}], "d.jsonl")
  with pytest.raises(S.DataError, match="'prompt' must be a string, got list"):
    S.eval_examples([{"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}], "d.jsonl")
  with pytest.raises(S.DataError, match="id 1 repeats row 2"):
    S.eval_examples([{"question": "a", "answer": "1"}, {"question": "b", "answer": "1"},
                     {"question": "c", "answer": "1", "id": 1}], "d.jsonl")


def test_tfds_source_without_tensorflow_is_a_clear_error():
  import importlib.util
  if importlib.util.find_spec("tensorflow_datasets") is not None:
    pytest.skip("tensorflow-datasets is installed here")
  with pytest.raises(S.DataError, match=r"tfds:gsm8k:train: TFDS sources need .*jaxreason\[tfds\]"):
    S.read_rows("tfds:gsm8k:train")


def test_addition_direct_rows_answer_without_thinking_and_keep_the_questions():
  from jaxreason.data.tasks import addition_trace, load_task
  plain = load_task("addition:n=400,seed=5,min_digits=2,max_digits=3")
  mixed = load_task("addition:n=400,seed=5,min_digits=2,max_digits=3,direct=60")
  assert [r["question"] for r in mixed] == [r["question"] for r in plain]
  assert all(r["attempt"] == r["answer"] == str(eval(r["question"])) for r in mixed)
  direct = [r for r in mixed if r["thinking"] == ""]
  assert 0.5 < len(direct) / len(mixed) < 0.7  # 60 % of the rows, seeded
  for r in mixed:
    if r["thinking"]:
      assert r["thinking"] == addition_trace(*map(int, r["question"].split("+")))
  assert all(r["thinking"] == "" for r in load_task("addition:n=50,seed=5,direct=100"))
  with pytest.raises(ValueError, match="direct"):
    load_task("addition:n=5,direct=101")
