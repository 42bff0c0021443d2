"""The one jitted train step: gradient accumulation over micro-batches, then one optimizer update.

Every algorithm (SFT/pretrain, GRPO, DPO, reward model, expert iteration) uses `make_train_step`
with its own loss. The batch arrives as [A, B_micro, ...] (A = accumulation steps, B_micro sharded
over data x fsdp). The normalisers (`normalizers_fn`) are counted over the whole global batch
first, then each micro-batch's loss is its share of the global loss (summing them gives the
global loss), so the accumulated gradient equals the gradient of one big batch (SPEC §2). The
state is donated (`jit_step`); metrics are returned as scalars.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxreason.lora.adapters import dropout_rng, merge as lora_merge
from jaxreason.train.nan_guard import guard_step
from jaxreason.train.state import TrainState

# loss_fn(params, micro_batch, norms, *extra) -> (loss share, sums): `sums` are summed over the
# micro-batches (keep them token- or pair-weighted, then normalise in metrics_fn).
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
# normalizers_fn(flat_batch [A * B_micro, ...]) -> global counts, passed to every micro-batch's loss.
NormalizersFn = Callable[[dict[str, jax.Array]], dict[str, jax.Array]]
# metrics_fn(sums, norms, flat_batch) -> logged metrics (besides loss, grad_norm, lr).
MetricsFn = Callable[[dict[str, jax.Array], dict[str, jax.Array], dict[str, jax.Array]], dict[str, jax.Array]]


def flatten_micro(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """[A, B_micro, ...] -> [A * B_micro, ...] (the global batch)."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


def make_train_step(tx: optax.GradientTransformation, schedule: optax.Schedule, loss_fn: LossFn,
                    normalizers_fn: NormalizersFn, metrics_fn: MetricsFn | None = None,
                    merge: Callable[..., dict] = lora_merge) -> Callable:
  """Returns step(state, batch, *extra) -> (state, metrics) (not jitted; see `jit_step`).

  `extra` (e.g. frozen reference parameters) is passed through to `loss_fn` unchanged. With LoRA
  (`state.frozen` set) the loss sees `merge(state.frozen, params, rng)` (default: base + adapters;
  PPO merges its policy only, `algorithms.ppo.loss.merge_policy`); `rng` is None, or with LoRA
  dropout the key of this step and micro-batch (`lora.adapters.dropout_rng`).
  """

  def step(state: TrainState, batch: dict[str, jax.Array], *extra: Any):
    flat = flatten_micro(batch)
    norms = normalizers_fn(flat)
    if state.frozen is not None:  # LoRA: the loss sees base + adapters; gradients reach the adapters only
      loss_fn_ = lambda p, mb, n, rng, *a: loss_fn(merge(state.frozen, p, rng), mb, n, *a)  # noqa: E731
    else:
      loss_fn_ = lambda p, mb, n, rng, *a: loss_fn(p, mb, n, *a)  # noqa: E731

    def rng_of(i):
      return None if state.frozen is None else dropout_rng(state.frozen, state.step, i)

    def micro(carry, xs):
      mb, i = xs
      grads_acc, loss_acc, sums_acc = carry
      (loss, sums), grads = jax.value_and_grad(loss_fn_, has_aux=True)(state.params, mb, norms, rng_of(i), *extra)
      grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
      return (grads_acc, loss_acc + loss, jax.tree.map(jnp.add, sums_acc, sums)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    first = jax.tree.map(lambda x: x[0], batch)
    sums_shape = jax.eval_shape(lambda p: loss_fn_(p, first, norms, rng_of(0), *extra)[1], state.params)
    sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
    micro_ids = jnp.arange(jax.tree.leaves(batch)[0].shape[0], dtype=jnp.int32)
    (grads, loss, sums), _ = jax.lax.scan(micro, (zeros, jnp.zeros(()), sums0), (batch, micro_ids))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **(metrics_fn(sums, norms, flat) if metrics_fn is not None else sums),
               "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, frozen=state.frozen), metrics

  return step


def jit_step(step_fn: Callable, state_shardings: TrainState, batch_sharding, *extra_shardings) -> Callable:
  """jax.jit with the state donated; `extra_shardings` for the step's extra arguments.

  Every step is NaN-guarded (`nan_guard.guard_step`): a non-finite loss or gradient norm keeps the
  old params and optimizer state, and `metrics["nonfinite"]` tells `fit`'s `NanGuard`."""
  return jax.jit(guard_step(step_fn), in_shardings=(state_shardings, batch_sharding, *extra_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))
