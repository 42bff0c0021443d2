"""Pairwise (Bradley-Terry) reward model loss, as in TRL's RewardTrainer (InstructGPT-style RM).

SPEC §6: a scalar head on the decoder's last non-pad hidden state; loss -logsigmoid(r_chosen -
r_rejected) averaged over pairs. Optional TRL `center_rewards_coefficient` term
coef * mean((r_chosen + r_rejected)^2) (off by default). No margin term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def last_token_index(mask: Int[Array, "B T"]) -> Int[Array, "B"]:
  """Index of each row's last non-pad position (mask or segment ids, > 0 = real token); 0 if none."""
  t = mask.shape[1]
  return jnp.max(jnp.where(mask > 0, jnp.arange(t)[None, :], 0), axis=1)


def reward_scores(hidden: Float[Array, "B T D"], head_w: Float[Array, "D"], head_b: Float[Array, ""],
                  mask: Int[Array, "B T"]) -> Float[Array, "B"]:
  """Scalar score of each row from its last non-pad hidden state (float32)."""
  idx = last_token_index(mask)  # [B]
  # [B, D]
  last = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
  w = jnp.asarray(head_w).reshape(-1)
  return jnp.einsum("BD,D->B", last, w.astype(last.dtype), preferred_element_type=jnp.float32) + \
      jnp.asarray(head_b, jnp.float32).reshape(())


def pairwise_loss(r_chosen: Float[Array, "B"], r_rejected: Float[Array, "B"], *, center_coef: float = 0.0):
  """mean(-logsigmoid(r_chosen - r_rejected)) -> (loss, metrics)."""
  rc, rr = jnp.asarray(r_chosen, jnp.float32), jnp.asarray(r_rejected, jnp.float32)
  loss = jnp.mean(-jax.nn.log_sigmoid(rc - rr))
  if center_coef:
    loss = loss + center_coef * jnp.mean((rc + rr) ** 2)
  metrics = {
      "accuracy": jnp.mean((rc > rr).astype(jnp.float32)),
      "reward_chosen": jnp.mean(rc),
      "reward_rejected": jnp.mean(rr),
      "margin": jnp.mean(rc - rr),
  }
  return loss, metrics
