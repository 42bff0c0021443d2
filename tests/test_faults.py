"""Fault injection (issue 16): adversarial grading, corrupt checkpoints, bad files, NaN, two runs.

Each case asserts the outcome a user sees: the exit code or exception, one clear line naming the
file / step / holder, and that the last good state is intact. Tiny models; a few minutes in all.
"""

import random
import threading
import time

import pytest

from jaxreason import rewards as R
from jaxreason.rewards import extract, math_equal

# ----------------------------------------------------------------------------------------------
# 5. Grading: linear-time extraction, a deadline for the whole call


@pytest.mark.parametrize("tail", ["", ",", "0", ",00", ".5"])
def test_extraction_is_linear_on_digit_groups(tail):
  # Today's regex rescans the run of groups from every group when it ends badly: ~10 s here.
  text = "1" + ",000" * 10_000 + tail
  t = time.monotonic()
  for mode in R.EXTRACT_MODES:
    R.extract_answer(text, mode)
    R.extract_answer("#### " + text, mode)
  assert time.monotonic() - t < 1.0


def test_extraction_scanner_equals_the_regex():
  # The linear scanner must find exactly the numbers the regex finds (random strings of number parts).
  rng = random.Random(0)
  alphabet = list("0123456789,,,.-a )_\u0663")
  for _ in range(20_000):
    s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    for _ in range(rng.randint(0, 2)):
      i = rng.randint(0, len(s))
      s = (s[:i] + rng.choice(["", "-", "1", "12", "1234"]) + ",000" * rng.randint(3, 6)
           + rng.choice(["", ",", "0", ".5", "a", ",00"]) + s[i:])
    assert list(extract._number_spans(s)) == [m.span() for m in extract._NUMBER.finditer(s)], s
  assert R.extract_answer("so 1" + ",000" * 5 + " apples", "last_number") == "1" + "000" * 5
  assert R.extract_answer("so 1" + ",000" * 5 + ",0 apples", "last_number") == "0"


def test_grading_call_deadline_covers_queueing(monkeypatch):
  # One worker, held by a slow item in another thread: a second call must not wait for it.
  with math_equal.Grader(num_workers=1, timeout=6.0) as g:
    assert g.grade_many([("x+1", "1+x")]) == [True]  # workers started
    monkeypatch.setattr(math_equal, "_SOFT_FRACTION", 10.0)  # the slow item runs to the hard limit
    slow = threading.Thread(target=g.grade_many, args=([(r"\boxed{99999999999^{999999999}}", "1")],))
    slow.start()
    time.sleep(0.3)
    t = time.monotonic()
    assert g.grade_many([("y+1", "1+y")], call_timeout=0.5) == [False]
    assert time.monotonic() - t < 1.5
    slow.join()
