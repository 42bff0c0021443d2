"""Abstract (shape-only) models and arrays carrying their target shardings, for AOT compiles."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxreason import sharding
from jaxreason.models.build import abstract_model
from jaxreason.models.config import ModelConfig


def sharded_abstract_state(state: nnx.State, mesh: Mesh, rules: sharding.Rules) -> nnx.State:
  """`state` (abstract Variables) with each value a ShapeDtypeStruct carrying its rule's sharding."""
  def put(var):
    value = var.get_value()
    spec = sharding.variable_sharding(var, mesh, rules)
    return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=spec))
  return jax.tree.map(put, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_sharded_model(cfg: ModelConfig, mesh: Mesh, rules: sharding.Rules):
  """(graphdef, abstract state sharded by `rules` on `mesh`): no memory is allocated."""
  graphdef, state = nnx.split(abstract_model(cfg))
  return graphdef, sharded_abstract_state(state, mesh, rules)
