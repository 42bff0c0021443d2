"""Rollout metrics the leading RL frameworks log (NeMo-RL, verl, slime).

`Sampler.generate(...).metrics` holds the engine counters (slot occupancy, padding waste,
tokens/s); this module holds the sampler-vs-trainer agreement.
"""

from __future__ import annotations

import numpy as np


def token_mult_prob_error(logp_sampler, logp_trainer, mask):
  """NeMo-RL's `token_mult_prob_error`: masked mean over tokens of exp(|logp_sampler - logp_trainer|).

  1.0 when the sampler and the trainer agree exactly; NeMo-RL gates on <= 1.05. Inputs [B, T]
  (numpy or jax arrays; the result has the input's array type), mask 1 on completion tokens.
  GRPO: logp_sampler = the rollout's `old_logp`, logp_trainer = the policy's log-probs of the same
  tokens before the first update.
  """
  xp = np if isinstance(logp_sampler, np.ndarray) else __import__("jax").numpy
  m = xp.asarray(mask).astype(xp.float32)
  err = xp.exp(xp.abs(xp.asarray(logp_sampler, xp.float32) - xp.asarray(logp_trainer, xp.float32)))
  return xp.sum(err * m) / xp.maximum(xp.sum(m), 1.0)
