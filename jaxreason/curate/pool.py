"""A built-in pool to show and test curation: generated reasoning problems with planted defects.

`builtin_pool(seed)` returns (pool rows, eval rows). Every pool row has `planted`: None for a
clean row, or the stage that must drop it:
  "quality"      `[asy]` figure, image reference, numbered parts, missing answer, blank question
  "dedup"        an exact copy (case/spacing changed) or a near copy (a few words added) of an
                 earlier row
  "decontam"     an evaluation question copied into the pool (prefix added, case/spacing changed)
  "difficulty"   an easy question that the built-in reference solver answers
Problems come from four domains (arithmetic, algebra, number theory, combinatorics) with
thinking traces whose length grows with difficulty; the evaluation set uses other templates
(geometry, sequences), so that clean rows share no word 8-gram with it.

`builtin_solver(rows, k)` is a stand-in reference model: it reads the generated `difficulty`
label, and for an "easy" row one of its k responses carries the right answer (s1 format); every
other response is wrong. It lets the difficulty stage be checked without a trained model.
"""

from __future__ import annotations

import math
import random
from typing import Any

NAMES = ("Ada", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena",
         "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara")  # fmt: skip
ITEMS = ("books", "marbles", "stamps", "coins", "shells", "cards", "pencils", "stickers")


def _trace(steps: list[str], hard: bool, rng: random.Random) -> str:
  extra = ["Let me double-check this step.", "Wait, recompute to be sure.", "Checking the result again."]
  out = []
  for s in steps:
    out.append(s)
    if hard:
      out += rng.sample(extra, k=rng.randint(1, 3))
  return "\n".join(out)


def _arithmetic(rng, hard):
  xs = [rng.randint(10, 99999 if hard else 999) for _ in range(rng.randint(5, 8) if hard else 4)]
  total, steps = 0, []
  for x in xs:
    steps.append(f"{total} + {x} = {total + x}")
    total += x
  q = f"{rng.choice(NAMES)} writes down the numbers {', '.join(map(str, xs[:-1]))} and {xs[-1]}. What is their sum?"
  return q, str(total), steps


def _algebra(rng, hard):
  a, x, b = rng.randint(2, 60 if hard else 9), rng.randint(-99, 99) if hard else rng.randint(1, 20), rng.randint(1, 500)
  c = a * x + b
  q = (f"{rng.choice(NAMES)} thinks of an integer x such that {a} times x plus {b} equals {c}. "
       "Which integer did they think of?")
  steps = [f"{a}x + {b} = {c}", f"{a}x = {c - b}", f"x = {(c - b)} / {a} = {x}"]
  return q, str(x), steps


def _number_theory(rng, hard):
  n, m = rng.randint(10**5 if hard else 100, 10**9 if hard else 9999), rng.randint(3, 97)
  q = f"{rng.choice(NAMES)} divides {n} by {m}. What remainder is left over after the division by {m}?"
  steps = [f"{n} = {m} * {n // m} + {n % m}", f"remainder {n % m}"]
  return q, str(n % m), steps


def _combinatorics(rng, hard):
  n = rng.randint(8, 40) if hard else rng.randint(3, 9)
  k = rng.randint(2, n - 1)
  item, name = rng.choice(ITEMS), rng.choice(NAMES)
  q = (f"{name} owns {n} different {item}. In how many ways can {name} pick exactly {k} of the {n} {item} "
       "for a gift box if the order does not matter?")
  steps = [f"C({n}, {k}) = {n}! / ({k}! {n - k}!)", f"= {math.comb(n, k)}"]
  return q, str(math.comb(n, k)), steps


DOMAINS = {"arithmetic": _arithmetic, "algebra": _algebra, "number_theory": _number_theory,
           "combinatorics": _combinatorics}


def _eval_question(rng, i):
  if i % 2 == 0:
    w, h = rng.randint(2, 90), rng.randint(2, 90)
    return (f"A rectangular garden measures {w} metres along one side and {h} metres along the other side; "
            "find its area in square metres."), str(w * h)
  a, d = rng.randint(1, 50), rng.randint(2, 12)
  return (f"An arithmetic progression starts with {a} and every later term grows by exactly {d}; "
          f"determine the value of term number {i + 5} of this progression."), str(a + (i + 4) * d)


def builtin_eval(n: int = 40, seed: int = 1) -> list[dict[str, Any]]:
  rng = random.Random(seed)
  return [{"id": f"eval-{i}", "question": q, "answer": a} for i, (q, a) in
          ((i, _eval_question(rng, i)) for i in range(n))]


def builtin_pool(seed: int = 0, per_domain: int = 40, n_quality: int = 10, n_exact: int = 6, n_near: int = 6,
                 n_contaminated: int = 6, easy_fraction: float = 0.3) -> tuple[list[dict], list[dict]]:
  rng = random.Random(seed)
  rows: list[dict[str, Any]] = []
  for domain, make in DOMAINS.items():
    for i in range(per_domain):
      hard = rng.random() >= easy_fraction
      q, a, steps = make(rng, hard)
      rows.append({"id": f"{domain}-{i}", "question": q, "answer": a, "thinking": _trace(steps, hard, rng),
                   "source": "builtin", "domain": domain, "difficulty": "hard" if hard else "easy",
                   "planted": "difficulty" if not hard else None})
  rng.shuffle(rows)
  clean = [r for r in rows if r["planted"] is None]
  defects = [
    lambda r: r | {"question": r["question"] + "\n[asy]\ndraw((0,0)--(1,1));\n[/asy]"},
    lambda r: r | {"question": r["question"] + " See the figure ![diagram](figures/fig3.png)."},
    lambda r: r | {"question": "(a) " + r["question"] + " (b) Explain why the answer is unique."},
    lambda r: r | {"answer": None},
    lambda r: r | {"question": "   "},
  ]
  fresh = [make(rng, True) + (d,) for d, make in ((d, DOMAINS[d]) for d in rng.choices(list(DOMAINS), k=n_quality))]
  for i, (q, a, steps, d) in enumerate(fresh):
    base = {"id": f"quality-{i}", "question": q, "answer": a, "thinking": _trace(steps, True, rng),
            "source": "builtin", "domain": d, "difficulty": "hard", "planted": "quality"}
    rows.append(defects[i % len(defects)](base))
  for i, r in enumerate(rng.sample(clean, n_exact)):
    rows.append(r | {"id": f"exact-{i}", "question": "  " + r["question"].upper().replace(" ", "  "),
                     "planted": "dedup"})
  for i, r in enumerate(rng.sample(clean, n_near)):
    rows.append(r | {"id": f"near-{i}", "question": r["question"] + " Explain briefly.", "planted": "dedup"})
  evals = builtin_eval(seed=seed + 1)
  for i, e in enumerate(rng.sample(evals, n_contaminated)):
    rows.append({"id": f"contam-{i}", "question": f"Problem {i + 1}. " + e["question"].upper(), "answer": e["answer"],
                 "thinking": "Compute it directly.\nThe result follows.", "source": "builtin",
                 "domain": "geometry", "difficulty": "hard", "planted": "decontam"})
  return rows, evals


def builtin_solver(rows: list[dict], k: int) -> list[list[str]]:
  """Stand-in reference model (see the module docstring): s1-format responses, k per row."""
  out = []
  for r in rows:
    wrong = [f"<|im_start|>think\nguess\n<|im_start|>answer\nAnswer: {r.get('answer')}1" for _ in range(k)]
    if r.get("difficulty") == "easy":
      wrong[-1] = f"<|im_start|>think\nsolve\n<|im_start|>answer\nAnswer: {r['answer']}"
    out.append(wrong)
  return out
