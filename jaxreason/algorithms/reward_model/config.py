"""The `reward_model:` config section."""

from __future__ import annotations

import dataclasses

from jaxreason.yamlconfig import require

@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
  """Pairwise (Bradley-Terry) reward model on the decoder. Data: prompt/chosen/rejected rows."""

  center_coef: float = 0.0  # TRL's center_rewards_coefficient

  def __post_init__(self):
    require(self.center_coef >= 0, "center_coef", f"must be >= 0; got {self.center_coef}")
