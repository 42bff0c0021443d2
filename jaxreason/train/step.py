"""The one jitted train step per algorithm kind: gradient accumulation over micro-batches.

The batch arrives as [A, B_micro, T] (A = accumulation steps, B_micro sharded over data x fsdp).
Normalisers come from the whole global batch first, so the accumulated gradient equals the
gradient of one big batch (SPEC §2). The state is donated; metrics are returned as scalars.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxreason.train import sft
from jaxreason.train.state import TrainState


def make_sft_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                  normalization: str = "token", chunk: int = 512) -> Callable:
  """Returns step(state, batch) -> (state, metrics) (not jitted; see `jit_step`)."""

  def step(state: TrainState, batch: dict[str, jax.Array]):
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    norms = sft.normalizers(flat["weights"], flat["segments"])

    def micro(carry, mb):
      grads_acc, loss_acc, nll_acc = carry

      def loss_fn(params):
        model = nnx.merge(graphdef, params)
        return sft.sft_loss_terms(model, mb, normalization=normalization, norms=norms, chunk=chunk)

      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
      return (grads_acc, loss_acc + loss, nll_acc + aux["nll_sum"]), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (grads, loss, nll), _ = jax.lax.scan(micro, (zeros, jnp.zeros(()), jnp.zeros(())), batch)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "nll_per_token": nll / jnp.maximum(norms["tokens"], 1.0),
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state.step),
        "trained_tokens": norms["tokens"],
        "tokens": jnp.sum(flat["segments"] > 0).astype(jnp.float32),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def jit_step(step_fn: Callable, state_shardings: TrainState, batch_sharding) -> Callable:
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))
