"""The `ppo:` config section (SPEC §9). `train.global_batch_size` counts completions per mini-batch."""

from __future__ import annotations

import dataclasses

from jaxreason.yamlconfig import choice, positive, require

PPO_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
IS_CORRECTIONS = ("none", "tis", "mis")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """PPO with a critic: k1 KL in the reward, GAE, whitened advantages, clipped policy and value losses.

  The rollout settings (`rollout:` section; num_generations may be 1) and the reward fields below
  (rewards, overlong shaping) mean what they mean for GRPO."""

  rewards: dict[str, float] = dataclasses.field(default_factory=dict)  # name -> weight; reward_model:RUN too
  beta: float = 0.05  # k1 KL to the frozen initial policy in the per-token reward; 0: no reference kept
  gamma: float = 1.0
  lam: float = 0.95  # GAE lambda
  whiten_advantages: bool = True  # over the rollout batch's completion tokens
  eps_low: float = 0.2
  eps_high: float = 0.2
  cliprange_value: float = 0.2  # eps_v
  vf_coef: float = 0.1  # TRL's default
  entropy_coef: float = 0.0
  ppo_epochs: int = 1  # passes over each rollout batch (mini-batches of train.global_batch_size)
  # The critic: "policy" (the initial policy's decoder + a new value head) or reward_model:RUN (the
  # reward model's decoder, its score head as the value head).
  critic_init: str = "policy"
  critic_lr: float | None = None  # null: optimizer.lr
  # gae (needs the critic) or a critic-free estimator (the critic is then still trained, not used).
  advantage_estimator: str = "gae"
  is_correction: str = "none"  # sampler/trainer mismatch: none | tis | mis (SPEC §9)
  is_cap: float = 2.0
  mask_truncated_completions: bool = False
  overlong_buffer: int | None = None
  overlong_penalty: float = 1.0
  log_samples_every: int = 10
  # Read by the shared rollout code (GRPO's): fixed for PPO.
  dynamic_sampling: bool = False
  max_refills: int = 0
  scale_rewards: str = "group"  # only for advantage_estimator grpo
  advantage_eps: float = 1e-4

  def __post_init__(self):
    choice(self, "advantage_estimator", PPO_ESTIMATORS)
    choice(self, "is_correction", IS_CORRECTIONS)
    for name in ("beta", "eps_low", "eps_high", "cliprange_value", "vf_coef", "entropy_coef", "overlong_penalty"):
      require(getattr(self, name) >= 0, name, f"must be >= 0; got {getattr(self, name)}")
    require(self.eps_low < 1, "eps_low", f"must be < 1; got {self.eps_low}")
    require(0 < self.gamma <= 1, "gamma", f"must be in (0, 1]; got {self.gamma}")
    require(0 <= self.lam <= 1, "lam", f"must be in [0, 1]; got {self.lam}")
    positive(self, "ppo_epochs", "is_cap", "advantage_eps")
    positive(self, "critic_lr", "overlong_buffer", optional=True)
    require(self.critic_init == "policy" or self.critic_init.startswith("reward_model:"), "critic_init",
            f"must be 'policy' or 'reward_model:RUN' (a trained reward model's run directory); got {self.critic_init!r}")
    require(not self.dynamic_sampling, "dynamic_sampling", "is not supported by PPO (each completion is scored alone)")
    require(self.log_samples_every >= 0, "log_samples_every", f"must be >= 0; got {self.log_samples_every}")
