r"""Rewards (SPEC §4): extraction, math equivalence, rule-based rewards, registry, hostile inputs.

Expected values follow SPEC §4 and the recipes' definitions. One Grader (2 workers) is shared by
the module and installed as the default, so reward functions use it too.
"""

import os
import signal
import time

import pytest

from jaxreason import rewards as R
from jaxreason.rewards import math_equal

GRADER_TIMEOUT = 3.0  # the shared grader's per-item limit, used by the reward functions
LIMIT = 1.5  # per-item time limit used for hostile inputs (seconds)
SLACK = 1.0  # process round trips, a busy CI machine


@pytest.fixture(scope="module")
def grader():
  g = R.Grader(num_workers=2, timeout=GRADER_TIMEOUT)
  previous = R.set_default_grader(g)
  yield g
  R.set_default_grader(previous)
  g.close()


# ----------------------------------------------------------------------------------------------
# Extraction (no grader)


@pytest.mark.parametrize("text, expected", [
  (r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
  (r"\boxed{\frac{\sqrt{2}}{2}} done", r"\frac{\sqrt{2}}{2}"),  # nested braces
  (r"first \boxed{1}, then \boxed{2}", "2"),  # last one wins
  (r"\fbox{7}", "7"),
  (r"$\boxed 5$", "5"),
  (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not close the box
  (r"\boxed{}", ""),
  (r"\boxed{3", None),  # unclosed (truncated) last box
  ("no box here", None),
])
def test_last_boxed(text, expected):
  assert R.last_boxed(text) == expected


@pytest.mark.parametrize("mode, text, expected", [
  ("boxed", r"x \boxed{4} y", "4"),
  ("s1", "thinking...\nAnswer: 42", "42"),
  ("s1", "Answer: 1\nfinal answer : \\boxed{7}.", "7"),  # last match, case-insensitive, boxed content
  ("s1", "no marker", None),
  ("answer_is", "The answer is 42.", "42"),
  ("answer_is", "So the final answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
  ("answer_is", "the answer is 3.5. Then more text", "3.5"),
  ("last_number", "She has 1,234 apples.", "1234"),
  ("last_number", "It is -3.5 degrees", "-3.5"),
  ("last_number", "Total: $72.", "72"),
  ("last_number", "from 3-4", "4"),  # a hyphen after a digit is not a minus sign
  ("last_number", "no digits", None),
  ("gsm8k", "She sells 16 - 3 - 4 = 9 eggs... #### 72", "72"),
  ("gsm8k", "#### 1,000\n", "1000"),
  ("gsm8k", "so -5", "-5"),
  ("simplerl", "The answer is 4 but \\boxed{3}", "3"),  # boxed first
  ("simplerl", "The answer is 4. Then 5", "4"),  # then "the answer is"
  ("simplerl", "The final answer is 6", "6"),  # then "final answer is"
  ("simplerl", "so 7 and 8", "8"),  # then the last number
  ("simplerl", "nothing", None),
  ("r1_zero", "a </think> <answer> 5 </answer>", "5"),
  ("r1_zero", "<answer> no </answer> <answer> \\boxed{\\frac{1}{2}} </answer>", "\\frac{1}{2}"),
  ("r1_zero", "no tags", None),
])
def test_extract_answer(mode, text, expected):
  assert R.extract_answer(text, mode) == expected


def test_extract_unknown_mode():
  with pytest.raises(ValueError, match="simplerl"):
    R.extract_answer("x", "bogus")


def test_extract_megabyte_input_is_fast():
  text = ("1,2 \\boxed{" * 50_000) + "x" * 1_000_000 + "Answer: 9"
  t = time.monotonic()
  for mode in R.EXTRACT_MODES:
    R.extract_answer(text, mode)
  assert time.monotonic() - t < 2.0


# ----------------------------------------------------------------------------------------------
# Cheap checks (no grader)


@pytest.mark.parametrize("pred, gold, expected", [
  ("1,000", "1000", True),
  ("0.5", r"\frac{1}{2}", True),
  (r"\dfrac{3}{4}", "0.75", True),
  ("$72$", "72.", True),
  (r"\left( 1, 2 \right)", "(1,2)", True),
  ("3", "4", False),
  ("0.33", "1/3", False),
  ("", "1", False),
  ("x", "y", None),  # needs math-verify
  ("0.3333333", "1/3", None),  # decimals within 1e-6: math-verify rounds to 6 places
  ("1e999999999", "1", None),  # exponents are never expanded here
])
def test_quick_equal(pred, gold, expected):
  assert math_equal.quick_equal(pred, gold) is expected


# ----------------------------------------------------------------------------------------------
# math-verify equivalence


EQUIV_CASES = [
  (r"\frac{1}{2}", "0.5", True),
  (r"\boxed{\dfrac{3}{4}}", "0.75", True),
  ("1,000", "1000", True),
  ("x=2", "2", True),
  (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}", True),
  (r"2\sqrt{3}", r"\sqrt{12}", True),
  (r"\{1,2\}", r"\{2,1\}", True),
  ("(1, 2)", "(1,2)", True),
  (r"10^{3}", "1000", True),
  ("3", "4", False),
  ("0.33", r"\frac{1}{3}", False),
  (r"\pi", "3", False),
  (r"x^2", "y", False),
  ("", "1", False),
]


def test_is_equiv_table(grader):
  got = grader.grade_many([(p, g) for p, g, _ in EQUIV_CASES])
  assert got == [e for _, _, e in EQUIV_CASES]
  assert R.is_equiv(r"\frac{3}{6}", "0.5") is True  # through the shared default grader


def test_verify_response(grader):
  assert R.verify_response(r"Thus $x = \boxed{\dfrac{3}{4}}$.", "0.75") is True
  assert R.verify_response("We get 5.", "0.75") is False
  assert R.verify_response("", "0.75") is False


@pytest.mark.parametrize("bad", [None, 3, 2**100_000, b"\xff\xfe\x00", object()],
                         ids=["none", "int", "huge_int", "bytes", "object"])
def test_is_equiv_odd_types(grader, bad):
  assert R.is_equiv(bad, "4") is False
  assert R.is_equiv("4", bad) is False


# ----------------------------------------------------------------------------------------------
# Rule-based rewards


@pytest.mark.parametrize("response, gt, expected", [
  (r"so \boxed{0.5}", "0.5", 1.0),
  (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),  # equivalent form
  (r"\boxed{1} then \boxed{2}", "2", 1.0),  # last box
  (r"so \boxed{3}", "0.5", -0.5),  # wrong
  ("The answer is 0.5.", "0.5", -1.0),  # right but no "boxed" at all
  ("nothing useful", "0.5", -1.0),
  (r"\boxed{0.5", "0.5", 1.0),  # "boxed" appears; unclosed, so the last number is used
  (r"\boxed{0.5", "0.7", -0.5),
])
def test_simplerl_v0(grader, response, gt, expected):
  assert R.simplerl_v0(response, gt) == expected


@pytest.mark.parametrize("response, gt, expected", [
  (r"Thus $x = \boxed{\dfrac{3}{4}}$.", "0.75", 1.0),
  (r"the result is \boxed{1,000}", "1000", 1.0),
  ("The final answer is $x=2$", "2", 1.0),
  (r"so \boxed{5}", "0.75", 0.0),
  ("I do not know.", "0.75", 0.0),
])
def test_simplerl_v1(grader, response, gt, expected):
  assert R.simplerl_v1(response, gt) == expected


def _r1(f, a):
  return {"format_reward": float(f), "answer_reward": float(a), "reward": float(a)}


@pytest.mark.parametrize("response, gt, expected", [
  ("2+2 is 4 </think> <answer> 4 </answer>", "4", _r1(1, 1)),
  ("half </think> <answer> 0.5 </answer>", r"\frac{1}{2}", _r1(1, 1)),
  (r"x </think> <answer> \boxed{\frac{1}{2}} </answer>", "0.5", _r1(1, 1)),
  ("x </think> <answer> 5 </answer>", "4", _r1(1, 0)),
  (r"x </think> <answer> \boxed{4 </answer>", "4", _r1(1, 0)),  # boxed but unclosed
  ("x </think><answer> 4 </answer>", "4", _r1(0, 0)),  # no space: format invalid
  ("x </think> <answer> 4", "4", _r1(0, 0)),  # no closing tag
  ("4", "4", _r1(0, 0)),
  ("x </think> <answer> 3 </answer>", ["4", "3"], _r1(1, 1)),  # list of accepted answers
])
def test_r1_zero(grader, response, gt, expected):
  assert R.r1_zero(response, gt) == expected


@pytest.mark.parametrize("response, gt, expected", [
  ("<|im_start|>think\n...\n<|im_start|>answer\nAnswer: 0.5", r"\frac{1}{2}", 1.0),
  ("answer: 12", "12", 1.0),
  (r"Final Answer: $\boxed{7}$", "7", 1.0),
  ("Answer: 13", "12", 0.0),
  ("12", "12", 0.0),  # no "Answer:" marker
])
def test_s1_answer(grader, response, gt, expected):
  assert R.s1_answer(response, gt) == expected


@pytest.mark.parametrize("response, gt, expected", [
  ("She makes 9 * 2 = $18 every day.", "Janet sells 16 - 3 - 4 = 9 eggs...\n#### 18", 1.0),
  ("In total 1,234 apples", "1234", 1.0),
  ("The change is -5", "-5", 1.0),
  ("It costs $18.00.", "18", 1.0),
  ("18 then 20", "18", 0.0),  # the last number counts
  ("about 17", "#### 18", 0.0),
  ("no number", "18", 0.0),
])
def test_gsm8k(response, gt, expected):
  assert R.gsm8k(response, gt) == expected


@pytest.mark.parametrize("response, gt, expected", [
  (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
  (r"\boxed{1} \boxed{2}", "2", 1.0),
  (r"\boxed{1} \boxed{2}", "1", 0.0),
  ("The answer is 2", "2", 0.0),
])
def test_boxed(grader, response, gt, expected):
  assert R.boxed(response, gt) == expected


# ----------------------------------------------------------------------------------------------
# Registry


def test_registry_names_and_errors():
  assert {"simplerl_v0", "simplerl_v1", "r1_zero", "s1_answer", "gsm8k", "boxed"} <= set(R.registered_rewards())
  assert R.get_reward_fn("gsm8k") is R.gsm8k
  assert R.get_reward_fn("jaxreason.rewards.rules:gsm8k") is R.gsm8k
  with pytest.raises(ValueError, match=r"Did you mean 'r1_zero'.*gsm8k"):
    R.get_reward_fn("r1zero")
  with pytest.raises(ValueError, match="no attribute"):
    R.get_reward_fn("jaxreason.rewards.rules:nope")
  with pytest.raises(ValueError, match="already registered"):
    R.register_reward("gsm8k")(lambda r, g: 0.0)


def test_register_and_combine(grader):
  @R.register_reward("test_length_penalty")
  def length_penalty(response, ground_truth):
    return -0.01 * len(response)

  fn = R.combine({"gsm8k": 1.0, "test_length_penalty": 0.5, R.r1_zero: 2.0})
  out = fn("x </think> <answer> 18 </answer>", "18")
  resp_len = len("x </think> <answer> 18 </answer>")
  assert out["gsm8k"] == 1.0 and out["r1_zero"] == 1.0
  assert out["test_length_penalty"] == pytest.approx(-0.01 * resp_len)
  assert out["reward"] == pytest.approx(1.0 + 0.5 * -0.01 * resp_len + 2.0 * 1.0)
  assert R.reward_value(out) == out["reward"] and R.reward_value(0.5) == 0.5


def test_combine_with_grader(grader):
  out = R.combine({"r1_zero": 1.0, "gsm8k": 0.5})("x </think> <answer> 4 </answer>", "4")
  assert out == {"r1_zero": 1.0, "gsm8k": 1.0, "reward": 1.5}


def test_apply_reward_threads(grader):
  responses = [f"\\boxed{{{i}/2}}" for i in range(16)]
  gts = ["0.5" if i % 2 else "1" for i in range(16)]
  got = R.apply_reward("boxed", responses, gts, num_threads=4)
  assert got == [1.0 if i in (1, 2) else 0.0 for i in range(16)]


# ----------------------------------------------------------------------------------------------
# Hostile model output: False within the limit, never a hang, a raise, or a dead caller


HOSTILE = [
  "9^9^9^9^9",
  "10**10**10",
  r"\boxed{9^{9^{9^{9}}}}",
  r"\boxed{99999999999^{999999999}}",
  "\\frac{" * 5000,  # 30,000 chars: rejected by the length cap
  "\\frac{" * 1500,  # 9,000 chars: parsed, must fail fast
  "(" * 3000,
  "x" * 1_000_000,
  "1" * 2_000_000,
  b"\xff\xfe\x00\\boxed{4}".decode("utf-8", "surrogateescape"),
  "\ud800\x00\x00\\boxed{4}",
]


@pytest.mark.parametrize("pred", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_answer(grader, pred):
  t = time.monotonic()
  assert grader.grade_many([(pred, "3")], timeout=LIMIT) == [False]
  assert time.monotonic() - t < LIMIT + SLACK


@pytest.mark.parametrize("pred", [HOSTILE[1], HOSTILE[3], HOSTILE[8], "x = " + "1+" * 4000 + "1"], ids=range(4))
def test_hostile_full_response(grader, pred):
  t = time.monotonic()
  assert grader.grade_many([(pred, "3")], timeout=LIMIT, full_response=True) == [False]
  assert time.monotonic() - t < LIMIT + SLACK


def test_hostile_rewards(grader):
  for response in (r"\boxed{9^{9^{9^{9}}}}", "\\boxed{" + "\\frac{" * 1500 + "}", "x" * 1_000_000):
    t = time.monotonic()
    assert R.simplerl_v0(response, "3") in (-0.5, -1.0)
    assert R.r1_zero("a </think> <answer> " + response + " </answer>", "3")["reward"] == 0.0
    assert time.monotonic() - t < 2 * (GRADER_TIMEOUT + SLACK)


def test_hard_limit_kills_and_replaces_worker(grader, monkeypatch):
  # Push the worker's own timer past the limit so the caller must kill it (as for C code that
  # ignores signals); the next item must still be graded.
  monkeypatch.setattr(math_equal, "_SOFT_FRACTION", 10.0)
  before = grader.restarts
  t = time.monotonic()
  got = grader.grade_many([(r"\boxed{99999999999^{999999999}}", "1"), (r"\frac{\pi}{2}", r"\pi/2")], timeout=LIMIT)
  assert time.monotonic() - t < LIMIT + SLACK
  assert got == [False, True]
  assert grader.restarts == before + 1
  monkeypatch.undo()
  assert grader.grade_many([(r"\sqrt{4}", "2"), ("x+1", "1+x")]) == [True, True]


def test_dead_idle_worker_is_replaced(grader):
  grader.grade_many([("x+1", "1+x")])  # make sure workers are back in the pool
  for w in list(grader._idle):
    os.kill(w.proc.pid, signal.SIGKILL)
  time.sleep(0.1)
  assert grader.grade_many([(r"\sqrt{9}", "3"), ("y", "x")]) == [True, False]


def test_grader_still_works_after_hostile_inputs(grader):
  got = grader.grade_many([(p, g) for p, g, _ in EQUIV_CASES])
  assert got == [e for _, _, e in EQUIV_CASES]
