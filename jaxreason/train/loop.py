"""The algorithm-agnostic training harness: run setup, the one training loop (`fit`), final eval.

Every algorithm (`jaxreason.algorithms`) builds its run from these pieces: `setup_run` (run dir,
tokenizer, model config, mesh, abstract model), `build_data`, `make_tx`, `restore_or_init`
(resuming is automatic when `output_dir/checkpoints` holds a step), then `fit` runs its
train step per step, logs, checkpoints asynchronously (params, optimizer state and the
algorithm's train_meta), saves on SIGTERM (preemption) before exiting, and `with_final_eval` runs
the configured evaluation. Extension points for run-wide checks: `Hook` / `DEFAULT_HOOKS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxreason import sharding
from jaxreason.config import EXECUTION_FIELDS
from jaxreason.io_utils import write_jsonl
from jaxreason.models.build import abstract_model, init_model
from jaxreason.models.config import ModelConfig
from jaxreason.io_utils import atomic_dir
from jaxreason.train import config_history, metrics_log, optim, run_lock
from jaxreason.train.nan_guard import NanGuard
from jaxreason.train.checkpointing import TrainCheckpointer
from jaxreason.train.state import TrainState, init_train_state

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
  from jaxreason.data.tasks import load_task
  return write_jsonl(os.path.join(out_dir, "data", f"{name}.jsonl"), load_task(spec[len("task:"):]))


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


# Called once per run with the RunSetup, after config.yaml and tokenizer/ are written and before any
# checkpoint is read or data built (e.g. a run lock, a config-history entry).
RUN_START_HOOKS: list[Callable[["RunSetup"], None]] = []


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
  is_main = jax.process_index() == 0
  os.makedirs(cfg.output_dir, exist_ok=True)
  run_lock.acquire(cfg.output_dir, jax.process_index())  # one run per output_dir, on every host
  config_history.record(cfg, is_main)  # config.yaml + config.<step>.yaml; refuses inexact resumes
  tokenizer = resolve_tokenizer(cfg)
  if is_main and not os.path.isdir(os.path.join(cfg.output_dir, "tokenizer")):
    with atomic_dir(os.path.join(cfg.output_dir, "tokenizer")) as tmp:
      tokenizer.save_pretrained(tmp)
  model_cfg = resolve_model_config(cfg, tokenizer)
  mesh = sharding.make_mesh(cfg.mesh)
  graphdef, abs_state = nnx.split(abstract_model(model_cfg))
  rs = RunSetup(cfg=cfg, tokenizer=tokenizer, model_cfg=model_cfg, mesh=mesh, rules=sharding.TRAIN_RULES,
                graphdef=graphdef, abs_state=abs_state, is_main=is_main)
  for hook in RUN_START_HOOKS:
    hook(rs)
  return rs


def make_tx(cfg, abs_params: dict, total_steps: int):
  """AdamW + schedule from the config's optimizer and schedule sections -> (tx, schedule)."""
  warmup = optim.warmup_steps(total_steps, cfg.schedule.warmup_steps, cfg.schedule.warmup_ratio)
  o = cfg.optimizer
  lora = getattr(cfg, "lora", None)
  if lora is not None:  # the optimizer holds the adapters' state only (jaxreason.lora.train)
    from jaxreason.lora.adapters import abstract_trainable
    from jaxreason.lora.train import LoraTransformation
    tx, schedule = make_tx(dataclasses.replace(cfg, lora=None), abstract_trainable(abs_params, lora), total_steps)
    return LoraTransformation(tx.init, tx.update, lora), schedule
  return optim.make_optimizer(
      abs_params, lr=o.lr, total_steps=total_steps, warmup=warmup, decay=cfg.schedule.decay,
      min_lr_ratio=cfg.schedule.min_lr_ratio, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
      decay_embeddings=o.decay_embeddings, max_grad_norm=o.max_grad_norm, mu_dtype=o.mu_dtype)


def make_checkpointer(cfg) -> TrainCheckpointer:
  items = None
  if getattr(cfg, "lora", None) is not None:  # adapters only: every step records its base (jaxreason.lora.train)
    from jaxreason.lora.train import LORA_ITEM, base_pointer
    items = {LORA_ITEM: base_pointer(cfg)}
  return TrainCheckpointer(os.path.join(cfg.output_dir, "checkpoints"), keep_last=cfg.checkpoint.keep_last,
                           keep_steps=tuple(cfg.checkpoint.keep_steps), async_save=cfg.checkpoint.async_save,
                           items=items)


def restore_or_init(rs: RunSetup, tx, shardings: TrainState, ckpt: TrainCheckpointer,
                    params_fn: Callable[[], dict] | None = None) -> tuple[TrainState, dict | None]:
  """The latest checkpoint's state and train_meta, or a fresh state (params from `params_fn`,
  default: `init_from` or a seeded init) and None."""
  from jaxreason.lora import adapters as lora_adapters
  from jaxreason.lora.train import spec_of
  spec = spec_of(tx)  # LoRA: the state's params are the adapters; the base is loaded beside them
  abs_params = rs.abs_params if spec is None else lora_adapters.abstract_trainable(rs.abs_params, spec)
  trained = dataclasses.replace(shardings, frozen=None)

  def base() -> dict:
    with sharding.use_mesh(rs.mesh, rs.rules):
      return params_fn() if params_fn is not None else initial_params(rs.cfg, rs.model_cfg, rs.mesh)

  def with_frozen(state: TrainState, params: dict) -> TrainState:
    frozen = lora_adapters.frozen_tree(params, spec, rs.cfg.seed)
    return dataclasses.replace(state, frozen=jax.device_put(frozen, shardings.frozen))

  latest = ckpt.latest_step()
  if latest is not None:
    abstract = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                              abs_params)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, trained)
    state, meta, _ = ckpt.restore(latest, abstract)
    return (state if spec is None else with_frozen(state, base())), meta
  params = base()
  if spec is None:
    with sharding.use_mesh(rs.mesh, rs.rules):
      return init_train_state(params, tx, shardings), None
  trainable, frozen = lora_adapters.split(params, spec, rs.cfg.seed)
  trainable = jax.device_put(trainable, trained.params)
  with sharding.use_mesh(rs.mesh, rs.rules):
    state = init_train_state(trainable, tx, trained)
  return dataclasses.replace(state, frozen=jax.device_put(frozen, shardings.frozen)), None


def reference_params(rs: RunSetup, state: TrainState) -> dict:
  """The frozen initial policy of a KL term, in the compute dtype. With LoRA: {} (no adapters),
  which the scorers merge into `state.frozen`, the base itself: no second copy is kept."""
  if state.frozen is not None:
    return {}
  with sharding.use_mesh(rs.mesh, rs.rules):
    params = initial_params(rs.cfg, rs.model_cfg, rs.mesh)
  dt = jnp.dtype(rs.model_cfg.dtype)
  return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


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


# ----------------------------------------------------------------------------------------------
# The one training loop.


class Hook:
  """Something `fit` calls at fixed points; override what you need (all no-ops here).

  - `on_start(rs, state, start)`: before the first step of each `fit` (expert iteration calls
    `fit` once per round; run-wide setup such as a run lock belongs in `RUN_START_HOOKS`).
  - `after_step(step, state, metrics)`: after every dispatched step, before the checkpoint tick
    (`metrics` are device arrays: fetching them waits for the step; e.g. a NaN guard that checks
    every k steps and raises to stop before a bad checkpoint is written).
  - `on_log(step, row)`: with each logged row (host floats).
  - `on_end(step)`: when the loop ends, normally or not.
  """

  def on_start(self, rs: "RunSetup", state: TrainState, start: int) -> None: ...

  def after_step(self, step: int, state: TrainState, metrics: dict) -> None: ...

  def on_log(self, step: int, row: dict[str, float]) -> None: ...

  def on_end(self, step: int) -> None: ...


# Hook factories (rs -> Hook) that every `fit` runs, after the ones passed in.
DEFAULT_HOOKS: list[Callable[["RunSetup"], Hook]] = []


@dataclasses.dataclass
class StepOutput:
  """What one training step gives back to `fit`.

  metrics: device (or host) scalars, fetched only at log points; tokens: tokens this step trained
  on, for tokens_per_sec (None: no throughput keys); host: host floats logged as they are.
  """

  state: TrainState
  metrics: dict[str, Any]
  tokens: float | None = None
  host: dict[str, float] = dataclasses.field(default_factory=dict)


class _Progress:
  """Advances the progress bar by COMPLETED steps (a step counts once its metrics are ready), not
  by dispatched ones: with asynchronous dispatch the host runs ahead of the device."""

  def __init__(self, logger):
    self.logger, self.pending = logger, []

  def dispatched(self, metrics: dict) -> None:
    leaves = [x for x in jax.tree.leaves(metrics) if isinstance(x, jax.Array)]
    self.pending.append(leaves[0] if leaves else None)
    self.poll()

  def poll(self) -> None:
    done = 0
    while self.pending and (self.pending[0] is None or self.pending[0].is_ready()):
      self.pending.pop(0)
      done += 1
    if done:
      self.logger.advance(done)

  def flush(self) -> None:  # after a blocking fetch: everything dispatched has completed
    if self.pending:
      self.logger.advance(len(self.pending))
      self.pending = []


def fit(rs: "RunSetup", state: TrainState, *, start: int, total_steps: int,
        train_step: Callable[[TrainState, int], StepOutput], save_meta: Callable[[int], dict], ckpt: TrainCheckpointer,
        logger: metrics_log.MetricsLogger, log_extra: Callable[[int, dict], dict] | None = None,
        guard: "PreemptionGuard | None" = None, extra_items: dict | None = None, save_at_end: bool = True,
        log_first: bool = False, hooks: Sequence[Hook] = ()) -> tuple[TrainState, int, dict]:
  """Runs steps start+1 .. total_steps -> (state, final step, last logged row). The one loop.

  train_step(state, step) runs step `step + 1` (build or fetch its batch, run the jitted update
  inside `sharding.use_mesh`).
  Every `train.log_every` steps (and at the last step, and the first with `log_first`) the step's
  metrics are fetched and logged with `tokens_per_sec` / `step_time` over the window since the
  last log and whatever `log_extra(step, row)` adds. After each step: `checkpoint.every_steps`
  saves (and one at total_steps when `save_at_end`), and on SIGTERM a forced save, a wait for the
  write and `Preempted`. Checkpoints carry `save_meta(step)` as their train_meta. `guard`: an
  outer PreemptionGuard (when the caller spans more than this loop, e.g. rollouts between fits);
  otherwise fit installs its own. The caller owns (and closes) `ckpt` and `logger` (`fit_and_close`).
  """
  cfg = rs.cfg
  hooks = list(hooks) + [make(rs) for make in DEFAULT_HOOKS]
  progress = _Progress(logger)
  holder = {"state": state}

  nans = NanGuard.from_config(cfg)  # the jitted step skips non-finite updates (train.step.jit_step)

  def save(step: int, force: bool = False):
    nans.check()  # stops (exit 3) before saving after too many non-finite steps in a row
    ckpt.save(step, holder["state"], rs.model_cfg, save_meta(step), force=force, extra=extra_items)

  for h in hooks:
    h.on_start(rs, state, start)
  last: dict[str, Any] = {}
  window_tokens, window_start, window_step = 0.0, time.perf_counter(), start
  step = start
  own_guard = PreemptionGuard(cfg.checkpoint.save_on_preemption) if guard is None else contextlib.nullcontext(guard)
  try:
    with own_guard as g:
      while step < total_steps:
        out = train_step(holder["state"], step)
        holder["state"] = out.state
        step += 1
        if out.tokens is not None:
          window_tokens += out.tokens
        progress.dispatched(out.metrics)
        nans.observe(step, out.metrics)
        for h in hooks:
          h.after_step(step, out.state, out.metrics)
        if step % cfg.train.log_every == 0 or step == total_steps or (log_first and step == start + 1):
          metrics = jax.device_get(out.metrics)  # waits for the step: the window's time includes it
          progress.flush()
          nans.check()
          elapsed = time.perf_counter() - window_start
          row = {**{k: float(v) for k, v in metrics.items()}, **out.host}
          if out.tokens is not None:
            row.update(tokens_per_sec=window_tokens / max(elapsed, 1e-9),
                       step_time=elapsed / max(1, step - window_step))
          if log_extra is not None:
            row.update(log_extra(step, row))
          logger.log(step, row)
          for h in hooks:
            h.on_log(step, row)
          last = row
          window_tokens, window_start, window_step = 0.0, time.perf_counter(), step
        if step == total_steps:  # at the end: saved here, or by the caller (save_at_end=False)
          if save_at_end:
            save(step)
        elif step % cfg.checkpoint.every_steps == 0:
          save(step)
        if g.requested:
          save(step, force=True)
          ckpt.wait()
          logger.message(f"SIGTERM: saved step {step} to {ckpt.directory}; exiting (resume by rerunning)")
          raise Preempted(step)
  finally:
    progress.flush()
    for h in hooks:
      h.on_end(step)
  return holder["state"], step, last


def fit_and_close(rs: "RunSetup", state: TrainState, *, ckpt, logger: metrics_log.MetricsLogger,
                  **kwargs: Any) -> tuple[TrainState, int, dict]:
  """`fit`, then the checkpointer and the logger closed whether it finished or raised (what every
  algorithm's run ends with). `ckpt` needs `save`/`wait` for fit and `close` here."""
  try:
    return fit(rs, state, ckpt=ckpt, logger=logger, **kwargs)
  finally:
    ckpt.close()
    logger.close()


def with_final_eval(cfg, result: dict[str, Any]) -> dict[str, Any]:
  """The run's result, plus the configured final evaluation (`eval:`) when there is one."""
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
  return write_jsonl(os.path.join(cfg.output_dir, "data", "eval.jsonl"), rows)


def run_final_eval(cfg) -> dict:
  """`python -m jaxreason.eval` on the run's final checkpoint, with the `eval:` section's settings
  (every EvalSection field is an EvalConfig field of the same name)."""
  from jaxreason.eval.run import EvalConfig, run_eval
  section = {f.name: getattr(cfg.eval, f.name) for f in dataclasses.fields(cfg.eval)}
  ecfg = EvalConfig(**{**section, "model": cfg.output_dir, "data": held_out(cfg),
                       "out": os.path.join(cfg.output_dir, "eval"), "seed": cfg.seed})
  return run_eval(ecfg)
