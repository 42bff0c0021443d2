"""The training loop shared by every algorithm: model, data, optimizer, checkpoints, logs.

`run(cfg)` builds (or resumes) the sharded train state and data iterator, runs the one jitted
step per batch, logs, checkpoints asynchronously (params, optimizer state, step and data-iterator
state), saves on SIGTERM (preemption) before exiting, and finally runs the configured evaluation.
Resuming is automatic when `output_dir/checkpoints` holds a step.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxreason import sharding
from jaxreason.models.build import abstract_model, init_model
from jaxreason.models.config import ModelConfig
from jaxreason.train import metrics_log, optim
from jaxreason.train.checkpointing import TrainCheckpointer
from jaxreason.train.state import TrainState, init_train_state, state_shardings
from jaxreason.train.step import jit_step, make_sft_step

EXECUTION_FIELDS = ("dtype", "param_dtype", "attention_backend", "remat")


class Preempted(Exception):
  pass


def resolve_tokenizer(cfg):
  from jaxreason import checkpoint
  from jaxreason.data.tokenizer import load_tokenizer
  if cfg.tokenizer == "builtin:char":
    from jaxreason.data.char_tokenizer import build_char_tokenizer
    return build_char_tokenizer()
  if cfg.tokenizer:
    return load_tokenizer(cfg.tokenizer)
  if cfg.init_from:
    return load_tokenizer(checkpoint.tokenizer_dir_for(cfg.init_from))
  raise ValueError("set `tokenizer` (a tokenizer directory or builtin:char) when training from scratch")


def resolve_model_config(cfg, tokenizer) -> ModelConfig:
  from jaxreason import checkpoint
  from jaxreason.models.hf import load_hf_config
  execution = {k: getattr(cfg.model, k) for k in EXECUTION_FIELDS}
  if cfg.init_from:
    if checkpoint.is_checkpoint(cfg.init_from):
      return checkpoint.load_model_config(cfg.init_from).replace(**execution)
    return load_hf_config(cfg.init_from, **execution)
  model_cfg = cfg.model
  if model_cfg.vocab_size < len(tokenizer):
    raise ValueError(f"model.vocab_size ({model_cfg.vocab_size}) is smaller than the tokenizer "
                     f"({len(tokenizer)} tokens); raise it")
  eos = tokenizer.eos_token_id
  return model_cfg.replace(eos_token_id=eos if model_cfg.eos_token_id is None else model_cfg.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id if model_cfg.pad_token_id is None else model_cfg.pad_token_id)


def initial_params(cfg, model_cfg: ModelConfig, mesh) -> dict:
  from jaxreason import checkpoint
  from jaxreason.models.hf import load_hf_model
  execution = {k: getattr(model_cfg, k) for k in EXECUTION_FIELDS}
  if not cfg.init_from:
    model = init_model(model_cfg, seed=cfg.seed, mesh=mesh)
  elif checkpoint.is_checkpoint(cfg.init_from):
    model = checkpoint.load_model(cfg.init_from, mesh=mesh, **execution)
  else:
    model = load_hf_model(cfg.init_from, mesh=mesh, **execution)
  return nnx.to_pure_dict(nnx.state(model))


def materialize_task(spec: str, out_dir: str, name: str) -> str:
  """Writes a built-in task (`task:NAME[:k=v,...]`) as JSONL under `out_dir/data/` and returns the path."""
  import json
  from jaxreason.data.tasks import load_task
  rows = load_task(spec[len("task:"):])
  path = os.path.join(out_dir, "data", f"{name}.jsonl")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{jax.process_index()}"
  with open(tmp, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)
  return path


def build_data(cfg, tokenizer):
  from jaxreason.data.pipeline import build_train_batches
  sources = [(materialize_task(s.path, cfg.output_dir, f"train{i}") if s.path.startswith("task:") else s.path,
              s.format, s.weight) for i, s in enumerate(cfg.data.train)]
  if not sources:
    raise ValueError("data.train is empty: list at least one training file")
  return build_train_batches(
      sources, tokenizer, seq_len=cfg.data.seq_len, global_batch_size=cfg.train.global_batch_size,
      packing=cfg.data.packing, shuffle=cfg.data.shuffle, seed=cfg.seed, num_epochs=cfg.data.num_epochs,
      on_bad_row=cfg.data.on_bad_row, tag_weights=dict(cfg.data.tag_weights) or None,
      process_index=jax.process_index(), process_count=jax.process_count(), truncation=cfg.data.truncation)


def run(cfg) -> dict[str, Any]:
  """Trains according to `cfg` (a TrainConfig); returns the final metrics (and eval summary)."""
  from jaxreason.config import dump_yaml
  if cfg.algorithm != "sft":
    raise NotImplementedError(f"algorithm {cfg.algorithm!r} is not implemented yet; available: sft")
  is_main = jax.process_index() == 0
  out = cfg.output_dir
  os.makedirs(out, exist_ok=True)
  if is_main:
    with open(os.path.join(out, "config.yaml"), "w") as f:
      f.write(dump_yaml(cfg))

  tokenizer = resolve_tokenizer(cfg)
  if is_main and not os.path.isdir(os.path.join(out, "tokenizer")):
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
  model_cfg = resolve_model_config(cfg, tokenizer)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.TRAIN_RULES

  data = build_data(cfg, tokenizer)
  steps_per_epoch = max(1, int(data.steps_per_epoch))
  total_steps = cfg.train.max_steps or data.num_batches
  if total_steps > data.num_batches:
    raise ValueError(f"train.max_steps ({total_steps}) is more than the data provides "
                     f"({data.num_batches} batches in {cfg.data.num_epochs} epoch(s)); raise data.num_epochs")
  data_iter = iter(data)
  warmup = optim.warmup_steps(total_steps, cfg.schedule.warmup_steps, cfg.schedule.warmup_ratio)

  graphdef, abs_state = nnx.split(abstract_model(model_cfg))
  abs_params = nnx.to_pure_dict(abs_state)
  o = cfg.optimizer
  tx, schedule = optim.make_optimizer(
      abs_params, lr=o.lr, total_steps=total_steps, warmup=warmup, decay=cfg.schedule.decay,
      min_lr_ratio=cfg.schedule.min_lr_ratio, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
      decay_embeddings=o.decay_embeddings, max_grad_norm=o.max_grad_norm, mu_dtype=o.mu_dtype)
  shardings = state_shardings(abs_state, tx, mesh, rules)

  ckpt = TrainCheckpointer(os.path.join(out, "checkpoints"), keep_last=cfg.checkpoint.keep_last,
                           keep_steps=tuple(cfg.checkpoint.keep_steps), async_save=cfg.checkpoint.async_save)
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                              abs_params)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    state, meta, _ = ckpt.restore(latest, abstract)
    data_iter.set_state(meta["data_state"])
    start = int(meta["step"])
  else:
    with sharding.use_mesh(mesh, rules):
      state = init_train_state(initial_params(cfg, model_cfg, mesh), tx, shardings)
    start = 0

  global_batch, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size or cfg.train.global_batch_size
  accum = global_batch // micro
  batch_sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None))
  step_fn = jit_step(make_sft_step(graphdef, tx, schedule, normalization=cfg.train.loss_normalization),
                     shardings, batch_sharding)

  logger = metrics_log.MetricsLogger(
      out, total_steps=total_steps, start_step=start, tensorboard=cfg.logging.tensorboard,
      wandb_project=cfg.logging.wandb_project, wandb_run=cfg.logging.wandb_run,
      progress_bar=cfg.logging.progress_bar, is_main=is_main)
  if is_main:
    stats = {k: v for k, v in data.stats.items() if isinstance(v, (int, float))}
    logger.message(f"model: {model_cfg.model_type}, {model_cfg.num_params() / 1e6:.2f}M params; mesh "
                   f"{dict(mesh.shape)}; {total_steps} steps ({steps_per_epoch}/epoch), global batch "
                   f"{global_batch} x {cfg.data.seq_len} tokens, {accum} micro-batch(es)"
                   + (f"; resumed at step {start}" if start else ""))
    if stats:
      logger.message("data: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
  fpt = metrics_log.flops_per_token(model_cfg, cfg.data.seq_len)
  peak = metrics_log.peak_flops_per_device(model_cfg.dtype)
  peak_total = peak if jax.default_backend() == "cpu" else peak * jax.device_count()

  preempted = {"flag": False}
  previous = None
  if cfg.checkpoint.save_on_preemption:
    previous = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True))

  def save(step: int, force: bool = False):
    meta = {"step": step, "data_state": data_iter.get_state(), "seed": cfg.seed, "total_steps": total_steps}
    ckpt.save(step, state, model_cfg, meta, force=force)

  last_metrics: dict[str, Any] = {}
  window_tokens, window_start, window_step = 0.0, time.perf_counter(), start
  step = start
  try:
    while step < total_steps:
      local = next(data_iter)
      window_tokens += float(np.count_nonzero(np.asarray(local["segments"]))) * jax.process_count()
      batch = {}
      for k, v in local.items():
        v = np.asarray(v)
        v = v.reshape((accum, v.shape[0] // accum) + v.shape[1:])
        global_shape = (accum, global_batch // accum) + v.shape[2:]
        batch[k] = jax.make_array_from_process_local_data(batch_sharding, v, global_shape)
      with sharding.use_mesh(mesh, rules):
        state, metrics = step_fn(state, batch)
      step += 1
      logger.advance()
      if step % cfg.train.log_every == 0 or step == total_steps:
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - window_start
        steps_in_window = step - window_step
        tps = window_tokens / max(elapsed, 1e-9)
        last_metrics = {**{k: float(v) for k, v in metrics.items()}, "tokens_per_sec": tps,
                        "step_time": elapsed / max(1, steps_in_window), "mfu": tps * fpt / peak_total,
                        "epoch": step / steps_per_epoch}
        logger.log(step, last_metrics)
        window_tokens, window_start, window_step = 0.0, time.perf_counter(), step
      if step % cfg.checkpoint.every_steps == 0 or step == total_steps:
        save(step)
      if preempted["flag"]:
        save(step, force=True)
        ckpt.wait()
        logger.message(f"SIGTERM: saved step {step} to {ckpt.directory}; exiting (resume by rerunning)")
        raise Preempted(step)
  finally:
    ckpt.close()
    logger.close()
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)

  result: dict[str, Any] = {"final_step": step, "metrics": last_metrics}
  if cfg.eval is not None:
    result["eval"] = run_final_eval(cfg)
  return result


def held_out(cfg) -> str:
  """The eval data; a built-in task is written to a file without the questions seen in training."""
  import json
  e = cfg.eval
  if not e.data.startswith("task:"):
    return e.data
  from jaxreason.data.sources import read_rows
  from jaxreason.data.tasks import load_task
  seen = set()
  for i, s in enumerate(cfg.data.train):
    path = os.path.join(cfg.output_dir, "data", f"train{i}.jsonl") if s.path.startswith("task:") else s.path
    if os.path.exists(path):
      seen.update(str(r.get("question")) for r in read_rows(path))
  rows = [r for r in load_task(e.data[len("task:"):]) if str(r["question"]) not in seen]
  path = os.path.join(cfg.output_dir, "data", "eval.jsonl")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return path


def run_final_eval(cfg) -> dict:
  from jaxreason.eval.run import EvalConfig, run_eval
  e = cfg.eval
  ecfg = EvalConfig(model=cfg.output_dir, data=held_out(cfg), out=os.path.join(cfg.output_dir, "eval"), format=e.format,
                    budgets=tuple(e.budgets), num_waits=e.num_waits, n=e.n, temperature=e.temperature,
                    max_new_tokens=e.max_new_tokens, max_answer_tokens=e.max_answer_tokens, limit=e.limit,
                    batch_size=e.batch_size, seed=cfg.seed)
  return run_eval(ecfg)
