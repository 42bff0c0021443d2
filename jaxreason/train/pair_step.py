"""The jitted steps of the pairwise algorithms (DPO, reward model), with gradient accumulation.

The batch arrives as [A, P_micro, 2, L] (A accumulation steps; P_micro pairs sharded over data x
fsdp; axis 2 = chosen, rejected). Every micro-batch has the same number of pairs and both losses
are means over pairs, so the global loss is the mean of the micro-batch losses and its gradient
the sum of the micro-batch gradients / A (= one big batch's). Metrics are means over the
micro-batches (= over all pairs). The state is donated.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxreason.train import dpo, reward_model
from jaxreason.train.state import TrainState


def _accumulate(state: TrainState, batch: dict, loss_fn: Callable, tx, schedule) -> tuple[TrainState, dict]:
  """loss_fn(params, micro_batch) -> (loss, metrics); one optimizer update on the mean over micro-batches."""
  accum = jax.tree.leaves(batch)[0].shape[0]

  def micro(grads_acc, mb):
    (loss, metrics), grads = jax.value_and_grad(lambda p: loss_fn(p, mb), has_aux=True)(state.params)
    grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32) / accum, grads_acc, grads)
    return grads_acc, {"loss": loss, **metrics}

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
  grads, per_micro = jax.lax.scan(micro, zeros, batch)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {k: jnp.mean(v) for k, v in per_micro.items()}
  metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state.step),
                 tokens=jnp.sum(batch["valid"] > 0).astype(jnp.float32))
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_dpo_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, *, beta: float,
                  loss_type: str, label_smoothing: float, precompute_ref: bool, chunk: int = 512) -> Callable:
  """step(state, batch[, ref_params]) -> (state, metrics) (not jitted; see `jit_pair_step`).

  precompute_ref: the batch carries `ref_logps` [A, P, 2]; else the frozen reference parameters
  are the third argument and the reference log-probs are computed here (no gradient).
  """

  def step(state: TrainState, batch: dict, ref_params: dict | None = None):
    def loss_fn(params, mb):
      if precompute_ref:
        ref = mb["ref_logps"]
      else:
        ref = jax.lax.stop_gradient(dpo.pair_logps(nnx.merge(graphdef, ref_params), mb, chunk=chunk)[0])
      pi, lengths = dpo.pair_logps(nnx.merge(graphdef, params), mb, chunk=chunk)  # [P, 2]
      loss, metrics = dpo.dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], beta=beta, loss_type=loss_type,
                                   label_smoothing=label_smoothing, chosen_lengths=lengths[:, 0],
                                   rejected_lengths=lengths[:, 1])
      metrics = {**metrics, "logps/chosen": jnp.mean(pi[:, 0]), "logps/rejected": jnp.mean(pi[:, 1])}
      return loss, jax.lax.stop_gradient(metrics)

    return _accumulate(state, batch, loss_fn, tx, schedule)

  return step


def make_reward_model_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                           center_coef: float = 0.0) -> Callable:
  """step(state, batch) -> (state, metrics); params = decoder + reward_model.SCORE_HEAD."""

  def step(state: TrainState, batch: dict):
    def loss_fn(params, mb):
      scores = reward_model.pair_scores(graphdef, params, mb)  # [P, 2]
      loss, metrics = reward_model.pairwise_loss(scores[:, 0], scores[:, 1], center_coef=center_coef)
      return loss, jax.lax.stop_gradient(metrics)

    return _accumulate(state, batch, loss_fn, tx, schedule)

  return step


def pair_ref_logps(graphdef, chunk: int = 512) -> Callable:
  """(params, batch [P, 2, L]) -> sequence log-probs [P, 2] (for precomputing the reference's)."""
  return lambda params, batch: dpo.pair_logps(nnx.merge(graphdef, params), batch, chunk=chunk)[0]


def jit_pair_step(step_fn: Callable, state_shardings: TrainState, batch_sharding, ref_shardings=None) -> Callable:
  shardings = (state_shardings, batch_sharding) + ((ref_shardings,) if ref_shardings is not None else ())
  return jax.jit(step_fn, in_shardings=shardings, out_shardings=(state_shardings, None), donate_argnums=(0,))
