"""Orbax checkpoints of jaxreason models: layout, save, restore onto any mesh.

Layout (the trainer adds its own items next to these in each step):

  RUN_DIR/checkpoints/<step>/params        the model's nnx.State (Orbax StandardSave)
  RUN_DIR/checkpoints/<step>/model_config  ModelConfig as JSON (each step is self-contained)

`resolve_checkpoint` accepts a step directory, a `checkpoints/` directory or a run directory
(latest step). A reward model's steps also hold a `reward_model` JSON item (its params are the
decoder's plus a `score_head`): `load_model` refuses them, `jaxreason.train.reward_model.load_scorer`
loads them. Restoring builds abstract arrays with the target mesh's shardings, so a checkpoint
saved on 8 devices restores on 1 (and the reverse). Saves are atomic: Orbax writes to a temporary
directory and renames it when complete, so an interrupted save leaves the previous step intact.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxreason import sharding
from jaxreason.models.build import abstract_model
from jaxreason.models.config import ModelConfig, RopeScaling
from jaxreason.models.transformer import Transformer


def config_to_json(cfg: ModelConfig) -> dict:
  return dataclasses.asdict(cfg)


def config_from_json(d: dict) -> ModelConfig:
  d = dict(d)
  d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
  if isinstance(d.get("eos_token_id"), list):
    d["eos_token_id"] = tuple(d["eos_token_id"])
  d.setdefault("scan_layers", False)  # checkpoints written before the option are unscanned
  return ModelConfig(**d)


def _is_step_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "model_config"))


def resolve_checkpoint(path: str) -> tuple[str, int]:
  """(checkpoints directory, step) for a step dir, a checkpoints dir or a run dir (latest step)."""
  path = os.path.abspath(path)
  if _is_step_dir(path):
    parent, name = os.path.split(path)
    if not name.isdigit():
      raise ValueError(f"{path}: a checkpoint step directory must be named by its step number")
    return parent, int(name)
  for candidate in (path, os.path.join(path, "checkpoints")):
    if os.path.isdir(candidate):
      steps = sorted(int(n) for n in os.listdir(candidate)
                     if n.isdigit() and _is_step_dir(os.path.join(candidate, n)))
      if steps:
        return candidate, steps[-1]
  raise FileNotFoundError(
      f"{path}: no Orbax checkpoint found (expected STEP/params and STEP/model_config under it or "
      "under its checkpoints/ folder). Pass a run directory, its checkpoints/ folder, or one step.")


def is_checkpoint(path: str) -> bool:
  try:
    resolve_checkpoint(path)
    return True
  except (FileNotFoundError, ValueError):
    return False


REWARD_MODEL_ITEM = "reward_model"


def is_reward_model(path: str) -> bool:
  """Whether the checkpoint at `path` is a reward model (decoder + score head), not a policy."""
  directory, step = resolve_checkpoint(path)
  return os.path.isdir(os.path.join(directory, str(step), REWARD_MODEL_ITEM))


def find_tokenizer_dir(path: str) -> str | None:
  """The `tokenizer/` folder a run keeps beside `checkpoints/` (None if there is none)."""
  directory, _ = resolve_checkpoint(path)
  candidate = os.path.join(os.path.dirname(directory), "tokenizer")
  return candidate if os.path.isdir(candidate) else None


def tokenizer_dir_for(model_path: str) -> str:
  """Where the tokenizer of a model lives: a checkpoint run's `tokenizer/`, or the HF dir itself."""
  if not is_checkpoint(model_path):
    return model_path
  tok_dir = find_tokenizer_dir(model_path)
  if tok_dir is None:
    raise FileNotFoundError(f"{model_path}: the checkpoint's run has no tokenizer/ folder; "
                            "give the tokenizer directory explicitly (--tokenizer / `tokenizer:`)")
  return tok_dir


def save_model(model: Transformer, directory: str, step: int) -> None:
  """Saves `model` as `directory/<step>` (synchronously; the trainer uses its own async manager)."""
  with ocp.CheckpointManager(os.path.abspath(directory),
                             options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False)) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
        model_config=ocp.args.JsonSave(config_to_json(model.cfg))))
    mngr.wait_until_finished()


def load_model_config(path: str) -> ModelConfig:
  """The ModelConfig stored with a checkpoint (step, checkpoints or run directory)."""
  directory, step = resolve_checkpoint(path)
  with ocp.CheckpointManager(directory) as mngr:
    meta = mngr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
  return config_from_json(meta.model_config)


def load_model(path: str, *, mesh: Mesh | None = None, rules: sharding.Rules = sharding.TRAIN_RULES,
               **overrides) -> Transformer:
  """Restores a model from a step/checkpoints/run directory, sharded on `mesh` (or one device).

  `overrides` replace execution fields of the stored config (dtype, attention_backend, remat,
  scan_layers). The stored layer layout is restored, then converted when `scan_layers` differs.
  """
  directory, step = resolve_checkpoint(path)
  if is_reward_model(path):
    raise ValueError(f"{path}: this is a reward model checkpoint (a decoder with a score head), not a policy; "
                     "it cannot be sampled, evaluated or exported as a language model. Load it with "
                     "jaxreason.train.reward_model.load_scorer, or use it as the reward 'reward_model:PATH'.")
  stored = load_model_config(path)
  cfg = stored.replace(**overrides)
  with ocp.CheckpointManager(directory) as mngr:
    graphdef, target = abstract_params(cfg.replace(scan_layers=stored.scan_layers), mesh, rules)
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  from jaxreason.models.layout import with_scan_layers
  return with_scan_layers(nnx.merge(graphdef, restored.params), cfg.scan_layers)


def abstract_params(cfg: ModelConfig, mesh: Mesh | None = None,
                    rules: sharding.Rules = sharding.TRAIN_RULES):
  """(graphdef, pure dict of ShapeDtypeStructs carrying the target shardings) for restoring."""
  graphdef, abs_state = nnx.split(abstract_model(cfg))
  if mesh is None:
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  shardings = sharding.pure_shardings(abs_state, mesh, rules)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nnx.to_pure_dict(abs_state), shardings)
  return graphdef, target
