"""Training configuration: frozen dataclasses, YAML files, dotted `--set` overrides, strict checks.

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
import difflib
import functools
import os
import re
import types
import typing
from typing import Any, Callable, Sequence, Union

import yaml

from jaxreason.models.config import ModelConfig, RopeScaling  # noqa: F401  (RopeScaling: `model.rope_scaling`)
from jaxreason.sharding import MeshConfig

__all__ = [
    "ConfigError", "TrainConfig", "DataSource", "DataConfig", "OptimizerConfig", "ScheduleConfig",
    "LoopConfig", "CheckpointConfig", "LoggingConfig", "EvalSection", "RolloutConfig", "GRPOConfig",
    "DPOConfig", "RewardModelConfig", "ExpertIterationConfig", "load_config", "config_to_dict",
    "dump_yaml", "EXECUTION_FIELDS",
]

ALGORITHMS = ("sft", "pretrain", "dpo", "grpo", "reward_model", "expert_iteration")
# `preference`: prompt/chosen/rejected rows for dpo and reward_model (jaxreason.data.preference).
DATA_FORMATS = ("s1", "think", "chat_messages", "prompt_response", "minimind", "r1_zero", "pretrain_text",
                "preference")
EVAL_FORMATS = ("s1", "think", "r1_zero", "boxed", "chat", "raw")  # = jaxreason.eval.formats.EVAL_FORMATS
DECAYS = ("cosine", "linear", "constant")
LOSS_NORMALIZATIONS = ("token", "sequence")
ON_BAD_ROW = ("error", "skip")
TRUNCATIONS = ("right", "drop")
DTYPES = ("float32", "bfloat16", "float16")
# The only `model` keys a config may set when the architecture comes from `init_from`.
EXECUTION_FIELDS = ("dtype", "param_dtype", "attention_backend", "remat", "scan_layers")

Key = tuple  # a dotted key as a path of names and list indices: ("data", "train", 0, "path")


class ConfigError(ValueError):
  """A configuration mistake, worded for the user: where, which key, what to do."""

  def __init__(self, message: str, key: Key = (), detail: str | None = None):
    super().__init__(message)
    self.key = key  # from a dataclass check: the key at fault, relative to the checked object
    self.detail = detail  # that message without the key, for the loader to prefix with location


def _dotted(key: Key) -> str:
  out = ""
  for part in key:
    out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
  return out


def _invalid(key: str | Key, detail: str) -> ConfigError:
  key = key if isinstance(key, tuple) else (key,)
  return ConfigError(f"{_dotted(key)} {detail}", key, detail)


def _require(ok: bool, key: str | Key, detail: str) -> None:
  if not ok:
    raise _invalid(key, detail)


def _choice(obj: Any, name: str, allowed: Sequence[str]) -> None:
  value = getattr(obj, name)
  if value not in allowed:
    raise _invalid(name, _choice_detail(value, allowed))


def _choice_detail(value: Any, allowed: Sequence[str]) -> str:
  near = difflib.get_close_matches(str(value), allowed, n=1)
  return f"must be one of {', '.join(allowed)}; got {value!r}" + (f" (did you mean {near[0]!r}?)" if near else "")


def _positive(obj: Any, *names: str, optional: bool = False) -> None:
  for name in names:
    value = getattr(obj, name)
    if not (optional and value is None):
      _require(value > 0, name, f"must be positive{', or null' if optional else ''}; got {value!r}")


def _in_range(obj: Any, name: str, lo: float, hi: float, hi_open: bool = False) -> None:
  value = getattr(obj, name)
  ok = lo <= value < hi if hi_open else lo <= value <= hi
  _require(ok, name, f"must be in [{lo}, {hi}{')' if hi_open else ']'}; got {value!r}")


# ----------------------------------------------------------------------------------- the schema
@dataclasses.dataclass(frozen=True)
class DataSource:
  """One training data source, mixed with the others by `weight`."""

  path: str  # .jsonl / .json / .parquet file, or a `datasets` dir written by `save_to_disk`
  format: str = "s1"  # how rows become text; one of DATA_FORMATS (inherits `data.format` in YAML)
  weight: float = 1.0  # relative sampling weight among the `data.train` sources
  split: str | None = None  # split of a `datasets` dir; None: its only split

  def __post_init__(self):
    _require(bool(self.path), "path", "must not be empty")
    _choice(self, "format", DATA_FORMATS)
    _positive(self, "weight")


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
    _choice(self, "format", DATA_FORMATS)
    _positive(self, "seq_len", "num_epochs")
    _choice(self, "on_bad_row", ON_BAD_ROW)
    _choice(self, "truncation", TRUNCATIONS)
    _require(self.num_workers >= 0, "num_workers", f"must be >= 0; got {self.num_workers}")
    for tag, w in self.tag_weights.items():
      _require(bool(tag), "tag_weights", "keys must be non-empty tag strings such as '<think>'")
      _require(w >= 0, ("tag_weights", tag), f"must be >= 0; got {w}")


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
    _positive(self, "lr", "eps")
    _in_range(self, "b1", 0.0, 1.0, hi_open=True)
    _in_range(self, "b2", 0.0, 1.0, hi_open=True)
    _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0; got {self.weight_decay}")
    _positive(self, "max_grad_norm", optional=True)
    _require(self.mu_dtype is None or self.mu_dtype in DTYPES, "mu_dtype",
             f"must be one of {', '.join(DTYPES)} or null; got {self.mu_dtype!r}")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Linear warm-up to `optimizer.lr`, then decay to `min_lr_ratio * lr` at the last step."""

  warmup_steps: int | None = None  # null: warmup_ratio * total steps
  warmup_ratio: float = 0.05
  decay: str = "cosine"  # cosine | linear | constant
  min_lr_ratio: float = 0.0  # final lr as a fraction of the peak

  def __post_init__(self):
    _require(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps",
             f"must be >= 0, or null to use warmup_ratio; got {self.warmup_steps}")
    _in_range(self, "warmup_ratio", 0.0, 1.0)
    _choice(self, "decay", DECAYS)
    _in_range(self, "min_lr_ratio", 0.0, 1.0)


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
    _positive(self, "global_batch_size", "log_every", "nan_max_consecutive")
    _choice(self, "nan_policy", ("stop", "skip"))
    _positive(self, "micro_batch_size", "max_steps", optional=True)
    if self.micro_batch_size is not None:
      _require(self.global_batch_size % self.micro_batch_size == 0, "micro_batch_size",
               f"({self.micro_batch_size}) must divide global_batch_size ({self.global_batch_size}); "
               "pick a divisor, or null for no gradient accumulation")
    _choice(self, "loss_normalization", LOSS_NORMALIZATIONS)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 500  # steps between checkpoints (one is always written at the end)
  keep_last: int = 3  # most recent checkpoints kept
  keep_steps: tuple[int, ...] = ()  # steps whose checkpoints are never deleted
  async_save: bool = True  # write in the background while training continues
  save_on_preemption: bool = True  # checkpoint when the job receives SIGTERM

  def __post_init__(self):
    _positive(self, "every_steps", "keep_last")
    for i, step in enumerate(self.keep_steps):
      _require(step > 0, ("keep_steps", i), f"must be a positive step; got {step}")


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
    _require(bool(self.data), "data", "must not be empty")
    _choice(self, "format", EVAL_FORMATS)
    _require(len(self.budgets) > 0, "budgets", "must list at least one budget (null: no cap)")
    for i, b in enumerate(self.budgets):
      _require(b is None or b > 0, ("budgets", i), f"must be positive, or null for no cap; got {b}")
    _require(self.num_waits >= 0, "num_waits", f"must be >= 0; got {self.num_waits}")
    _require(self.temperature >= 0, "temperature", f"must be >= 0; got {self.temperature}")
    _positive(self, "n", "max_new_tokens", "batch_size")
    _positive(self, "max_answer_tokens", "limit", optional=True)


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


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
  # The sampler's own (data, fsdp, tensor) layout over the same devices (e.g. tensor: 4 so a 7B model's
  # weights split across chips while decoding); null: the training mesh. Weights reshard on device.
  mesh: MeshConfig | None = None

  def __post_init__(self):
    _choice(self, "format", EVAL_FORMATS)
    _positive(self, "prompts_per_step", "num_generations", "max_new_tokens")
    _positive(self, "max_thinking_tokens", "batch_size", optional=True)
    _require(self.temperature >= 0, "temperature", f"must be >= 0; got {self.temperature}")
    _require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1]; got {self.top_p}")
    _require(self.top_k >= 0, "top_k", f"must be >= 0 (0: off); got {self.top_k}")
    _require(self.num_waits >= 0, "num_waits", f"must be >= 0; got {self.num_waits}")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """GRPO and its variants (SPEC §5). `train.global_batch_size` counts completions per optimizer step."""

  rewards: dict[str, float] = dataclasses.field(default_factory=dict)  # name -> weight; {}: the format's reward
  scale_rewards: str = "group"  # advantage scaling: group | batch | none (Dr.GRPO)
  loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
  importance_sampling_level: str = "token"  # token (GRPO) | sequence (GSPO)
  eps_low: float = 0.2  # clip range below 1
  eps_high: float = 0.2  # clip range above 1 (DAPO clip-higher: 0.28)
  beta: float = 0.0  # k3 KL to the frozen initial policy; 0: no reference model is kept
  entropy_coef: float = 0.0  # entropy bonus
  num_iterations: int = 1  # mu: passes over each rollout batch (old log-probs from the sampler)
  mask_truncated_completions: bool = False  # completions that never ended get no loss
  dynamic_sampling: bool = False  # DAPO: drop groups with equal rewards and refill with new ones
  max_refills: int = 4  # dynamic sampling: extra rollout rounds per step before training on what is there
  overlong_buffer: int | None = None  # DAPO overlong shaping: penalise length past max_new_tokens - buffer
  overlong_penalty: float = 1.0  # penalty at max_new_tokens (scaled linearly inside the buffer)
  advantage_eps: float = 1e-4
  log_samples_every: int = 10  # steps between logging sample generations (0: never)

  def __post_init__(self):
    _choice(self, "scale_rewards", SCALE_REWARDS)
    _choice(self, "loss_type", GRPO_LOSS_TYPES)
    _choice(self, "importance_sampling_level", IS_LEVELS)
    for name in ("eps_low", "eps_high", "beta", "entropy_coef", "overlong_penalty"):
      _require(getattr(self, name) >= 0, name, f"must be >= 0; got {getattr(self, name)}")
    _require(self.eps_low < 1, "eps_low", f"must be < 1; got {self.eps_low}")
    _positive(self, "num_iterations", "advantage_eps")
    _positive(self, "overlong_buffer", optional=True)
    _require(self.max_refills >= 0, "max_refills", f"must be >= 0; got {self.max_refills}")
    _require(self.log_samples_every >= 0, "log_samples_every", f"must be >= 0; got {self.log_samples_every}")
    for name, w in self.rewards.items():
      _require(bool(name), "rewards", "keys must be reward names (see jaxreason.rewards) or module:function")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """DPO (SPEC §6). Data: rows with prompt/chosen/rejected (text or chat messages)."""

  beta: float = 0.1
  loss_type: str = "sigmoid"  # sigmoid | hinge | ipo | robust
  label_smoothing: float = 0.0
  precompute_ref: bool = True  # reference log-probs once before training; false: on the fly each step
  self_pairs: str | None = None  # question/answer data: build pairs from the initial model's right and wrong answers
  pairs_per_question: int = 1  # self_pairs: at most this many (right, wrong) pairs per question

  def __post_init__(self):
    _positive(self, "beta", "pairs_per_question")
    _choice(self, "loss_type", DPO_LOSS_TYPES)
    _in_range(self, "label_smoothing", 0.0, 0.5, hi_open=True)


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
  """Pairwise (Bradley-Terry) reward model on the decoder. Data: prompt/chosen/rejected rows."""

  center_coef: float = 0.0  # TRL's center_rewards_coefficient

  def __post_init__(self):
    _require(self.center_coef >= 0, "center_coef", f"must be >= 0; got {self.center_coef}")


@dataclasses.dataclass(frozen=True)
class ExpertIterationConfig:
  """CS336 expert iteration: sample `rollout.num_generations` per question, keep the verified correct, SFT, repeat."""

  rounds: int = 3  # R
  questions_per_round: int = 512  # questions sampled each round
  epochs_per_round: int = 1  # SFT passes over the kept completions
  reward: str | None = None  # verifier; null: the rollout format's reward

  def __post_init__(self):
    _positive(self, "rounds", "questions_per_round", "epochs_per_round")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  output_dir: str  # checkpoints, logs and the resolved config go here
  seed: int = 0  # parameter init, data order and sampling
  algorithm: str = "sft"  # sft | pretrain | dpo | grpo | reward_model | expert_iteration
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
  dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
  reward_model: RewardModelConfig = dataclasses.field(default_factory=RewardModelConfig)
  expert_iteration: ExpertIterationConfig = dataclasses.field(default_factory=ExpertIterationConfig)

  def __post_init__(self):
    _require(bool(self.output_dir), "output_dir", "must not be empty")
    _require(self.seed >= 0, "seed", f"must be >= 0; got {self.seed}")
    _choice(self, "algorithm", ALGORITHMS)
    for name in ("dtype", "param_dtype"):
      value = getattr(self.model, name)
      _require(value in DTYPES, ("model", name), f"must be one of {', '.join(DTYPES)}; got {value!r}")
    sizes = {a: getattr(self.mesh, a) for a in ("data", "fsdp", "tensor")}
    for axis, size in sizes.items():
      _require(size > 0 or size == -1, ("mesh", axis),
               f"must be a positive size, or -1 for all remaining devices; got {size}")
    _require(list(sizes.values()).count(-1) <= 1, ("mesh",),
             f"may use -1 for one axis only; got {sizes}")
    warmup, steps = self.schedule.warmup_steps, self.train.max_steps
    _require(warmup is None or steps is None or warmup <= steps, ("schedule", "warmup_steps"),
             f"({warmup}) must not exceed train.max_steps ({steps})")


# ------------------------------------------------------------------------------ types -> checks
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_NONE = type(None)
_NAMES = {int: ("an int", "ints"), float: ("a number", "numbers"), bool: ("a bool (true or false)", "bools"),
          str: ("a string", "strings"), _NONE: ("null", "nulls")}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _field_names(cls: type) -> list[str]:
  return [f.name for f in dataclasses.fields(cls) if f.init]


def _options(tp: Any) -> tuple:
  return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def _describe(tp: Any, plural: bool = False) -> str:
  options = _options(tp)
  if len(options) > 1:
    names = [_describe(t, plural) for t in options]
    return ", ".join(names[:-1]) + " or " + names[-1]
  if dataclasses.is_dataclass(tp):
    return "mappings" if plural else "a mapping"
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (tuple, list):
    return ("lists" if plural else "a list") + f" of {_describe(args[0], True)}"
  if origin is dict:
    return ("mappings" if plural else "a mapping") + f" of {_describe(args[0], True)} to {_describe(args[1], True)}"
  return _NAMES[tp][plural]


def _matches(value: Any, tp: Any) -> bool:
  """Whether `value` has the outer shape of `tp` (contents are checked by `_convert`)."""
  if tp is _NONE:
    return value is None
  if dataclasses.is_dataclass(tp):
    return isinstance(value, (dict, tp))
  origin = typing.get_origin(tp)
  if origin in (tuple, list):
    return isinstance(value, (list, tuple))
  if origin is dict:
    return isinstance(value, dict)
  if tp is bool:
    return isinstance(value, bool)
  if tp is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if tp is float:
    return ((isinstance(value, (int, float)) and not isinstance(value, bool))
            or (isinstance(value, str) and _FLOAT.fullmatch(value.strip()) is not None))
  if tp is str:
    return isinstance(value, str)
  raise TypeError(f"config type {tp!r} is not supported")


def _type_error(value: Any, tp: Any, key: Key, where: Callable[[Key], str]) -> ConfigError:
  shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
  hint = ""
  if value is None:
    hint = "; this key cannot be null (remove it to get the default)"
  elif str in _options(tp) and isinstance(value, (int, float, bool)):
    hint = "; quote it to make it a string"
  elif bool in _options(tp) and isinstance(value, str):
    hint = "; write true or false"
  return ConfigError(f"{where(key)}: {_dotted(key)} must be {_describe(tp)}, got {shown}{hint}")


def _convert(value: Any, tp: Any, key: Key, where: Callable[[Key], str]) -> Any:
  option = next((t for t in _options(tp) if _matches(value, t)), None)
  if option is None:
    raise _type_error(value, tp, key, where)
  if value is None:
    return None
  if dataclasses.is_dataclass(option):
    return value if isinstance(value, option) else _build(option, value, key, where)
  origin, args = typing.get_origin(option), typing.get_args(option)
  if origin in (tuple, list):
    return tuple(_convert(v, args[0], key + (i,), where) for i, v in enumerate(value))
  if origin is dict:
    out = {}
    for k, v in value.items():
      if not isinstance(k, str):
        raise ConfigError(f"{where(key)}: {_dotted(key)} keys must be strings, got {k!r}; quote it")
      out[k] = _convert(v, args[1], key + (k,), where)
    return out
  return float(value) if option is float else value


def _unknown(name: Any, key: Key, valid: Sequence[str]) -> str:
  section = _dotted(key) or "the top level"
  near = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
  hint = f"did you mean {near[0]!r}? Valid" if near else "valid"
  return f"unknown key {name!r} in {section}; {hint} keys: {', '.join(valid)}"


def _build(cls: type, raw: dict, key: Key, where: Callable[[Key], str]) -> Any:
  """`cls(**raw)` with every key and value checked; errors located with `where`."""
  names = _field_names(cls)
  for name in raw:
    if name not in names:
      raise ConfigError(f"{where(key + (name,))}: {_unknown(name, key, names)}")
  if cls is DataConfig:
    raw = _expand_sources(raw, key, where)
  for f in dataclasses.fields(cls):
    if f.init and f.name not in raw and f.default is f.default_factory is dataclasses.MISSING:
      full = _dotted(key + (f.name,))
      raise ConfigError(f"{where(key)}: {full} is required; set it in the config file or with --set {full}=...")
  hints = _hints(cls)
  kwargs = {name: _convert(value, hints[name], key + (name,), where) for name, value in raw.items()}
  try:
    return cls(**kwargs)
  except ConfigError as e:
    if e.detail is None:
      raise
    full = key + e.key
    raise ConfigError(f"{where(full)}: {_dotted(full)} {e.detail}", full, None) from None
  except ValueError as e:  # a check that names no key (ModelConfig's): locate the key it mentions
    full, msg = _mentioned(raw, key, str(e)), str(e)
    text = _dotted(full) + msg[len(full[-1]):] if full and msg.startswith(f"{full[-1]} ") else f"{_dotted(full)}: {msg}"
    raise ConfigError(f"{where(full)}: {text}") from None


def _mentioned(raw: dict, key: Key, message: str) -> Key:
  """The first key set in `raw` (depth first) that `message` names, else `key`."""
  words = set(re.findall(r"\w+", message))

  def walk(mapping: dict, prefix: Key):
    for name, value in mapping.items():
      if name in words:
        return prefix + (name,)
      if isinstance(value, dict) and (found := walk(value, prefix + (name,))):
        return found
    return None

  return walk(raw, key) or key


def _expand_sources(raw: dict, key: Key, where: Callable[[Key], str]) -> dict:
  """`data.train` as a path or a list of paths/mappings -> mappings, each with a format."""
  train, fmt = raw.get("train"), raw.get("format", "s1")
  if isinstance(fmt, str) and fmt not in DATA_FORMATS:
    fkey = key + ("format",)
    raise ConfigError(f"{where(fkey)}: {_dotted(fkey)} {_choice_detail(fmt, DATA_FORMATS)}")
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


# ------------------------------------------------------------------------------- YAML and --set
class _Origins:
  """Where each dotted key was set ('configs/x.yaml line 12', '--set a.b=1', 'base config')."""

  def __init__(self, default: str):
    self.default = default
    self.at: dict[Key, str] = {}

  def __call__(self, key: Key) -> str:
    for n in range(len(key), 0, -1):
      if key[:n] in self.at:
        return self.at[key[:n]]
    inside = [origin for k, origin in self.at.items() if k[:len(key)] == key]  # a section-level check
    return inside[-1] if key and inside else self.default

  def replace(self, key: Key, origin: str) -> None:
    for k in [k for k in self.at if k[:len(key)] == key]:
      del self.at[k]
    self.at[key] = origin


def _read_yaml(path: str, origins: _Origins) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise ConfigError(f"{path}: config file not found (relative paths start at {os.getcwd()})") from None
  except OSError as e:
    raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
  loader = yaml.SafeLoader(text)
  try:
    node = loader.get_single_node()
    data = {} if node is None else _construct(node, (), loader, path, origins)
  except yaml.MarkedYAMLError as e:
    mark = e.problem_mark or e.context_mark
    line = f" line {mark.line + 1}" if mark else ""
    what = ", ".join(s for s in (e.context, e.problem) if s)
    raise ConfigError(f"{path}{line}: not valid YAML ({what})") from None
  except yaml.YAMLError as e:
    raise ConfigError(f"{path}: not valid YAML ({e})") from None
  finally:
    loader.dispose()
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: a config file must be a mapping of keys to values, got {type(data).__name__}")
  return data


def _construct(node: yaml.Node, key: Key, loader: yaml.SafeLoader, path: str, origins: _Origins) -> Any:
  """The node as Python data, recording the line of every mapping key and list item."""
  if isinstance(node, yaml.MappingNode):
    own = {id(k) for k, _ in node.value}
    loader.flatten_mapping(node)  # `<<: *anchor` merges
    out: dict = {}
    first: dict[str, tuple[int, bool]] = {}
    for knode, vnode in node.value:
      name, line = loader.construct_object(knode, deep=True), knode.start_mark.line + 1
      if not isinstance(name, str):
        raise ConfigError(f"{path} line {line}: keys must be strings, got {name!r}; quote it")
      if name in first and first[name][1] and id(knode) in own:
        raise ConfigError(f"{path} line {line}: duplicate key {_dotted(key + (name,))!r} "
                          f"(first set on line {first[name][0]}); keep one")
      first[name] = (line, id(knode) in own)
      origins.at[key + (name,)] = f"{path} line {line}"
      out[name] = _construct(vnode, key + (name,), loader, path, origins)
    return out
  if isinstance(node, yaml.SequenceNode):
    items = []
    for i, item in enumerate(node.value):
      origins.at[key + (i,)] = f"{path} line {item.start_mark.line + 1}"
      items.append(_construct(item, key + (i,), loader, path, origins))
    return items
  return loader.construct_object(node, deep=True)


def _override_key(name: str, expr: str) -> Key:
  """`optimizer.lr` -> ("optimizer", "lr"), checked against the schema."""
  tp, key = TrainConfig, ()
  for part in name.split("."):
    options = [t for t in _options(tp) if t is not _NONE]
    tp = options[0] if len(options) == 1 else tp
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
      names = _field_names(tp)
      if part not in names:
        raise ConfigError(f"--set {expr}: {_unknown(part, key, names)}")
      tp, key = _hints(tp)[part], key + (part,)
    elif origin is dict and part:
      tp, key = typing.get_args(tp)[1], key + (part,)
    elif origin in (tuple, list) and part.isdigit():
      tp, key = typing.get_args(tp)[0], key + (int(part),)
    else:
      what = f"{_dotted(key)} is {_describe(tp)}" if key else "KEY is empty"
      hint = "; index its entries by number, e.g. .0" if origin in (tuple, list) else ""
      raise ConfigError(f"--set {expr}: {what}, so it has no key {part!r}{hint}")
  return key


def _assign(data: dict, key: Key, value: Any, expr: str) -> None:
  node: Any = data
  for i, part in enumerate(key):
    if isinstance(part, int) and not (isinstance(node, list) and part < len(node)):
      n = len(node) if isinstance(node, list) else 0
      raise ConfigError(f"--set {expr}: {_dotted(key[:i])} has {n} entries, so there is no entry {part}; "
                        f"set the whole list instead, e.g. --set '{_dotted(key[:i])}=[...]'")
    if i == len(key) - 1:
      node[part] = value
      return
    child = node[part] if isinstance(part, int) else node.get(part)
    if isinstance(key[i + 1], int):
      child = [child] if isinstance(child, str) else child  # data.train: one path
    elif isinstance(child, str) and isinstance(part, int):
      child = {"path": child}  # a data source given as a plain path
    elif not isinstance(child, dict):
      child = {}  # absent or null (e.g. `eval: null`) sections start empty
    node[part] = child
    node = child


def _apply_override(data: dict, expr: str, origins: _Origins) -> None:
  name, sep, text = expr.partition("=")
  name = name.strip()
  if not sep or not name:
    raise ConfigError(f"--set {expr}: expected KEY=VALUE with a dotted KEY, e.g. --set optimizer.lr=3e-5")
  try:
    value = yaml.safe_load(text)
  except yaml.YAMLError as e:
    problem = getattr(e, "problem", None) or e
    raise ConfigError(f"--set {expr}: the value is not valid YAML ({problem}); "
                      f"quote it, e.g. --set '{name}=\"...\"'") from None
  key = _override_key(name, expr)
  _assign(data, key, value, expr)
  origins.replace(key, f"--set {expr}")


def _merge(base: dict, top: dict) -> dict:
  out = dict(base)
  for k, v in top.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def _plain(value: Any) -> Any:
  """Dataclasses -> dicts, tuples -> lists, recursively (a deep copy)."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value


def _key_paths(data: Any, prefix: Key = ()):
  items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
  for k, v in items:
    yield prefix + (k,)
    yield from _key_paths(v, prefix + (k,))


# ---------------------------------------------------------------------------------- public API
def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (),
                base: dict | None = None) -> TrainConfig:
  """The validated TrainConfig from `base` (defaults under the file), the YAML file, then `--set`s.

  `overrides` are `a.b.c=value` strings; each value is parsed as YAML (`data.seq_len=512`,
  `data.tag_weights={"<think>": 10}`, `eval=null`). Raises ConfigError.
  """
  where = _Origins(os.fspath(path) if path is not None else "config")
  data: dict = {}
  if base:
    data = _plain(base)
    if not isinstance(data, dict):
      raise ConfigError(f"base config must be a mapping, got {type(base).__name__}")
    where.at.update((k, "base config") for k in _key_paths(data))
  if path is not None:
    data = _merge(data, _read_yaml(os.fspath(path), where))
  for expr in [overrides] if isinstance(overrides, str) else overrides:
    _apply_override(data, expr, where)
  cfg = _build(TrainConfig, data, (), where)
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
  out = _plain(cfg)
  if cfg.init_from is not None:
    default = ModelConfig()
    out["model"] = {k: v for k, v in out["model"].items()
                    if k in EXECUTION_FIELDS or getattr(cfg.model, k) != getattr(default, k)}
  return out


def dump_yaml(cfg: TrainConfig) -> str:
  """The whole config as YAML (every key, defaults included)."""
  return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
