"""`algorithm: sft` and `algorithm: pretrain`: one train step per batch of the Grain pipeline.

SFT trains the response tokens of prompt/response (or chat) rows with the loss of `loss.py`;
pretrain is the same loop on data format `pretrain_text`, where every token is trained. The data
position is checkpointed, so a resumed run continues with the next batch.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxreason import sharding
from jaxreason.algorithms.sft.heldout import make_heldout_eval
from jaxreason.algorithms.sft.loss import make_sft_step
from jaxreason.train import metrics_log
from jaxreason.train.loop import (StepOutput, build_data, fit_and_close, global_batch, make_checkpointer, make_logger, make_tx,
                                  restore_or_init, setup_run, with_final_eval)
from jaxreason.train.state import state_shardings
from jaxreason.lora.adapters import merged_params
from jaxreason.train.step import jit_step


def run_sft(cfg) -> dict[str, Any]:
  """SFT / pre-training from `cfg` (a TrainConfig) -> {"final_step", "metrics"[, "eval"]}."""
  rs = setup_run(cfg)
  data = build_data(cfg, rs.tokenizer)
  steps_per_epoch = max(1, int(data.steps_per_epoch))
  total_steps = cfg.train.max_steps or data.num_batches
  if total_steps > data.num_batches:
    raise ValueError(f"train.max_steps ({total_steps}) is more than the data provides "
                     f"({data.num_batches} batches in {cfg.data.num_epochs} epoch(s)); raise data.num_epochs")
  data_iter = iter(data)
  tx, schedule = make_tx(cfg, rs.abs_params, total_steps)
  shardings = state_shardings(rs.abs_state, tx, rs.mesh, rs.rules)
  ckpt = make_checkpointer(cfg)
  state, meta = restore_or_init(rs, tx, shardings, ckpt)
  start = 0
  if meta is not None:
    data_iter.set_state(meta["data_state"])
    start = int(meta["step"])

  gbs, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size or cfg.train.global_batch_size
  accum = gbs // micro
  batch_sharding = NamedSharding(rs.mesh, PartitionSpec(None, ("data", "fsdp"), None))
  step_fn = jit_step(make_sft_step(rs.graphdef, tx, schedule, normalization=cfg.train.loss_normalization),
                     shardings, batch_sharding)

  logger = make_logger(rs, total_steps, start)
  heldout_eval = None
  if getattr(data, "eval_every", 0):  # token streams: held-out perplexity (heldout.py)
    heldout_eval = make_heldout_eval(rs, data, batch_sharding)
  if rs.is_main:
    stats = {k: v for k, v in data.stats.items() if isinstance(v, (int, float))}
    logger.message(f"model: {rs.model_cfg.model_type}, {rs.model_cfg.num_params() / 1e6:.2f}M params; mesh "
                   f"{dict(rs.mesh.shape)}; {total_steps} steps ({steps_per_epoch}/epoch), global batch "
                   f"{gbs} x {cfg.data.seq_len} tokens, {accum} micro-batch(es)"
                   + (f"; resumed at step {start}" if start else ""))
    if stats:
      logger.message("data: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
  fpt = metrics_log.flops_per_token(rs.model_cfg, cfg.data.seq_len)
  peak = metrics_log.peak_flops_per_device(rs.model_cfg.dtype)
  peak_total = peak if jax.default_backend() == "cpu" else peak * jax.device_count()

  latest = {}

  def train_step(state, step: int) -> StepOutput:
    local = next(data_iter)
    tokens = float(np.count_nonzero(np.asarray(local["segments"]))) * jax.process_count()
    batch = global_batch(local, accum, gbs, batch_sharding)
    with sharding.use_mesh(rs.mesh, rs.rules):
      state, metrics = step_fn(state, batch)
    latest["state"] = state
    return StepOutput(state, metrics, tokens=tokens)

  def save_meta(step: int) -> dict:
    return {"step": step, "data_state": data_iter.get_state(), "seed": cfg.seed, "total_steps": total_steps}

  def log_extra(step: int, row: dict) -> dict:
    extra = {"mfu": row["tokens_per_sec"] * fpt / peak_total, "epoch": step / steps_per_epoch}
    if heldout_eval is not None and (step % data.eval_every == 0 or step == total_steps):
      extra.update(heldout_eval(merged_params(latest["state"])))  # at log steps only (eval_every: a multiple of log_every)
    return extra

  _, step, last = fit_and_close(rs, state, start=start, total_steps=total_steps, train_step=train_step,
                                save_meta=save_meta, ckpt=ckpt, logger=logger, log_extra=log_extra)
  return with_final_eval(cfg, {"final_step": step, "metrics": last})
