"""Reading LoRA training checkpoints: adapters + the base they point at -> a merged model.

A LoRA step holds `params` = the trainable tree ({"lora": adapters, **extras}) and the `lora`
JSON item ({"config", "base", "seed"}: jaxreason.lora.train.base_pointer). `load_merged` loads
the base (HF dir, Orbax run, or the seeded init when the run started from scratch), restores the
adapters and returns the ordinary Transformer with W + scale * A B (QLoRA: on the dequantised
int8 base, i.e. exactly the weights the run trained against).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxreason import sharding
from jaxreason.lora import adapters
from jaxreason.lora.train import LORA_ITEM, spec_from_pointer


def lora_pointer(directory: str, step: int) -> dict | None:
  from jaxreason.checkpoint import read_json_item
  return read_json_item(directory, step, LORA_ITEM)


def load_base(pointer: dict, stored_cfg, mesh=None, rules=sharding.TRAIN_RULES):
  """The base model a LoRA run trained on, in the run's own layout and dtypes."""
  from jaxreason import checkpoint
  from jaxreason.config import EXECUTION_FIELDS
  from jaxreason.errors import CheckpointError
  from jaxreason.models.build import init_model
  from jaxreason.models.hf import load_hf_model
  execution = {k: getattr(stored_cfg, k) for k in EXECUTION_FIELDS}
  base = pointer.get("base")
  if base is None:
    return init_model(stored_cfg, seed=int(pointer.get("seed", 0)), mesh=mesh, rules=rules)
  if not os.path.isdir(base):
    raise CheckpointError(f"this LoRA checkpoint's base model {base} is missing: the checkpoint holds the adapters "
                          "only; restore the base at that path (or export with --base DIR)")
  if checkpoint.is_checkpoint(base):
    return checkpoint.load_model(base, mesh=mesh, rules=rules, **execution)
  return load_hf_model(base, mesh=mesh, rules=rules, **execution)


def load_trainable(directory: str, step: int, abs_params: dict, spec, mesh=None) -> dict:
  """The step's trainable tree (adapters, extras) restored onto `mesh` (default: one device), verified."""
  from jaxreason.checkpoint import INTEGRITY_ITEM, check_integrity, read_json_item, short_error
  from jaxreason.errors import CheckpointError
  if mesh is None:
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  one = NamedSharding(mesh, PartitionSpec())
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                        adapters.abstract_trainable(abs_params, spec))  # the trainer's layout (adapters replicated)
  where = os.path.join(directory, str(step))
  try:
    with ocp.CheckpointManager(directory) as mngr:
      restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    saved = read_json_item(directory, step, INTEGRITY_ITEM)
  except Exception as e:
    raise CheckpointError(f"{where}: the LoRA adapters cannot be read ({short_error(e)})") from e
  check_integrity(where, {"params": restored.params}, saved)
  return restored.params


def load_merged_params(directory: str, step: int, pointer: dict, stored_cfg, mesh=None, rules=sharding.TRAIN_RULES,
                       extras: dict | None = None):
  """-> (graphdef, merged parameter dict, spec, trainable tree). `extras`: abstract non-model
  parameters the run also trained (the reward model's score head), restored and returned with them."""
  spec = spec_from_pointer(pointer)
  base = load_base(pointer, stored_cfg, mesh, rules)
  graphdef, state = nnx.split(base)
  params = nnx.to_pure_dict(state)
  trainable = load_trainable(directory, step, {**params, **(extras or {})}, spec, mesh)
  frozen = {"base": adapters.frozen_base(params, spec), "scale": np.float32(spec.scale)}
  return graphdef, jax.jit(adapters.merge)(frozen, trainable), spec, trainable


def load_merged(directory: str, step: int, pointer: dict, stored_cfg, mesh=None, rules=sharding.TRAIN_RULES):
  """-> (merged Transformer in the stored layout, spec, trainable tree)."""
  graphdef, merged, spec, trainable = load_merged_params(directory, step, pointer, stored_cfg, mesh, rules)
  return nnx.merge(graphdef, merged), spec, trainable
