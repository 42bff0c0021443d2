"""DPO losses (Rafailov et al. 2023, as in TRL's DPOTrainer: sigmoid, hinge, IPO, robust DPO).

SPEC §6: sequence log-prob = sum of response-token log-probs; with
Delta = (logpi(y_w) - logref(y_w)) - (logpi(y_l) - logref(y_l)) and label smoothing s,
  sigmoid: -(1 - s) logsigmoid(beta Delta) - s logsigmoid(-beta Delta)
  hinge:   relu(1 - beta Delta)
  ipo:     (Delta - 1 / (2 beta))^2 on length-averaged log-probs
  robust:  [-(1 - s) logsigmoid(beta Delta) + s logsigmoid(-beta Delta)] / (1 - 2 s)
averaged over the batch. As in TRL, for IPO the implicit-reward metrics also use the
length-averaged log-probs. Reference log-probs never carry gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxreason.ops.logprobs import token_logprobs

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


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
  return jnp.mean(losses), metrics
