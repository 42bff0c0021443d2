"""Rewards and grading (SPEC §4): answer extraction, math equivalence, rule-based rewards, registry.

Pure Python (no JAX). Equivalence runs HuggingFace math-verify in worker processes with a hard
time limit per item; see `math_equal`.
"""

from jaxreason.rewards.extract import (
  EXTRACT_MODES,
  answer_colon,
  answer_is,
  extract_answer,
  gsm8k_answer,
  last_boxed,
  last_number,
  r1_zero_answer,
  simplerl_extract,
)
from jaxreason.rewards.math_equal import (
  MAX_ANSWER_CHARS,
  MAX_RESPONSE_CHARS,
  Grader,
  default_grader,
  is_equiv,
  set_default_grader,
  verify_response,
)
from jaxreason.rewards.registry import (
  RewardFn,
  RewardOutput,
  apply_reward,
  call_reward,
  combine,
  get_reward_fn,
  register_reward,
  registered_rewards,
  is_correct,
  reward_value,
)
from jaxreason.rewards.rules import boxed, gsm8k, r1_zero, s1_answer, simplerl_v0, simplerl_v1

__all__ = [
  "EXTRACT_MODES", "answer_colon", "answer_is", "extract_answer", "gsm8k_answer", "last_boxed",
  "last_number", "r1_zero_answer", "simplerl_extract",
  "MAX_ANSWER_CHARS", "MAX_RESPONSE_CHARS", "Grader", "default_grader", "is_equiv", "set_default_grader",
  "verify_response",
  "RewardFn", "RewardOutput", "apply_reward", "call_reward", "combine", "get_reward_fn", "register_reward",
  "registered_rewards", "reward_value", "is_correct",
  "boxed", "gsm8k", "r1_zero", "s1_answer", "simplerl_v0", "simplerl_v1",
]
