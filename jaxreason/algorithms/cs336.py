"""CS336 assignment 5 adapters: the assignment's exact function signatures and semantics.

A second public surface beside the library's losses (`algorithms.grpo.loss`, `algorithms.sft.loss`):
these keep the assignment's unclamped semantics (0/0 gives NaN) and its `grad_accum_steps`
division inside the loss, where the library's step passes global normalisers instead.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxreason.algorithms.grpo.loss import group_advantages


def compute_group_normalized_rewards(reward_fn: Callable[[str, str], dict], rollout_responses: Sequence[str],
                                     repeated_ground_truths: Sequence[str], group_size: int,
                                     advantage_eps: float, normalize_by_std: bool):
  """CS336's signature: rewards from reward_fn(response, truth)["reward"], then group advantages.

  Returns (advantages [N], raw_rewards [N], metadata).
  """
  raw = jnp.asarray([float(reward_fn(r, t)["reward"]) for r, t in zip(rollout_responses, repeated_ground_truths)],
                    jnp.float32)
  adv = group_advantages(raw, group_size, scale_rewards="group" if normalize_by_std else "none", eps=advantage_eps)
  meta = {"reward_mean": jnp.mean(raw), "reward_std": jnp.std(raw), "reward_max": jnp.max(raw),
          "reward_min": jnp.min(raw)}
  return adv, raw, meta


def masked_mean(x: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
  m = mask.astype(jnp.float32)
  return jnp.sum(x * m, axis=axis) / jnp.sum(m, axis=axis)


def masked_normalize(x: jax.Array, mask: jax.Array, normalize_constant: float, axis: int | None = None) -> jax.Array:
  return jnp.sum(x * mask.astype(jnp.float32), axis=axis) / normalize_constant


def sft_microbatch_loss(policy_logp: Float[Array, "B T"], response_mask: Float[Array, "B T"],
                        grad_accum_steps: int, normalize_constant: float = 1.0):
  """-mean_b(sum_t logp * m / c) / grad_accum -> (loss, metadata)."""
  per_seq = masked_normalize(policy_logp, response_mask, normalize_constant, axis=-1)  # [B]
  loss = -jnp.mean(per_seq) / grad_accum_steps
  return loss, {"nll": -jnp.mean(per_seq), "response_tokens": jnp.sum(response_mask)}


def compute_naive_policy_gradient_loss(raw_rewards_or_advantages: Float[Array, "B 1"],
                                       policy_logp: Float[Array, "B T"]) -> Float[Array, "B T"]:
  return -raw_rewards_or_advantages * policy_logp


def compute_grpo_clip_loss(advantages: Float[Array, "B 1"], policy_logp: Float[Array, "B T"],
                           old_logp: Float[Array, "B T"], cliprange: float):
  """Per-token -min(rho A, clip(rho, 1 - c, 1 + c) A) -> (loss [B, T], metadata)."""
  ratio = jnp.exp(policy_logp - old_logp)
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange) * advantages
  loss = -jnp.minimum(unclipped, clipped)
  return loss, {"ratio": ratio, "clipped": clipped < unclipped}


def compute_policy_gradient_loss(policy_logp: Float[Array, "B T"], loss_type: str,
                                 raw_rewards: Float[Array, "B 1"] | None = None,
                                 advantages: Float[Array, "B 1"] | None = None,
                                 old_logp: Float[Array, "B T"] | None = None, cliprange: float | None = None):
  """loss_type: no_baseline (-r logp), reinforce_with_baseline (-A logp), grpo_clip -> (loss [B, T], metadata)."""
  if loss_type == "no_baseline":
    if raw_rewards is None:
      raise ValueError("loss_type 'no_baseline' needs raw_rewards [B, 1]")
    return compute_naive_policy_gradient_loss(raw_rewards, policy_logp), {}
  if loss_type == "reinforce_with_baseline":
    if advantages is None:
      raise ValueError("loss_type 'reinforce_with_baseline' needs advantages [B, 1]")
    return compute_naive_policy_gradient_loss(advantages, policy_logp), {}
  if loss_type == "grpo_clip":
    if advantages is None or old_logp is None or cliprange is None:
      raise ValueError("loss_type 'grpo_clip' needs advantages [B, 1], old_logp [B, T] and cliprange")
    return compute_grpo_clip_loss(advantages, policy_logp, old_logp, cliprange)
  raise ValueError(f"loss_type must be 'no_baseline', 'reinforce_with_baseline' or 'grpo_clip', got {loss_type!r}")


def grpo_microbatch_loss(policy_logp: Float[Array, "B T"], response_mask: Float[Array, "B T"],
                         grad_accum_steps: int, loss_type: str, raw_rewards=None, advantages=None,
                         old_logp=None, cliprange=None):
  """mean_b(masked_mean(loss, m, -1)) / grad_accum -> (loss, metadata); the caller takes the gradient."""
  per_token, meta = compute_policy_gradient_loss(policy_logp, loss_type, raw_rewards, advantages, old_logp, cliprange)
  loss = jnp.mean(masked_mean(per_token, response_mask, axis=-1)) / grad_accum_steps
  return loss, meta
