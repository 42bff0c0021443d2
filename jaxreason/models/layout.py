"""Converting a model between the scanned and unscanned layer layouts, on device.

Scanned: `layers.<name>` [L, ...]; unscanned: `layers.<i>.<name>` [...] (see `models.transformer`).
Each parameter is converted by one jitted stack/slice whose output keeps the source sharding (the
layer axis unsharded), so a sharded model never gathers on one device; the peak extra memory is one
stacked parameter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxreason.models.build import abstract_model
from jaxreason.models.transformer import Transformer


def _spec(x):
  s = getattr(x, "sharding", None)
  return s if isinstance(s, NamedSharding) else None


def stacked_path(path: tuple) -> tuple[tuple, int | None]:
  """An unscanned path -> (its scanned path, layer index); non-layer paths map to themselves."""
  if len(path) > 1 and path[0] == "layers" and isinstance(path[1], int):
    return ("layers",) + tuple(path[2:]), path[1]
  return tuple(path), None


def stack(arrays: list[jax.Array]) -> jax.Array:
  src = _spec(arrays[0])
  out = None if src is None else NamedSharding(src.mesh, PartitionSpec(None, *src.spec))
  return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=out)(*arrays)


def layer_slice(x: jax.Array, i: int) -> jax.Array:
  src = _spec(x)
  out = None if src is None else NamedSharding(src.mesh, PartitionSpec(*tuple(src.spec)[1:]))
  return jax.jit(lambda a: a[i], out_shardings=out)(x)


def with_scan_layers(model: Transformer, scan: bool) -> Transformer:
  """`model` in the scanned (`scan=True`) or unscanned layout; the same object if already so."""
  cfg = model.cfg
  if cfg.scan_layers == scan:
    return model
  new_cfg = cfg.replace(scan_layers=scan)
  graphdef, abs_state = nnx.split(abstract_model(new_cfg))
  src = dict(nnx.to_flat_state(nnx.state(model)))
  flat = []
  for path, var in nnx.to_flat_state(abs_state):
    if scan:
      spath, _ = stacked_path(path)
      if spath != tuple(path):
        raise AssertionError(path)
      if path[0] == "layers":
        value = stack([src[("layers", i) + tuple(path[1:])].get_value() for i in range(cfg.num_layers)])
      else:
        value = src[tuple(path)].get_value()
    else:
      spath, layer = stacked_path(path)
      value = src[spath].get_value()
      if layer is not None:
        value = layer_slice(value, layer)
    flat.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
