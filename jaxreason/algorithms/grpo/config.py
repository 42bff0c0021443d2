"""The `grpo:` config section."""

from __future__ import annotations

import dataclasses

from jaxreason.yamlconfig import choice, positive, require

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")  # gae: algorithm ppo
IS_CORRECTIONS = ("none", "tis", "mis")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """GRPO and its variants (SPEC §5). `train.global_batch_size` counts completions per optimizer step."""

  rewards: dict[str, float] = dataclasses.field(default_factory=dict)  # name -> weight; {}: the format's reward
  scale_rewards: str = "group"  # advantage scaling: group | batch | none (Dr.GRPO)
  loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
  importance_sampling_level: str = "token"  # token (GRPO) | sequence (GSPO)
  eps_low: float = 0.2  # clip range below 1
  eps_high: float = 0.2  # clip range above 1 (DAPO clip-higher: 0.28)
  beta: float = 0.0  # k3 KL to the frozen initial policy; 0: no reference model is kept
  entropy_coef: float = 0.0  # entropy bonus
  num_iterations: int = 1  # mu: passes over each rollout batch (old log-probs from the sampler)
  mask_truncated_completions: bool = False  # completions that never ended get no loss
  dynamic_sampling: bool = False  # DAPO: drop groups with equal rewards and refill with new ones
  max_refills: int = 4  # dynamic sampling: extra rollout rounds per step before training on what is there
  overlong_buffer: int | None = None  # DAPO overlong shaping: penalise length past max_new_tokens - buffer
  overlong_penalty: float = 1.0  # penalty at max_new_tokens (scaled linearly inside the buffer)
  advantage_eps: float = 1e-4
  # SPEC §9 (jaxreason.algorithms.advantages): grpo | rloo | reinforce_pp | reinforce_pp_baseline
  advantage_estimator: str = "grpo"
  reward_kl_coef: float = 0.0  # REINFORCE++: k1 KL to the reference in the token rewards (needs the reference)
  gamma: float = 1.0  # REINFORCE++: discount of the token rewards
  # Sampler/trainer mismatch correction (SPEC §9): none | tis (weights capped at is_cap) | mis (masked above it)
  is_correction: str = "none"
  is_cap: float = 2.0
  log_samples_every: int = 10  # steps between logging sample generations (0: never)

  def __post_init__(self):
    choice(self, "scale_rewards", SCALE_REWARDS)
    choice(self, "loss_type", GRPO_LOSS_TYPES)
    choice(self, "importance_sampling_level", IS_LEVELS)
    require(self.advantage_estimator != "gae", "advantage_estimator",
            "gae needs a critic: use `algorithm: ppo` (its `ppo:` section) instead")
    choice(self, "advantage_estimator", ADVANTAGE_ESTIMATORS)
    choice(self, "is_correction", IS_CORRECTIONS)
    positive(self, "is_cap")
    require(0 < self.gamma <= 1, "gamma", f"must be in (0, 1]; got {self.gamma}")
    require(self.reward_kl_coef >= 0, "reward_kl_coef", f"must be >= 0; got {self.reward_kl_coef}")
    for name in ("eps_low", "eps_high", "beta", "entropy_coef", "overlong_penalty"):
      require(getattr(self, name) >= 0, name, f"must be >= 0; got {getattr(self, name)}")
    require(self.eps_low < 1, "eps_low", f"must be < 1; got {self.eps_low}")
    positive(self, "num_iterations", "advantage_eps")
    positive(self, "overlong_buffer", optional=True)
    require(self.max_refills >= 0, "max_refills", f"must be >= 0; got {self.max_refills}")
    require(self.log_samples_every >= 0, "log_samples_every", f"must be >= 0; got {self.log_samples_every}")
    for name, w in self.rewards.items():
      require(bool(name), "rewards", "keys must be reward names (see jaxreason.rewards) or module:function")
