"""GRPO policy losses (DeepSeekMath GRPO as in TRL's GRPOTrainer; Dr.GRPO, DAPO, GSPO; CS336 helpers).

Everything is a pure float32 function of per-token log-probs; the model forward (with logits
divided by the sampling temperature, `ops.logprobs.token_logprobs`) and the jit live elsewhere.
SPEC §5:
- Advantages per group: A_i = r_i - mean_group(r), divided by (std + eps) with the UNBIASED std of
  the group ("group"), of the whole batch ("batch"; the mean stays per group), or not ("none").
  eps = 1e-4 as in TRL (CS336's `advantage_eps` is the same knob).
- rho = exp(logp - logp_old) per token, or (GSPO, importance_sampling_level="sequence") one ratio
  per sequence exp(masked mean of (logp - logp_old)) applied to every token. Per-token loss
  -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * k3, k3 = exp(ref - logp) - (ref - logp) - 1.
- Aggregation: grpo = per-sequence token mean, then mean over sequences; bnpo = sum / tokens in the
  batch; dr_grpo = sum / (B * max_completion_length); dapo = sum / num_items_in_batch (the global
  completion-token count across devices and micro-batches; defaults to this batch's tokens).
Deviations from TRL: no gradient-accumulation division inside `policy_loss` (the step function
passes global normalisers instead); the clip fraction is always a mean over masked tokens (TRL
averages over sequences for GSPO, whose ratio is per sequence); an optional entropy bonus
(-entropy_coef * entropy per token, aggregated like the loss) that TRL does not have.
Division guards follow TRL: token counts are clamped to >= 1 (a fully masked row contributes 0),
whereas the CS336 helpers keep their exact unclamped semantics (0/0 gives NaN).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

sg = jax.lax.stop_gradient


# ----------------------------------------------------------------------------------------------
# Rewards -> advantages, masks, DAPO shaping.


def group_advantages(rewards: Float[Array, "N"] | Float[Array, "B G"], group_size: int | None = None, *,
                     scale_rewards: str = "group", eps: float = 1e-4) -> jax.Array:
  """Group-relative advantages, same shape as `rewards` ([B * G] flat, groups contiguous, or [B, G])."""
  r = jnp.asarray(rewards, jnp.float32)
  shape = r.shape
  if r.ndim == 1:
    if group_size is None or r.shape[0] % group_size:
      raise ValueError(f"flat rewards of length {r.shape[0]} need a group_size that divides it, got {group_size}")
    r = r.reshape(-1, group_size)
  elif r.ndim != 2 or (group_size is not None and r.shape[1] != group_size):
    raise ValueError(f"rewards must be [B * G] or [B, G] with G = group_size; got shape {shape}, group_size={group_size}")
  adv = r - jnp.mean(r, axis=1, keepdims=True)  # [B, G]
  if scale_rewards == "group":
    adv = adv / (jnp.std(r, axis=1, ddof=1, keepdims=True) + eps)
  elif scale_rewards == "batch":
    adv = adv / (jnp.std(r, ddof=1) + eps)
  elif scale_rewards != "none":
    raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
  return adv.reshape(shape)


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


def completion_mask(tokens: Int[Array, "B T"], end_ids: int | Sequence[int], lengths: Int[Array, "B"] | None = None,
                    *, mask_truncated_completions: bool = False) -> Float[Array, "B T"]:
  """1.0 up to and including the first end token (or up to `lengths` when a row never ends).

  With `mask_truncated_completions`, rows that never produced an end token are zeroed entirely.
  """
  b, t = tokens.shape
  pos = jnp.arange(t)[None, :]  # [1, T]
  valid = pos < (t if lengths is None else jnp.asarray(lengths)[:, None])  # [B, T]
  is_end = jnp.isin(tokens, jnp.asarray(end_ids).reshape(-1)) & valid
  ended = jnp.any(is_end, axis=1)  # [B]
  first_end = jnp.where(ended, jnp.argmax(is_end, axis=1), t)  # [B]
  mask = (pos <= first_end[:, None]) & valid
  if mask_truncated_completions:
    mask = mask & ended[:, None]
  return mask.astype(jnp.float32)


def dapo_overlong_penalty(lengths: Int[Array, "N"], max_len: int, cache_len: int) -> Float[Array, "N"]:
  """DAPO soft overlong punishment: 0 up to max_len - cache_len, linear to -1 at max_len, -1 beyond."""
  L = jnp.asarray(lengths, jnp.float32)
  soft = max_len - cache_len
  return jnp.where(L <= soft, 0.0, jnp.where(L <= max_len, (soft - L) / cache_len, -1.0))


def dynamic_sampling_filter(rewards: Float[Array, "B G"]) -> Bool[Array, "B"]:
  """DAPO dynamic sampling: True for groups whose rewards are not all equal (they carry signal)."""
  r = jnp.asarray(rewards)
  return jnp.any(r != r[:, :1], axis=1)


# ----------------------------------------------------------------------------------------------
# The policy loss (TRL GRPOTrainer semantics).


def policy_loss(logp: Float[Array, "B T"], old_logp: Float[Array, "B T"], advantages: Float[Array, "B"],
                mask: Float[Array, "B T"], *, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
                ref_logp: Float[Array, "B T"] | None = None, loss_type: str = "grpo",
                importance_sampling_level: str = "token", max_completion_length: int | None = None,
                num_items_in_batch: float | jax.Array | None = None, entropy: Float[Array, "B T"] | None = None,
                entropy_coef: float = 0.0):
  """Clipped surrogate (+ k3 KL) loss of one batch of completions -> (loss, metrics).

  Gradients flow through `logp` (and `entropy` when entropy_coef != 0) only.
  """
  logp = logp.astype(jnp.float32)
  old_logp = sg(old_logp.astype(jnp.float32))
  adv = sg(jnp.asarray(advantages, jnp.float32))[:, None]  # [B, 1]
  m = mask.astype(jnp.float32)
  tokens_per_seq = jnp.maximum(jnp.sum(m, axis=1), 1.0)  # [B]
  tokens = jnp.maximum(jnp.sum(m), 1.0)

  log_ratio = logp - old_logp  # [B, T]
  if importance_sampling_level == "token":
    log_w = log_ratio
  elif importance_sampling_level == "sequence":
    log_w = (jnp.sum(log_ratio * m, axis=1) / tokens_per_seq)[:, None]  # [B, 1]
  else:
    raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
  rho = jnp.broadcast_to(jnp.exp(log_w), logp.shape)  # [B, T]
  rho_clip = jnp.clip(rho, 1.0 - eps_low, 1.0 + eps_high)
  per_token = -jnp.minimum(rho * adv, rho_clip * adv)  # [B, T]

  metrics = {}
  if beta != 0.0:
    if ref_logp is None:
      raise ValueError("beta != 0 needs ref_logp (the reference model's log-probs); set beta=0 to train without one")
    d = sg(ref_logp.astype(jnp.float32)) - logp
    k3 = jnp.exp(d) - d - 1.0
    per_token = per_token + beta * k3
    metrics["kl"] = jnp.sum(k3 * m) / tokens
  if entropy is not None:
    ent = entropy.astype(jnp.float32)
    metrics["entropy"] = jnp.sum(sg(ent) * m) / tokens
    if entropy_coef != 0.0:
      per_token = per_token - entropy_coef * ent

  masked = per_token * m
  if loss_type == "grpo":
    loss = jnp.mean(jnp.sum(masked, axis=1) / tokens_per_seq)
  elif loss_type == "bnpo":
    loss = jnp.sum(masked) / tokens
  elif loss_type == "dr_grpo":
    length = logp.shape[1] if max_completion_length is None else max_completion_length
    loss = jnp.sum(masked) / (logp.shape[0] * length)
  elif loss_type == "dapo":
    norm = tokens if num_items_in_batch is None else jnp.asarray(num_items_in_batch, jnp.float32)
    loss = jnp.sum(masked) / norm
  else:
    raise ValueError(f"loss_type must be 'grpo', 'bnpo', 'dr_grpo' or 'dapo', got {loss_type!r}")

  rho_s = sg(rho)
  low = (rho_s < 1.0 - eps_low) & (adv < 0)
  high = (rho_s > 1.0 + eps_high) & (adv > 0)
  metrics["clip_frac_low"] = jnp.sum(low * m) / tokens
  metrics["clip_frac_high"] = jnp.sum(high * m) / tokens
  metrics["clip_frac"] = jnp.sum((low | high) * m) / tokens
  metrics["ratio_mean"] = jnp.sum(rho_s * m) / tokens
  return loss, metrics


# ----------------------------------------------------------------------------------------------
# CS336 assignment 5 helpers, exact semantics (no clamping: 0/0 gives NaN).


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
