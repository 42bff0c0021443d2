"""Encoded examples (jaxreason.data.examples) and the Grain training pipeline (jaxreason.data.pipeline).

Hand-made expectations use Qwen2.5's vocabulary: digits are one token each ("1"=16 ... "9"=24), so a
pretrain_text row of k digits is k tokens + eos, i.e. k inputs after the shift.
"""

from __future__ import annotations

import collections
import json
import logging

import numpy as np
import pytest

from jaxreason.data import formats as F
from jaxreason.data.examples import encode_example
from jaxreason.data.pipeline import build_train_batches
from jaxreason.data.sources import DataError
from jaxreason.data.tokenize import tokenize_chat, tokenize_prompt_and_output

IM_START, IM_END = 151644, 151645
TAGS = {t: 10.0 for t in F.THINK_TAGS}
KEYS = {"inputs", "targets", "weights", "positions", "segments"}


def _trained_text(tok, ids, w):
  return tok.decode([int(i) for i, x in zip(ids, w, strict=True) if x > 0])


# ----------------------------------------------------------------------------------------------
# encode_example


def test_s1_first_and_last_trained_tokens(qwen_tokenizer):
  tok = qwen_tokenizer
  row = {"question": "1+1?", "thinking_trajectories": ["Add.", "It is 2."], "attempt": "2"}  # s1K columns
  ids, w = encode_example(row, "s1", tok)
  assert ids.dtype == np.int32 and w.dtype == np.float32 and ids.shape == w.shape
  prompt = tok.encode(F.get_format("s1").prompt("1+1?", tok))
  n = len(prompt)
  assert ids[:n].tolist() == prompt and not w[:n].any()
  assert ids[n] == IM_START and w[n] == 1  # <|im_start|>think
  assert ids[-1] == IM_END and w[-1] == 1
  assert (w[n:] == 1).all()
  assert _trained_text(tok, ids, w) == "<|im_start|>think\nAdd.\nIt is 2.\n<|im_start|>answer\nAnswer: 2<|im_end|>"
  ids2, w2 = encode_example({"question": "1+1?", "thinking": "Add.\nIt is 2.", "answer": "2"}, "s1", tok)
  np.testing.assert_array_equal(ids, ids2)
  np.testing.assert_array_equal(w, w2)


def test_prompt_response_is_cs336_layout(qwen_tokenizer):
  tok = qwen_tokenizer
  ids, w = encode_example({"prompt": "Q: 2+3 =", "response": " 5"}, "prompt_response", tok)
  assert ids.tolist() == tok.encode("Q: 2+3 =") + tok.encode(" 5") + [IM_END]
  assert w.tolist() == [0] * len(tok.encode("Q: 2+3 =")) + [1] * (len(tok.encode(" 5")) + 1)
  ref = tokenize_prompt_and_output(["Q: 2+3 ="], [" 5<|im_end|>"], tok)
  np.testing.assert_array_equal(ids[:-1], ref["input_ids"][0])
  np.testing.assert_array_equal(ids[1:], ref["labels"][0])
  np.testing.assert_array_equal(w[1:], ref["response_mask"][0])


def test_chat_messages_trains_every_assistant_turn(qwen_tokenizer):
  tok = qwen_tokenizer
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "4"}]  # fmt: skip
  ids, w = encode_example({"messages": msgs}, "chat_messages", tok)
  ref = tokenize_chat(msgs, tok)
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(w, ref["loss_mask"])
  assert _trained_text(tok, ids, w) == "Hello.<|im_end|>4<|im_end|>"
  assert (ids[w > 0] == IM_END).sum() == 2


def test_minimind_conversations(qwen_tokenizer):
  tok = qwen_tokenizer
  answer = "<think>\nSum.\n</think>\n<answer>\n4\n</answer>"
  row = {"conversations": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": answer}]}
  ids, w = encode_example(row, "minimind", tok)
  assert _trained_text(tok, ids, w) == answer + "<|im_end|>"
  assert set(w.tolist()) == {0.0, 1.0}
  _, wt = encode_example(row, "minimind", tok, tag_weights=TAGS)
  assert wt.max() == 10 and ((wt > 0) == (w > 0)).all()


def test_tag_weights_only_in_trained_part(qwen_tokenizer):
  tok = qwen_tokenizer
  row = {"question": "What is <think>?", "thinking": "a b", "answer": "2"}
  ids, w = encode_example(row, "think", tok, tag_weights=TAGS)
  trained = [(tok.decode([int(i)]), float(x)) for i, x in zip(ids, w, strict=True) if x > 0]
  # Qwen splits each tag into several tokens; tokens overlapping a tag (also ">\n") get its weight.
  assert trained == [
    ("<th", 10), ("ink", 10), (">\n", 10), ("a", 1), (" b", 1), ("\n", 1), ("</", 10), ("think", 10), (">\n", 10),
    ("<", 10), ("answer", 10), (">\n", 10), ("2", 1), ("\n", 1), ("</", 10), ("answer", 10), (">", 10),
    ("<|im_end|>", 1),
  ]  # fmt: skip
  n_prompt = len(tok.encode(F.get_format("think").prompt(row["question"], tok)))
  assert "<think>" in tok.decode(ids[:n_prompt].tolist()) and not w[:n_prompt].any()
  ids0, w0 = encode_example(row, "think", tok)
  np.testing.assert_array_equal(ids, ids0)
  np.testing.assert_array_equal(w > 0, w0 > 0)


def test_pretrain_text_and_r1_zero(qwen_tokenizer):
  tok = qwen_tokenizer
  ids, w = encode_example({"text": "12345"}, "pretrain_text", tok)
  assert ids.tolist() == [16, 17, 18, 19, 20, IM_END] and (w == 1).all()
  ids, w = encode_example({"question": "1+1?", "thinking": "easy", "answer": "2"}, "r1_zero", tok)
  assert tok.decode(ids[w == 0].tolist()).endswith("Assistant: <think>")
  assert _trained_text(tok, ids, w) == " easy </think> <answer> 2 </answer>"  # no eos (CS336)


def test_bad_rows_name_missing_field_and_keys(qwen_tokenizer):
  with pytest.raises(DataError, match=r"missing 'response'.*keys \['prompt'\]"):
    encode_example({"prompt": "x"}, "prompt_response", qwen_tokenizer)
  with pytest.raises(DataError, match="'thinking' must be a string or a list of strings"):
    encode_example({"question": "q", "thinking": 3, "answer": "a"}, "think", qwen_tokenizer)
  with pytest.raises(DataError, match="no assistant message"):
    encode_example({"messages": [{"role": "user", "content": "hi"}]}, "chat_messages", qwen_tokenizer)
  with pytest.raises(ValueError, match="Did you mean 'chat_messages'"):
    encode_example({}, "chat_message", qwen_tokenizer)


# ----------------------------------------------------------------------------------------------
# Pipeline helpers


def _write(path, rows, blank_after=()):
  with open(path, "w") as f:
    for i, r in enumerate(rows):
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
      if i in blank_after:
        f.write("\n")
  return str(path)


def _digits(lengths, start=0):
  """pretrain_text rows of the given input lengths; row i's digits start at (start + i) % 9 + 1."""
  return [{"text": "".join(str((start + i + j) % 9 + 1) for j in range(n))} for i, n in enumerate(lengths)]


def _random_rows(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"prompt": f"Q{i}:" + " x" * int(rng.integers(1, 12)), "response": " y" * int(rng.integers(1, 20)) + f" {i}"}
          for i in range(n)]  # fmt: skip


def _all(batches):
  return list(iter(batches))


def _eq(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# Packing and padding layouts


def test_packed_layout_by_hand(qwen_tokenizer, tmp_path):
  path = _write(tmp_path / "d.jsonl", _digits([3, 4, 5, 2]))
  b = build_train_batches([(path, "pretrain_text")], qwen_tokenizer, seq_len=8, global_batch_size=2, shuffle=False)
  (batch,) = _all(b)
  assert set(batch) == KEYS and all(v.shape == (2, 8) for v in batch.values())
  assert {k: v.dtype for k, v in batch.items()} == {"inputs": np.int32, "targets": np.int32, "weights": np.float32,
                                                    "positions": np.int32, "segments": np.int32}  # fmt: skip
  # First fit in 2 rows of 8: ex0 (3) -> row 0; ex1 (4) -> row 0; ex2 (5) -> row 1; ex3 (2) -> row 1.
  np.testing.assert_array_equal(batch["segments"], [[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 2, 2, 0]])
  np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 0]])
  d = lambda s: [int(c) + 15 for c in s]  # noqa: E731  digit -> Qwen id
  np.testing.assert_array_equal(batch["inputs"], [d("123") + d("2345") + [0], d("34567") + d("45") + [0]])
  E = IM_END
  np.testing.assert_array_equal(batch["targets"], [d("23") + [E] + d("345") + [E, 0],
                                                   d("4567") + [E] + d("5") + [E, 0]])  # fmt: skip
  np.testing.assert_array_equal(batch["weights"], [[1] * 7 + [0], [1] * 7 + [0]])
  # The last input of example A predicts A's own eos, never the first token of example B.
  assert batch["targets"][0, 2] == E and batch["inputs"][0, 3] == d("2")[0]
  assert b.num_batches == 1 and b.stats["examples"] == 4 and b.stats["trained_tokens"] == 14


def test_padded_layout(qwen_tokenizer, tmp_path):
  path = _write(tmp_path / "d.jsonl", _digits([3, 4, 5]))
  b = build_train_batches([(path, "pretrain_text")], qwen_tokenizer, seq_len=6, global_batch_size=2,
                          packing=False, shuffle=False)  # fmt: skip
  first, last = _all(b)
  np.testing.assert_array_equal(first["segments"], [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(first["positions"], [[0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 0, 0]])
  np.testing.assert_array_equal(first["inputs"][0], [16, 17, 18, 0, 0, 0])
  np.testing.assert_array_equal(first["targets"][0], [17, 18, IM_END, 0, 0, 0])
  np.testing.assert_array_equal(first["weights"], first["segments"].astype(np.float32))
  # The last global batch is filled up with empty rows: fixed shapes, no weight.
  assert last["segments"][0].tolist() == [1] * 5 + [0] and not last["segments"][1].any()
  assert not last["weights"][1].any() and not last["inputs"][1].any()
  assert b.num_batches == 2


def _trained_triples(batches):
  out = collections.Counter()
  for batch in batches:
    m = batch["weights"] > 0
    out.update(zip(batch["inputs"][m].tolist(), batch["targets"][m].tolist(), batch["weights"][m].tolist()))
  return out


def _check_rows(batch):
  seg, pos, w, t = batch["segments"], batch["positions"], batch["weights"], batch["targets"]
  assert not w[seg == 0].any() and not t[seg == 0].any() and not batch["inputs"][seg == 0].any()
  for r in range(seg.shape[0]):
    for s in np.unique(seg[r][seg[r] > 0]):
      idx = np.flatnonzero(seg[r] == s)
      assert (np.diff(idx) == 1).all()  # contiguous
      np.testing.assert_array_equal(pos[r, idx], np.arange(len(idx)))
      np.testing.assert_array_equal(t[r, idx[:-1]], batch["inputs"][r, idx[1:]])  # shift within the example


def test_packed_and_padded_train_the_same_tokens(qwen_tokenizer, tmp_path):
  rows = _random_rows(40)
  path = _write(tmp_path / "d.jsonl", rows)
  kw = dict(seq_len=48, global_batch_size=4, seed=1, num_epochs=2, tag_weights={" y": 3.0})
  packed = build_train_batches([(path, "prompt_response")], qwen_tokenizer, packing=True, **kw)
  padded = build_train_batches([(path, "prompt_response")], qwen_tokenizer, packing=False, **kw)
  pb, db = _all(packed), _all(padded)
  for batch in pb + db:
    assert all(v.shape == (4, 48) for v in batch.values())
    _check_rows(batch)
  assert _trained_triples(pb) == _trained_triples(db)
  assert sum(int((b["weights"] > 0).sum()) for b in pb) == 2 * packed.stats["trained_tokens"]
  assert len(pb) < len(db) == padded.num_batches == 20
  assert len(pb) == packed.num_batches and packed.steps_per_epoch == -(-len(pb) // 2)
  assert max(int(b["segments"].max()) for b in pb) > 1


# ----------------------------------------------------------------------------------------------
# Truncation and bad rows


def test_truncation_counts_and_drop(qwen_tokenizer, tmp_path):
  path = _write(tmp_path / "d.jsonl", _digits([3, 9, 12, 5]))
  b = build_train_batches([(path, "pretrain_text")], qwen_tokenizer, seq_len=6, global_batch_size=2, shuffle=False)
  assert (b.stats["examples"], b.stats["truncated"], b.stats["dropped_too_long"]) == (4, 2, 0)
  assert b.stats["tokens"] == 3 + 6 + 6 + 5
  seg_lengths = [int((r == s).sum()) for bt in _all(b) for r in bt["segments"] for s in np.unique(r[r > 0])]
  assert sorted(seg_lengths) == [3, 5, 6, 6]  # 9 and 12 inputs cut to seq_len
  d = build_train_batches([(path, "pretrain_text")], qwen_tokenizer, seq_len=6, global_batch_size=2,
                          shuffle=False, truncation="drop")  # fmt: skip
  assert (d.stats["examples"], d.stats["truncated"], d.stats["dropped_too_long"]) == (2, 0, 2)
  # A prompt longer than seq_len leaves nothing to train: the example is dropped and counted.
  p = _write(tmp_path / "p.jsonl", [{"prompt": "1234567890", "response": "1"}, {"prompt": "1", "response": "2"}])
  e = build_train_batches([(p, "prompt_response")], qwen_tokenizer, seq_len=6, global_batch_size=2)
  assert (e.stats["examples"], e.stats["truncated"], e.stats["dropped_no_trained_tokens"]) == (1, 0, 1)


def test_bad_row_error_names_file_and_line(qwen_tokenizer, tmp_path):
  rows = [{"prompt": "a", "response": "b"}, {"prompt": "c"}, "{not json", {"prompt": "d", "response": "e"}]
  path = _write(tmp_path / "bad.jsonl", rows, blank_after=(0,))  # line 2 is blank
  with pytest.raises(DataError, match=r"bad\.jsonl line 3: format 'prompt_response': missing 'response'"):
    build_train_batches([(path, "prompt_response")], qwen_tokenizer, seq_len=16, global_batch_size=2)


def test_bad_rows_skipped_and_counted(qwen_tokenizer, tmp_path, caplog):
  rows = [{"prompt": "a", "response": "b"}, {"prompt": "c"}, "{not json", {"prompt": "d", "response": "e"}]
  path = _write(tmp_path / "bad.jsonl", rows, blank_after=(0,))
  with caplog.at_level(logging.WARNING, logger="jaxreason.data.pipeline"):
    b = build_train_batches([(path, "prompt_response")], qwen_tokenizer, seq_len=16, global_batch_size=2,
                            on_bad_row="skip")  # fmt: skip
  assert (b.stats["rows"], b.stats["examples"], b.stats["bad_rows_skipped"]) == (4, 2, 2)
  assert "bad.jsonl line 3" in caplog.text and "bad.jsonl line 4" in caplog.text and "not valid JSON" in caplog.text
  assert len(b.stats["skipped_rows"]) == 2


def test_source_weights_repeat_examples(qwen_tokenizer, tmp_path):
  a = _write(tmp_path / "a.jsonl", _digits([2] * 4))
  c = _write(tmp_path / "c.jsonl", _digits([3] * 6, start=4))
  b = build_train_batches([(a, "pretrain_text", 2.0), (c, "pretrain_text", 0.5)], qwen_tokenizer, seq_len=8,
                          global_batch_size=2, packing=False)  # fmt: skip
  assert b.stats["examples"] == 10 and b.stats["examples_per_epoch"] == 4 * 2 + 3
  lengths = collections.Counter(int(r.sum()) for bt in _all(b) for r in bt["segments"] if r.any())
  assert lengths == {2: 8, 3: 3}


# ----------------------------------------------------------------------------------------------
# Determinism, epochs, checkpointing, processes


def test_seeded_and_reshuffled_each_epoch(qwen_tokenizer, tmp_path):
  path = _write(tmp_path / "d.jsonl", _random_rows(16))
  kw = dict(seq_len=32, global_batch_size=16, packing=False, num_epochs=2)
  e1, e2 = _all(build_train_batches([(path, "prompt_response")], qwen_tokenizer, seed=5, **kw))
  again = _all(build_train_batches([(path, "prompt_response")], qwen_tokenizer, seed=5, **kw))
  other = _all(build_train_batches([(path, "prompt_response")], qwen_tokenizer, seed=6, **kw))
  assert _eq(e1, again[0]) and _eq(e2, again[1])
  rows = lambda b: [r.tobytes() for r in b["inputs"]]  # noqa: E731
  assert rows(e1) != rows(e2) and sorted(rows(e1)) == sorted(rows(e2))  # each epoch: all examples, new order
  assert rows(other[0]) != rows(e1)


@pytest.mark.parametrize("packing", [True, False])
def test_resume_from_state_is_exact(qwen_tokenizer, tmp_path, packing):
  path = _write(tmp_path / "d.jsonl", _random_rows(30))
  b = build_train_batches([(path, "prompt_response")], qwen_tokenizer, seq_len=40, global_batch_size=4,
                          packing=packing, num_epochs=3, seed=2)  # fmt: skip
  full = _all(b)
  it = iter(b)
  for _ in range(b.steps_per_epoch - 1):  # the restart crosses an epoch boundary
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
  rest = list(it)
  resumed = iter(b)
  resumed.set_state(state)
  again = list(resumed)
  assert len(again) == len(rest) == len(full) - (b.steps_per_epoch - 1) > 3
  assert all(_eq(x, y) for x, y in zip(rest, again, strict=True))
  assert all(_eq(x, y) for x, y in zip(full[-len(rest):], again, strict=True))


def test_processes_get_disjoint_shares_of_each_global_batch(qwen_tokenizer, tmp_path):
  path = _write(tmp_path / "d.jsonl", _random_rows(50))
  kw = dict(seq_len=40, global_batch_size=4, seed=3, num_epochs=1)
  glob = _all(build_train_batches([(path, "prompt_response")], qwen_tokenizer, **kw))
  local = [_all(build_train_batches([(path, "prompt_response")], qwen_tokenizer, process_index=p, process_count=2,
                                    **kw)) for p in range(2)]  # fmt: skip
  assert len(local[0]) == len(local[1]) == len(glob)
  row = lambda b, i: b"".join(b[k][i].tobytes() for k in sorted(KEYS))  # noqa: E731
  for g, l0, l1 in zip(glob, *local, strict=True):
    assert all(v.shape == (2, 40) for v in (*l0.values(), *l1.values()))
    r0 = {row(l0, i) for i in range(2) if l0["segments"][i].any()}
    r1 = {row(l1, i) for i in range(2) if l1["segments"][i].any()}
    assert not r0 & r1
    assert r0 | r1 == {row(g, i) for i in range(4) if g["segments"][i].any()}
  with pytest.raises(ValueError, match="divisible"):
    build_train_batches([(path, "prompt_response")], qwen_tokenizer, seq_len=8, global_batch_size=3, process_count=2)
