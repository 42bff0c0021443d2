"""Training loops for preference pairs: `algorithm: dpo` and `algorithm: reward_model`.

Both read pairs (data format `preference`, `jaxreason.data.preference`); `train.global_batch_size`
and `train.micro_batch_size` count pairs. The loop is `run_sft`'s: resume from the latest
checkpoint (train_meta holds the position in the pair stream), a checkpoint every
`checkpoint.every_steps` and at the end, a save on SIGTERM, metrics to the logger.

DPO (Rafailov et al. 2023, as TRL's DPOTrainer; loss in `dpo.py`): the policy starts from
`init_from`, and the reference is those same initial weights, frozen. With `dpo.precompute_ref`
the reference's sequence log-probs of every pair are computed once up front (recomputed on resume)
and travel with the batches; otherwise the reference parameters stay on device and are run in
each step. `dpo.self_pairs` first builds pairs from the initial policy's own right and wrong answers
(`rollout.build_self_pairs`) and trains on them with `data.train`. Checkpoints are ordinary policy
checkpoints; `eval` runs at the end as for SFT.

Reward model (`reward_model.py`): the decoder (`init_from`, or from scratch as `model`) plus a
scalar head on the last token's hidden state, pairwise Bradley-Terry loss. Its checkpoints carry a
`reward_model` item, so loading one as a policy fails clearly; `reward_model.load_scorer` reads them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxreason import sharding
from jaxreason.checkpoint import REWARD_MODEL_ITEM
from jaxreason.data.preference import PreferenceBatches, build_preference_batches
from jaxreason.train import pair_step
from jaxreason.train.loop import (PreemptionGuard, RunSetup, checkpoint_tick, global_batch, initial_params,
                                  make_checkpointer, make_logger, make_tx, restore_or_init, run_final_eval, setup_run)
from jaxreason.train.reward_model import SCORE_HEAD, init_score_head
from jaxreason.train.state import params_state_shardings, replicated, state_shardings


def _pair_data(cfg, tokenizer, *, max_tokens: int, extra: tuple[str, ...] = ()) -> PreferenceBatches:
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


def _total_steps(cfg, data: PreferenceBatches) -> int:
  total = cfg.train.max_steps or data.num_batches
  if total > data.num_batches:
    raise ValueError(f"train.max_steps ({total}) is more than the data provides ({data.num_batches} batches of "
                     f"{cfg.train.global_batch_size} pairs in {cfg.data.num_epochs} epoch(s)); raise data.num_epochs")
  return total


def _rows_sharding(mesh, leading: int = 1) -> NamedSharding:
  """Pairs over data x fsdp after `leading` unsharded axes."""
  return NamedSharding(mesh, PartitionSpec(*([None] * leading), ("data", "fsdp")))


def _without_index(local: dict) -> dict:
  return {k: v for k, v in local.items() if k != "index"}


def _train(rs: RunSetup, data: PreferenceBatches, state, meta, step_fn, ckpt, total_steps: int, *,
           prepare=_without_index, extra_items: dict | None = None) -> tuple[int, dict]:
  """run_sft's loop over pair batches -> (final step, last logged metrics). `prepare(local)` turns a
  data batch into the step's (drops or looks up `index`)."""
  cfg = rs.cfg
  data_iter = iter(data)
  start = 0
  if meta is not None:
    data_iter.set_state(meta["data_state"])
    start = int(meta["step"])
  gbs = cfg.train.global_batch_size
  accum = gbs // (cfg.train.micro_batch_size or gbs)
  batch_sharding = _rows_sharding(rs.mesh)
  logger = make_logger(rs, total_steps, start)
  if rs.is_main:
    logger.message(f"{cfg.algorithm}: {rs.model_cfg.model_type}, {rs.model_cfg.num_params() / 1e6:.2f}M params; "
                   f"mesh {dict(rs.mesh.shape)}; {total_steps} steps ({data.steps_per_epoch}/epoch), "
                   f"{gbs} pairs x 2 x {data.max_tokens} tokens per step, {accum} micro-batch(es)"
                   + (f"; resumed at step {start}" if start else ""))
    logger.message("data: " + ", ".join(f"{k}={v}" for k, v in data.stats.items() if isinstance(v, int)))

  from jaxreason.train import nan_guard
  nans = nan_guard.NanGuard.from_config(cfg)  # issue 16

  def save(step: int, force: bool = False):
    nans.check()
    meta = {"step": step, "data_state": data_iter.get_state(), "seed": cfg.seed, "total_steps": total_steps}
    ckpt.save(step, state, rs.model_cfg, meta, force=force, extra=extra_items)

  last: dict[str, Any] = {}
  window_tokens, window_start, window_step = 0.0, time.perf_counter(), start
  step = start
  try:
    with PreemptionGuard(cfg.checkpoint.save_on_preemption) as guard:
      while step < total_steps:
        local = next(data_iter)
        window_tokens += float(np.count_nonzero(local["valid"])) * jax.process_count()
        batch = global_batch(prepare(local), accum, gbs, batch_sharding)
        with sharding.use_mesh(rs.mesh, rs.rules):
          state, metrics = step_fn(state, batch)
        step += 1
        nans.observe(step, metrics)
        logger.advance()
        if step % cfg.train.log_every == 0 or step == total_steps:
          metrics = jax.device_get(metrics)  # waits for the step: the window's time includes it
          nans.check()
          elapsed = time.perf_counter() - window_start
          last = {**{k: float(v) for k, v in metrics.items()},
                  "tokens_per_sec": window_tokens / max(elapsed, 1e-9),
                  "step_time": elapsed / max(1, step - window_step), "epoch": step / data.steps_per_epoch}
          logger.log(step, last)
          window_tokens, window_start, window_step = 0.0, time.perf_counter(), step
        checkpoint_tick(cfg, step, total_steps, save, guard, ckpt, logger)
  finally:
    ckpt.close()
    logger.close()
  return step, last


# ---------------------------------------------------------------------------------------------- DPO


def _self_pairs(rs: RunSetup, cfg) -> str:
  try:
    from jaxreason.train.rollout import build_self_pairs
  except ImportError as e:
    raise NotImplementedError(f"dpo.self_pairs needs jaxreason.train.rollout.build_self_pairs ({e})") from None
  return build_self_pairs(rs, cfg)


def precompute_ref_logps(rs: RunSetup, data: PreferenceBatches, ref_params: dict, param_shardings: dict,
                         pairs_per_call: int) -> np.ndarray:
  """The reference's sequence log-probs of every pair, [num_pairs, 2] (chosen, rejected), on every process."""
  rows = _rows_sharding(rs.mesh, leading=0)
  fn = jax.jit(pair_step.pair_ref_logps(rs.graphdef), in_shardings=(param_shardings, rows),
               out_shardings=replicated(rs.mesh))
  n = len(data.pairs)
  local = pairs_per_call // jax.process_count()
  lo = jax.process_index() * local
  out = np.zeros((n, 2), np.float32)
  for start in range(0, n, pairs_per_call):
    idx = np.minimum(np.arange(start, start + pairs_per_call), n - 1)  # the last call repeats the last pair
    part = data.batch(idx[lo:lo + local])
    del part["index"]
    batch = {k: jax.make_array_from_process_local_data(rows, v, (pairs_per_call,) + v.shape[1:])
             for k, v in part.items()}
    with sharding.use_mesh(rs.mesh, rs.rules):
      logps = fn(ref_params, batch)
    m = min(n - start, pairs_per_call)
    out[start:start + m] = np.asarray(jax.device_get(logps))[:m]
  return out


def run_dpo(cfg) -> dict[str, Any]:
  """DPO from `init_from` against its frozen copy (see the module docstring)."""
  if not cfg.init_from:
    raise ValueError("algorithm dpo needs init_from: the policy to start from (an SFT run directory, a checkpoint "
                     "or a HuggingFace model directory); its weights are also the frozen reference model")
  rs = setup_run(cfg)
  extra = (_self_pairs(rs, cfg),) if cfg.dpo.self_pairs else ()
  data = _pair_data(cfg, rs.tokenizer, max_tokens=cfg.data.seq_len + 1, extra=extra)
  total_steps = _total_steps(cfg, data)
  tx, schedule = make_tx(cfg, rs.abs_params, total_steps)
  shardings = state_shardings(rs.abs_state, tx, rs.mesh, rs.rules)
  ckpt = make_checkpointer(cfg)
  with sharding.use_mesh(rs.mesh, rs.rules):
    ref_params = initial_params(cfg, rs.model_cfg, rs.mesh)
  state, meta = restore_or_init(rs, tx, shardings, ckpt, params_fn=lambda: jax.tree.map(jnp.copy, ref_params))

  d = cfg.dpo
  from jaxreason.train.nan_guard import guard_step
  step_fn = guard_step(pair_step.make_dpo_step(rs.graphdef, tx, schedule, beta=d.beta, loss_type=d.loss_type,  # issue 16
                                               label_smoothing=d.label_smoothing, precompute_ref=d.precompute_ref))
  batch_sharding = _rows_sharding(rs.mesh)
  if d.precompute_ref:
    table = precompute_ref_logps(rs, data, ref_params, shardings.params,
                                 cfg.train.micro_batch_size or cfg.train.global_batch_size)
    del ref_params
    jitted = pair_step.jit_pair_step(step_fn, shardings, batch_sharding)

    def prepare(local):
      return {**_without_index(local), "ref_logps": table[local["index"]]}
  else:
    with_ref = pair_step.jit_pair_step(step_fn, shardings, batch_sharding, shardings.params)

    def jitted(state, batch):
      return with_ref(state, batch, ref_params)
    prepare = _without_index

  step, last = _train(rs, data, state, meta, jitted, ckpt, total_steps, prepare=prepare)
  result: dict[str, Any] = {"final_step": step, "metrics": last}
  if cfg.eval is not None:
    result["eval"] = run_final_eval(cfg)
  return result


# ------------------------------------------------------------------------------------- reward model


@dataclasses.dataclass
class RewardModelSetup(RunSetup):
  """A RunSetup whose parameters are the decoder's plus the score head."""

  @property
  def abs_params(self) -> dict:
    d, dtype = self.model_cfg.hidden_size, jnp.dtype(self.model_cfg.param_dtype)
    return {**nnx.to_pure_dict(self.abs_state),
            SCORE_HEAD: {"kernel": jax.ShapeDtypeStruct((d, 1), dtype), "bias": jax.ShapeDtypeStruct((), dtype)}}


def run_reward_model(cfg) -> dict[str, Any]:
  """A pairwise reward model on the decoder (see the module docstring)."""
  if cfg.eval is not None:
    raise ValueError("algorithm reward_model trains a scorer, not a policy: it cannot be evaluated by sampling; "
                     "set eval: null")
  base = setup_run(cfg)
  rs = RewardModelSetup(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
  data = _pair_data(cfg, rs.tokenizer, max_tokens=cfg.data.seq_len)
  total_steps = _total_steps(cfg, data)
  tx, schedule = make_tx(cfg, rs.abs_params, total_steps)
  one = replicated(rs.mesh)
  param_shardings = {**sharding.pure_shardings(rs.abs_state, rs.mesh, rs.rules),
                     SCORE_HEAD: {"kernel": one, "bias": one}}
  shardings = params_state_shardings(rs.abs_params, param_shardings, tx, rs.mesh)
  ckpt = make_checkpointer(cfg)
  mc = rs.model_cfg

  def params_fn():
    head = init_score_head(mc.hidden_size, mc.initializer_range, cfg.seed, jnp.dtype(mc.param_dtype))
    return {**initial_params(cfg, mc, rs.mesh), SCORE_HEAD: head}

  state, meta = restore_or_init(rs, tx, shardings, ckpt, params_fn=params_fn)
  from jaxreason.train.nan_guard import guard_step
  step_fn = guard_step(pair_step.make_reward_model_step(rs.graphdef, tx, schedule,  # issue 16
                                                        center_coef=cfg.reward_model.center_coef))
  jitted = pair_step.jit_pair_step(step_fn, shardings, _rows_sharding(rs.mesh))
  marker = {REWARD_MODEL_ITEM: {"head": "linear on the last token's final hidden state", "seq_len": cfg.data.seq_len,
                                "center_coef": cfg.reward_model.center_coef}}
  step, last = _train(rs, data, state, meta, jitted, ckpt, total_steps, extra_items=marker)
  return {"final_step": step, "metrics": last}
