"""Runs curation stages in order and writes what each kept and dropped, the selection and a report.

Output directory:
  selected.jsonl            the rows the last stage kept (in selection order)
  stages/NN_NAME.jsonl      one line per row the stage saw: {id, kept, reason}
  decontamination.jsonl     every 8-gram hit: {id, field, ngram, eval_set, eval_id}
  report.json               counts per stage, seed, the stage settings
  lengths.png, domains.png  trace-length histogram (pool vs selected), domains of the selection
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxreason.curate.stages import Row, Stage, StageResult


def load_pool(path: str, split: str | None = None) -> list[Row]:
  """Rows of a jsonl/json/parquet file or a `datasets` dir; ids are kept, or set to the row index."""
  from jaxreason.data.sources import read_rows
  rows = [dict(r) for r in read_rows(path, split=split)]
  seen: dict[Any, int] = {}
  for i, r in enumerate(rows):
    r.setdefault("id", i)
    if r["id"] is None:
      r["id"] = i
    if r["id"] in seen:
      raise ValueError(f"{path} row {i + 1}: id {r['id']!r} repeats row {seen[r['id']] + 1}; ids must be unique")
    seen[r["id"]] = i
  return rows


def _jsonable(v: Any) -> Any:
  if isinstance(v, (np.integer,)):
    return int(v)
  if isinstance(v, (np.floating,)):
    return float(v)
  return str(v)


def _write_jsonl(path: str, rows: Sequence[dict]) -> None:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r, default=_jsonable) + "\n")


def _reason_kind(why: str) -> str:
  """A reason without its specifics ("near duplicate of X (...)" -> "near duplicate")."""
  if why.startswith(("pattern", "missing field")):
    return why.split(" in ")[0]
  for sep in (" of ", " by ", " (", " '"):
    why = why.split(sep)[0]
  return why


def curate(rows: list[Row], stages: Sequence[Stage], *, seed: int = 0, out: str | None = None,
           log=print) -> tuple[list[Row], list[StageResult]]:
  """Runs `stages` in order over `rows` (seeded: one numpy Generator per stage from `seed`).

  Returns (selected rows, the StageResult of each stage); with `out`, writes the files above."""
  results = []
  current = list(rows)
  for i, stage in enumerate(stages):
    res = stage.run(current, np.random.default_rng([seed, i]))
    results.append(res)
    log(f"{stage.name:>12}: {len(current)} in, {len(res.kept)} kept, {len(res.dropped)} dropped")
    current = res.kept
  if out is not None:
    write_outputs(out, rows, current, results, seed=seed, stages=stages)
  return current, results


def write_outputs(out: str, pool: list[Row], selected: list[Row], results: Sequence[StageResult], *,
                  seed: int, stages: Sequence[Stage]) -> dict[str, Any]:
  os.makedirs(os.path.join(out, "stages"), exist_ok=True)
  _write_jsonl(os.path.join(out, "selected.jsonl"), selected)
  counts = []
  n_in = len(pool)
  for i, res in enumerate(results):
    lines = [{"id": r["id"], "kept": True, "reason": None} for r in res.kept]
    lines += [{"id": r["id"], "kept": False, "reason": why} for r, why in res.dropped]
    _write_jsonl(os.path.join(out, "stages", f"{i:02d}_{res.name}.jsonl"), lines)
    reasons = Counter(_reason_kind(why) for _, why in res.dropped)
    counts.append({"stage": res.name, "in": n_in, "kept": len(res.kept), "dropped": len(res.dropped),
                   "dropped_by_reason": dict(reasons.most_common())})
    n_in = len(res.kept)
  hits = [h for res in results for h in res.info.get("hits", [])]
  _write_jsonl(os.path.join(out, "decontamination.jsonl"), hits)
  report = {"seed": seed, "pool": len(pool), "selected": len(selected), "stages": counts,
            "decontamination_hits": len(hits),
            "settings": [{k: v for k, v in vars(s).items() if not k.startswith("_") and k not in ("eval_sets",)}
                         for s in stages]}
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=2, default=_jsonable)
  _plots(out, pool, selected)
  return report


def _plots(out: str, pool: list[Row], selected: list[Row]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  def length(r):
    return float(r.get("trace_length", len(str(r.get("thinking") or "").split())))

  fig, ax = plt.subplots(figsize=(6, 4))
  a, b = [length(r) for r in pool], [length(r) for r in selected]
  bins = np.histogram_bin_edges(a + b or [0], bins=30)
  ax.hist(a, bins=bins, alpha=0.5, label=f"pool ({len(a)})")
  ax.hist(b, bins=bins, alpha=0.7, label=f"selected ({len(b)})")
  ax.set_xlabel("trace length"), ax.set_ylabel("rows"), ax.legend()
  fig.tight_layout(), fig.savefig(os.path.join(out, "lengths.png"), dpi=100), plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  doms = Counter(str(r.get("domain")) for r in selected)
  ax.bar(list(doms), list(doms.values()))
  ax.set_ylabel("selected rows"), ax.set_title("domains of the selection")
  plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
  fig.tight_layout(), fig.savefig(os.path.join(out, "domains.png"), dpi=100), plt.close(fig)
