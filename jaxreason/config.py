"""Training configuration: the `TrainConfig` schema, loaded by the generic `jaxreason.yamlconfig`.

The shared sections are here; each algorithm's own section lives in its package
(`jaxreason/algorithms/*/config.py`) and is re-exported below.

A run is one `TrainConfig`. `load_config` reads a YAML mapping (only what differs from the defaults
below), applies `--set a.b.c=value` overrides (each value parsed as YAML), builds the nested frozen
dataclasses and validates them. Every mistake is a `ConfigError` that says where (file and line, or
the `--set` argument), which dotted key, and what to do: an unknown key names the nearest valid one,
a wrong type names the expected one, a value outside its set lists the allowed values.

    cfg = load_config("configs/quickstart.yaml", ["optimizer.lr=3e-5", "eval=null"])
    text = dump_yaml(cfg)   # loading this text gives back `cfg`

YAML notes: `1e-5` (no dot) is a string to PyYAML; float keys accept such numeric strings. Integers
are accepted for float keys; booleans must be `true`/`false`; `null` only where a key is optional.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import yaml

from jaxreason.algorithms.distill.config import DistillConfig
from jaxreason.algorithms.dpo.config import DPOConfig
from jaxreason.algorithms.expert_iteration.config import ExpertIterationConfig
from jaxreason.algorithms.grpo.config import GRPOConfig
from jaxreason.algorithms.ppo.config import PPOConfig
from jaxreason.algorithms.reward_model.config import RewardModelConfig
from jaxreason.formats import FORMATS
from jaxreason.lora.config import LoraConfig
from jaxreason.models.config import ModelConfig, RopeScaling  # noqa: F401  (RopeScaling: `model.rope_scaling`)
from jaxreason.sharding import MeshConfig
from jaxreason.yamlconfig import ConfigError, Key, choice, choice_detail, dotted, in_range, positive, require
from jaxreason.yamlconfig import load as _load
from jaxreason.yamlconfig import plain

__all__ = [
    "ConfigError", "TrainConfig", "DataSource", "DataConfig", "OptimizerConfig", "ScheduleConfig",
    "LoopConfig", "CheckpointConfig", "LoggingConfig", "EvalSection", "RolloutConfig", "GRPOConfig", "PPOConfig",
    "DPOConfig", "RewardModelConfig", "ExpertIterationConfig", "load_config", "config_to_dict",
    "dump_yaml", "EXECUTION_FIELDS",
]

ALGORITHMS = ("sft", "pretrain", "dpo", "grpo", "ppo", "reward_model", "expert_iteration", "distill")
# `preference`: prompt/chosen/rejected rows for dpo and reward_model (jaxreason.data.preference).
DATA_FORMATS = ("s1", "think", "chat_messages", "prompt_response", "minimind", "r1_zero", "pretrain_text",
                "preference")
EVAL_FORMATS = tuple(FORMATS)  # generation formats (jaxreason.formats)
DECAYS = ("cosine", "linear", "constant")
LOSS_NORMALIZATIONS = ("token", "sequence")
ON_BAD_ROW = ("error", "skip")
TRUNCATIONS = ("right", "drop")
DTYPES = ("float32", "bfloat16", "float16")
# The only `model` keys a config may set when the architecture comes from `init_from`.
EXECUTION_FIELDS = ("dtype", "param_dtype", "attention_backend", "remat", "scan_layers")


# ----------------------------------------------------------------------------------- the schema
@dataclasses.dataclass(frozen=True)
class DataSource:
  """One training data source, mixed with the others by `weight`."""

  path: str  # .jsonl / .json / .parquet file, or a `datasets` dir written by `save_to_disk`
  format: str = "s1"  # how rows become text; one of DATA_FORMATS (inherits `data.format` in YAML)
  weight: float = 1.0  # relative sampling weight among the `data.train` sources
  split: str | None = None  # split of a `datasets` dir; None: its only split

  def __post_init__(self):
    require(bool(self.path), "path", "must not be empty")
    choice(self, "format", DATA_FORMATS)
    positive(self, "weight")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # Sources; in YAML also a path or a list of paths (each gets `format` below).
  train: tuple[DataSource, ...] = ()
  format: str = "s1"  # default format of the sources: s1 | think | chat_messages | ... (DATA_FORMATS)
  seq_len: int = 2048  # tokens per training sequence
  packing: bool = True  # pack several examples into one sequence (attention kept per example)
  shuffle: bool = True  # shuffle examples every epoch (seeded by `seed`)
  num_epochs: int = 1  # passes over the data (when `train.max_steps` is null)
  on_bad_row: str = "error"  # a malformed row: `error` stops with its file and line, `skip` drops it
  tag_weights: dict[str, float] = dataclasses.field(default_factory=dict)  # loss weight per tag, e.g. {"<think>": 10.0}
  truncation: str = "right"  # an example longer than seq_len: `right` cuts its end, `drop` skips it
  num_workers: int = 0  # data-loading worker processes; 0 = in the training process

  def __post_init__(self):
    choice(self, "format", DATA_FORMATS)
    positive(self, "seq_len", "num_epochs")
    choice(self, "on_bad_row", ON_BAD_ROW)
    choice(self, "truncation", TRUNCATIONS)
    require(self.num_workers >= 0, "num_workers", f"must be >= 0; got {self.num_workers}")
    for tag, w in self.tag_weights.items():
      require(bool(tag), "tag_weights", "keys must be non-empty tag strings such as '<think>'")
      require(w >= 0, ("tag_weights", tag), f"must be >= 0; got {w}")

  @staticmethod
  def config_prepare(raw: dict, key: Key, where: Callable[[Key], str]) -> dict:
    """`data.train` as a path or a list of paths/mappings -> mappings, each with a format."""
    train, fmt = raw.get("train"), raw.get("format", "s1")
    if isinstance(fmt, str) and fmt not in DATA_FORMATS:
      fkey = key + ("format",)
      raise ConfigError(f"{where(fkey)}: {dotted(fkey)} {choice_detail(fmt, DATA_FORMATS)}")
    if isinstance(train, str):
      train = [train]
    if not isinstance(train, (list, tuple)):
      return raw
    items = []
    for item in train:
      item = {"path": item} if isinstance(item, str) else item
      if isinstance(item, dict) and "format" not in item and isinstance(fmt, str):
        item = {**item, "format": fmt}
      items.append(item)
    return {**raw, "train": items}



@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with global-norm clipping (jaxreason.train.optim)."""

  lr: float = 1e-5  # peak learning rate
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 1e-4  # decoupled; >= 2-D weights only
  decay_embeddings: bool = False  # also decay the token embedding (and an untied lm_head)
  max_grad_norm: float | None = 1.0  # global-norm clip; null: no clipping
  mu_dtype: str | None = None  # dtype of Adam's first moment; null: the parameters' dtype

  def __post_init__(self):
    positive(self, "lr", "eps")
    in_range(self, "b1", 0.0, 1.0, hi_open=True)
    in_range(self, "b2", 0.0, 1.0, hi_open=True)
    require(self.weight_decay >= 0, "weight_decay", f"must be >= 0; got {self.weight_decay}")
    positive(self, "max_grad_norm", optional=True)
    require(self.mu_dtype is None or self.mu_dtype in DTYPES, "mu_dtype",
             f"must be one of {', '.join(DTYPES)} or null; got {self.mu_dtype!r}")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Linear warm-up to `optimizer.lr`, then decay to `min_lr_ratio * lr` at the last step."""

  warmup_steps: int | None = None  # null: warmup_ratio * total steps
  warmup_ratio: float = 0.05
  decay: str = "cosine"  # cosine | linear | constant
  min_lr_ratio: float = 0.0  # final lr as a fraction of the peak

  def __post_init__(self):
    require(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps",
             f"must be >= 0, or null to use warmup_ratio; got {self.warmup_steps}")
    in_range(self, "warmup_ratio", 0.0, 1.0)
    choice(self, "decay", DECAYS)
    in_range(self, "min_lr_ratio", 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  global_batch_size: int = 16  # sequences per optimizer step, over all devices
  micro_batch_size: int | None = None  # sequences per forward/backward; null: the whole global batch
  max_steps: int | None = None  # optimizer steps; null: from data.num_epochs
  loss_normalization: str = "token"  # token: mean over all target tokens; sequence: per sequence, then mean
  log_every: int = 10  # steps between metric logs
  nan_policy: str = "stop"  # non-finite loss/grad norm: the update is skipped; stop: exit after nan_max_consecutive in a row; skip: never stop
  nan_max_consecutive: int = 3  # consecutive non-finite steps that stop the run (nan_policy: stop)

  def __post_init__(self):
    positive(self, "global_batch_size", "log_every", "nan_max_consecutive")
    choice(self, "nan_policy", ("stop", "skip"))
    positive(self, "micro_batch_size", "max_steps", optional=True)
    if self.micro_batch_size is not None:
      require(self.global_batch_size % self.micro_batch_size == 0, "micro_batch_size",
               f"({self.micro_batch_size}) must divide global_batch_size ({self.global_batch_size}); "
               "pick a divisor, or null for no gradient accumulation")
    choice(self, "loss_normalization", LOSS_NORMALIZATIONS)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 500  # steps between checkpoints (one is always written at the end)
  keep_last: int = 3  # most recent checkpoints kept
  keep_steps: tuple[int, ...] = ()  # steps whose checkpoints are never deleted
  async_save: bool = True  # write in the background while training continues
  save_on_preemption: bool = True  # checkpoint when the job receives SIGTERM

  def __post_init__(self):
    positive(self, "every_steps", "keep_last")
    for i, step in enumerate(self.keep_steps):
      require(step > 0, ("keep_steps", i), f"must be a positive step; got {step}")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  tensorboard: bool = True  # event files under output_dir/tensorboard
  wandb_project: str | None = None  # Weights & Biases project; null: no wandb
  wandb_run: str | None = None  # wandb run name; null: output_dir's name
  progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class EvalSection:
  """An evaluation at the end of training (as `python -m jaxreason.eval`)."""

  data: str  # eval file, `datasets` dir, or built-in task
  format: str = "s1"  # prompt/answer format: one of EVAL_FORMATS
  budgets: tuple[int | None, ...] = (None,)  # max thinking tokens per sweep point; null: no cap
  num_waits: int = 0  # times "Wait" is appended when the model tries to stop thinking
  n: int = 1  # samples per question
  temperature: float = 0.0
  max_new_tokens: int = 512
  max_answer_tokens: int | None = None  # cap on the answer after thinking; null: none
  limit: int | None = None  # first `limit` questions only; null: all
  batch_size: int = 32

  def __post_init__(self):
    require(bool(self.data), "data", "must not be empty")
    choice(self, "format", EVAL_FORMATS)
    require(len(self.budgets) > 0, "budgets", "must list at least one budget (null: no cap)")
    for i, b in enumerate(self.budgets):
      require(b is None or b > 0, ("budgets", i), f"must be positive, or null for no cap; got {b}")
    require(self.num_waits >= 0, "num_waits", f"must be >= 0; got {self.num_waits}")
    require(self.temperature >= 0, "temperature", f"must be >= 0; got {self.temperature}")
    positive(self, "n", "max_new_tokens", "batch_size")
    positive(self, "max_answer_tokens", "limit", optional=True)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Sampling from the policy during training (GRPO rollouts, expert iteration, DPO self-pairs).

  Prompts are the questions of `data.train` (rows with a question/problem/prompt and an answer),
  rendered in `format` (its prompt and thinking opener, as at evaluation).
  """

  format: str = "s1"  # prompt/answer format: one of EVAL_FORMATS (also the default reward)
  prompts_per_step: int = 16  # questions per rollout batch (all processes together)
  num_generations: int = 8  # G: completions per question
  temperature: float = 1.0  # the policy's logits are divided by it when scoring, too
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 512  # the whole completion (thinking + answer)
  max_thinking_tokens: int | None = None  # budget forcing during rollouts; null: no cap
  num_waits: int = 0  # budget forcing: "Wait" extensions
  stop: tuple[str, ...] = ()  # extra stop strings (e.g. "</answer>"); the tokenizer's eos always stops
  batch_size: int | None = None  # questions per sampler call; null: the whole rollout batch
  # The rollout engine: "continuous" (continuous batching in `slots` decode slots, the tail shrinking
  # as rows end) or "dense" (every completion in its own row until the longest ends; the old sampler).
  engine: str = "continuous"
  slots: int | None = None  # continuous batching's decode slots (a multiple of num_generations); null: 256
  # The sampler's own (data, fsdp, tensor) layout over the same devices (e.g. tensor: 4 so a 7B model's
  # weights split across chips while decoding); null: the training mesh. Weights reshard on device.
  mesh: MeshConfig | None = None
  # The reward whose verdict is "correct" (logged accuracy; DPO self-pairs' right/wrong): a reward
  # name or module:function; null: the format's reward.
  accuracy_reward: str | None = None

  def __post_init__(self):
    choice(self, "format", EVAL_FORMATS)
    positive(self, "prompts_per_step", "num_generations", "max_new_tokens")
    positive(self, "max_thinking_tokens", "batch_size", "slots", optional=True)
    choice(self, "engine", ("continuous", "dense"))
    require(self.slots is None or self.slots >= self.num_generations, "slots",
            f"must be >= num_generations ({self.num_generations}): a question's samples share one prefill; "
            f"got {self.slots}")
    require(self.temperature >= 0, "temperature", f"must be >= 0; got {self.temperature}")
    require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1]; got {self.top_p}")
    require(self.top_k >= 0, "top_k", f"must be >= 0 (0: off); got {self.top_k}")
    require(self.num_waits >= 0, "num_waits", f"must be >= 0; got {self.num_waits}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  output_dir: str  # checkpoints, logs and the resolved config go here
  seed: int = 0  # parameter init, data order and sampling
  algorithm: str = "sft"  # sft | pretrain | dpo | grpo | ppo | reward_model | expert_iteration | distill
  init_from: str | None = None  # HF model dir or Orbax run/checkpoint dir; null: from scratch
  allow_config_change: bool = False  # resume even if architecture, data or batch size changed (CLI --allow-config-change)
  tokenizer: str | None = None  # tokenizer dir or "builtin:char"; null: init_from's
  # Architecture (from scratch) and execution. With init_from, only EXECUTION_FIELDS may be set.
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # data x fsdp x tensor; -1: the rest
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
  train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
  eval: EvalSection | None = None  # evaluation at the end; null: none
  rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)  # grpo, expert_iteration, dpo self_pairs
  grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
  ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
  dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
  reward_model: RewardModelConfig = dataclasses.field(default_factory=RewardModelConfig)
  expert_iteration: ExpertIterationConfig = dataclasses.field(default_factory=ExpertIterationConfig)
  distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)  # algorithm distill (SPEC §11)
  lora: LoraConfig | None = None  # low-rank adapters on a frozen base, for every algorithm; null: full training

  def __post_init__(self):
    require(bool(self.output_dir), "output_dir", "must not be empty")
    require(self.seed >= 0, "seed", f"must be >= 0; got {self.seed}")
    choice(self, "algorithm", ALGORITHMS)
    for name in ("dtype", "param_dtype"):
      value = getattr(self.model, name)
      require(value in DTYPES, ("model", name), f"must be one of {', '.join(DTYPES)}; got {value!r}")
    sizes = {a: getattr(self.mesh, a) for a in ("data", "fsdp", "tensor")}
    for axis, size in sizes.items():
      require(size > 0 or size == -1, ("mesh", axis),
               f"must be a positive size, or -1 for all remaining devices; got {size}")
    require(list(sizes.values()).count(-1) <= 1, ("mesh",),
             f"may use -1 for one axis only; got {sizes}")
    warmup, steps = self.schedule.warmup_steps, self.train.max_steps
    require(warmup is None or steps is None or warmup <= steps, ("schedule", "warmup_steps"),
             f"({warmup}) must not exceed train.max_steps ({steps})")


# ---------------------------------------------------------------------------------- public API
def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (),
                base: dict | None = None) -> TrainConfig:
  """The validated TrainConfig from `base` (defaults under the file), the YAML file, then `--set`s.

  `overrides` are `a.b.c=value` strings; each value is parsed as YAML (`data.seq_len=512`,
  `data.tag_weights={"<think>": 10}`, `eval=null`). Raises ConfigError.
  """
  cfg, data, where = _load(TrainConfig, path, overrides, base)
  if cfg.init_from is not None and isinstance(data.get("model"), dict):
    for name in data["model"]:
      if name not in EXECUTION_FIELDS:
        raise ConfigError(
            f"{where(('model', name))}: model.{name} cannot be set together with init_from "
            f"({cfg.init_from!r}): the architecture comes from that checkpoint. Remove model.{name}, "
            f"or set init_from: null to train from scratch. With init_from, model may set only "
            f"{', '.join(EXECUTION_FIELDS)}.")
  return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
  """Plain data (lists, dicts, scalars) that `load_config` turns back into `cfg`.

  With `init_from`, `model` holds the execution fields only (plus any architecture field that
  differs from the defaults, which loading then reports as an error).
  """
  out = plain(cfg)
  if cfg.init_from is not None:
    default = ModelConfig()
    out["model"] = {k: v for k, v in out["model"].items()
                    if k in EXECUTION_FIELDS or getattr(cfg.model, k) != getattr(default, k)}
  return out


def dump_yaml(cfg: TrainConfig) -> str:
  """The whole config as YAML (every key, defaults included)."""
  return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
