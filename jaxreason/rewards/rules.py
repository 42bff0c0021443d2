r"""Rule-based rewards (SPEC §4), registered by name. Each is `(response, ground_truth) -> float | dict`.

  simplerl_v0  SimpleRL-reason (Zeng et al. 2025), first release: +1 if the extracted answer
               (last boxed, "the answer is", "final answer is", last number) equals the ground
               truth, -0.5 if it does not, -1 if the response has no "boxed" at all.
  simplerl_v1  SimpleRL-Zoo (verl `math_verify` reward): 1 if math-verify finds the response's
               answer equal to `\boxed{ground_truth}`, else 0. No format term.
  r1_zero      DeepSeek-R1-Zero as in Stanford CS336 assignment 5 (`r1_zero_reward_fn`): the
               format is valid only if "</think> <answer>" and "</answer>" both appear; the answer
               is the text after the last "<answer>" (boxed content if boxed). Returns
               format_reward, answer_reward, reward in {(1,1,1), (1,0,0), (0,0,0)}.
  s1_answer    s1: answer read with `(?i)Answer\s*:\s*(.*)` (last match); 1 if equal, else 0.
  gsm8k        GSM8K: 1 if the last number of the response equals the reference number (the one
               after "####" when present), compared exactly as numbers (72.0 == 72), else 0.
  boxed        Qwen2.5-Math CoT: 1 if the last `\boxed{}` equals the ground truth, else 0.

Deviation: "equals" is decided by `math_equal` (cheap checks, then HuggingFace math-verify), not
by each recipe's own grader (SimpleRL and CS336 shipped their own sympy normalisers). A ground
truth may be a list of acceptable answers (any match counts), as CS336 allows.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from jaxreason.rewards.extract import answer_colon, gsm8k_answer, last_boxed, last_number, simplerl_extract
from jaxreason.rewards.math_equal import default_grader, parse_number, sanitize
from jaxreason.rewards.registry import register_reward

__all__ = ["simplerl_v0", "simplerl_v1", "r1_zero", "think_answer", "s1_answer", "gsm8k", "boxed", "equiv_any"]


def _golds(ground_truth: Any) -> list[str]:
  if isinstance(ground_truth, (list, tuple)):
    return [sanitize(g) for g in ground_truth]
  return [sanitize(ground_truth)]


def equiv_any(pred: str | None, ground_truth: Any, *, full_response: bool = False,
              timeout: float | None = None) -> bool:
  """Whether `pred` equals the ground truth (or any of a list of them), via the shared Grader.

  `timeout` defaults to the shared Grader's (5 s unless `set_default_grader` installed another).
  """
  if pred is None:
    return False
  golds = _golds(ground_truth)
  try:
    grades = default_grader().grade_many([(pred, g) for g in golds], timeout=timeout, full_response=full_response)
  except Exception:
    return False
  return any(grades)


@register_reward("simplerl_v0")
def simplerl_v0(response: str, ground_truth: Any) -> float:
  """SimpleRL-reason: +1 correct, -0.5 wrong, -1 if "boxed" never appears."""
  response = sanitize(response)
  if "boxed" not in response:
    return -1.0
  return 1.0 if equiv_any(simplerl_extract(response), ground_truth) else -0.5


@register_reward("simplerl_v1")
def simplerl_v1(response: str, ground_truth: Any) -> float:
  """SimpleRL-Zoo: 1 if math-verify says the response's answer equals the ground truth, else 0."""
  return 1.0 if equiv_any(sanitize(response), ground_truth, full_response=True) else 0.0


_R1_UNFORMATTED = {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
_R1_WRONG = {"format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0}
_R1_RIGHT = {"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0}


@register_reward("r1_zero")
def r1_zero(response: str, ground_truth: Any) -> dict[str, float]:
  """CS336 R1-Zero: strict "</think> <answer> ... </answer>" format, then answer equivalence."""
  response = sanitize(response)
  if "</think> <answer>" not in response or "</answer>" not in response:
    return dict(_R1_UNFORMATTED)
  return _grade_tagged_answer(response, ground_truth)


def _grade_tagged_answer(response: str, ground_truth: Any) -> dict[str, float]:
  """Text after the last `<answer>` without `</answer>` (boxed content if boxed), graded."""
  answer = response.split("<answer>")[-1].replace("</answer>", "")
  if "\\boxed" in answer:
    answer = last_boxed(answer)
    if answer is None:
      return dict(_R1_WRONG)
  return dict(_R1_RIGHT if equiv_any(answer.strip(), ground_truth) else _R1_WRONG)


@register_reward("s1_answer")
def s1_answer(response: str, ground_truth: Any) -> float:
  r"""s1: the answer after the last "Answer:" (`(?i)Answer\s*:\s*(.*)`), 1 if equal, else 0."""
  return 1.0 if equiv_any(answer_colon(sanitize(response)), ground_truth) else 0.0


def _as_fraction(s: str | None) -> Fraction | None:
  if s is None:
    return None
  parsed = parse_number(s)
  return parsed[0] if parsed is not None else None


@register_reward("gsm8k")
def gsm8k(response: str, ground_truth: Any) -> float:
  """GSM8K: 1 if the response's last number equals the reference number (no grader needed)."""
  pred = _as_fraction(last_number(sanitize(response)))
  if pred is None:
    return 0.0
  for gold in _golds(ground_truth):
    if pred == _as_fraction(gsm8k_answer(gold)):
      return 1.0
  return 0.0


@register_reward("boxed")
def boxed(response: str, ground_truth: Any) -> float:
  r"""Qwen2.5-Math CoT: 1 if the last `\boxed{}` content equals the ground truth, else 0."""
  return 1.0 if equiv_any(last_boxed(sanitize(response)), ground_truth) else 0.0


@register_reward("think_answer")
def think_answer(response: str, ground_truth: Any) -> dict[str, float]:
  """MiniMind think/answer tags: format valid if `</think>`, `<answer>`, `</answer>` appear in that
  order (any whitespace between them); the answer is read as in `r1_zero`."""
  response = sanitize(response)
  end, start = response.find("</think>"), response.rfind("<answer>")
  if end < 0 or start < end or response.find("</answer>", start) < 0:
    return dict(_R1_UNFORMATTED)
  return _grade_tagged_answer(response, ground_truth)
