"""The train state: parameters (a pure dict of arrays), optimizer state and step, all sharded.

Parameters are fp32 master weights (`param_dtype`); the model casts them to the compute dtype at
use. Shardings come from the logical-axis rules for parameters; the optimizer's moment trees mirror
them (`optax.tree_utils.tree_map_params`); scalars are replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxreason import sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: Any
  # LoRA (jaxreason.lora): the frozen base {"base", "scale"}; `params` then holds the adapters.
  # Not trained and not checkpointed (the checkpoint points at the base).
  frozen: Any = None


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def state_shardings(abs_state: nnx.State, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: sharding.Rules = sharding.TRAIN_RULES) -> TrainState:
  """Shardings for a TrainState built from the model's abstract nnx.State."""
  return params_state_shardings(nnx.to_pure_dict(abs_state), sharding.pure_shardings(abs_state, mesh, rules), tx, mesh)


def params_state_shardings(abs_params: dict, param_shardings: dict, tx: optax.GradientTransformation,
                           mesh: Mesh) -> TrainState:
  """Shardings for a TrainState of any parameter dict (e.g. a decoder plus a reward head).

  With a LoRA optimizer (`jaxreason.lora.train.LoraTransformation`) `params` are the trainable
  adapters (and extras) and `frozen` the base's shardings."""
  from jaxreason.lora import adapters as lora_adapters
  from jaxreason.lora.train import spec_of
  spec, frozen = spec_of(tx), None
  if spec is not None:
    frozen = lora_adapters.frozen_shardings(abs_params, param_shardings, spec, mesh)
    param_shardings = lora_adapters.trainable_shardings(abs_params, param_shardings, spec, mesh)
    abs_params = lora_adapters.abstract_trainable(abs_params, spec)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  opt_shardings = optax.tree_utils.tree_map_params(
      tx, lambda _, s: s, abs_opt, param_shardings,
      transform_non_params=lambda _: replicated(mesh))
  return TrainState(step=replicated(mesh), params=param_shardings, opt_state=opt_shardings, frozen=frozen)


def init_train_state(params: dict, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """Optimizer state created directly with its shardings (params are already placed)."""
  import jax.numpy as jnp
  init = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                 out_shardings=shardings)
  return init(params)
