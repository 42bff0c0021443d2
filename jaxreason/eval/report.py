"""Writing evaluation results: per-sample JSONL, summary JSON, the s1 scaling plot, a console table.

Files are written atomically (a temporary file in the same directory, then `os.replace`), so an
interrupted run never leaves a half-written result. numpy scalars and arrays are written as JSON
numbers and lists. The plot uses matplotlib's Agg canvas directly and leaves the global backend alone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jaxreason.eval.metrics import budget_rows
from jaxreason.io_utils import atomic_write as _atomic_write, to_jsonable, write_jsonl

__all__ = ["write_samples", "write_summary", "plot_scaling", "format_table", "to_jsonable"]


def write_samples(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> str:
  """One JSON object per line (UTF-8, not ASCII-escaped), written atomically. Returns the path."""
  return write_jsonl(path, rows)


def write_summary(path: str | os.PathLike, summary: Mapping[str, Any] | Sequence[Any]) -> str:
  """The summary as indented JSON, written atomically. Returns the path."""
  def write(f):
    json.dump(summary, f, indent=2, ensure_ascii=False, default=to_jsonable)
    f.write("\n")
  return _atomic_write(path, write)


def _budget_label(budget: Any) -> str:
  return "none" if budget is None else str(budget)


def plot_scaling(path: str | os.PathLike, summary: Mapping[str, Any] | Sequence[Mapping[str, Any]], *,
                 metric: str = "accuracy", title: str | None = None) -> str:
  """The s1 figure: `metric` (%) against mean thinking tokens, one labelled point per budget.

  The x axis is log-2 when the thinking lengths span more than a factor of 8. Returns the path.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  rows = [r for r in budget_rows(summary)
          if r.get("mean_thinking_tokens") is not None and r.get(metric) is not None]
  if not rows:
    raise ValueError(f"nothing to plot: no budget has both mean_thinking_tokens and {metric!r}")
  rows.sort(key=lambda r: r["mean_thinking_tokens"])
  xs = [float(r["mean_thinking_tokens"]) for r in rows]
  ys = [100.0 * float(r[metric]) for r in rows]

  fig = Figure(figsize=(6.0, 4.0), dpi=150)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ax.plot(xs, ys, "-o", color="tab:blue", markersize=6, linewidth=1.5)
  for x, y, r in zip(xs, ys, rows):
    ax.annotate(_budget_label(r.get("budget")), (x, y), textcoords="offset points", xytext=(0, 7),
                ha="center", fontsize=8)
  positive = [x for x in xs if x > 0]
  if len(positive) == len(xs) and max(xs) / min(xs) > 8:
    ax.set_xscale("log", base=2)
  ax.set_xlabel("Average thinking time (tokens)")
  ax.set_ylabel(f"{metric} (%)")
  lo, hi = min(ys), max(ys)
  pad = max(2.0, 0.1 * (hi - lo))
  ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
  ax.margins(x=0.08)
  ax.grid(True, alpha=0.3)
  ax.set_title(title or f"Budget forcing: {metric} vs thinking tokens")
  fig.tight_layout()

  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp.png"
  try:
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _fmt(value: Any, percent: bool = False) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if percent:
    return f"{100.0 * value:.1f}"
  if isinstance(value, float):
    return f"{value:.1f}"
  return str(value)


def format_table(summary: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
  """A small aligned text table: budget, n, accuracy, pass@k, maj@k (%), mean thinking tokens, forced %."""
  rows = budget_rows(summary)
  metric_cols = sorted({key for r in rows for key in r if key.startswith(("pass@", "maj@"))},
                       key=lambda key: (not key.startswith("pass@"), int(key.split("@")[1])))
  header = ["budget", "questions", "acc%"] + [f"{c}%" for c in metric_cols] + ["think", "answer", "forced%", "no-ans%"]
  table = [header]
  for r in rows:
    table.append([_budget_label(r.get("budget")), _fmt(r.get("n_questions")), _fmt(r.get("accuracy"), True)]
                 + [_fmt(r.get(c), True) for c in metric_cols]
                 + [_fmt(r.get("mean_thinking_tokens")), _fmt(r.get("mean_answer_tokens")),
                    _fmt(r.get("share_forced"), True), _fmt(r.get("share_no_answer"), True)])
  widths = [max(len(line[i]) for line in table) for i in range(len(header))]
  lines = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in table]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
