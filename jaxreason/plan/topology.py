"""Accelerator chips and named topologies (`v5e-8`, `v5p-64`, `v6e-256`, `h100:8`, `cpu:8`).

TPU topologies become compile-only devices on any host with `libtpu` installed
(`jax.experimental.topologies.get_topology_desc`); programs compiled for them report XLA:TPU's
memory and cost analyses. GPU topologies cannot be compiled without GPUs (JAX has no deviceless
GPU path): they get a chip entry for the analytic estimates and no devices. `cpu:N` uses the host's
(fake) CPU devices.

Naming follows Cloud TPU: v4-N and v5p-N count TensorCores (2 per chip, megacore), v5e-N and
v6e-N count chips. Figures per chip are the vendors' published ones (bf16 dense peak).
"""

from __future__ import annotations

import dataclasses
import math
import os

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int
  peak_flops: float  # bf16 dense FLOP/s
  hbm_bandwidth: float  # bytes/s
  platform: str  # "tpu" | "gpu" | "cpu"
  usable_hbm_bytes: int | None = None  # what XLA lets a program use, when it is known to differ

  @property
  def budget_bytes(self) -> int:
    return self.usable_hbm_bytes or self.hbm_bytes


CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1228e9, "tpu"),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819e9, "tpu", usable_hbm_bytes=int(15.75 * GIB)),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2765e9, "tpu"),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1640e9, "tpu"),
    "a100": Chip("NVIDIA A100 80GB", 80 * GIB, 312e12, 2039e9, "gpu"),
    "h100": Chip("NVIDIA H100 SXM", 80 * GIB, 989e12, 3350e9, "gpu"),
    "h200": Chip("NVIDIA H200", 141 * GIB, 989e12, 4800e9, "gpu"),
    "cpu": Chip("host CPU (fake devices)", 16 * GIB, 1e12, 50e9, "cpu"),
}

# (topology prefix for get_topology_desc, chip_config_name, dimensions, cores per chip)
_TPU_KINDS = {"v4": ("v4", "megacore", 3, 2), "v5p": ("v5", "megacore", 3, 2),
              "v5e": ("v5e", "default", 2, 1), "v6e": ("v6e", "default", 2, 1)}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  chip: Chip
  num_chips: int
  shape: tuple[int, ...] | None = None  # TPU chip grid

  @property
  def platform(self) -> str:
    return self.chip.platform

  def devices(self):
    """Compile-only TPU devices, the host's CPU devices, or None for GPUs (see module doc)."""
    import jax
    if self.platform == "cpu":
      devs = jax.devices("cpu")
      if len(devs) < self.num_chips:
        raise ValueError(f"topology {self.name}: the host has {len(devs)} CPU devices; set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={self.num_chips}")
      return devs[: self.num_chips]
    if self.platform == "gpu":
      gpus = [d for d in jax.devices() if d.platform == "gpu"]
      return gpus[: self.num_chips] if len(gpus) >= self.num_chips else None
    return tpu_devices(self)


def _grid(chips: int, dims: int) -> tuple[int, ...]:
  """A chip count as the near-cubic power-of-two grid Cloud TPU uses (8 -> 2x4 or 2x2x2)."""
  if chips & (chips - 1):
    raise ValueError(f"{chips} chips: TPU slices have a power-of-two chip count")
  shape = [1] * dims
  i = 0
  while math.prod(shape) < chips:
    shape[i % dims] *= 2
    i += 1
  shape = sorted(shape)
  if dims == 3 and chips == 4:
    shape = [2, 2, 1]
  return tuple(shape)


def parse_topology(name: str) -> Topology:
  """`v5e-8`, `v5p-64`, `v4-8`, `v6e-256`, `h100:8` (or `h100-8`), `cpu:8`."""
  raw = name.strip().lower()
  for sep in (":", "-"):
    if sep in raw:
      kind, count = raw.split(sep, 1)
      break
  else:
    raise ValueError(f"topology {name!r}: expected KIND-COUNT, e.g. v5e-8, v5p-64, v6e-256, h100:8, cpu:8")
  if kind not in CHIPS or not count.isdigit() or int(count) < 1:
    raise ValueError(f"topology {name!r}: unknown kind {kind!r} or count {count!r}; kinds: {', '.join(CHIPS)}")
  n = int(count)
  if kind in _TPU_KINDS:
    cores = _TPU_KINDS[kind][3]
    if n % cores:
      raise ValueError(f"topology {name!r}: {kind}-N counts TensorCores ({cores} per chip); N must be even")
    chips = n // cores
    return Topology(raw, CHIPS[kind], chips, _grid(chips, _TPU_KINDS[kind][2]))
  return Topology(raw, CHIPS[kind], n)


def tpu_devices(topo: Topology):
  """Compile-only devices of a TPU topology (needs the `libtpu` package; no TPU needed)."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise RuntimeError(
        f"topology {topo.name}: compiling for TPU needs libtpu; pip install 'libtpu==0.0.42.*' "
        "(the version jax 0.10.2's tpu extra pins; it works on CPU-only hosts)") from None
  # Compile-only devices hold no chip: another process holding libtpu (a second plan, a test
  # worker) must not make this one fail on libtpu's lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  kind = next(k for k, v in CHIPS.items() if v == topo.chip)
  prefix, chip_config, _, _ = _TPU_KINDS[kind]
  host = tuple(min(s, 2) for s in topo.shape) + (1,) * (3 - len(topo.shape))
  desc = topologies.get_topology_desc(
      topology_name=f"{prefix}:{'x'.join(map(str, topo.shape))}", platform="tpu",
      chip_config_name=chip_config, chips_per_host_bounds=host[:3], num_slices=1)
  return list(desc.devices)
