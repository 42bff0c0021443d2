"""The training loop shared by every algorithm: model, data, optimizer, checkpoints, logs.

`run(cfg)` builds (or resumes) the sharded train state and data iterator, runs the one jitted
step per batch, logs, checkpoints asynchronously (params, optimizer state, step and data-iterator
state), saves on SIGTERM (preemption) before exiting, and finally runs the configured evaluation.
Resuming is automatic when `output_dir/checkpoints` holds a step.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any, Callable

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

EXECUTION_FIELDS = ("dtype", "param_dtype", "attention_backend", "remat", "scan_layers")


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
  if any(s.path.startswith("tokens:") for s in cfg.data.train):  # a pre-tokenised stream (data/token_stream.py)
    from jaxreason.data.token_stream import build_token_batches
    return build_token_batches(cfg.data.train, tokenizer, seq_len=cfg.data.seq_len, global_batch_size=cfg.train.global_batch_size,
                               shuffle=cfg.data.shuffle, seed=cfg.seed, num_epochs=cfg.data.num_epochs,
                               process_index=jax.process_index(), process_count=jax.process_count())
  sources = [(materialize_task(s.path, cfg.output_dir, f"train{i}") if s.path.startswith("task:") else s.path,
              s.format, s.weight) for i, s in enumerate(cfg.data.train)]
  if not sources:
    raise ValueError("data.train is empty: list at least one training file")
  return build_train_batches(
      sources, tokenizer, seq_len=cfg.data.seq_len, global_batch_size=cfg.train.global_batch_size,
      packing=cfg.data.packing, shuffle=cfg.data.shuffle, seed=cfg.seed, num_epochs=cfg.data.num_epochs,
      on_bad_row=cfg.data.on_bad_row, tag_weights=dict(cfg.data.tag_weights) or None,
      process_index=jax.process_index(), process_count=jax.process_count(), truncation=cfg.data.truncation)


@dataclasses.dataclass
class RunSetup:
  """What every algorithm's loop starts from: tokenizer, model config, mesh, abstract model."""

  cfg: Any
  tokenizer: Any
  model_cfg: ModelConfig
  mesh: Any
  rules: Any
  graphdef: Any
  abs_state: Any  # nnx.State of ShapeDtypeStructs
  is_main: bool

  @property
  def out(self) -> str:
    return self.cfg.output_dir

  @property
  def abs_params(self) -> dict:
    return nnx.to_pure_dict(self.abs_state)


def setup_run(cfg) -> RunSetup:
  """Writes config.yaml and tokenizer/ to the run dir; resolves the model config and the mesh."""
  from jaxreason.io_utils import atomic_dir
  from jaxreason.train import config_history, run_lock
  is_main = jax.process_index() == 0
  os.makedirs(cfg.output_dir, exist_ok=True)
  run_lock.acquire(cfg.output_dir, jax.process_index())  # issue 16: one run per output_dir
  config_history.record(cfg, is_main)  # issue 16: config.yaml + config.<step>.yaml; refuses inexact resumes
  tokenizer = resolve_tokenizer(cfg)
  if is_main and not os.path.isdir(os.path.join(cfg.output_dir, "tokenizer")):
    with atomic_dir(os.path.join(cfg.output_dir, "tokenizer")) as tmp:
      tokenizer.save_pretrained(tmp)
  model_cfg = resolve_model_config(cfg, tokenizer)
  mesh = sharding.make_mesh(cfg.mesh)
  graphdef, abs_state = nnx.split(abstract_model(model_cfg))
  return RunSetup(cfg=cfg, tokenizer=tokenizer, model_cfg=model_cfg, mesh=mesh, rules=sharding.TRAIN_RULES,
                  graphdef=graphdef, abs_state=abs_state, is_main=is_main)


def make_tx(cfg, abs_params: dict, total_steps: int):
  """AdamW + schedule from the config's optimizer and schedule sections -> (tx, schedule)."""
  warmup = optim.warmup_steps(total_steps, cfg.schedule.warmup_steps, cfg.schedule.warmup_ratio)
  o = cfg.optimizer
  return optim.make_optimizer(
      abs_params, lr=o.lr, total_steps=total_steps, warmup=warmup, decay=cfg.schedule.decay,
      min_lr_ratio=cfg.schedule.min_lr_ratio, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
      decay_embeddings=o.decay_embeddings, max_grad_norm=o.max_grad_norm, mu_dtype=o.mu_dtype)


def make_checkpointer(cfg) -> TrainCheckpointer:
  return TrainCheckpointer(os.path.join(cfg.output_dir, "checkpoints"), keep_last=cfg.checkpoint.keep_last,
                           keep_steps=tuple(cfg.checkpoint.keep_steps), async_save=cfg.checkpoint.async_save)


def restore_or_init(rs: RunSetup, tx, shardings: TrainState, ckpt: TrainCheckpointer,
                    params_fn: Callable[[], dict] | None = None) -> tuple[TrainState, dict | None]:
  """The latest checkpoint's state and train_meta, or a fresh state (params from `params_fn`,
  default: `init_from` or a seeded init) and None."""
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                              rs.abs_params)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    state, meta, _ = ckpt.restore(latest, abstract)
    return state, meta
  with sharding.use_mesh(rs.mesh, rs.rules):
    params = params_fn() if params_fn is not None else initial_params(rs.cfg, rs.model_cfg, rs.mesh)
    return init_train_state(params, tx, shardings), None


def make_logger(rs: RunSetup, total_steps: int, start: int) -> metrics_log.MetricsLogger:
  lc = rs.cfg.logging
  return metrics_log.MetricsLogger(
      rs.out, total_steps=total_steps, start_step=start, tensorboard=lc.tensorboard,
      wandb_project=lc.wandb_project, wandb_run=lc.wandb_run, progress_bar=lc.progress_bar, is_main=rs.is_main)


def global_batch(local: dict, accum: int, global_size: int, batch_sharding) -> dict:
  """Process-local rows [B_local, ...] -> global arrays [A, B_global / A, ...] for the jitted step.

  `batch_sharding`: one sharding for every array, or a dict of them by key."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    v = v.reshape((accum, v.shape[0] // accum) + v.shape[1:])
    s = batch_sharding[k] if isinstance(batch_sharding, dict) else batch_sharding
    out[k] = jax.make_array_from_process_local_data(s, v, (accum, global_size // accum) + v.shape[2:])
  return out


def row_shardings(mesh, ranks: dict[str, int]) -> dict[str, NamedSharding]:
  """Per-key shardings for [A, B, ...] batches: B over data x fsdp, the rest replicated."""
  return {k: NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), *([None] * (r - 2)))) for k, r in ranks.items()}


class PreemptionGuard:
  """Within `with`, SIGTERM only sets `.requested`; the loop saves and raises `Preempted`."""

  def __init__(self, enabled: bool):
    self.enabled, self.requested, self.previous = enabled, False, None

  def __enter__(self):
    if self.enabled:
      self.previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))
    return self

  def __exit__(self, *exc):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)
    return False


def checkpoint_tick(cfg, step: int, total_steps: int, save: Callable, guard: PreemptionGuard, ckpt, logger) -> None:
  """After a step: save every `checkpoint.every_steps` and at the end; on SIGTERM save, wait for
  the write, and raise `Preempted` (the CLI exits 143; rerunning resumes)."""
  if step % cfg.checkpoint.every_steps == 0 or step == total_steps:
    save(step)
  if guard.requested:
    save(step, force=True)
    ckpt.wait()
    logger.message(f"SIGTERM: saved step {step} to {ckpt.directory}; exiting (resume by rerunning)")
    raise Preempted(step)


RUNNERS = {
    "sft": "jaxreason.train.loop:run_sft",
    "pretrain": "jaxreason.train.loop:run_sft",  # next-token loss on every token (data format pretrain_text)
    "grpo": "jaxreason.train.grpo_trainer:run_grpo",
    "dpo": "jaxreason.train.preference:run_dpo",
    "reward_model": "jaxreason.train.preference:run_reward_model",
    "expert_iteration": "jaxreason.train.expert_iteration:run_expert_iteration",
}


def run(cfg) -> dict[str, Any]:
  """Trains according to `cfg` (a TrainConfig) with its algorithm's loop; returns final metrics (and eval)."""
  import importlib
  module, name = RUNNERS[cfg.algorithm].split(":")
  try:
    runner = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError):
    raise NotImplementedError(f"algorithm {cfg.algorithm!r} is not implemented yet") from None
  return runner(cfg)


def run_sft(cfg) -> dict[str, Any]:
  """SFT / pre-training: one jitted step per batch of the Grain pipeline."""
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
  from jaxreason.train import nan_guard
  step_fn = jit_step(nan_guard.guard_step(make_sft_step(rs.graphdef, tx, schedule,  # issue 16: NaN guard
                                                        normalization=cfg.train.loss_normalization)),
                     shardings, batch_sharding)
  nans = nan_guard.NanGuard.from_config(cfg)

  logger = make_logger(rs, total_steps, start)
  heldout_eval = None
  if getattr(data, "eval_every", 0):  # token streams: held-out perplexity (train/heldout.py)
    from jaxreason.train.heldout import make_heldout_eval
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

  def save(step: int, force: bool = False):
    nans.check()  # issue 16: stop (exit 3) before saving after too many non-finite steps
    meta = {"step": step, "data_state": data_iter.get_state(), "seed": cfg.seed, "total_steps": total_steps}
    ckpt.save(step, state, rs.model_cfg, meta, force=force)

  last_metrics: dict[str, Any] = {}
  window_tokens, window_start, window_step = 0.0, time.perf_counter(), start
  step = start
  try:
    with PreemptionGuard(cfg.checkpoint.save_on_preemption) as guard:
      while step < total_steps:
        local = next(data_iter)
        window_tokens += float(np.count_nonzero(np.asarray(local["segments"]))) * jax.process_count()
        batch = global_batch(local, accum, gbs, batch_sharding)
        with sharding.use_mesh(rs.mesh, rs.rules):
          state, metrics = step_fn(state, batch)
        step += 1
        nans.observe(step, metrics)
        logger.advance()
        if step % cfg.train.log_every == 0 or step == total_steps:
          metrics = jax.device_get(metrics)
          nans.check()
          elapsed = time.perf_counter() - window_start
          steps_in_window = step - window_step
          tps = window_tokens / max(elapsed, 1e-9)
          last_metrics = {**{k: float(v) for k, v in metrics.items()}, "tokens_per_sec": tps,
                          "step_time": elapsed / max(1, steps_in_window), "mfu": tps * fpt / peak_total,
                          "epoch": step / steps_per_epoch}
          if heldout_eval is not None and (step % data.eval_every == 0 or step == total_steps):
            last_metrics.update(heldout_eval(state.params))  # at log steps only (eval_every: a multiple of log_every)
          logger.log(step, last_metrics)
          window_tokens, window_start, window_step = 0.0, time.perf_counter(), step
        checkpoint_tick(cfg, step, total_steps, save, guard, ckpt, logger)
  finally:
    ckpt.close()
    logger.close()

  result: dict[str, Any] = {"final_step": step, "metrics": last_metrics}
  if cfg.eval is not None:
    result["eval"] = run_final_eval(cfg)
  return result


def _training_question_files(run_dir: str, init_from: str | None, depth: int = 0) -> list[str]:
  """Question files a run trained on (data/train*, data/pairs*, written by the loops), and those of
  the run it started from (`init_from`, followed through each run's config.yaml)."""
  import glob
  import yaml
  from jaxreason import checkpoint
  files = sorted(glob.glob(os.path.join(run_dir, "data", "train[0-9]*.jsonl"))
                 + glob.glob(os.path.join(run_dir, "data", "pairs[0-9]*.jsonl")))
  if init_from and depth < 8 and checkpoint.is_checkpoint(init_from):
    parent = os.path.dirname(checkpoint.resolve_checkpoint(init_from)[0])
    config = os.path.join(parent, "config.yaml")
    parent_init = None
    if os.path.exists(config):
      parent_init = (yaml.safe_load(open(config)) or {}).get("init_from")
    files += _training_question_files(parent, parent_init, depth + 1)
  return files


def held_out(cfg) -> str:
  """The eval data; a built-in task is written to a file without the questions seen in training
  (by this run, or by the runs it was initialised from)."""
  import json
  e = cfg.eval
  if not e.data.startswith("task:"):
    return e.data
  from jaxreason.data.sources import read_rows
  from jaxreason.data.tasks import load_task
  seen = set()
  for path in _training_question_files(cfg.output_dir, cfg.init_from):
    seen.update(str(r.get("question")) for r in read_rows(path))
  for s in cfg.data.train:
    if not s.path.startswith("task:") and os.path.exists(s.path):
      seen.update(str(r.get("question")) for r in read_rows(s.path))
  rows = [r for r in load_task(e.data[len("task:"):]) if str(r["question"]) not in seen]
  path = os.path.join(cfg.output_dir, "data", "eval.jsonl")
  from jaxreason.io_utils import atomic_write_text
  atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
  return path


def run_final_eval(cfg) -> dict:
  from jaxreason.eval.run import EvalConfig, run_eval
  e = cfg.eval
  ecfg = EvalConfig(model=cfg.output_dir, data=held_out(cfg), out=os.path.join(cfg.output_dir, "eval"), format=e.format,
                    budgets=tuple(e.budgets), num_waits=e.num_waits, n=e.n, temperature=e.temperature,
                    max_new_tokens=e.max_new_tokens, max_answer_tokens=e.max_answer_tokens, limit=e.limit,
                    batch_size=e.batch_size, seed=cfg.seed)
  return run_eval(ecfg)
