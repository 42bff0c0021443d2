r"""Evaluation metrics (SPEC §8): pass@k, maj@k, and a per-budget summary of sampled responses.

pass@k is the unbiased estimator of Chen et al. 2021 (Codex), `1 - C(n-c, k) / C(n, k)`, in its
numerically stable product form `1 - prod_{i=n-c+1}^{n} (1 - k/i)`, averaged over questions.

maj@k (self-consistency, Wang et al. 2022) votes over the first k samples of a question: each
sample with an extracted answer votes for its answer key; the most voted key wins, ties going to
the key that appeared first; a sample without an answer does not vote. The question counts as
solved when the winning key's sample was graded correct (the first sample with that key).
Answer keys: a sample's "answer_key" when given (e.g. a caller's equivalence classes), else its
"answer" lightly normalised (`$..$`, `\left`, spacing, `\dfrac`) with plain numbers made exact,
so "0.5", "1/2" and "\frac{1}{2}" vote together. Deviation: answers that only math-verify would
find equal (e.g. "x+1" and "1+x") vote apart unless the caller supplies answer keys.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from jaxreason.rewards.math_equal import normalize_answer, parse_number, sanitize

__all__ = ["pass_at_k", "maj_at_k", "answer_key", "sample_length", "summarize", "budget_rows"]


def pass_at_k(n: int, c: int, k: int) -> float:
  """Probability that at least one of k samples, drawn without replacement from n with c correct, is correct."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  prod = 1.0
  for i in range(n - c + 1, n + 1):
    prod *= 1.0 - k / i
  return 1.0 - prod


def maj_at_k(pairs: Sequence[tuple[Hashable | None, bool]], k: int) -> bool:
  """Majority vote over the first k (answer_key, correct) pairs; None keys do not vote.

  Ties go to the key seen first. False when no sample in the first k has an answer.
  """
  if k < 1:
    raise ValueError(f"maj@k needs k >= 1, got {k}")
  votes: Counter = Counter()
  first_correct: dict[Hashable, bool] = {}
  for key, correct in pairs[:k]:
    if key is None:
      continue
    votes[key] += 1
    first_correct.setdefault(key, bool(correct))
  if not votes:
    return False
  best = max(votes.values())
  winner = next(key for key in first_correct if votes[key] == best)  # dicts keep first-seen order
  return first_correct[winner]


def answer_key(answer: Any) -> str | None:
  """A vote key for an extracted answer: normalised text, or the exact value of a plain number."""
  if answer is None:
    return None
  s = normalize_answer(sanitize(answer))
  if not s:
    return None
  num = parse_number(s)
  if num is not None:
    value = num[0]
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
  return s


def sample_length(sample: Mapping[str, Any]) -> int:
  """Response tokens: "length", else len("response_token_ids"), else thinking + answer tokens."""
  if sample.get("length") is not None:
    return int(sample["length"])
  if sample.get("response_token_ids") is not None:
    return len(sample["response_token_ids"])
  return int(sample.get("thinking_tokens") or 0) + int(sample.get("answer_tokens") or 0)


def _reward_parts(sample: Mapping[str, Any]) -> tuple[float | None, float | None]:
  """(reward, format_reward) of a sample; "reward" may be a float or a dict with a "reward" key."""
  r, fmt = sample.get("reward"), sample.get("format_reward")
  if isinstance(r, Mapping):
    fmt = r.get("format_reward", fmt)
    r = r.get("reward")
  return (None if r is None else float(r)), (None if fmt is None else float(fmt))


def _mean(values: Sequence[float | None]) -> float | None:
  vals = [float(v) for v in values if v is not None]
  return sum(vals) / len(vals) if vals else None


def _budget_order(budget: Any) -> tuple:
  if isinstance(budget, (int, float)) and not isinstance(budget, bool):
    return (0, budget, "")
  return (1, 0, str(budget))


def _summarize_budget(budget: Any, samples: list[Mapping[str, Any]], ks: Sequence[int]) -> dict:
  by_id: dict[Any, list[Mapping[str, Any]]] = defaultdict(list)
  for s in samples:
    by_id[s["id"]].append(s)
  n_min = min(len(group) for group in by_id.values())
  correct = [bool(s["correct"]) for s in samples]
  lengths = [sample_length(s) for s in samples]
  rewards = [_reward_parts(s) for s in samples]
  out: dict[str, Any] = {
      "budget": budget,
      "n_questions": len(by_id),
      "n_samples": len(samples),
      "samples_per_question": n_min,
      "accuracy": sum(correct) / len(samples),
  }
  for k in ks:
    if k > n_min:
      continue
    out[f"pass@{k}"] = _mean([pass_at_k(len(g), sum(bool(s["correct"]) for s in g), k) for g in by_id.values()])
  for k in ks:
    if k > n_min:
      continue
    votes = [maj_at_k([(s["answer_key"] if "answer_key" in s else answer_key(s.get("answer")), bool(s["correct"]))
                       for s in g], k) for g in by_id.values()]
    out[f"maj@{k}"] = sum(votes) / len(votes)
  out.update({
      "mean_thinking_tokens": _mean([s.get("thinking_tokens") for s in samples]),
      "mean_answer_tokens": _mean([s.get("answer_tokens") for s in samples]),
      "mean_length": _mean(lengths),
      "share_forced": _mean([bool(s.get("forced_end", False)) for s in samples]),
      "share_no_answer": _mean([s.get("answer") is None for s in samples]),
      "share_truncated": _mean([bool(s.get("truncated", False)) for s in samples]),
      "mean_length_correct": _mean([n for n, c in zip(lengths, correct) if c]),
      "mean_length_wrong": _mean([n for n, c in zip(lengths, correct) if not c]),
      "mean_entropy": _mean([s.get("mean_entropy") for s in samples]),
      "mean_reward": _mean([r for r, _ in rewards]),
  })
  if any(f is not None for _, f in rewards):
    out["mean_format_reward"] = _mean([f for _, f in rewards])
  return out


def summarize(samples: Sequence[Mapping[str, Any]], ks: Sequence[int] = (1,)) -> dict:
  """Per-budget metrics over per-sample rows -> `{"ks": [...], "budgets": [one dict per budget]}`.

  A sample needs "id" and "correct"; "budget" (default None), "answer" (extracted, None if none),
  "answer_key", "reward" (float or dict with "reward"), "format_reward", "thinking_tokens",
  "answer_tokens", "length" or "response_token_ids", "forced_end", "truncated", "mean_entropy" are
  optional. Samples of a question are taken in list order for maj@k. pass@k and maj@k are
  reported for each k in `ks` with k <= the fewest samples any question has at that budget.
  Means over absent fields are None. Budgets are sorted: numbers ascending, then others (None).
  """
  ks = sorted({int(k) for k in ks})
  if any(k < 1 for k in ks):
    raise ValueError(f"ks must be >= 1, got {ks}")
  groups: dict[Any, list[Mapping[str, Any]]] = defaultdict(list)
  for i, s in enumerate(samples):
    missing = [key for key in ("id", "correct") if key not in s]
    if missing:
      raise KeyError(f"sample {i} has no {' or '.join(repr(m) for m in missing)}; it has keys {sorted(s)}")
    groups[s.get("budget")].append(s)
  budgets = sorted(groups, key=_budget_order)
  return {"ks": ks, "budgets": [_summarize_budget(b, groups[b], ks) for b in budgets]}


def budget_rows(summary: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """The per-budget dicts of a `summarize` result (or such a list itself)."""
  if isinstance(summary, Mapping):
    return list(summary["budgets"])
  return list(summary)
