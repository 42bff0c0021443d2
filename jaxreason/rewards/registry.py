"""Reward functions by name: a registry, `module:function` paths, and weighted combinations.

A reward function takes `(response, ground_truth)` and returns a float, or a dict of floats with
the total under "reward" (as CS336's `r1_zero_reward_fn` does). `reward_value` reads either.

What it receives (evaluation, GRPO, expert iteration, DPO self-pairs alike):
- `response`: the completion's text only, decoded with special tokens kept and the end-of-turn /
  eos / pad token text removed. Not the prompt, and not the format's thinking opener that ends
  the prompt (s1's "<|im_start|>think\n", "<think>\n"); budget-forcing injections ("Wait", the
  forced end of thinking and suffix) are part of it (`jaxreason.generation.decode`).
- `ground_truth`: the row's answer (`answer`, else `solution`, else `ground_truth`), as it is
  in the data (a str, number, list or dict).
- the row's other columns, as keyword arguments, as TRL passes dataset columns: a function with a
  `**kwargs` parameter gets every column, one with named extra parameters (`def score(response,
  ground_truth, entry)`) gets the columns of those names (`call_reward`). So a task's own entry
  can travel in its own column, and `answer` stays what the accuracy is computed from.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Union

__all__ = [
  "RewardFn", "RewardOutput", "register_reward", "registered_rewards", "get_reward_fn", "reward_value",
  "combine", "apply_reward", "call_reward",
]

RewardOutput = Union[float, Mapping[str, float]]
RewardFn = Callable[[str, Any], RewardOutput]

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
  """Decorator registering a reward function under `name` (an existing other function is an error)."""
  if not isinstance(name, str) or not name or ":" in name:
    raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")

  def decorator(fn: RewardFn) -> RewardFn:
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not fn and _qualname(existing) != _qualname(fn):
      raise ValueError(f"reward {name!r} is already registered to {_qualname(existing)}; "
                       f"pick another name for {_qualname(fn)}")
    _REGISTRY[name] = fn
    return fn

  return decorator


def _qualname(fn: Callable) -> str:
  return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _ensure_builtins() -> None:
  from jaxreason.rewards import rules  # noqa: F401  (registers the built-in rewards)


def registered_rewards() -> list[str]:
  """Names of all registered reward functions, sorted."""
  _ensure_builtins()
  return sorted(_REGISTRY)


def get_reward_fn(name_or_path: str | RewardFn) -> RewardFn:
  """A registered name ("r1_zero"), a "package.module:function" path, or a callable (returned as is)."""
  if callable(name_or_path):
    return name_or_path
  if not isinstance(name_or_path, str):
    raise TypeError(f"reward must be a name, 'module:function' or a callable, got {type(name_or_path).__name__}")
  _ensure_builtins()
  if name_or_path in _REGISTRY:
    return _REGISTRY[name_or_path]
  if ":" in name_or_path:
    module_name, _, attr = name_or_path.partition(":")
    try:
      obj: Any = importlib.import_module(module_name)
    except ImportError as e:
      raise ValueError(f"reward {name_or_path!r}: cannot import module {module_name!r} ({e})") from e
    for part in attr.split("."):
      if not hasattr(obj, part):
        raise ValueError(f"reward {name_or_path!r}: module {module_name!r} has no attribute {attr!r}")
      obj = getattr(obj, part)
    if not callable(obj):
      raise ValueError(f"reward {name_or_path!r} is a {type(obj).__name__}, not a function")
    return obj
  close = difflib.get_close_matches(name_or_path, _REGISTRY, n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  raise ValueError(f"unknown reward {name_or_path!r}.{hint} Registered rewards: {', '.join(sorted(_REGISTRY))}; "
                   "or give a 'package.module:function' path.")


def reward_value(out: RewardOutput) -> float:
  """The scalar reward of a reward function's output (a float, or a dict's "reward")."""
  if isinstance(out, Mapping):
    return float(out["reward"])
  return float(out)


def is_correct(out: RewardOutput) -> bool:
  """Whether a graded response counts as correct: its answer reward (a dict's "answer_reward",
  else its reward) is 1."""
  value = out.get("answer_reward", out["reward"]) if isinstance(out, Mapping) else out
  return float(value) >= 1.0 - 1e-9


@functools.lru_cache(maxsize=None)
def _column_params(fn: Callable) -> tuple[tuple[str, ...], bool, tuple[str, ...]]:
  """(named parameters after the first two, whether it takes **kwargs, the first two's names)."""
  try:
    params = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):  # a builtin without a signature: (response, ground_truth) only
    return (), False, ()
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  first = tuple(p.name for p in positional[:2])
  named = tuple(p.name for p in params if p.name not in first
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
  return named, any(p.kind == p.VAR_KEYWORD for p in params), first


def call_reward(fn: RewardFn, response: str, ground_truth: Any, row: Mapping[str, Any] | None = None) -> RewardOutput:
  """`fn(response, ground_truth, **columns)`: the row's columns that `fn` asks for by name, or all
  of them when it takes `**kwargs` (see the module docstring); none for a two-argument function."""
  if not row:
    return fn(response, ground_truth)
  try:
    named, var_kw, first = _column_params(fn)
  except TypeError:  # an unhashable callable
    named, var_kw, first = _column_params.__wrapped__(fn)
  if var_kw:
    kwargs = {k: v for k, v in row.items() if isinstance(k, str) and k not in first}
  else:
    kwargs = {k: row[k] for k in named if k in row}
  return fn(response, ground_truth, **kwargs)


def combine(weights: Mapping[str | RewardFn, float]) -> RewardFn:
  """Weighted sum of reward functions: `combine({"r1_zero": 1.0, "mymod:length_penalty": 0.1})`.

  The combined function returns a dict: "reward" (the weighted sum) and each component's
  unweighted scalar under its name (for logging per reward function).
  """
  if not weights:
    raise ValueError("combine() needs at least one reward function")
  parts: list[tuple[str, RewardFn, float]] = []
  for key, weight in weights.items():
    name = key if isinstance(key, str) else getattr(key, "__name__", repr(key))
    parts.append((name, get_reward_fn(key), float(weight)))
  names = [n for n, _, _ in parts]
  if len(set(names)) != len(names) or "reward" in names:
    raise ValueError(f"combine(): component names must be unique and not 'reward', got {names}")

  def combined(response: str, ground_truth: Any, **columns: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    total = 0.0
    for name, fn, weight in parts:
      value = reward_value(call_reward(fn, response, ground_truth, columns))
      out[name] = value
      total += weight * value
    out["reward"] = total
    return out

  combined.__name__ = "combined_" + "_".join(names)
  return combined


def apply_reward(fn: str | RewardFn, responses: Sequence[str], ground_truths: Sequence[Any],
                 num_threads: int | None = None, rows: Sequence[Mapping[str, Any] | None] | None = None
                 ) -> list[RewardOutput]:
  """Scores many responses, in threads so that math-verify workers grade in parallel. `rows`: each
  response's data row, whose columns `call_reward` passes on."""
  if len(responses) != len(ground_truths):
    raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
  if rows is not None and len(rows) != len(responses):
    raise ValueError(f"{len(responses)} responses but {len(rows)} rows")
  fn = get_reward_fn(fn)
  rows = [None] * len(responses) if rows is None else rows
  one = lambda r, g, row: call_reward(fn, r, g, row)
  if num_threads is None:
    from jaxreason.rewards.math_equal import default_num_workers
    num_threads = default_num_workers()
  if num_threads <= 1 or len(responses) <= 1:
    return [one(r, g, row) for r, g, row in zip(responses, ground_truths, rows)]
  with ThreadPoolExecutor(max_workers=num_threads) as pool:
    return list(pool.map(one, responses, ground_truths, rows))
