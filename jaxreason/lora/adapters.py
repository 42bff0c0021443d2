"""LoRA on the parameter tree (SPEC §10): adapters beside a frozen base, merged inside the step.

Written here rather than taken from qwix or `flax.nnx.LoRA`: both attach adapters to modules
(`nnx.Linear` / intercepted `dot_general` calls per module), while our projections are raw einsum
weights with head axes ([D, N, H], [N, H, D]) stacked over layers ([L, ...], `scan_layers`) and run
inside `jax.lax.scan`. Here an adapter is two arrays per targeted weight W [*lead, *in, *out]
(lead = [L] when scanned, none per unscanned layer):

    A [*lead, prod(in), r]   B [*lead, r, prod(out)]   W' = W + scale * (A @ B).reshape(W.shape)

`scale` = alpha / r (rsLoRA: alpha / sqrt(r)); A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's Kaiming-uniform
with a = sqrt(5)), B = 0, so the first step starts exactly at the base. The flattened axes are
HF's row order (q: n * H + h), so A^T / B^T are PEFT's lora_A / lora_B weights.

The trainable tree is {"lora": adapters mirroring the base paths, **extras} (extras: non-model
top-level parameters, e.g. the reward model's score head, trained in full). The frozen tree is
{"base": the model's parameters (int8 `QTensor`s with QLoRA), "scale": []}. `merge` gives the
ordinary parameter dict, differentiable in the adapters, so every loss runs unchanged.

Deviation (cost): the merge happens once per step before the layer scan, so the backward forms
the dense gradient of each merged weight (then projects it onto A and B): the optimizer state
and checkpoints are adapter-sized, the step's compute and transient memory are a full
fine-tune's.

Unmerged form (`unmerged`, `LoraWeight`): each adapted weight stays W, A, B in the parameter
tree and the layers compute x W + scale * (x A) B (`nn.layers.project`). Training uses it when
`lora.dropout` > 0 (PEFT's train mode: y = x W + scale * dropout(x) A B, the frozen tree then
holds a `Dropout` node with the run's key; masks are drawn per step, micro-batch, projection and
layer, so a resumed run draws the same ones); sampling and scoring always run without dropout
(PEFT's eval mode) on the merged weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxreason.lora.config import PROJECTIONS, LoraConfig

ADAPTERS = "lora"
MODEL_KEYS = ("embed", "layers", "final_norm", "lm_head")  # the Transformer's top-level parameters


# ------------------------------------------------------------------------------- QLoRA storage
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QTensor:
  """int8 weight with per-output-channel absmax scales: W ~= q * scale (scale keeps the input
  axes as size 1, so it broadcasts)."""

  q: jax.Array
  scale: jax.Array

  @property
  def shape(self):
    return self.q.shape

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def quantize_int8(w: jax.Array, in_axes: tuple[int, ...]) -> QTensor:
  """Symmetric int8 over each output channel (max |W| over the input axes -> 127)."""
  w32 = w.astype(jnp.float32)
  amax = jnp.max(jnp.abs(w32), axis=in_axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  return QTensor(q=jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8), scale=scale)


# ------------------------------------------------------------------------------- tree helpers
def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: dict[tuple, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def projection_of(path: tuple) -> str | None:
  """Our projection name of a layer weight path (layers[.i].attn.q_proj -> "q"), else None."""
  if len(path) < 3 or path[0] != "layers":
    return None
  for name, (_, module, param, _) in PROJECTIONS.items():
    if tuple(path[-2:]) == (module, param):
      return name
  return None


def _lead(path: tuple) -> int:
  """Leading stacked axes: 1 for a scanned layer weight (layers.attn.q_proj [L, ...]), else 0."""
  return 0 if isinstance(path[1], int) else 1


def _in_out(path: tuple, shape) -> tuple[int, int, int]:
  """(lead axes, flattened input size, flattened output size) of a projection weight."""
  lead, n_in = _lead(path), PROJECTIONS[projection_of(path)][3]
  ins = shape[lead:lead + n_in]
  outs = shape[lead + n_in:]
  return lead, int(np.prod(ins)), int(np.prod(outs))


def adapter_shapes(path: tuple, shape, rank: int) -> tuple[tuple, tuple]:
  lead, fan_in, fan_out = _in_out(path, shape)
  lead_shape = tuple(shape[:lead])
  return lead_shape + (fan_in, rank), lead_shape + (rank, fan_out)


def delta(path: tuple, shape, a: jax.Array, b: jax.Array) -> jax.Array:
  """A @ B in the weight's shape (float32)."""
  # [*lead, in, r] x [*lead, r, out] -> [*lead, in, out]
  ab = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
  return ab.reshape(shape)


# ------------------------------------------------------------------------------- split / merge
def abstract_trainable(abs_params: dict, spec: LoraConfig, dtype=jnp.float32) -> dict:
  """ShapeDtypeStructs of the trainable tree for a model's (abstract) parameter dict."""
  adapters = {}
  for path, x in flatten({k: v for k, v in abs_params.items() if k in MODEL_KEYS}).items():
    if projection_of(path) in spec.projections:
      sa, sb = adapter_shapes(path, x.shape, spec.rank)
      adapters[path] = {"a": jax.ShapeDtypeStruct(sa, dtype), "b": jax.ShapeDtypeStruct(sb, dtype)}
  extras = {k: v for k, v in abs_params.items() if k not in MODEL_KEYS}
  return {ADAPTERS: unflatten(adapters), **extras}


def init_adapters(params: dict, spec: LoraConfig, seed: int, dtype=jnp.float32) -> dict:
  """Fresh adapters for `params` (concrete or abstract): A Kaiming-uniform, B zero."""
  key = jax.random.key(seed)
  out = {}
  abstract = flatten(abstract_trainable(params, spec, dtype)[ADAPTERS])
  for i, path in enumerate(sorted({p[:-1] for p in abstract}, key=str)):
    sa, sb = abstract[path + ("a",)].shape, abstract[path + ("b",)].shape
    bound = 1.0 / math.sqrt(sa[-2])
    out[path + ("a",)] = jax.random.uniform(jax.random.fold_in(key, i), sa, dtype, -bound, bound)
    out[path + ("b",)] = jnp.zeros(sb, dtype)
  return unflatten(out)


def frozen_base(params: dict, spec: LoraConfig) -> dict:
  """The model's parameters as the frozen base: cast to `base_dtype`, projections int8 with QLoRA."""
  flat = flatten({k: v for k, v in params.items() if k in MODEL_KEYS})
  out = {}
  for path, x in flat.items():
    if spec.base_dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(spec.base_dtype)
    if spec.quantize == "int8" and projection_of(path) is not None:
      lead, n_in = _lead(path), PROJECTIONS[projection_of(path)][3]
      x = jax.jit(quantize_int8, static_argnums=1)(x, tuple(range(lead, lead + n_in)))
    out[path] = x
  return unflatten(out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Dropout:
  """LoRA dropout in the frozen tree: the run's key (raw uint32 key data) and the rate (static)."""

  key: jax.Array
  rate: float = dataclasses.field(default=0.0, metadata=dict(static=True))


def frozen_tree(params: dict, spec: LoraConfig, seed: int) -> dict:
  """The frozen tree {"base", "scale"} (+ "dropout": `Dropout` when spec.dropout > 0)."""
  out = {"base": frozen_base(params, spec), "scale": jnp.asarray(spec.scale, jnp.float32)}
  if spec.dropout > 0:
    key = jax.random.fold_in(jax.random.key(seed), 0x4C6F5241)  # "LoRA": apart from the adapters' init key
    out["dropout"] = Dropout(jax.random.key_data(key), spec.dropout)
  return out


def split(params: dict, spec: LoraConfig, seed: int) -> tuple[dict, dict]:
  """Full parameters -> (trainable {"lora": fresh adapters, **extras}, frozen `frozen_tree`)."""
  trainable = {ADAPTERS: init_adapters(params, spec, seed), **{k: v for k, v in params.items() if k not in MODEL_KEYS}}
  return trainable, frozen_tree(params, spec, seed)


def dropout_rng(frozen: dict, step: jax.Array, micro: jax.Array) -> jax.Array | None:
  """The dropout key of one micro-batch of one optimizer step (None without LoRA dropout)."""
  d = frozen.get("dropout") if isinstance(frozen, dict) else None
  if d is None:
    return None
  return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(d.key), step), micro)


def merge(frozen: dict, trainable: dict, rng: jax.Array | None = None) -> dict:
  """The ordinary parameter dict W + scale * A B (dequantised), plus the trainable extras.

  With `rng` and LoRA dropout (frozen["dropout"]): the unmerged tree with dropout masks instead
  (`unmerged`; the training step passes `dropout_rng`)."""
  if rng is not None and "dropout" in frozen:
    return unmerged(frozen, trainable, rng)
  adapters = flatten(trainable.get(ADAPTERS, {}))
  out = {}
  for path, w in flatten(frozen["base"]).items():
    if isinstance(w, QTensor):
      w = w.dequantize(jnp.float32)
    if path + ("a",) in adapters:
      d = delta(path, w.shape, adapters[path + ("a",)], adapters[path + ("b",)])
      w = w.astype(jnp.promote_types(w.dtype, adapters[path + ("a",)].dtype)) + frozen["scale"] * d
    out[path] = w
  return {**unflatten(out), **{k: v for k, v in trainable.items() if k != ADAPTERS}}


# ------------------------------------------------------------------------------- unmerged forward
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeight:
  """A projection weight with its adapter kept apart, in the parameter tree where W was:
  the layers' `project` computes x W + scale * (x A) B (the unmerged form; W may be int8).

  Leaves W [*lead, *in, *out] (or a QTensor), A [*lead, in, r], B [*lead, r, out], scale [*lead]
  and, for dropout, key [*lead, 2] (raw key data); a scanned layer stack slices them per layer
  like any weight. `n_in` (W's input axes) and the dropout `rate` are static.
  """

  w: Any
  a: jax.Array
  b: jax.Array
  scale: jax.Array
  key: jax.Array | None = None
  n_in: int = dataclasses.field(default=1, metadata=dict(static=True))
  rate: float = dataclasses.field(default=0.0, metadata=dict(static=True))

  def __getitem__(self, index):  # `param[...]` in the layers reads the whole weight
    if index is not Ellipsis:
      raise TypeError("a LoraWeight is read whole (param[...])")
    return self

  @property
  def shape(self):
    return self.w.shape

  @property
  def dtype(self):
    return self.a.dtype

  def lora_project(self, eq: str, x: jax.Array, dtype) -> jax.Array:
    """einsum(eq, x, W) + scale * (dropout(x) A) B, in `dtype`; x's last n_in axes are W's input axes."""
    w = self.w.dequantize(dtype) if isinstance(self.w, QTensor) else self.w.astype(dtype)
    y = jnp.einsum(eq, x, w)
    # [..., *in] -> [..., in] x [in, r] -> [..., r] x [r, out] -> [..., out] -> [..., *out]
    xf = x.reshape(x.shape[:x.ndim - self.n_in] + (-1,))
    if self.key is not None and self.rate > 0:  # inverted dropout on the adapter's input
      keep = dropout_keep(self.key, self.rate, xf.shape)
      xf = jnp.where(keep, xf / (1.0 - self.rate), 0).astype(xf.dtype)
    low = jnp.einsum("...i,ir->...r", xf, self.a.astype(dtype))
    low = jnp.einsum("...r,ro->...o", low, self.b.astype(dtype))
    return y + (self.scale.astype(dtype) * low).reshape(y.shape).astype(y.dtype)


def dropout_keep(key: jax.Array, rate: float, shape) -> jax.Array:
  """The kept positions (True with probability 1 - rate) of a raw uint32 key."""
  return jax.random.bernoulli(jax.random.wrap_key_data(key), 1.0 - rate, shape)


def unmerged(frozen: dict, trainable: dict, rng: jax.Array | None = None) -> dict:
  """The parameter dict with each adapted weight a `LoraWeight` (base W, A, B) instead of
  W + scale A B: the model then runs the adapters unmerged (no merged copy). `rng` (with
  frozen["dropout"]): dropout masks, one key per projection and layer. The other weights are the
  base's (QTensors dequantised), plus the trainable extras."""
  adapters = flatten(trainable.get(ADAPTERS, {}))
  drop = frozen.get("dropout") if rng is not None else None
  out = {}
  for i, (path, w) in enumerate(flatten(frozen["base"]).items()):
    if path + ("a",) in adapters:
      a, b = adapters[path + ("a",)], adapters[path + ("b",)]
      lead = a.shape[:-2]
      key = None
      if drop is not None:  # [*lead, 2]: one key per layer of this projection
        k = jax.random.fold_in(rng, i)
        key = jax.random.key_data(jax.random.split(k, lead) if lead else k)
      w = LoraWeight(w, a, b, jnp.broadcast_to(jnp.asarray(frozen["scale"], jnp.float32), lead), key,
                     PROJECTIONS[projection_of(path)][3], drop.rate if drop is not None else 0.0)
    elif isinstance(w, QTensor):
      w = w.dequantize(jnp.float32)
    out[path] = w
  return {**unflatten(out), **{k: v for k, v in trainable.items() if k != ADAPTERS}}


def merged_params(state) -> dict:
  """A TrainState's model parameters: its params, or with LoRA the merged copy (for sampling)."""
  if getattr(state, "frozen", None) is None:
    return state.params
  return jax.jit(merge)(state.frozen, state.params)


# ------------------------------------------------------------------------------- shardings
def trainable_shardings(abs_params: dict, param_shardings: dict, spec: LoraConfig, mesh) -> dict:
  """Adapters replicated (they are small; their gradients are reduced over data x fsdp); extras
  keep their given shardings."""
  one = NamedSharding(mesh, PartitionSpec())
  adapters = abstract_trainable(abs_params, spec)[ADAPTERS]
  return {ADAPTERS: jax.tree.map(lambda _: one, adapters),
          **{k: v for k, v in param_shardings.items() if k not in MODEL_KEYS}}


def frozen_shardings(abs_params: dict, param_shardings: dict, spec: LoraConfig, mesh) -> dict:
  """The base keeps the model's shardings; an int8 weight's scale drops its input axes' names."""
  flat_sh = flatten({k: v for k, v in param_shardings.items() if k in MODEL_KEYS})
  out = {}
  for path, s in flat_sh.items():
    if spec.quantize == "int8" and projection_of(path) is not None:
      lead, n_in = _lead(path), PROJECTIONS[projection_of(path)][3]
      parts = list(s.spec) + [None] * (len(flatten_shape(abs_params, path)) - len(s.spec))
      for ax in range(lead, lead + n_in):
        parts[ax] = None
      out[path] = QTensor(q=s, scale=NamedSharding(s.mesh, PartitionSpec(*parts)))
    else:
      out[path] = s
  one = NamedSharding(mesh, PartitionSpec())
  return {"base": unflatten(out), "scale": one, **({"dropout": Dropout(one, spec.dropout)} if spec.dropout > 0 else {})}


def flatten_shape(abs_params: dict, path: tuple):
  node = abs_params
  for k in path:
    node = node[k]
  return node.shape


def tree_bytes(tree) -> int:
  """Bytes of every array leaf (QTensors count their int8 values and scales)."""
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
