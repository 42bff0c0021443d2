"""The `expert_iteration:` config section."""

from __future__ import annotations

import dataclasses

from jaxreason.yamlconfig import positive

@dataclasses.dataclass(frozen=True)
class ExpertIterationConfig:
  """CS336 expert iteration: sample `rollout.num_generations` per question, keep the verified correct, SFT, repeat."""

  rounds: int = 3  # R
  questions_per_round: int = 512  # questions sampled each round
  epochs_per_round: int = 1  # SFT passes over the kept completions
  reward: str | None = None  # verifier; null: the rollout format's reward

  def __post_init__(self):
    positive(self, "rounds", "questions_per_round", "epochs_per_round")
