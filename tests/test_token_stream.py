"""Token stream: prepare writes documents + eos exactly; windows, shuffling, slices and resume."""

import json

import numpy as np
import pytest

from jaxreason.data.prepare import prepare
from jaxreason.data.token_stream import TokenStream, _WindowRow, build_token_batches, parse_tokens_spec
from jaxreason.tokenizer import train_tokenizer

DOCS = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(5 + (i * 13) % 40)) for i in range(120)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok")
  train_tokenizer(DOCS, 400, out)
  return str(out)


@pytest.fixture(scope="module")
def prepared(tok_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("stream"))
  meta = prepare(DOCS, tok_dir, out, heldout_fraction=0.2, workers=1, chunk_size=7, log=lambda *_: None)
  return out, meta


def test_stream_holds_exactly_the_documents_with_eos_between(prepared, tok_dir):
  from jaxreason.data.prepare import is_heldout
  from jaxreason.data.tokenizer import load_tokenizer
  out, meta = prepared
  tok = load_tokenizer(tok_dir)
  assert meta["dtype"] == "uint16" and meta["eos_id"] == tok.eos_token_id == 2
  expected = {"train": [], "val": []}
  for i, d in enumerate(DOCS):
    expected["val" if is_heldout(i, 0.2, 0) else "train"].append(tok.encode(d, add_special_tokens=False) + [2])
  assert 10 < len(expected["val"]) < 40
  for split, docs in expected.items():
    s = TokenStream(out, split)
    assert s.tokens.dtype == np.uint16
    assert s.tokens.tolist() == [t for d in docs for t in d]
    assert len(s.doc_starts) == len(docs) + 1
    assert [s.document(i).tolist() for i in range(len(docs))] == docs
    assert meta["splits"][split] == {"tokens": len(s), "documents": len(docs)}


def test_parallel_prepare_writes_the_same_stream(prepared, tok_dir, tmp_path):
  out, _ = prepared
  prepare(DOCS, tok_dir, str(tmp_path), heldout_fraction=0.2, workers=2, chunk_size=5, log=lambda *_: None)
  for split in ("train", "val"):
    assert (tmp_path / f"{split}.bin").read_bytes() == open(f"{out}/{split}.bin", "rb").read()


def test_windows_cover_the_stream_and_rows_match_the_sft_structure(prepared):
  out, _ = prepared
  seq = 16
  b = build_token_batches([f"tokens:{out}:eval_every=0"], seq_len=seq, global_batch_size=4, shuffle=False)
  stream = TokenStream(out)
  n_windows = (len(stream) - 1) // seq
  rows = [r for batch in b for r in zip(batch["inputs"], batch["targets"], batch["segments"], batch["positions"])]
  assert b.num_batches == n_windows // 4 == len(rows) // 4
  toks = stream.tokens.astype(np.int64)
  for w, (inp, tgt, seg, pos) in enumerate(rows):  # unshuffled: window w in order
    assert inp.tolist() == toks[w * seq:(w + 1) * seq].tolist()
    assert tgt.tolist() == toks[w * seq + 1:(w + 1) * seq + 1].tolist()
  # consecutive windows: every token after the first is a target exactly once (up to the dropped tail)
  targets = np.concatenate([r[1] for r in rows])
  assert targets.tolist() == toks[1:1 + len(targets)].tolist()
  batch = next(iter(b))
  assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
    "inputs": ("int32", (4, seq)), "targets": ("int32", (4, seq)), "weights": ("float32", (4, seq)),
    "positions": ("int32", (4, seq)), "segments": ("int32", (4, seq))}


def test_attention_reset_at_document_boundaries():
  eos = 2
  row = _WindowRow(eos, reset=True)(np.array([5, 6, 2, 7, 8, 9, 2, 2, 4], np.int32))
  assert row["segments"].tolist() == [1, 1, 2, 2, 2, 2, 3, 4]
  assert row["positions"].tolist() == [0, 1, 0, 1, 2, 3, 0, 0]
  flat = _WindowRow(eos, reset=False)(np.array([5, 6, 2, 7, 8], np.int32))
  assert flat["segments"].tolist() == [1, 1, 1, 1] and flat["positions"].tolist() == [0, 1, 2, 3]


def _synthetic(tmp_path, n_tokens=2001):
  """A prepared dir whose tokens are 3, 4, 5, ... (every window is told apart by its first token)."""
  np.arange(3, 3 + n_tokens, dtype=np.uint16).tofile(tmp_path / "train.bin")
  np.save(tmp_path / "train.idx.npy", np.array([0, n_tokens]))
  np.zeros(0, np.uint16).tofile(tmp_path / "val.bin")
  np.save(tmp_path / "val.idx.npy", np.array([0]))
  (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "eos_id": 2, "vocab_size": 2**16}))
  return str(tmp_path)


def _windows(b, seq=8):
  """Window index of every row, in batch order."""
  return [(r[0] - 3) // seq for batch in b for r in batch["inputs"].tolist()]


def test_global_shuffle_per_process_slices_disjoint_and_epochs(tmp_path):
  out = _synthetic(tmp_path)
  n = 2000 // 8  # windows
  kw = dict(seq_len=8, global_batch_size=4, seed=3, num_epochs=2)
  whole = build_token_batches([f"tokens:{out}"], **kw)
  parts = [build_token_batches([f"tokens:{out}"], **kw, process_index=p, process_count=2) for p in range(2)]
  assert whole.num_batches == parts[0].num_batches == parts[1].num_batches == 2 * n // 4
  w, w0, w1 = _windows(whole), _windows(parts[0]), _windows(parts[1])
  assert sorted(w[:n]) == sorted(w[n:]) == list(range(n))  # each epoch is a permutation of all windows
  assert w[:n] != list(range(n)) and w[:n] != w[n:]  # shuffled globally, a new order per epoch
  assert _windows(build_token_batches([f"tokens:{out}"], **kw, shuffle=False)) == list(range(n)) * 2
  for b in range(whole.num_batches):  # process p: rows p, p + 2 of each global batch
    g = w[4 * b:4 * b + 4]
    assert w0[2 * b:2 * b + 2] == g[0::2] and w1[2 * b:2 * b + 2] == g[1::2]
  e0 = [set(w0[i:i + 2]) for i in range(0, len(w0), 2)]
  e1 = [set(w1[i:i + 2]) for i in range(0, len(w1), 2)]
  assert all(not (a & b) for a, b in zip(e0, e1))  # disjoint within every step
  assert sorted(w0[:n // 2] + w1[:n // 2]) == list(range(n))  # together: the whole first epoch


def test_iterator_resume_is_exact(tmp_path):
  out = _synthetic(tmp_path)
  b = build_token_batches([f"tokens:{out}"], seq_len=8, global_batch_size=4, seed=1, num_epochs=2)
  it = iter(b)
  for _ in range(60):  # the epoch ends inside batch 62
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  rest = [next(it)["inputs"].tolist() for _ in range(6)]
  it2 = iter(b)
  it2.set_state(state)
  assert [next(it2)["inputs"].tolist() for _ in range(6)] == rest


def test_spec_options_and_errors(prepared, tmp_path):
  out, _ = prepared
  assert parse_tokens_spec(f"tokens:{out}") == (out, {"reset": 1, "eval_every": 100, "eval_batches": 8})
  assert parse_tokens_spec(f"tokens:{out}:reset=0,eval_every=5")[1] == {"reset": 0, "eval_every": 5, "eval_batches": 8}
  with pytest.raises(ValueError, match="unknown option"):
    parse_tokens_spec(f"tokens:{out}:resett=0")
  with pytest.raises(FileNotFoundError, match="jaxreason.data.prepare"):
    build_token_batches([f"tokens:{tmp_path}"], seq_len=8, global_batch_size=4)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    build_token_batches([f"tokens:{out}"], seq_len=8, global_batch_size=10**6)
  b = build_token_batches([f"tokens:{out}:eval_batches=2"], seq_len=8, global_batch_size=4)
  assert b.heldout is not None and b.heldout_batches == 2 and b.eval_every == 100


def test_token_dtype_by_vocabulary_size():
  from jaxreason.data.prepare import token_dtype
  assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
