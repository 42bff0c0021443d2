"""`algorithm: distill`: the student trains on KD against a frozen teacher through the shared harness.

offline: batches of the SFT pipeline (`data.train`, its response tokens are the KD positions; the
CE mix uses the same tokens). on_policy: each step samples `rollout.prompts_per_step` x
`rollout.num_generations` completions from the current student (merged LoRA copy when `lora:`),
the teacher scores every completion token, the update minimises the per-token divergence on
them (`distill.loss: reverse_kl` is on-policy distillation; CE is not defined there). Each
step's prompts are new to the student in the first epoch, so the logged `kd` (before the
update) is the divergence on held-out prompts.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxreason import sharding
from jaxreason.algorithms.distill.loss import chunked_kd, kd_loss
from jaxreason.algorithms.sft.loss import normalizers as sft_normalizers
from jaxreason.lora.adapters import merged_params
from jaxreason.train.loop import (StepOutput, build_data, fit_and_close, global_batch, make_checkpointer, make_logger, make_tx,
                                  restore_or_init, row_shardings, setup_run, with_final_eval)
from jaxreason.train.state import state_shardings
from jaxreason.train.step import jit_step, make_train_step


def load_teacher(cfg, student_cfg, mesh):
  """The teacher Transformer in the student's compute dtype, sharded on the training mesh."""
  import os
  from jaxreason import checkpoint
  from jaxreason.models.hf import load_hf_model
  path = cfg.distill.teacher
  if not path:
    raise ValueError("algorithm distill needs distill.teacher: an HF model dir or an Orbax run of the teacher")
  if not os.path.isdir(path):
    raise ValueError(f"distill.teacher {path}: no such directory")
  kw = {"dtype": student_cfg.dtype, "scan_layers": True}
  if checkpoint.is_checkpoint(path):  # restored in its saved dtype (integrity is checked there), cast below
    teacher = checkpoint.load_model(path, mesh=mesh, **kw)
  else:
    teacher = load_hf_model(path, mesh=mesh, **kw)
  dt = jnp.dtype(student_cfg.dtype)  # frozen: held in the compute dtype
  graphdef, state = nnx.split(teacher)
  state = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  teacher = nnx.merge(graphdef, state)
  if teacher.cfg.vocab_size != student_cfg.vocab_size:
    raise ValueError(f"distill.teacher {path} has vocab_size {teacher.cfg.vocab_size}, the student "
                     f"{student_cfg.vocab_size}: teacher and student must share the tokenizer")
  return teacher


def make_distill_step(graphdef, teacher_graphdef, tx, schedule, dc, mask_key: str):
  """step(state, batch, teacher_params) -> (state, metrics); the batch carries `mask_key` [A, B, T]."""

  def loss_fn(params, mb, norms, teacher_params):
    student = nnx.merge(graphdef, params)
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    hs, _ = student.hidden_states(mb["inputs"], mb["positions"], mb["segments"])
    ht, _ = teacher.hidden_states(mb["inputs"], mb["positions"], mb["segments"])
    d, lp = chunked_kd(hs, student.unembedding(), ht, teacher.unembedding(), mb["targets"], kind=dc.loss,
                       beta=dc.beta, temperature=dc.temperature, chunk=dc.chunk)
    return kd_loss(d, lp, (mb[mask_key] > 0).astype(jnp.float32), dc.kd_weight, norms["tokens"])

  def normalizers(flat):
    if mask_key == "weights":
      return sft_normalizers(flat["weights"], flat["segments"])
    return {"tokens": jnp.sum(flat[mask_key] > 0).astype(jnp.float32)}

  def metrics_fn(sums, norms, flat):
    n = jnp.maximum(norms["tokens"], 1.0)
    return {"kd": sums["kd_sum"] / n, "ce": sums["ce_sum"] / n, "trained_tokens": norms["tokens"]}

  return make_train_step(tx, schedule, loss_fn, normalizers, metrics_fn)


def run_distill(cfg) -> dict[str, Any]:
  dc = cfg.distill
  if dc.mode == "on_policy" and dc.kd_weight != 1.0:
    raise ValueError("distill.kd_weight must be 1.0 with mode on_policy: the student's own samples have no "
                     "reference tokens for a cross-entropy term")
  rs = setup_run(cfg)
  teacher = load_teacher(cfg, rs.model_cfg, rs.mesh)
  t_graphdef, t_state = nnx.split(teacher)
  t_params = nnx.to_pure_dict(t_state)
  t_shardings = jax.tree.map(lambda x: x.sharding, t_params)
  gbs = cfg.train.global_batch_size
  micro = cfg.train.micro_batch_size or gbs
  accum = gbs // micro

  if dc.mode == "offline":
    data = build_data(cfg, rs.tokenizer)
    total_steps = cfg.train.max_steps or data.num_batches
    data_iter = iter(data)
  else:
    from jaxreason.algorithms.grpo.run import completion_rows
    from jaxreason.rollout import QuestionStream, RolloutSampler, load_questions, stream_meta
    rc = cfg.rollout
    questions = load_questions([s.path for s in cfg.data.train], rs.out, rc.format, rs.tokenizer)
    n_rollout = rc.prompts_per_step * rc.num_generations
    if n_rollout % gbs:
      raise ValueError(f"train.global_batch_size ({gbs}) must divide rollout.prompts_per_step x "
                       f"rollout.num_generations = {n_rollout}")
    prompt_len = max(len(q.ids) for q in questions)
    seq_len = -(-(prompt_len + rc.max_new_tokens) // 8) * 8
    total_steps = cfg.train.max_steps or math.ceil(cfg.data.num_epochs * len(questions) / rc.prompts_per_step)
  updates = 1 if dc.mode == "offline" else n_rollout // gbs
  tx, schedule = make_tx(cfg, rs.abs_params, total_steps * updates)
  shardings = state_shardings(rs.abs_state, tx, rs.mesh, rs.rules)
  ckpt = make_checkpointer(cfg)
  state, meta = restore_or_init(rs, tx, shardings, ckpt)
  start = int(meta["step"]) if meta else 0

  mask_key = "weights" if dc.mode == "offline" else "mask"
  keys = ("inputs", "targets", "positions", "segments", mask_key)
  batch_sharding = row_shardings(rs.mesh, {k: 3 for k in keys})
  step_fn = jit_step(make_distill_step(rs.graphdef, t_graphdef, tx, schedule, dc, mask_key), shardings,
                     batch_sharding, t_shardings)
  logger = make_logger(rs, total_steps, start)
  if rs.is_main:
    logger.message(f"distill ({dc.mode}, {dc.loss}, tau {dc.temperature}, kd_weight {dc.kd_weight}): student "
                   f"{rs.model_cfg.num_params() / 1e6:.2f}M params, teacher {teacher.cfg.num_params() / 1e6:.2f}M"
                   + (f"; resumed at step {start}" if start else ""))
  del teacher, t_state

  if dc.mode == "offline":
    if meta is not None:
      data_iter.set_state(meta["data_state"])

    def train_step(state, step: int) -> StepOutput:
      local = next(data_iter)
      batch = global_batch({k: local[k] for k in keys}, accum, gbs, batch_sharding)
      with sharding.use_mesh(rs.mesh, rs.rules):
        state, metrics = step_fn(state, batch, t_params)
      return StepOutput(state, metrics, tokens=float(np.count_nonzero(np.asarray(local["segments"]))))

    def save_meta(step: int) -> dict:
      return {"step": step, "data_state": data_iter.get_state(), "seed": cfg.seed, "total_steps": total_steps}
  else:
    stream = QuestionStream(questions, cfg.seed, position=int(meta["stream_position"]) if meta else 0)
    roller = RolloutSampler(rs.graphdef, rs.abs_state, rs.model_cfg, rs.mesh, rs.tokenizer, rc)
    pad = rs.tokenizer.pad_token_id or 0
    proc, nproc = jax.process_index(), jax.process_count()

    def train_step(state, step: int) -> StepOutput:
      t0 = time.perf_counter()
      roller.set_params(merged_params(state))
      c = roller.sample(stream.take(rc.prompts_per_step), seed=(cfg.seed * 1_000_003 + step) * 101)
      rows = completion_rows(c, seq_len, pad, False)
      used = int(rows["segments"].astype(bool).sum(axis=1).max())
      width = min(seq_len, max(32, -(-used // 32) * 32))
      rows = {k: rows[k][:, :width] for k in keys}
      t1 = time.perf_counter()
      order = np.random.default_rng([cfg.seed, step]).permutation(n_rollout)
      ms = []
      for u in range(n_rollout // gbs):
        sel = order[u * gbs:(u + 1) * gbs]
        per = gbs // nproc
        batch = global_batch({k: v[sel][proc * per:(proc + 1) * per] for k, v in rows.items()}, accum, gbs,
                             batch_sharding)
        with sharding.use_mesh(rs.mesh, rs.rules):
          state, m = step_fn(state, batch, t_params)
        ms.append(m)
      ms = jax.device_get(ms)
      metrics = {k: float(np.mean([float(m[k]) for m in ms])) for k in ms[0]}
      metrics["kd_before_update"] = float(ms[0]["kd"])  # the first update's divergence: on prompts new to the student
      metrics.update(completion_length=float(np.mean([len(t) for t in c.output.tokens])),
                     time_rollout=t1 - t0, time_update=time.perf_counter() - t1)
      return StepOutput(state, metrics)

    save_meta = stream_meta(stream, cfg.seed, total_steps)

  _, step, last = fit_and_close(rs, state, start=start, total_steps=total_steps, train_step=train_step,
                                save_meta=save_meta, ckpt=ckpt, logger=logger, log_first=True)
  return with_final_eval(cfg, {"final_step": step, "metrics": last})
