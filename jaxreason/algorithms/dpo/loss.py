"""DPO losses (Rafailov et al. 2023, as in TRL's DPOTrainer: sigmoid, hinge, IPO, robust DPO).

SPEC §6: sequence log-prob = sum of response-token log-probs; with
Delta = (logpi(y_w) - logref(y_w)) - (logpi(y_l) - logref(y_l)) and label smoothing s,
  sigmoid: -(1 - s) logsigmoid(beta Delta) - s logsigmoid(-beta Delta)
  hinge:   relu(1 - beta Delta)
  ipo:     (Delta - 1 / (2 beta))^2 on length-averaged log-probs
  robust:  [-(1 - s) logsigmoid(beta Delta) + s logsigmoid(-beta Delta)] / (1 - 2 s)
averaged over the batch. For IPO, `rewards/*` (chosen, rejected, accuracy, margin) use the
length-averaged log-probs, as the loss does; TRL 1.16 logs them from the summed log-ratios, which
are logged as `rewards_summed/*` (chosen, rejected, margin). Reference log-probs never carry gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jaxreason.algorithms.dpo import config
from jaxreason.algorithms.pairs import make_pair_step
from jaxreason.ops.logprobs import token_logprobs

LOSS_TYPES = config.LOSS_TYPES


def sequence_logps(token_logp: Float[Array, "B T"], mask: Float[Array, "B T"]) -> Float[Array, "B"]:
  """Sum of the response-token log-probs of each row (mask = 1 on response tokens)."""
  return jnp.sum(token_logp.astype(jnp.float32) * mask.astype(jnp.float32), axis=-1)


def pair_logps(model, batch: dict[str, jax.Array], *, chunk: int = 512):
  """(sequence log-probs, response lengths), each [P, 2] (chosen, rejected), of `model`.

  batch: tokens, response_mask, valid, each [P, 2, L] (jaxreason.data.preference); the model reads
  tokens[..., :-1] and is scored on predicting the response tokens among tokens[..., 1:].
  """
  p, _, length = batch["tokens"].shape
  flat = lambda x: x.reshape(2 * p, length)
  tokens = flat(batch["tokens"])
  # [2P, L-1]
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  segments = flat(batch["valid"])[:, :-1]
  mask = flat(batch["response_mask"])[:, 1:]
  positions = jnp.broadcast_to(jnp.arange(length - 1, dtype=jnp.int32), inputs.shape)
  hidden, _ = model.hidden_states(inputs, positions, segments)
  logp = token_logprobs(hidden, model.unembedding(), targets, chunk=chunk)
  return sequence_logps(logp, mask).reshape(p, 2), jnp.sum(mask.astype(jnp.float32), -1).reshape(p, 2)


def dpo_loss(pi_chosen: Float[Array, "B"], pi_rejected: Float[Array, "B"], ref_chosen: Float[Array, "B"],
             ref_rejected: Float[Array, "B"], *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: Float[Array, "B"] | None = None,
             rejected_lengths: Float[Array, "B"] | None = None):
  """Sequence log-probs (sums) of policy and reference -> (mean loss, metrics).

  `chosen_lengths` / `rejected_lengths` (response token counts) are used by "ipo" only, which
  divides all four log-probs by them; pass ones if your log-probs are already averaged.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"DPO loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  pc, pr = f32(pi_chosen), f32(pi_rejected)
  rc, rr = jax.lax.stop_gradient(f32(ref_chosen)), jax.lax.stop_gradient(f32(ref_rejected))
  if loss_type == "ipo":
    if chosen_lengths is None or rejected_lengths is None:
      raise ValueError("DPO loss_type 'ipo' uses length-averaged log-probs: pass chosen_lengths and rejected_lengths "
                       "(response token counts; ones if the log-probs are already averaged)")
    lc, lr = f32(chosen_lengths), f32(rejected_lengths)
    pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
  delta = (pc - rc) - (pr - rr)  # [B]
  s = label_smoothing
  if loss_type == "sigmoid":
    losses = -(1 - s) * jax.nn.log_sigmoid(beta * delta) - s * jax.nn.log_sigmoid(-beta * delta)
  elif loss_type == "hinge":
    losses = jax.nn.relu(1 - beta * delta)
  elif loss_type == "ipo":
    losses = (delta - 1 / (2 * beta)) ** 2
  else:  # robust
    if not s < 0.5:
      raise ValueError(f"robust DPO divides by 1 - 2 * label_smoothing: label_smoothing must be < 0.5, got {s}")
    losses = (-(1 - s) * jax.nn.log_sigmoid(beta * delta) + s * jax.nn.log_sigmoid(-beta * delta)) / (1 - 2 * s)
  chosen_rewards = jax.lax.stop_gradient(beta * (pc - rc))
  rejected_rewards = jax.lax.stop_gradient(beta * (pr - rr))
  metrics = {
      "rewards/chosen": jnp.mean(chosen_rewards),
      "rewards/rejected": jnp.mean(rejected_rewards),
      "rewards/accuracy": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "rewards/margin": jnp.mean(chosen_rewards - rejected_rewards),
  }
  if loss_type == "ipo":  # TRL logs IPO's implicit rewards from the summed log-ratios: log those too
    sum_chosen = jax.lax.stop_gradient(beta * (f32(pi_chosen) - f32(ref_chosen)))
    sum_rejected = jax.lax.stop_gradient(beta * (f32(pi_rejected) - f32(ref_rejected)))
    metrics.update({"rewards_summed/chosen": jnp.mean(sum_chosen), "rewards_summed/rejected": jnp.mean(sum_rejected),
                    "rewards_summed/margin": jnp.mean(sum_chosen - sum_rejected)})
  return jnp.mean(losses), metrics


def make_dpo_step(graphdef, tx, schedule, *, beta: float, loss_type: str, label_smoothing: float,
                  precompute_ref: bool, chunk: int = 512):
  """step(state, batch[, ref_params]) -> (state, metrics) (not jitted; see `train.step.jit_step`).

  precompute_ref: the batch carries `ref_logps` [A, P, 2]; else the frozen reference parameters
  are the third argument and the reference log-probs are computed here (no gradient).
  """

  def mean_loss(params, mb, ref_params=None):
    if precompute_ref:
      ref = mb["ref_logps"]
    else:
      ref = jax.lax.stop_gradient(pair_logps(nnx.merge(graphdef, ref_params), mb, chunk=chunk)[0])
    pi, lengths = pair_logps(nnx.merge(graphdef, params), mb, chunk=chunk)  # [P, 2]
    loss, metrics = dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], beta=beta, loss_type=loss_type,
                             label_smoothing=label_smoothing, chosen_lengths=lengths[:, 0],
                             rejected_lengths=lengths[:, 1])
    return loss, {**metrics, "logps/chosen": jnp.mean(pi[:, 0]), "logps/rejected": jnp.mean(pi[:, 1])}

  return make_pair_step(tx, schedule, mean_loss)


def pair_ref_logps(graphdef, chunk: int = 512):
  """(params, batch [P, 2, L]) -> sequence log-probs [P, 2] (for precomputing the reference's)."""
  return lambda params, batch: pair_logps(nnx.merge(graphdef, params), batch, chunk=chunk)[0]
