"""Curation stages over rows (dicts with `id`, `question`, `answer`, optional `thinking`, `source`).

Every stage maps the rows it is given to a `StageResult`: the rows it kept (in input order) and
each dropped row with the reason. The stages of SPEC §7 (s1, Muennighoff et al. 2025):

  Quality        missing fields, and formatting artefacts by regex (`[asy]` figures, image
                 references, numbered-part questions); the patterns are configurable.
  Deduplicate    exact duplicates of the normalised question, then near duplicates by MinHash LSH
                 (datasketch) over word n-gram shingles; the first row of a group is kept.
  Decontaminate  a row sharing one word 8-gram (lowercased, whitespace-normalised) with a question
                 of an evaluation set is dropped; every hit is recorded.
  Difficulty     (difficulty.py) drop what reference models solve.
  Diversity      s1's sampling: until N rows are picked, choose a domain uniformly, then a row in it
                 with probability proportional to 2^-rank (rank 0 = longest trace); remove it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxreason.curate.text import normalize, word_ngrams

Row = dict[str, Any]

# Default quality patterns (name -> regex, searched in question, thinking and answer).
DEFAULT_PATTERNS: dict[str, str] = {
  "asy": r"\[asy\]",
  "image": r"!\[[^\]]*\]\([^)]*\)|<img\b|\b[\w/.-]+\.(?:png|jpe?g|gif|svg|bmp)\b",
  "numbered_parts": r"(?s)\(a\).*\(b\)|\(i\).*\(ii\)|(?:^|\n)\s*(?:part|question)\s*\(?1\)?[.:].*(?:part|question)\s*\(?2",
  "api_error": r"(?i)\bapi error\b|\brate limit exceeded\b",
}


@dataclasses.dataclass
class StageResult:
  name: str
  kept: list[Row]
  dropped: list[tuple[Row, str]]  # (row, reason)
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


class Stage:
  """A curation step: `run(rows, rng) -> StageResult`."""

  name = "stage"

  def run(self, rows: list[Row], rng: np.random.Generator) -> StageResult:
    raise NotImplementedError


def _text(row: Row, key: str) -> str:
  v = row.get(key)
  return "" if v is None else str(v)


# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Quality(Stage):
  """Drops rows missing a required field (absent, None or blank) or matching a pattern."""

  required: Sequence[str] = ("question", "answer")
  patterns: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_PATTERNS))
  fields: Sequence[str] = ("question", "thinking", "answer")  # where patterns are searched
  name = "quality"

  def __post_init__(self):
    self._compiled = {}
    for key, pat in self.patterns.items():
      try:
        self._compiled[key] = re.compile(pat)
      except re.error as e:
        raise ValueError(f"quality pattern {key!r} ({pat!r}) is not a valid regex: {e}") from None

  def reason(self, row: Row) -> str | None:
    for key in self.required:
      if not _text(row, key).strip():
        return f"missing field {key!r}"
    for key, pat in self._compiled.items():
      for field in self.fields:
        if pat.search(_text(row, field)):
          return f"pattern {key!r} in {field}"
    return None

  def run(self, rows, rng):
    kept, dropped = [], []
    for row in rows:
      why = self.reason(row)
      (dropped.append((row, why)) if why else kept.append(row))
    return StageResult(self.name, kept, dropped)


# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Deduplicate(Stage):
  """Exact duplicates (normalised question), then MinHash LSH near duplicates (Jaccard >= threshold
  of word `shingle`-gram sets, estimated with `num_perm` permutations). The first row wins."""

  threshold: float = 0.7
  num_perm: int = 128
  shingle: int = 3
  key: str = "question"
  name = "dedup"

  def __post_init__(self):
    if not 0 < self.threshold <= 1:
      raise ValueError(f"near-duplicate threshold must be in (0, 1], got {self.threshold}")

  def run(self, rows, rng):
    from datasketch import MinHash, MinHashLSH
    kept, dropped = [], []
    exact: dict[str, Any] = {}
    lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
    sigs = {}
    for row in rows:
      norm = normalize(_text(row, self.key))
      digest = hashlib.sha1(norm.encode()).hexdigest()
      if digest in exact:
        dropped.append((row, f"exact duplicate of {exact[digest]}"))
        continue
      exact[digest] = row["id"]
      grams = word_ngrams(norm, self.shingle)
      m = MinHash(num_perm=self.num_perm, seed=1)
      m.update_batch([" ".join(g).encode() for g in grams])
      hits = lsh.query(m)
      # LSH candidates are confirmed against the estimated Jaccard (LSH alone has false positives).
      hits = [h for h in hits if sigs[h][0].jaccard(m) >= self.threshold]
      if hits:
        first = min(hits, key=lambda h: sigs[h][1])
        dropped.append((row, f"near duplicate of {first} (Jaccard ~{sigs[first][0].jaccard(m):.2f})"))
        continue
      key = str(len(sigs))
      sigs[key] = (m, row["id"])
      lsh.insert(key, m)
      kept.append(row)
    # reasons name row ids; the LSH keys are internal
    dropped = [(r, re.sub(r"near duplicate of (\d+)", lambda mt: f"near duplicate of {sigs[mt.group(1)][1]}", why))
               for r, why in dropped]
    return StageResult(self.name, kept, dropped)


# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Decontaminate(Stage):
  """Drops rows whose question shares a word n-gram (n=8) with an evaluation question."""

  eval_sets: Mapping[str, Sequence[Row]]  # name (file) -> rows with `question` (and `id`)
  n: int = 8
  fields: Sequence[str] = ("question",)
  name = "decontam"

  def __post_init__(self):
    self._index: dict[tuple[str, ...], tuple[str, Any]] = {}
    for name, rows in self.eval_sets.items():
      for i, r in enumerate(rows):
        q = r.get("question", r.get("problem", r.get("prompt")))
        if q is None:
          raise ValueError(f"eval set {name} row {i + 1}: no question/problem/prompt field")
        for g in word_ngrams(str(q), self.n):
          self._index.setdefault(g, (name, r.get("id", i)))

  def run(self, rows, rng):
    kept, dropped, hits = [], [], []
    for row in rows:
      hit = None
      for field in self.fields:
        for g in sorted(word_ngrams(_text(row, field), self.n)):
          if g in self._index:
            hit = (field, g, *self._index[g])
            break
        if hit:
          break
      if hit:
        field, g, name, eid = hit
        hits.append({"id": row["id"], "field": field, "ngram": " ".join(g), "eval_set": name, "eval_id": eid})
        dropped.append((row, f"{self.n}-gram {' '.join(g)!r} of {name} id {eid}"))
      else:
        kept.append(row)
    return StageResult(self.name, kept, dropped, {"hits": hits})


# ----------------------------------------------------------------------------------------------


def s1_diversity_sample(domains: Sequence[Any], lengths: Sequence[float], n: int,
                        rng: np.random.Generator) -> list[int]:
  """Indices of `n` rows picked as s1 did: repeat { domain uniformly among those with rows left;
  a row in it with probability 2^-rank / sum, rank 0 = longest (ties: earlier row first); remove it }."""
  by_domain: dict[Any, list[int]] = {}
  for i, d in enumerate(domains):
    by_domain.setdefault(d, []).append(i)
  pools = {d: sorted(ix, key=lambda i: (-lengths[i], i)) for d, ix in by_domain.items()}
  names = sorted(pools, key=str)
  picked: list[int] = []
  while len(picked) < n and names:
    d = names[int(rng.integers(len(names)))]
    pool = pools[d]
    w = np.exp2(-np.arange(len(pool), dtype=np.float64))
    j = int(rng.choice(len(pool), p=w / w.sum()))
    picked.append(pool.pop(j))
    if not pool:
      names.remove(d)
  return picked


@dataclasses.dataclass
class Diversity(Stage):
  """s1's domain-uniform, length-favouring sampling of `n` rows (all rows if fewer).

  Domains: `domain_fn(row)` if given, else the row's `domain_column`. Trace length: the row's
  `trace_length` (set by Difficulty), else the word count of its thinking."""

  n: int
  domain_column: str = "domain"
  domain_fn: Callable[[Row], Any] | None = None
  name = "diversity"

  def domain(self, row: Row) -> Any:
    if self.domain_fn is not None:
      return self.domain_fn(row)
    if self.domain_column not in row:
      raise ValueError(f"row {row['id']}: no domain column {self.domain_column!r}; pass --domain-column "
                       "or --domain-fn module:function")
    return row[self.domain_column]

  def run(self, rows, rng):
    domains = [self.domain(r) for r in rows]
    lengths = [float(r.get("trace_length", len(_text(r, "thinking").split()))) for r in rows]
    picked = s1_diversity_sample(domains, lengths, self.n, rng)
    chosen = set(picked)
    kept = [rows[i] | {"domain": domains[i]} for i in picked]  # in pick order
    dropped = [(rows[i], "not sampled") for i in range(len(rows)) if i not in chosen]
    return StageResult(self.name, kept, dropped)
