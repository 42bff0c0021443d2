"""GRPO policy losses (DeepSeekMath GRPO as in TRL's GRPOTrainer; Dr.GRPO, DAPO, GSPO).

Everything is a pure float32 function of per-token log-probs; `grpo_micro_loss` adds the model
forward (logits divided by the sampling temperature, `ops.logprobs.token_logprobs`) for the one
train step (`train.step.make_train_step`). The CS336 assignment's exact-signature helpers are in
`jaxreason.algorithms.cs336`.
SPEC §5:
- Advantages per group (host-side numpy, like the overlong penalty and the dynamic-sampling filter): A_i = r_i - mean_group(r), divided by (std + eps) with the UNBIASED std of
  the group ("group"), of the whole batch ("batch"; the mean stays per group), or not ("none").
  eps = 1e-4 as in TRL (CS336's `advantage_eps` is the same knob).
- rho = exp(logp - logp_old) per token, or (GSPO, importance_sampling_level="sequence") one ratio
  per sequence exp(masked mean of (logp - logp_old)) applied to every token. Per-token loss
  -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * k3, k3 = exp(ref - logp) - (ref - logp) - 1.
- Aggregation: grpo = per-sequence token mean, then mean over sequences; bnpo = sum / tokens in the
  batch; dr_grpo = sum / (B * max_completion_length); dapo = sum / num_items_in_batch (the global
  completion-token count across devices and micro-batches; defaults to this batch's tokens).
Deviations from TRL: no gradient-accumulation division inside `policy_loss` (the step function
passes global normalisers instead); the clip fractions are always means over masked tokens, also
for GSPO, whose ratio is per sequence (TRL counts clipped sequences there; with equal-length
completions the two agree, otherwise ours weights long completions more); an optional entropy
bonus (-entropy_coef * entropy per token, aggregated exactly like the loss). TRL 1.16 has an
entropy term too, normalised differently, so the same coefficient is not the same strength there.
Division guards follow TRL: token counts are clamped to >= 1 (a fully masked row contributes 0),
whereas the CS336 helpers keep their exact unclamped semantics (0/0 gives NaN).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxreason.lora.adapters import merge as lora_merge
from jaxreason.ops.logprobs import token_logprobs
from jaxreason.train.step import make_train_step

sg = jax.lax.stop_gradient


# ----------------------------------------------------------------------------------------------
# Rewards -> advantages, masks, DAPO shaping.


def group_advantages(rewards: np.ndarray, group_size: int | None = None, *, scale_rewards: str = "group",
                     eps: float = 1e-4) -> np.ndarray:
  """Group-relative advantages, same shape as `rewards` ([B * G] flat, groups contiguous, or [B, G]).

  Host bookkeeping: numpy float32 in and out (rewards come from Python reward functions).
  """
  r = np.asarray(rewards, np.float32)
  shape = r.shape
  if r.ndim == 1:
    if group_size is None or r.shape[0] % group_size:
      raise ValueError(f"flat rewards of length {r.shape[0]} need a group_size that divides it, got {group_size}")
    r = r.reshape(-1, group_size)
  elif r.ndim != 2 or (group_size is not None and r.shape[1] != group_size):
    raise ValueError(f"rewards must be [B * G] or [B, G] with G = group_size; got shape {shape}, group_size={group_size}")
  adv = r - np.mean(r, axis=1, keepdims=True)  # [B, G]
  if scale_rewards == "group":
    adv = adv / (np.std(r, axis=1, ddof=1, keepdims=True) + np.float32(eps))
  elif scale_rewards == "batch":
    adv = adv / (np.std(r, ddof=1) + np.float32(eps))
  elif scale_rewards != "none":
    raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
  return adv.astype(np.float32).reshape(shape)


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


def dapo_overlong_penalty(lengths: np.ndarray, max_len: int, cache_len: int) -> np.ndarray:
  """DAPO soft overlong punishment: 0 up to max_len - cache_len, linear to -1 at max_len, -1 beyond (numpy)."""
  L = np.asarray(lengths, np.float32)
  soft = max_len - cache_len
  return np.where(L <= soft, 0.0, np.where(L <= max_len, (soft - L) / cache_len, -1.0)).astype(np.float32)


def dynamic_sampling_filter(rewards: np.ndarray) -> np.ndarray:
  """DAPO dynamic sampling: True for groups [B, G] whose rewards are not all equal (they carry signal; numpy)."""
  r = np.asarray(rewards)
  return np.any(r != r[:, :1], axis=1)


# ----------------------------------------------------------------------------------------------
# The policy loss (TRL GRPOTrainer semantics).


def policy_loss(logp: Float[Array, "B T"], old_logp: Float[Array, "B T"], advantages: Float[Array, "B"] | Float[Array, "B T"],
                mask: Float[Array, "B T"], *, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
                ref_logp: Float[Array, "B T"] | None = None, loss_type: str = "grpo",
                importance_sampling_level: str = "token", max_completion_length: int | None = None,
                num_items_in_batch: float | jax.Array | None = None, entropy: Float[Array, "B T"] | None = None,
                entropy_coef: float = 0.0, is_weights: Float[Array, "B T"] | None = None):
  """Clipped surrogate (+ k3 KL) loss of one batch of completions -> (loss, metrics).

  `advantages`: one per completion [B] (grpo, rloo) or one per token [B, T] (REINFORCE++, GAE;
  `algorithms.advantages`). `is_weights`: the sampler/trainer mismatch correction per token
  (`mismatch_weights`, detached), multiplying the clipped surrogate (not the KL or entropy terms).
  Gradients flow through `logp` (and `entropy` when entropy_coef != 0) only.
  """
  logp = logp.astype(jnp.float32)
  old_logp = sg(old_logp.astype(jnp.float32))
  adv = sg(jnp.asarray(advantages, jnp.float32))
  adv = adv[:, None] if adv.ndim == 1 else adv  # [B, 1] or [B, T]
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
  if is_weights is not None:
    per_token = per_token * sg(is_weights.astype(jnp.float32))

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
  adv = jnp.broadcast_to(adv, logp.shape)
  low = (rho_s < 1.0 - eps_low) & (adv < 0)
  high = (rho_s > 1.0 + eps_high) & (adv > 0)
  metrics["clip_frac_low"] = jnp.sum(low * m) / tokens
  metrics["clip_frac_high"] = jnp.sum(high * m) / tokens
  metrics["clip_frac"] = jnp.sum((low | high) * m) / tokens
  metrics["ratio_mean"] = jnp.sum(rho_s * m) / tokens
  return loss, metrics



# ----------------------------------------------------------------------------------------------
# Sampler/trainer mismatch correction (SPEC §9).

IS_CORRECTIONS = ("none", "tis", "mis")


def mismatch_weights(trainer_logp: Float[Array, "B T"], sampler_logp: Float[Array, "B T"], mask: Float[Array, "B T"],
                     kind: str, cap: float = 2.0):
  """Per-token weights w = exp(logp_trainer - logp_sampler) (detached) -> (weights, sums).

  tis: min(w, cap) (truncated IS); mis: w, and 0 where w > cap (the token is masked). `sums`
  (summed over the mask): token_mult_prob_error = exp(|logp_s - logp_t|) (NeMo-RL's gate, <= 1.05)
  and is_truncated (tokens with w > cap: truncated by tis, masked by mis), to be divided by the
  token count."""
  m = mask.astype(jnp.float32)
  d = sg(trainer_logp.astype(jnp.float32)) - sg(sampler_logp.astype(jnp.float32))
  w = jnp.exp(d)
  over = (w > cap).astype(jnp.float32)
  if kind == "tis":
    weights = jnp.minimum(w, cap)
  elif kind == "mis":
    weights = w * (1.0 - over)
  else:
    raise ValueError(f"is_correction must be one of {', '.join(IS_CORRECTIONS)}; got {kind!r}")
  sums = {"token_mult_prob_error": jnp.sum(jnp.exp(jnp.abs(d)) * m), "is_truncated_frac": jnp.sum(over * m),
          "is_weight_mean": jnp.sum(weights * m)}
  return weights * m, sums


# ----------------------------------------------------------------------------------------------
# The train step's loss: one micro-batch of completion rows against global normalisers.


def grpo_normalizers(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Counts over the whole optimizer batch ([N, T] rows): completion tokens and sequences."""
  return {"tokens": jnp.maximum(jnp.sum(batch["mask"]), 1.0),
          "sequences": jnp.maximum(jnp.sum(batch["valid"]), 1.0)}


def grpo_micro_loss(model, mb: dict[str, jax.Array], norms: dict[str, jax.Array], gcfg, *, temperature: float,
                    max_completion_length: int, on_policy: bool, chunk: int = 512):
  """One micro-batch's share of the optimizer batch's loss (summing micro-batches gives the loss).

  The aggregation is decided here, once, against the global normalisers: bnpo/dapo divide by the
  batch's completion tokens; grpo (per-sequence means) and dr_grpo (sum / (B * max_len)) are
  computed on the micro-batch and reweighted by B_micro / (the batch's sequences).
  Returns (loss, sums) where sums are token-weighted metric sums (divided by the batch's tokens
  after accumulation).
  """
  hidden, _ = model.hidden_states(mb["inputs"], mb["positions"], mb["segments"])
  logp, entropy = token_logprobs(hidden, model.unembedding(), mb["targets"], chunk=chunk, temperature=temperature,
                                 with_entropy=True)
  mask = mb["mask"]
  # The old policy's log-probs: the policy's own (detached) on-policy; with num_iterations > 1 the
  # trainer's at rollout time when they were scored ("trainer_logp", for the mismatch correction),
  # otherwise the sampler's.
  trainer = sg(logp) if on_policy else mb.get("trainer_logp", sg(logp))
  old = sg(logp) if on_policy else mb.get("trainer_logp", mb["old_logp"])
  b = mask.shape[0]
  kind = gcfg.loss_type
  correction = getattr(gcfg, "is_correction", "none")
  weights, is_sums = None, {}
  if correction != "none":  # SPEC §9: TIS / MIS against the sampler's log-probs
    weights, is_sums = mismatch_weights(trainer, mb["old_logp"], mask, correction, gcfg.is_cap)
  kwargs = dict(eps_low=gcfg.eps_low, eps_high=gcfg.eps_high, beta=gcfg.beta, ref_logp=mb.get("ref_logp"),
                importance_sampling_level=gcfg.importance_sampling_level, entropy=entropy,
                entropy_coef=gcfg.entropy_coef, is_weights=weights)
  if kind in ("bnpo", "dapo"):  # sum over the batch's tokens / its token count
    loss, m = policy_loss(logp, old, mb["adv"], mask, loss_type="dapo", num_items_in_batch=norms["tokens"], **kwargs)
  elif kind == "grpo":  # mean over this micro-batch's sequences, reweighted to the batch's
    loss, m = policy_loss(logp, old, mb["adv"], mask, loss_type="grpo", **kwargs)
    loss = loss * b / norms["sequences"]
  else:  # dr_grpo: sum / (B * max_completion_length)
    loss, m = policy_loss(logp, old, mb["adv"], mask, loss_type="dr_grpo",
                          max_completion_length=max_completion_length, **kwargs)
    loss = loss * b / norms["sequences"]
  tokens = jnp.sum(mask)
  sums = {k: v * jnp.maximum(tokens, 1.0) for k, v in m.items()}  # metrics are means over these tokens
  sums["sampler_logp_diff"] = jnp.sum(jnp.abs(trainer - mb["old_logp"]) * mask)
  # NeMo-RL's token_mult_prob_error (jaxreason.sampling.metrics): masked mean of exp(|logp_sampler -
  # logp_trainer|), against the weights of this update (the first update of a step: the rollout's)
  # or the trainer's log-probs scored at rollout time.
  sums["token_mult_prob_error"] = jnp.sum(jnp.exp(jnp.abs(trainer - mb["old_logp"])) * mask)
  sums.update({k: v for k, v in is_sums.items() if k != "token_mult_prob_error"})
  return loss, sums


def make_grpo_step(graphdef, tx, schedule, gcfg, *, temperature: float, max_completion_length: int):
  """`train.step.make_train_step` with the GRPO loss: step(state, batch [A, B, T]) -> (state, metrics)."""
  on_policy = gcfg.num_iterations == 1

  def loss_fn(params, mb, norms):
    return grpo_micro_loss(nnx.merge(graphdef, params), mb, norms, gcfg, temperature=temperature,
                           max_completion_length=max_completion_length, on_policy=on_policy)

  def metrics_fn(sums, norms, flat):
    return {**{k: v / norms["tokens"] for k, v in sums.items()}, "completion_tokens": jnp.sum(flat["mask"])}

  return make_train_step(tx, schedule, loss_fn, grpo_normalizers, metrics_fn)


def make_ref_scorer(graphdef, temperature: float, chunk: int = 512):
  """Jitted reference log-probs of rows [N, T] (no gradient), scored in micro-batches [A, B, T].

  `frozen` (LoRA): a base that `params` (adapters, or {} for the base itself) are merged into inside
  the jit, so no merged copy outlives the call."""

  @jax.jit
  def score(params, batch, frozen=None):
    if frozen is not None:
      params = lora_merge(frozen, params)

    def one(_, mb):
      model = nnx.merge(graphdef, params)
      hidden, _ = model.hidden_states(mb["inputs"], mb["positions"], mb["segments"])
      return None, token_logprobs(hidden, model.unembedding(), mb["targets"], chunk=chunk, temperature=temperature)
    return jax.lax.scan(one, None, batch)[1]

  return score
