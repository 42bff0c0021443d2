"""Reward functions get the row's columns (TRL-style), the config picks the accuracy reward, and
every `algorithm:` the config accepts has a runner."""

import numpy as np
import pytest

from jaxreason import config
from jaxreason.algorithms.registry import ALGORITHMS
from jaxreason.rewards import apply_reward, call_reward, combine
from jaxreason.rollout import Completions, Question, Rewards
from jaxreason.sampling.sampler import SamplingOutput


def entry_score(response: str, ground_truth, entry) -> float:
  """A task scorer that needs the task's own entry (a dict), not just the answer."""
  return float(response == entry["target"])


def all_columns(response: str, ground_truth, **columns) -> dict:
  return {"reward": float(len(columns)), "answer_reward": float(ground_truth == columns.get("answer"))}


def test_call_reward_passes_the_columns_a_function_names():
  row = {"question": "q", "answer": "a", "entry": {"target": "yes"}, "level": 3}
  assert call_reward(entry_score, "yes", "a", row) == 1.0
  assert call_reward(entry_score, "no", "a", row) == 0.0
  assert call_reward(all_columns, "r", "a", row) == {"reward": 4.0, "answer_reward": 1.0}
  assert call_reward(lambda r, g: r == g, "a", "a", row) is True  # two arguments: no columns
  with pytest.raises(TypeError):
    call_reward(entry_score, "yes", "a", {"answer": "a"})  # the column is missing from the row
  assert apply_reward(entry_score, ["yes", "no"], ["a", "a"], rows=[row, row], num_threads=1) == [1.0, 0.0]
  both = combine({f"{__name__}:entry_score": 1.0, f"{__name__}:all_columns": 0.5})
  assert call_reward(both, "yes", "a", row)["reward"] == 1.0 + 0.5 * 4


def _completions(texts, rows):
  qs = [Question(id=i, text="Q", ids=(1,), answer=r["answer"], row=r) for i, r in enumerate(rows)]
  out = SamplingOutput(tokens=[[1]] * len(texts), logprobs=[], entropies=[], injected=[],
                       finish_reason=["stop"] * len(texts), thinking_tokens=np.zeros(len(texts)),
                       answer_tokens=np.zeros(len(texts)), waits=np.zeros(len(texts)),
                       forced_end=np.zeros(len(texts), bool), truncated=np.zeros(len(texts), bool),
                       prompt_index=np.arange(len(texts)))
  return Completions(qs, 1, out, texts, texts)


def test_rollout_rewards_see_rows_and_accuracy_follows_the_configured_reward():
  rows = [{"answer": "7", "entry": {"target": "yes"}}, {"answer": "8", "entry": {"target": "no"}}]
  c = _completions(["yes", "yes"], rows)
  scorer = f"{__name__}:entry_score"
  got = Rewards({scorer: 1.0}, "raw", accuracy=scorer)(c)
  np.testing.assert_array_equal(got[scorer], [1.0, 0.0])
  np.testing.assert_array_equal(got["correct"], [True, False])  # accuracy from the task's scorer
  default = Rewards({scorer: 1.0}, "raw")(c)  # the format's reward grades "yes" against 7 / 8: wrong
  np.testing.assert_array_equal(default["correct"], [False, False])
  cfg = config.load_config(None, ["output_dir=x", f"rollout.accuracy_reward={scorer}"])
  assert cfg.rollout.accuracy_reward == scorer


def test_every_configurable_algorithm_has_a_runner():
  assert set(ALGORITHMS) == set(config.ALGORITHMS)
