"""Built-in verifiable reasoning tasks, generated offline (procedural, seeded).

`addition`: a + b with `digits` in [min_digits, max_digits]. The thinking trace works column by
column from the right ("7+8=15" then "5+6+1=12" ...), so harder problems need longer reasoning:
capping the thinking tokens cuts the trace and the answer suffers, which makes the s1 scaling
curve visible even for tiny models (ENV.md measured 0.00/0.14/0.38/0.81 at 8/16/32/64 tokens).
Rows: {"id", "question", "answer", "thinking", "attempt"} (s1 columns: question, thinking, attempt).

`direct=P` (percent, default 0) gives P % of the rows an empty thinking trace: the answer comes at
once, as from a chat model that was never taught to reason. A model fine-tuned on such a mix does
both; the direct answers are mostly wrong for a tiny model, so RL has a behaviour to select (think
first), which is what the RL quickstarts show. The questions are the same whatever P is.
"""

from __future__ import annotations

import random
from typing import Callable

TASKS: dict[str, Callable[..., list[dict]]] = {}


def register_task(name: str):
  def deco(fn):
    TASKS[name] = fn
    return fn
  return deco


def addition_trace(a: int, b: int) -> str:
  """Column-by-column addition, one line per column, least significant first.

  457 + 68 -> "7+8=15\n5+6+1=12\n4+0+1=5": each line adds the column's digits and the carry from
  the line before; the answer's digits are the lines' last digits read upwards (plus a final
  carry line "1" when one is left).
  """
  xs, ys = str(a)[::-1], str(b)[::-1]
  lines, carry = [], 0
  for i in range(max(len(xs), len(ys))):
    x = int(xs[i]) if i < len(xs) else 0
    y = int(ys[i]) if i < len(ys) else 0
    total = x + y + carry
    lines.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
    carry = total // 10
  if carry:
    lines.append(str(carry))
  return "\n".join(lines)


@register_task("addition")
def addition(n: int = 200, seed: int = 0, min_digits: int = 2, max_digits: int = 7,
             direct: int = 0) -> list[dict]:
  if not 1 <= min_digits <= max_digits:
    raise ValueError(f"addition: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
  if not 0 <= direct <= 100:
    raise ValueError(f"addition: direct is a percentage of rows in [0, 100], got {direct}")
  rng = random.Random(seed)
  mode_rng = random.Random(f"addition-direct-{seed}")  # its own stream: the questions don't depend on it
  rows = []
  for i in range(n):
    da, db = rng.randint(min_digits, max_digits), rng.randint(min_digits, max_digits)
    a = rng.randint(10 ** (da - 1), 10**da - 1)
    b = rng.randint(10 ** (db - 1), 10**db - 1)
    thinking = "" if mode_rng.random() * 100 < direct else addition_trace(a, b)
    rows.append({"id": f"add-{seed}-{i}", "question": f"{a}+{b}", "answer": str(a + b),
                 "thinking": thinking, "attempt": str(a + b)})
  return rows


def load_task(spec: str) -> list[dict]:
  """`NAME` or `NAME:key=value,key=value` (e.g. `addition:n=100,seed=1,max_digits=5`)."""
  name, _, arg_str = spec.partition(":")
  if name not in TASKS:
    raise ValueError(f"unknown built-in task {name!r}; available: {', '.join(sorted(TASKS))}")
  kwargs = {}
  for part in filter(None, arg_str.split(",")):
    key, eq, value = part.partition("=")
    if not eq:
      raise ValueError(f"task {spec!r}: expected key=value, got {part!r}")
    kwargs[key.strip()] = int(value)
  try:
    return TASKS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"task {spec!r}: {e}") from None
