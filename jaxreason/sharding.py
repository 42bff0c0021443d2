"""Meshes and logical-axis sharding rules.

Model code names logical dimensions (`embed`, `heads`, `mlp`, `vocab`, ... for weights and
`act_*` for activations); this module alone knows the mesh. A rules table maps each logical name to
mesh axes (`data`, `fsdp`, `tensor`). Two presets:

- `TRAIN_RULES`: weights sharded over `fsdp` (ZeRO-3 style) along `embed` and over `tensor`
  (Megatron style) along heads/mlp/vocab; the batch over `data` x `fsdp`.
- `SAMPLING_RULES`: as training but with `fsdp` dropped from weights, so decoding needs no
  per-step all-gathers; `fsdp` devices then act as extra data parallelism.

A dimension that a mesh axis does not divide evenly is left replicated along that axis (e.g. 2 KV
heads on `tensor=4`), and a mesh axis is never used twice in one spec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, "str | tuple[str, ...] | None"], ...]

TRAIN_RULES: Rules = (
    # weights
    ("layers", None),  # the stacked-layer axis of scanned models: every device holds every layer
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_kv_length", None),
)

SAMPLING_RULES: Rules = tuple((name, None) if name == "embed" else (name, axes) for name, axes in TRAIN_RULES)

PRESETS = {"train": TRAIN_RULES, "sampling": SAMPLING_RULES}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; -1 in one axis means 'all remaining devices'."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1:
      raise ValueError(f"mesh: at most one axis may be -1, got data={self.data} fsdp={self.fsdp} tensor={self.tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"mesh: {num_devices} devices are not divisible by data*tensor*... = {known}")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ValueError(
          f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices; "
          "set the sizes so that they multiply to the device count (or use -1 for one axis)")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  cfg = cfg or MeshConfig()
  devices = list(devices) if devices is not None else jax.devices()
  shape = cfg.shape(len(devices))
  if devices == jax.devices():
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec with the rules table.

  With `mesh` and `shape`, mesh axes that do not divide a dimension are dropped for that dimension.
  """
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(logical_axes):
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
    axes = table[name]
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    kept = []
    for ax in axes:
      if ax in used:
        continue
      if mesh is not None and shape is not None:
        size = math.prod(mesh.shape[a] for a in kept + [ax])
        if shape[i] % size:
          continue
      kept.append(ax)
    used.update(kept)
    out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return PartitionSpec(*out)


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules) -> NamedSharding:
  axes = var.get_metadata().get("logical_axes")
  shape = var.get_value().shape
  if axes is None:
    axes = (None,) * len(shape)
  return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules):
  """A pytree of NamedSharding with the structure of `state` (Variables replaced by shardings)."""
  return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def pure_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> dict:
  """Like `state_shardings`, as a pure nested dict (the layout of `nnx.to_pure_dict`)."""
  out: dict = {}
  for path, var in nnx.to_flat_state(state):
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = variable_sharding(var, mesh, rules)
  return out


# ----------------------------------------------------------------- activation constraints
_ACTIVE: list[tuple[Mesh, Rules]] = []


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = TRAIN_RULES) -> Iterator[Mesh]:
  """Activates `mesh` and `rules` for activation constraints traced inside the block."""
  _ACTIVE.append((mesh, rules))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _ACTIVE.pop()


def active_mesh() -> tuple[Mesh, Rules] | None:
  """The (mesh, rules) of the innermost `use_mesh`, or None outside one."""
  return _ACTIVE[-1] if _ACTIVE else None


def target_platform() -> str:
  """The platform ("tpu", "gpu", "cpu") of the devices being compiled for: the active mesh's
  (`use_mesh`, else `jax.set_mesh`), else the host's default backend. Compile-only TPU devices
  (`jax.experimental.topologies`) count as "tpu" on a CPU host."""
  mesh = _ACTIVE[-1][0] if _ACTIVE else None
  if mesh is None:
    concrete = getattr(jax.sharding, "get_mesh", None)
    try:
      mesh = concrete() if concrete else None
    except Exception:  # noqa: BLE001 -- no concrete mesh set
      mesh = None
  if mesh is not None and not getattr(mesh, "empty", True) and mesh.devices is not None:
    platform = mesh.devices.flat[0].platform
    return "gpu" if platform in ("cuda", "rocm") else platform
  return jax.default_backend()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op outside `use_mesh`."""
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  spec = logical_to_spec(logical_axes, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
