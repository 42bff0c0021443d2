"""What the pairwise algorithms (DPO, reward model) share: pair data and the pair-mean step contract.

The batch arrives as [A, P_micro, 2, L] (A accumulation steps; P_micro pairs sharded over data x
fsdp; axis 2 = chosen, rejected); `train.global_batch_size` and `train.micro_batch_size` count
pairs. Every micro-batch has the same number of pairs and both losses are means over pairs, so the
global loss is the mean of the micro-batch losses: `make_pair_step` gives each micro-batch the
share loss / A (its gradient sums to one big batch's), and metrics are means over the
micro-batches (= over all pairs).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxreason import sharding
from jaxreason.data.preference import PreferenceBatches, build_preference_batches
from jaxreason.train.loop import StepOutput, fit_and_close, global_batch, make_logger
from jaxreason.train.step import make_train_step


def pair_normalizers(flat: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The global batch's pair count (static), to turn each micro-batch's mean into its share."""
  return {"pairs": jnp.asarray(flat["valid"].shape[0], jnp.float32)}


def make_pair_step(tx, schedule, mean_loss_fn: Callable) -> Callable:
  """mean_loss_fn(params, micro_batch, *extra) -> (mean loss over its pairs, mean metrics) ->
  step(state, batch [A, P, 2, L], *extra) -> (state, metrics) (not jitted; see `train.step.jit_step`)."""

  def loss_fn(params, mb, norms, *extra):
    share = mb["valid"].shape[0] / norms["pairs"]  # = 1 / A
    loss, metrics = mean_loss_fn(params, mb, *extra)
    return loss * share, jax.tree.map(lambda v: v * share, jax.lax.stop_gradient(metrics))

  def metrics_fn(sums, norms, flat):
    return {**sums, "tokens": jnp.sum(flat["valid"] > 0).astype(jnp.float32)}

  return make_train_step(tx, schedule, loss_fn, pair_normalizers, metrics_fn)


def pair_data(cfg, tokenizer, *, max_tokens: int, extra: tuple[str, ...] = ()) -> PreferenceBatches:
  """The run's preference pairs (data.train, plus `extra` files of pairs) as resumable batches."""
  sources = []
  for i, s in enumerate(cfg.data.train):
    if s.path.startswith("task:"):
      raise ValueError(f"data.train[{i}] ({s.path}): a built-in task has questions, not preference pairs; use "
                       "dpo.self_pairs to build pairs from it, or give a file of prompt/chosen/rejected rows")
    sources.append((s.path, s.format, s.weight))
  sources += [(path, "preference", 1.0) for path in extra]
  if not sources:
    raise ValueError("no preference data: list files of prompt/chosen/rejected rows in data.train "
                     "(data.format: preference)" + (", or set dpo.self_pairs" if cfg.algorithm == "dpo" else ""))
  return build_preference_batches(
      sources, tokenizer, seq_len=cfg.data.seq_len, max_tokens=max_tokens,
      global_batch_size=cfg.train.global_batch_size, shuffle=cfg.data.shuffle, seed=cfg.seed,
      num_epochs=cfg.data.num_epochs, on_bad_row=cfg.data.on_bad_row, truncation=cfg.data.truncation,
      process_index=jax.process_index(), process_count=jax.process_count())


def total_steps_for(cfg, data: PreferenceBatches) -> int:
  total = cfg.train.max_steps or data.num_batches
  if total > data.num_batches:
    raise ValueError(f"train.max_steps ({total}) is more than the data provides ({data.num_batches} batches of "
                     f"{cfg.train.global_batch_size} pairs in {cfg.data.num_epochs} epoch(s)); raise data.num_epochs")
  return total


def rows_sharding(mesh, leading: int = 1) -> NamedSharding:
  """Pairs over data x fsdp after `leading` unsharded axes."""
  return NamedSharding(mesh, PartitionSpec(*([None] * leading), ("data", "fsdp")))


def without_index(local: dict) -> dict:
  return {k: v for k, v in local.items() if k != "index"}


def fit_pairs(rs, data: PreferenceBatches, state, meta, step_fn, ckpt, total_steps: int, *,
              prepare=without_index, extra_items: dict | None = None) -> tuple[int, dict]:
  """`train.loop.fit` over pair batches -> (final step, last logged row). `prepare(local)` turns a
  data batch into the step's (drops or looks up `index`). Closes `ckpt`."""
  cfg = rs.cfg
  data_iter = iter(data)
  start = 0
  if meta is not None:
    data_iter.set_state(meta["data_state"])
    start = int(meta["step"])
  gbs = cfg.train.global_batch_size
  accum = gbs // (cfg.train.micro_batch_size or gbs)
  batch_sharding = rows_sharding(rs.mesh)
  logger = make_logger(rs, total_steps, start)
  if rs.is_main:
    logger.message(f"{cfg.algorithm}: {rs.model_cfg.model_type}, {rs.model_cfg.num_params() / 1e6:.2f}M params; "
                   f"mesh {dict(rs.mesh.shape)}; {total_steps} steps ({data.steps_per_epoch}/epoch), "
                   f"{gbs} pairs x 2 x {data.max_tokens} tokens per step, {accum} micro-batch(es)"
                   + (f"; resumed at step {start}" if start else ""))
    logger.message("data: " + ", ".join(f"{k}={v}" for k, v in data.stats.items() if isinstance(v, int)))

  def train_step(state, step: int) -> StepOutput:
    local = next(data_iter)
    tokens = float(np.count_nonzero(local["valid"])) * jax.process_count()
    batch = global_batch(prepare(local), accum, gbs, batch_sharding)
    with sharding.use_mesh(rs.mesh, rs.rules):
      state, metrics = step_fn(state, batch)
    return StepOutput(state, metrics, tokens=tokens)

  def save_meta(step: int) -> dict:
    return {"step": step, "data_state": data_iter.get_state(), "seed": cfg.seed, "total_steps": total_steps}

  _, step, last = fit_and_close(rs, state, start=start, total_steps=total_steps, train_step=train_step,
                                save_meta=save_meta, ckpt=ckpt, logger=logger, extra_items=extra_items,
                                log_extra=lambda step, row: {"epoch": step / data.steps_per_epoch})
  return step, last
