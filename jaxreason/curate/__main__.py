"""python -m jaxreason.curate --pool POOL --out DIR [--eval FILE ...] [--solver MODEL|module:fn ...] --n N

  --pool builtin            the built-in planted pool (pool.py) and its eval set
  --stages                  comma list, in order (default quality,dedup,decontam,difficulty,diversity)
  --eval FILE               evaluation set(s) to decontaminate against (jsonl/parquet/datasets dir)
  --solver SPEC             reference model for the difficulty stage: a HF dir, an Orbax checkpoint or
                            run dir, or module:function; repeat for several (none: stage skipped)
  --pattern NAME=REGEX      add or replace a quality pattern; --no-pattern NAME removes a default one
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from jaxreason.curate import pool as builtin
from jaxreason.curate.difficulty import Difficulty
from jaxreason.curate.pipeline import curate, load_pool
from jaxreason.curate.stages import DEFAULT_PATTERNS, Decontaminate, Deduplicate, Diversity, Quality

STAGES = ("quality", "dedup", "decontam", "difficulty", "diversity")


def _fn(spec: str):
  mod, _, attr = spec.partition(":")
  try:
    return getattr(importlib.import_module(mod), attr)
  except (ImportError, AttributeError, ValueError) as e:
    raise SystemExit(f"error: cannot load {spec!r} as module:function ({e})") from None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxreason.curate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--pool", required=True)
  p.add_argument("--split", default=None)
  p.add_argument("--out", required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stages", default=",".join(STAGES))
  p.add_argument("--require", default="question,answer", help="fields a row must have (quality)")
  p.add_argument("--pattern", action="append", default=[])
  p.add_argument("--no-pattern", action="append", default=[])
  p.add_argument("--near-dup-threshold", type=float, default=0.7)
  p.add_argument("--num-perm", type=int, default=128)
  p.add_argument("--shingle", type=int, default=3, help="word n-gram size of MinHash shingles")
  p.add_argument("--eval", action="append", default=[])
  p.add_argument("--ngram", type=int, default=8, help="decontamination n-gram size (s1: 8)")
  p.add_argument("--solver", action="append", default=[])
  p.add_argument("--k", type=int, default=4, help="samples per question and solver")
  p.add_argument("--format", default="s1")
  p.add_argument("--reward", default=None)
  p.add_argument("--tokenizer", default=None, help="tokenizer dir for trace lengths in tokens (default: words)")
  p.add_argument("--min-trace-length", type=int, default=0)
  p.add_argument("--n", type=int, default=1000, help="rows to select (diversity)")
  p.add_argument("--domain-column", default="domain")
  p.add_argument("--domain-fn", default=None, help="module:function(row) -> domain label")
  a = p.parse_args(argv)

  names = [s.strip() for s in a.stages.split(",") if s.strip()]
  for s in names:
    if s not in STAGES:
      p.error(f"--stages: unknown stage {s!r}; choose from {', '.join(STAGES)}")
  try:
    return _run(p, a, names)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _run(p, a, names) -> int:
  if a.pool == "builtin":
    rows, evals = builtin.builtin_pool(a.seed)
    eval_sets = {"builtin_eval": evals}
    solvers = a.solver or ["jaxreason.curate.pool:builtin_solver"]
  else:
    rows = load_pool(a.pool, a.split)
    eval_sets = {}
    solvers = a.solver
  for path in a.eval:
    eval_sets[path] = load_pool(path)
  patterns = dict(DEFAULT_PATTERNS)
  for item in a.pattern:
    key, eq, rx = item.partition("=")
    if not eq:
      p.error(f"--pattern wants NAME=REGEX, got {item!r}")
    patterns[key] = rx
  for key in a.no_pattern:
    if key not in patterns:
      p.error(f"--no-pattern: no pattern {key!r}; patterns: {', '.join(patterns)}")
    del patterns[key]
  tok = None
  if a.tokenizer:
    from jaxreason.data.tokenizer import load_tokenizer
    tok = load_tokenizer(a.tokenizer)

  stages = []
  for s in names:
    if s == "quality":
      stages.append(Quality(required=tuple(f for f in a.require.split(",") if f), patterns=patterns))
    elif s == "dedup":
      stages.append(Deduplicate(threshold=a.near_dup_threshold, num_perm=a.num_perm, shingle=a.shingle))
    elif s == "decontam":
      if not eval_sets:
        print("decontam: no --eval files given; stage skipped", file=sys.stderr)
        continue
      stages.append(Decontaminate(eval_sets, n=a.ngram))
    elif s == "difficulty":
      if not solvers and not a.min_trace_length:
        print("difficulty: no --solver given; stage skipped", file=sys.stderr)
        continue
      stages.append(Difficulty(solvers, k=a.k, reward=a.reward, format=a.format, tokenizer=tok,
                               min_trace_length=a.min_trace_length))
    elif s == "diversity":
      stages.append(Diversity(a.n, domain_column=a.domain_column, domain_fn=_fn(a.domain_fn) if a.domain_fn else None))
  selected, _ = curate(rows, stages, seed=a.seed, out=a.out)
  print(f"selected {len(selected)} of {len(rows)} rows -> {a.out}/selected.jsonl; report {a.out}/report.json")
  print(json.dumps(json.load(open(f"{a.out}/report.json"))["stages"], indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
