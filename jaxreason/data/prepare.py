"""Pre-training data (SPEC §7/§12, seed 003): a corpus -> one memory-mapped token stream per split.

  python -m jaxreason.data.prepare --corpus FILES... --tokenizer DIR --out DIR
      [--heldout-fraction 0.01] [--workers 2] [--text-key text] [--seed 0]

Every document (a text file, or a row's `text` of jsonl / json / parquet / datasets dirs) is
tokenised with no special tokens added, followed by the tokenizer's eos, and appended to the
stream of its split. Documents go to `val` with probability `heldout_fraction` (seeded by
document index; the same split for any number of workers), else to `train`. Output:

  train.bin, val.bin      the token stream, uint16 if the vocabulary has <= 65,536 ids, else uint32
  train.idx.npy, ...      int64 [num_docs + 1] document start offsets (doc i = [idx[i], idx[i+1]),
                          its last token is eos)
  meta.json               dtype, eos_id, vocab_size, token and document counts per split
  tokenizer/              the tokenizer used (a run reads its tokenizer from here if none is set)

Tokenisation runs in `workers` processes (chunks of documents, results written in corpus order,
so the stream does not depend on the number of workers).
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

SPLITS = ("train", "val")
_TOK = None


def _init_worker(tokenizer_dir: str) -> None:
  global _TOK
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  from jaxreason.data.tokenizer import load_tokenizer
  _TOK = load_tokenizer(tokenizer_dir)


def _encode_chunk(docs: Sequence[str]) -> list[np.ndarray]:
  return [np.asarray(_TOK.encode(d, add_special_tokens=False), np.int64) for d in docs]


def _chunks(docs: Iterable[str], size: int) -> Iterator[list[str]]:
  buf: list[str] = []
  for d in docs:
    buf.append(d)
    if len(buf) == size:
      yield buf
      buf = []
  if buf:
    yield buf


def is_heldout(index: int, fraction: float, seed: int) -> bool:
  """Whether document `index` is held out (a seeded hash of the index, independent of the workers)."""
  return fraction > 0 and zlib.crc32(f"{seed}:{index}".encode()) / 2**32 < fraction


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def prepare(documents: Iterable[str], tokenizer_dir: str, out: str, *, heldout_fraction: float = 0.01,
            workers: int = 1, seed: int = 0, chunk_size: int = 64, log=print) -> dict:
  """Writes the token streams of `documents` to `out` (see the module docstring); returns meta."""
  from jaxreason.data.tokenizer import load_tokenizer
  if not 0 <= heldout_fraction < 1:
    raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
  tok = load_tokenizer(tokenizer_dir)
  eos = tok.eos_token_id
  if eos is None:
    raise ValueError(f"the tokenizer in {tokenizer_dir} has no eos token; documents must be separated by eos")
  vocab = len(tok)
  dtype = token_dtype(vocab)
  os.makedirs(out, exist_ok=True)
  files = {s: open(os.path.join(out, f"{s}.bin.tmp"), "wb") for s in SPLITS}
  starts = {s: [0] for s in SPLITS}
  index = 0
  pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_dir,)) if workers > 1 else None
  try:
    if pool is None:
      _init_worker(tokenizer_dir)
      encoded = map(_encode_chunk, _chunks(documents, chunk_size))
    else:
      encoded = pool.imap(_encode_chunk, _chunks(documents, chunk_size))
    for chunk in encoded:
      for ids in chunk:
        split = "val" if is_heldout(index, heldout_fraction, seed) else "train"
        doc = np.append(ids, eos).astype(dtype)
        files[split].write(doc.tobytes())
        starts[split].append(starts[split][-1] + len(doc))
        index += 1
  finally:
    if pool is not None:
      pool.close()
      pool.join()
    for f in files.values():
      f.close()
  if index == 0:
    raise ValueError("the corpus has no documents")
  meta = {"dtype": dtype.name, "eos_id": int(eos), "vocab_size": vocab, "seed": seed,
          "heldout_fraction": heldout_fraction, "splits": {}}
  for s in SPLITS:
    os.replace(os.path.join(out, f"{s}.bin.tmp"), os.path.join(out, f"{s}.bin"))
    np.save(os.path.join(out, f"{s}.idx.npy"), np.asarray(starts[s], np.int64))
    meta["splits"][s] = {"tokens": int(starts[s][-1]), "documents": len(starts[s]) - 1}
  tok.save_pretrained(os.path.join(out, "tokenizer"))
  with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump(meta, f, indent=2)
  log(f"{index} documents -> {out}: " + ", ".join(f"{s} {m['tokens']:,} tokens / {m['documents']} docs"
                                                   for s, m in meta["splits"].items()) + f" ({dtype.name})")
  return meta


def main(argv=None) -> int:
  from jaxreason.tokenizer.corpus import iter_documents
  p = argparse.ArgumentParser(prog="python -m jaxreason.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--corpus", nargs="+", required=True, help="text files, jsonl/parquet with a text column (globs ok)")
  p.add_argument("--tokenizer", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--heldout-fraction", type=float, default=0.01)
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--text-key", default="text")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  files = sorted({f for pat in a.corpus for f in (glob.glob(pat, recursive=True) or [pat])})
  try:
    prepare(iter_documents(files, a.text_key), a.tokenizer, a.out, heldout_fraction=a.heldout_fraction,
            workers=a.workers, seed=a.seed)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
