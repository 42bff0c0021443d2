"""python -m jaxreason.tokenizer train --corpus FILES... --vocab-size N --out DIR [--kind byte_bpe]"""

from __future__ import annotations

import argparse
import glob
import sys

from jaxreason.tokenizer.corpus import iter_documents
from jaxreason.tokenizer.train import KINDS, train_tokenizer


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxreason.tokenizer")
  sub = p.add_subparsers(dest="cmd", required=True)
  t = sub.add_parser("train", help="train a tokenizer on a corpus and save it as a HF tokenizer dir")
  t.add_argument("--corpus", nargs="+", required=True, help="text files, jsonl/parquet with a text column (globs ok)")
  t.add_argument("--vocab-size", type=int, required=True)
  t.add_argument("--out", required=True)
  t.add_argument("--kind", choices=KINDS, default="byte_bpe")
  t.add_argument("--min-frequency", type=int, default=2)
  t.add_argument("--text-key", default="text")
  t.add_argument("--special-token", action="append", default=[], help="extra special token (repeatable)")
  a = p.parse_args(argv)
  files = sorted({f for pat in a.corpus for f in (glob.glob(pat, recursive=True) or [pat])})
  try:
    tok = train_tokenizer(iter_documents(files, a.text_key), a.vocab_size, a.out, kind=a.kind,
                          min_frequency=a.min_frequency, extra_special_tokens=a.special_token)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"trained {a.kind} tokenizer on {len(files)} file(s): {len(tok)} tokens -> {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
