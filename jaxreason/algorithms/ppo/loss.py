"""PPO with a critic (SPEC §9; InstructGPT / OpenRLHF / TRL PPOTrainer): the value head, the
clipped value loss and the joint policy + critic train step.

The critic is a decoder with VALUE_HEAD, a linear layer on the final-normed hidden state of every
position (HF's `score` layer applied per token, with a bias): V at index t is the value of the
state whose next token is `targets[t]`, aligned with the log-prob of that token and the
completion mask. Its parameters are `{**decoder, VALUE_HEAD: {"kernel": [D, 1], "bias": []}}`.

One optimizer step updates both models from one loss, loss = policy + vf_coef * value, over the
joint parameters {"policy": ..., "critic": ...}; they share nothing, so each gets exactly its own
term's gradient, and `split_tx` gives each its own optimizer (own clipping, own lr).
- Policy: the clipped surrogate of `algorithms.grpo.loss.policy_loss` with per-token (GAE)
  advantages, token-mean aggregation over the optimizer batch (sum / the batch's completion
  tokens, across micro-batches), optional entropy bonus and TIS/MIS mismatch weights.
- Value: 0.5 * max((V - G)^2, (clip(V, V_old - eps_v, V_old + eps_v) - G)^2), masked token mean
  (same normaliser).
- Rows marked `fresh` (the first mini-batch of the first epoch: the weights that scored the
  rollout) use the models' own detached log-probs and values as the old ones, so the ratio is
  exactly 1 and no value is clipped there (the stored ones equal them up to rounding).
- LoRA (`lora:`): params["policy"] is the adapter tree and `TrainState.frozen` the policy's base;
  the step merges the policy only (`merge_policy`), the critic trains in full.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float

from jaxreason.algorithms.grpo.loss import mismatch_weights, policy_loss
from jaxreason.lora.adapters import merge as lora_merge
from jaxreason.ops.logprobs import token_logprobs
from jaxreason.train.step import make_train_step

sg = jax.lax.stop_gradient
VALUE_HEAD = "value_head"


def init_value_head(hidden_size: int, std: float, seed: int, dtype=jnp.float32) -> dict:
  kernel = std * jax.random.normal(jax.random.key(seed), (hidden_size, 1), dtype)
  return {"kernel": kernel, "bias": jnp.zeros((), dtype)}


def token_values(graphdef, params: dict, mb: dict[str, jax.Array]) -> Float[Array, "B T"]:
  """The critic's value at every position of rows [B, T] (float32)."""
  model = nnx.merge(graphdef, {k: v for k, v in params.items() if k != VALUE_HEAD})
  hidden, _ = model.hidden_states(mb["inputs"], mb["positions"], mb["segments"])
  head = params[VALUE_HEAD]
  w = jnp.asarray(head["kernel"]).reshape(-1).astype(hidden.dtype)
  # [B, T, D] x [D] -> [B, T]
  return jnp.einsum("BTD,D->BT", hidden, w, preferred_element_type=jnp.float32) + \
      jnp.asarray(head["bias"], jnp.float32).reshape(())


def value_loss(values: Float[Array, "B T"], old_values: Float[Array, "B T"], returns: Float[Array, "B T"],
               mask: Float[Array, "B T"], clip: float, normalizer: jax.Array | float | None = None):
  """Clipped value loss, masked token mean (sum / normalizer; default this batch's tokens) -> (loss, metrics)."""
  v = values.astype(jnp.float32)
  v_old, g = sg(old_values.astype(jnp.float32)), sg(returns.astype(jnp.float32))
  m = mask.astype(jnp.float32)
  v_clip = jnp.clip(v, v_old - clip, v_old + clip)
  a, b = (v - g) ** 2, (v_clip - g) ** 2
  per = 0.5 * jnp.maximum(a, b)
  tokens = jnp.maximum(jnp.sum(m), 1.0)
  norm = tokens if normalizer is None else normalizer
  metrics = {"value_clip_frac": jnp.sum((b > a) * m) / tokens, "value_mean": jnp.sum(sg(v) * m) / tokens}
  return jnp.sum(per * m) / norm, metrics


def split_tx(txs: dict[str, optax.GradientTransformation]) -> optax.GradientTransformation:
  """One optimizer per top-level key of the parameters (here policy, critic)."""
  def init(params):
    return {k: tx.init(params[k]) for k, tx in txs.items()}

  def update(grads, state, params=None):
    out, new = {}, {}
    for k, tx in txs.items():
      out[k], new[k] = tx.update(grads[k], state[k], None if params is None else params[k])
    return out, new

  return optax.GradientTransformation(init, update)


def ppo_normalizers(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {"tokens": jnp.maximum(jnp.sum(batch["mask"]), 1.0)}


def ppo_micro_loss(params: dict, mb: dict[str, jax.Array], norms: dict[str, jax.Array], policy_def, critic_def, pcfg,
                   *, temperature: float, chunk: int = 512):
  """One micro-batch's share of the optimizer batch's PPO loss -> (loss, token-weighted sums)."""
  policy = nnx.merge(policy_def, params["policy"])
  hidden, _ = policy.hidden_states(mb["inputs"], mb["positions"], mb["segments"])
  logp, entropy = token_logprobs(hidden, policy.unembedding(), mb["targets"], chunk=chunk, temperature=temperature,
                                 with_entropy=True)
  mask = mb["mask"]
  fresh = mb["fresh"][:, None] > 0  # [B, 1]
  old = jnp.where(fresh, sg(logp), mb["old_logp"])
  weights, is_sums = None, {}
  if pcfg.is_correction != "none":  # the rollout's trainer log-probs against the sampler's
    weights, is_sums = mismatch_weights(old, mb["sampler_logp"], mask, pcfg.is_correction, pcfg.is_cap)
  pg, pm = policy_loss(logp, old, mb["adv"], mask, eps_low=pcfg.eps_low, eps_high=pcfg.eps_high, loss_type="dapo",
                       num_items_in_batch=norms["tokens"], entropy=entropy, entropy_coef=pcfg.entropy_coef,
                       is_weights=weights)
  values = token_values(critic_def, params["critic"], mb)
  old_v = jnp.where(fresh, sg(values), mb["old_values"])
  vf, vm = value_loss(values, old_v, mb["returns"], mask, pcfg.cliprange_value, normalizer=norms["tokens"])
  tokens = jnp.maximum(jnp.sum(mask), 1.0)
  sums = {k: v * tokens for k, v in {**pm, **vm}.items()}
  sums["policy_loss"], sums["value_loss"] = pg * norms["tokens"], vf * norms["tokens"]
  sums.update(is_sums)
  return pg + pcfg.vf_coef * vf, sums


def merge_policy(frozen: dict, params: dict, rng=None) -> dict:
  """LoRA: the joint parameters with the policy's adapters merged into its frozen base (`rng`:
  LoRA dropout's key, see `lora.adapters.merge`)."""
  return {**params, "policy": lora_merge(frozen, params["policy"], rng)}


def make_ppo_step(policy_def, critic_def, tx, schedule, pcfg, *, temperature: float):
  """`train.step.make_train_step` over the joint {"policy", "critic"} parameters (with LoRA the
  state's `frozen` is the policy's base, merged by `merge_policy`)."""

  def loss_fn(params, mb, norms):
    return ppo_micro_loss(params, mb, norms, policy_def, critic_def, pcfg, temperature=temperature)

  def metrics_fn(sums, norms, flat):
    return {**{k: v / norms["tokens"] for k, v in sums.items()}, "completion_tokens": jnp.sum(flat["mask"])}

  return make_train_step(tx, schedule, loss_fn, ppo_normalizers, metrics_fn, merge=merge_policy)


def make_scorer(policy_def, critic_def, temperature: float, chunk: int = 512):
  """Jitted (log-probs of a policy, values of the critic) of rows [A, B, T]; either params may be None.

  `frozen` (LoRA): a base {"base", "scale"} that `policy_params` (adapters, or {} for the base
  itself: the reference) are merged into inside the jit, so no merged copy outlives the call."""

  @jax.jit
  def score(policy_params, critic_params, batch, frozen=None):
    if frozen is not None and policy_params is not None:
      policy_params = lora_merge(frozen, policy_params)

    def one(_, mb):
      out = {}
      if policy_params is not None:
        model = nnx.merge(policy_def, policy_params)
        hidden, _ = model.hidden_states(mb["inputs"], mb["positions"], mb["segments"])
        out["logp"] = token_logprobs(hidden, model.unembedding(), mb["targets"], chunk=chunk, temperature=temperature)
      if critic_params is not None:
        out["values"] = token_values(critic_def, critic_params, mb)
      return None, out
    return jax.lax.scan(one, None, batch)[1]

  return score
