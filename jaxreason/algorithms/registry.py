"""`algorithm:` -> the function that trains it. Each takes a TrainConfig and returns the run's result."""

from __future__ import annotations

from typing import Any, Callable

from jaxreason.algorithms.distill.run import run_distill
from jaxreason.algorithms.dpo.run import run_dpo
from jaxreason.algorithms.expert_iteration.run import run_expert_iteration
from jaxreason.algorithms.grpo.run import run_grpo
from jaxreason.algorithms.ppo.run import run_ppo
from jaxreason.algorithms.reward_model.run import run_reward_model
from jaxreason.algorithms.sft.run import run_sft

ALGORITHMS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "sft": run_sft,
    "pretrain": run_sft,  # next-token loss on every token (data format pretrain_text)
    "grpo": run_grpo,
    "ppo": run_ppo,
    "dpo": run_dpo,
    "reward_model": run_reward_model,
    "expert_iteration": run_expert_iteration,
    "distill": run_distill,
}


def run(cfg) -> dict[str, Any]:
  """Trains according to `cfg` (a TrainConfig) with its algorithm's runner; returns final metrics (and eval)."""
  return ALGORITHMS[cfg.algorithm](cfg)
