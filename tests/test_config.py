"""TrainConfig: defaults, YAML round trips, --set overrides, and errors that say where and what to do."""

import os
import textwrap

import pytest

from jaxreason.config import (ConfigError, DataConfig, DataSource, EvalSection, LoopConfig, OptimizerConfig,
                              TrainConfig, config_to_dict, dump_yaml, load_config)
from jaxreason.models.config import ModelConfig, RopeScaling
from jaxreason.sharding import MeshConfig


def write(tmp_path, text, name="x.yaml"):
  path = tmp_path / name
  path.write_text(textwrap.dedent(text).lstrip("\n"))
  return str(path)


def error(*args, **kw) -> str:
  with pytest.raises(ConfigError) as e:
    load_config(*args, **kw)
  return str(e.value)


FULL = """
output_dir: runs/full
seed: 3
algorithm: sft
tokenizer: builtin:char
model:
  model_type: llama
  vocab_size: 256
  hidden_size: 64
  intermediate_size: 128
  num_layers: 2
  num_heads: 4
  num_kv_heads: 2
  qkv_bias: false
  rope_scaling: {rope_type: llama3, factor: 8}
  eos_token_id: [1, 2]
  dtype: bfloat16
mesh: {data: 2, fsdp: -1}
data:
  format: think
  train:
    - a.jsonl
    - {path: b.parquet, weight: 3, format: s1, split: train}
  seq_len: 512
  packing: false
  tag_weights: {"<think>": 10, "</think>": 10.0}
  truncation: drop
optimizer:
  lr: 1e-5              # PyYAML reads this as a string; float keys accept it
  max_grad_norm: null
  mu_dtype: bfloat16
schedule: {warmup_steps: 10, decay: linear, min_lr_ratio: 0.1}
train: {global_batch_size: 8, micro_batch_size: 2, max_steps: 100, loss_normalization: sequence}
checkpoint: {every_steps: 50, keep_steps: [50, 100], async_save: false}
logging: {wandb_project: reasoning, progress_bar: false}
eval:
  data: eval.jsonl
  format: think
  budgets: [256, 1024, null]
  num_waits: 2
"""


# ------------------------------------------------------------------------------------ defaults
def test_defaults():
  cfg = TrainConfig(output_dir="runs/x")
  assert cfg.seed == 0 and cfg.algorithm == "sft" and cfg.init_from is None and cfg.tokenizer is None
  assert cfg.model == ModelConfig() and cfg.mesh == MeshConfig() and cfg.eval is None
  assert cfg.data == DataConfig(train=(), format="s1", seq_len=2048, packing=True, shuffle=True, num_epochs=1,
                                on_bad_row="error", tag_weights={}, truncation="right", num_workers=0)
  assert cfg.optimizer == OptimizerConfig(lr=1e-5, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4,
                                          decay_embeddings=False, max_grad_norm=1.0, mu_dtype=None)
  assert (cfg.schedule.warmup_steps, cfg.schedule.warmup_ratio, cfg.schedule.decay, cfg.schedule.min_lr_ratio) \
      == (None, 0.05, "cosine", 0.0)
  assert cfg.train == LoopConfig(16, None, None, "token", 10)
  assert (cfg.checkpoint.every_steps, cfg.checkpoint.keep_last, cfg.checkpoint.keep_steps) == (500, 3, ())
  assert cfg.logging.tensorboard and cfg.logging.wandb_project is None
  ev = EvalSection(data="e.jsonl")
  assert (ev.format, ev.budgets, ev.n, ev.temperature, ev.max_new_tokens, ev.batch_size) \
      == ("s1", (None,), 1, 0.0, 512, 32)
  assert load_config(None, ["output_dir=runs/x"]) == cfg


def test_empty_file_needs_output_dir(tmp_path):
  path = write(tmp_path, "# nothing\n")
  msg = error(path)
  assert path in msg and "output_dir is required" in msg and "--set output_dir=" in msg
  assert load_config(path, ["output_dir=runs/x"]) == TrainConfig(output_dir="runs/x")


# ---------------------------------------------------------------------------------- round trips
def test_full_yaml_loads_and_round_trips(tmp_path):
  cfg = load_config(write(tmp_path, FULL))
  assert cfg.model.rope_scaling == RopeScaling(rope_type="llama3", factor=8.0)
  assert cfg.model.eos_token_id == (1, 2) and cfg.model.dtype == "bfloat16"
  assert cfg.mesh == MeshConfig(data=2, fsdp=-1, tensor=1)
  assert cfg.data.train == (DataSource("a.jsonl", "think"), DataSource("b.parquet", "s1", 3.0, "train"))
  assert cfg.data.tag_weights == {"<think>": 10.0, "</think>": 10.0}
  assert cfg.optimizer.lr == 1e-5 and isinstance(cfg.optimizer.lr, float) and cfg.optimizer.max_grad_norm is None
  assert cfg.train.micro_batch_size == 2 and cfg.checkpoint.keep_steps == (50, 100)
  assert cfg.eval == EvalSection(data="eval.jsonl", format="think", budgets=(256, 1024, None), num_waits=2)
  again = load_config(write(tmp_path, dump_yaml(cfg), "dumped.yaml"))
  assert again == cfg
  assert load_config(None, base=config_to_dict(cfg)) == cfg


def test_round_trip_with_init_from_keeps_only_execution_fields(tmp_path):
  path = write(tmp_path, """
      output_dir: runs/ft
      init_from: hf/Qwen2.5-0.5B
      model: {dtype: bfloat16, remat: full}
      """)
  cfg = load_config(path)
  assert cfg.model.dtype == "bfloat16" and cfg.model.remat == "full"
  assert set(config_to_dict(cfg)["model"]) == {"dtype", "param_dtype", "attention_backend", "remat",
                                                   "scan_layers"}
  assert load_config(write(tmp_path, dump_yaml(cfg), "dumped.yaml")) == cfg


# ------------------------------------------------------------------------------------ overrides
def test_overrides_nested_lists_dicts_and_null(tmp_path):
  path = write(tmp_path, FULL)
  cfg = load_config(path, [
      "optimizer.lr=3e-5",
      "data.seq_len=1024",
      "model.rope_scaling.factor=4",
      "data.train=[c.jsonl, d.jsonl]",
      'data.tag_weights={"<think>": 5}',
      "data.tag_weights.<answer>=2",
      "eval=null",
      "checkpoint.keep_steps=[]",
      "logging.wandb_project=null",
  ])
  assert cfg.optimizer.lr == 3e-5 and cfg.data.seq_len == 1024 and cfg.model.rope_scaling.factor == 4.0
  assert cfg.data.train == (DataSource("c.jsonl", "think"), DataSource("d.jsonl", "think"))
  assert cfg.data.tag_weights == {"<think>": 5.0, "<answer>": 2.0}
  assert cfg.eval is None and cfg.checkpoint.keep_steps == () and cfg.logging.wandb_project is None


def test_override_list_entry_section_and_init_from(tmp_path):
  path = write(tmp_path, FULL)
  cfg = load_config(path, ["data.train.0.weight=2", "data.train.1.split=test"])
  assert cfg.data.train[0] == DataSource("a.jsonl", "think", 2.0)
  assert cfg.data.train[1].split == "test"
  cfg = load_config(None, ["output_dir=o", "eval.data=task:addition", "eval.budgets=[64, null]"])
  assert cfg.eval == EvalSection(data="task:addition", budgets=(64, None))
  cfg = load_config(None, ["output_dir=o", "init_from=runs/x", "model.dtype=bfloat16"])
  assert cfg.init_from == "runs/x" and cfg.model.dtype == "bfloat16"
  cfg = load_config(None, ["output_dir=o", "data.train=one.jsonl", "data.format=r1_zero"])
  assert cfg.data.train == (DataSource("one.jsonl", "r1_zero"),)


def test_base_is_under_the_file_and_overrides(tmp_path):
  path = write(tmp_path, "output_dir: runs/x\ndata: {seq_len: 256}\n")
  cfg = load_config(path, ["train.global_batch_size=4"], base={"data": {"seq_len": 64, "packing": False}, "seed": 7})
  assert (cfg.data.seq_len, cfg.data.packing, cfg.seed, cfg.train.global_batch_size) == (256, False, 7, 4)


# --------------------------------------------------------------------------------------- errors
def test_unknown_key_names_file_line_and_nearest(tmp_path):
  path = write(tmp_path, """
      output_dir: runs/x
      data:
        seq_len: 128
      optimiser:
        lr: 1.0e-5
      """)
  msg = error(path)
  assert f"{path} line 4:" in msg and "unknown key 'optimiser'" in msg and "did you mean 'optimizer'?" in msg
  path = write(tmp_path, "output_dir: runs/x\ndata:\n  seq_len: 128\n  packng: false\n")
  msg = error(path)
  assert f"{path} line 4:" in msg and "unknown key 'packng' in data" in msg and "did you mean 'packing'?" in msg
  path = write(tmp_path, "output_dir: runs/x\nmodel:\n  rope_scaling: {type: llama3}\n")
  assert "did you mean 'rope_type'?" in error(path)


def test_wrong_types(tmp_path):
  path = write(tmp_path, "output_dir: runs/x\nseed: 1\ndata:\n  seq_len: abc\n")
  assert error(path) == f"{path} line 4: data.seq_len must be an int, got 'abc'"
  path = write(tmp_path, "output_dir: runs/x\ndata:\n  packing: 1\n")
  msg = error(path)
  assert f"{path} line 3: data.packing must be a bool (true or false), got 1" in msg
  path = write(tmp_path, "output_dir: runs/x\ndata:\n  seq_len: null\n")
  assert f"{path} line 3: data.seq_len must be an int, got None" in error(path) and "cannot be null" in error(path)
  path = write(tmp_path, "output_dir: runs/x\ntrain:\n  global_batch_size: 8.0\n")
  assert f"{path} line 3: train.global_batch_size must be an int" in error(path)
  path = write(tmp_path, "output_dir: runs/x\nlogging:\n  wandb_run: 123\n")
  assert "logging.wandb_run must be a string or null, got 123; quote it" in error(path)
  path = write(tmp_path, "output_dir: runs/x\neval:\n  data: e.jsonl\n  budgets: [256, lots]\n")
  assert f"{path} line 4: eval.budgets[1] must be an int or null, got 'lots'" in error(path)
  path = write(tmp_path, "output_dir: runs/x\noptimizer:\n  lr: fast\n")
  assert "optimizer.lr must be a number, got 'fast'" in error(path)
  # ints are numbers; null is fine where optional
  cfg = load_config(write(tmp_path, "output_dir: o\noptimizer: {lr: 1, max_grad_norm: null}\n"))
  assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float) and cfg.optimizer.max_grad_norm is None


@pytest.mark.parametrize("line,expected", [
    ("algorithm: sf", "algorithm must be one of sft, pretrain, dpo, grpo, ppo, reward_model, expert_iteration, distill; "
                      "got 'sf' (did you mean 'sft'?)"),
    ("data: {format: thinking}", "data.format must be one of s1, think, chat_messages"),
    ("data: {on_bad_row: ignore}", "data.on_bad_row must be one of error, skip"),
    ("schedule: {decay: cosin}",
     "schedule.decay must be one of cosine, linear, constant; got 'cosin' (did you mean 'cosine'?)"),
    ("train: {loss_normalization: tokens}", "train.loss_normalization must be one of token, sequence"),
    ("data: {seq_len: 0}", "data.seq_len must be positive; got 0"),
    ("train: {global_batch_size: -4}", "train.global_batch_size must be positive; got -4"),
    ("train: {global_batch_size: 16, micro_batch_size: 3}",
     "train.micro_batch_size (3) must divide global_batch_size (16)"),
    ("schedule: {warmup_ratio: 1.5}", "schedule.warmup_ratio must be in [0.0, 1.0]; got 1.5"),
    ("mesh: {data: 0}", "mesh.data must be a positive size, or -1"),
    ("model: {dtype: fp8}", "model.dtype must be one of float32, bfloat16, float16"),
    ("eval: {data: e.jsonl, format: s2}", "eval.format must be one of s1, think, r1_zero, boxed, chat, raw"),
])
def test_invalid_values_list_allowed(tmp_path, line, expected):
  path = write(tmp_path, f"output_dir: runs/x\n{line}\n")
  msg = error(path)
  assert msg.startswith(f"{path} line 2: ") and expected in msg


def test_model_post_init_errors_get_model_keys(tmp_path):
  path = write(tmp_path, "output_dir: runs/x\nmodel:\n  num_heads: 14\n  num_kv_heads: 3\n")
  msg = error(path)
  assert msg.startswith(f"{path} line 3: model.num_heads") and "multiple of num_kv_heads (3)" in msg
  path = write(tmp_path, "output_dir: runs/x\nmodel:\n  rope_scaling:\n    rope_type: yarn\n")
  msg = error(path)
  assert msg.startswith(f"{path} line 4: model.rope_scaling.rope_type 'yarn' is not supported")
  assert "default, llama3, linear" in msg
  assert error(None, ["output_dir=o", "model.model_type=gpt2"]).startswith(
      "--set model.model_type=gpt2: model.model_type 'gpt2' is not supported")


def test_init_from_allows_only_execution_fields(tmp_path):
  path = write(tmp_path, """
      output_dir: runs/x
      init_from: hf/Qwen2.5-0.5B
      model:
        dtype: bfloat16
        hidden_size: 64
      """)
  msg = error(path)
  assert msg.startswith(f"{path} line 5: model.hidden_size cannot be set together with init_from")
  assert "init_from: null" in msg and "dtype, param_dtype, attention_backend, remat" in msg
  # the same architecture key is fine from scratch, and the rule follows --set init_from
  ok = write(tmp_path, "output_dir: runs/x\nmodel: {hidden_size: 64, num_heads: 4, num_kv_heads: 2}\n", "ok.yaml")
  assert load_config(ok).model.hidden_size == 64
  assert "model.hidden_size cannot be set" in error(ok, ["init_from=runs/base"])
  assert load_config(path, ["init_from=null"]).model.hidden_size == 64


def test_set_errors():
  assert error(None, ["optimizer.lrr=1"]).startswith(
      "--set optimizer.lrr=1: unknown key 'lrr' in optimizer; did you mean 'lr'?")
  assert "unknown key 'optimiser' in the top level; did you mean 'optimizer'?" in error(None, ["optimiser.lr=1"])
  assert error(None, ["output_dir=o", "data.seq_len=abc"]) == \
      "--set data.seq_len=abc: data.seq_len must be an int, got 'abc'"
  assert "expected KEY=VALUE" in error(None, ["optimizer.lr"])
  assert "seed is an int, so it has no key 'x'" in error(None, ["seed.x=1"])
  assert "data.train has 0 entries" in error(None, ["output_dir=o", "data.train.2.weight=1"])
  assert "not valid YAML" in error(None, ["output_dir=o", "data.tag_weights={a: [}"])


def test_set_error_points_at_the_override_not_the_file(tmp_path):
  path = write(tmp_path, "output_dir: runs/x\ntrain:\n  global_batch_size: 16\n")
  assert error(path, ["train.micro_batch_size=5"]).startswith("--set train.micro_batch_size=5: ")
  assert error(path, ["mesh.data=-1"]).startswith("--set mesh.data=-1: mesh may use -1 for one axis only")


def test_file_errors(tmp_path):
  missing = str(tmp_path / "nope.yaml")
  assert error(missing).startswith(f"{missing}: config file not found")
  path = write(tmp_path, "output_dir: runs/x\ndata:\n  seq_len: [1, 2\noptimizer: {}\n")
  msg = error(path)
  assert msg.startswith(f"{path} line 4: not valid YAML")
  path = write(tmp_path, "- a\n- b\n")
  assert "must be a mapping" in error(path)
  path = write(tmp_path, "output_dir: runs/x\nseed: 1\nseed: 2\n")
  assert error(path).startswith(f"{path} line 3: duplicate key 'seed' (first set on line 2)")
  path = write(tmp_path, "output_dir: runs/x\n1: 2\n")
  assert error(path).startswith(f"{path} line 2: keys must be strings")


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
  path = write(tmp_path, """
      output_dir: runs/x
      common: &common {seq_len: 64, packing: false}
      """)
  assert "unknown key 'common'" in error(path)
  path = write(tmp_path, """
      output_dir: runs/x
      data:
        <<: {seq_len: 64, packing: false}
        seq_len: 128
      """)
  cfg = load_config(path)
  assert (cfg.data.seq_len, cfg.data.packing) == (128, False)


def test_direct_construction_is_checked_too():
  with pytest.raises(ConfigError, match="seq_len must be positive"):
    DataConfig(seq_len=0)
  with pytest.raises(ConfigError, match=r"micro_batch_size \(3\) must divide global_batch_size \(16\)"):
    LoopConfig(global_batch_size=16, micro_batch_size=3)
  assert isinstance(ConfigError("x"), ValueError)


_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(_CONFIGS) if f.endswith(".yaml")))
def test_shipped_configs_load(name):
  cfg = load_config(os.path.join(_CONFIGS, name))
  assert load_config(None, base=__import__("yaml").safe_load(dump_yaml(cfg))) == cfg
