"""Creating models: abstract (no memory), initialised from scratch, sharded on a mesh."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxreason import sharding
from jaxreason.models.config import ModelConfig
from jaxreason.models.transformer import Transformer


def abstract_model(cfg: ModelConfig) -> Transformer:
  """A model whose parameters are ShapeDtypeStructs (nothing allocated)."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def init_model(cfg: ModelConfig, seed: int = 0, mesh: Mesh | None = None,
               rules: sharding.Rules = sharding.TRAIN_RULES) -> Transformer:
  """Randomly initialised model; with a mesh, every parameter is created already sharded.

  Initialisation always runs under `jax.jit`, so the values do not depend on the mesh.
  """
  graphdef, abs_state = nnx.split(abstract_model(cfg))
  out_shardings = None if mesh is None else sharding.state_shardings(abs_state, mesh, rules)

  def make_state():
    return nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)))

  state = jax.jit(make_state, out_shardings=out_shardings)()
  return nnx.merge(graphdef, state)


def reshard_model(model: Transformer, mesh: Mesh, rules: sharding.Rules) -> Transformer:
  """Moves a model's parameters onto `mesh` with `rules` (e.g. the sampling preset)."""
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
  return nnx.merge(graphdef, state)
