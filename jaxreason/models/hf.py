"""HuggingFace <-> jaxreason weights, both directions, from one name map.

`load_hf_model` reads `config.json` and single or sharded safetensors (with index) tensor by tensor
straight into (optionally sharded) NNX parameters: a host holds one HF tensor at a time, and with
`jax.make_array_from_callback` each device (and each host, multi-host) receives only its shard.
`save_hf_model` writes the reverse: sharded safetensors + index, `config.json`,
`generation_config.json` and tokenizer files, gathering one parameter at a time.

A scanned model (`scan_layers`, stacked [L, ...] parameters) maps `model.layers.<i>.X` to layer i of
its stacked `layers.X`: loading writes each HF tensor into its layer slot on device (one tensor on the
host at a time, as unscanned), saving slices one layer at a time; the files are the same bytes.

Layouts (HF torch Linear is [out, in]; ours are einsum-friendly with explicit head axes):
  q_proj.weight [N*H, D] <-> q_proj [D, N, H]      o_proj.weight [D, N*H] <-> o_proj [N, H, D]
  k/v_proj.weight [K*H, D] <-> [D, K, H]           q/k/v_proj.bias [N*H] <-> [N, H]
  gate/up_proj.weight [F, D] <-> [D, F]            down_proj.weight [D, F] <-> [F, D]
  embed_tokens / lm_head [V, D] <-> [V, D]         norms [D] (q_norm/k_norm [H]) unchanged
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxreason import sharding
from jaxreason.models import safetensors_io as st
from jaxreason.models.build import abstract_model
from jaxreason.models.config import ModelConfig
from jaxreason.models.layout import layer_slice, stacked_path
from jaxreason.models.transformer import Transformer

# Buffers that some HF checkpoints carry and that are recomputed, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Entry:
  hf_name: str
  path: tuple  # path of the nnx Variable in the model state
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x):
  return x


def _transpose(x):
  return x.T


def param_map(cfg: ModelConfig) -> list[Entry]:
  """The one name map: every HF tensor of `cfg`, with its NNX path (unscanned layout: `("layers",
  i, ...)`; see `_locate` for the scanned one) and layout transforms."""
  d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim

  def proj_in(heads):  # HF [heads*H, D] <-> ours [D, heads, H]
    return (lambda w: w.T.reshape(d, heads, h)), (lambda p: p.reshape(d, heads * h).T)

  def bias_heads(heads):
    return (lambda b: b.reshape(heads, h)), (lambda p: p.reshape(heads * h))

  o_in = (lambda w: w.T.reshape(n, h, d)), (lambda p: p.reshape(n * h, d).T)

  entries = [Entry("model.embed_tokens.weight", ("embed", "embedding"), _identity, _identity)]
  for i in range(cfg.num_layers):
    pre, at = f"model.layers.{i}.", ("layers", i, "attn")
    entries += [
        Entry(pre + "input_layernorm.weight", ("layers", i, "attn_norm", "scale"), _identity, _identity),
        Entry(pre + "self_attn.q_proj.weight", at + ("q_proj",), *proj_in(n)),
        Entry(pre + "self_attn.k_proj.weight", at + ("k_proj",), *proj_in(k)),
        Entry(pre + "self_attn.v_proj.weight", at + ("v_proj",), *proj_in(k)),
        Entry(pre + "self_attn.o_proj.weight", at + ("o_proj",), *o_in),
    ]
    if cfg.qkv_bias:
      entries += [
          Entry(pre + "self_attn.q_proj.bias", at + ("q_bias",), *bias_heads(n)),
          Entry(pre + "self_attn.k_proj.bias", at + ("k_bias",), *bias_heads(k)),
          Entry(pre + "self_attn.v_proj.bias", at + ("v_bias",), *bias_heads(k)),
      ]
    if cfg.o_bias:
      entries.append(Entry(pre + "self_attn.o_proj.bias", at + ("o_bias",), _identity, _identity))
    if cfg.qk_norm:
      entries += [
          Entry(pre + "self_attn.q_norm.weight", at + ("q_norm", "scale"), _identity, _identity),
          Entry(pre + "self_attn.k_norm.weight", at + ("k_norm", "scale"), _identity, _identity),
      ]
    mlp = ("layers", i, "mlp")
    entries += [
        Entry(pre + "post_attention_layernorm.weight", ("layers", i, "mlp_norm", "scale"), _identity, _identity),
        Entry(pre + "mlp.gate_proj.weight", mlp + ("gate",), _transpose, _transpose),
        Entry(pre + "mlp.up_proj.weight", mlp + ("up",), _transpose, _transpose),
        Entry(pre + "mlp.down_proj.weight", mlp + ("down",), _transpose, _transpose),
    ]
    if cfg.mlp_bias:
      entries += [Entry(pre + f"mlp.{p}_proj.bias", mlp + (f"{p}_bias",), _identity, _identity)
                  for p in ("gate", "up", "down")]
  entries.append(Entry("model.norm.weight", ("final_norm", "scale"), _identity, _identity))
  if not cfg.tie_word_embeddings:
    entries.append(Entry("lm_head.weight", ("lm_head",), _identity, _identity))
  return entries


def _locate(cfg: ModelConfig, path: tuple) -> tuple[tuple, int | None]:
  """(path of the model Variable, layer index within its stacked axis or None)."""
  return stacked_path(path) if cfg.scan_layers else (tuple(path), None)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, layer_value, i):
  return jax.lax.dynamic_update_index_in_dim(stacked, layer_value.astype(stacked.dtype), i, 0)


# ------------------------------------------------------------------------------ loading
def load_hf_config(model_dir: str, **overrides) -> ModelConfig:
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{model_dir}: no config.json; is this a HuggingFace model directory?")
  try:
    with open(path, encoding="utf-8") as f:
      hf = json.load(f)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise ValueError(f"{path}: not valid JSON ({e}); the file is corrupt") from None
  try:
    return ModelConfig.from_hf(hf, **overrides)
  except (KeyError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from None


def _check_names(model_dir: str, expected: Iterable[str], found: dict[str, str],
                 cfg: ModelConfig) -> None:
  expected = set(expected)
  present = {n for n in found if not n.endswith(_IGNORED_SUFFIXES)}
  if cfg.tie_word_embeddings:
    present.discard("lm_head.weight")  # some tied checkpoints still store it; the embedding wins
  missing, extra = sorted(expected - present), sorted(present - expected)
  if missing or extra:
    msg = [f"{model_dir}: the checkpoint does not match its config ({cfg.model_type}, "
           f"{cfg.num_layers} layers, tie_word_embeddings={cfg.tie_word_embeddings})."]
    if missing:
      msg.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if extra:
      msg.append(f"unexpected tensors ({len(extra)}): {', '.join(extra[:20])}" + (" ..." if len(extra) > 20 else ""))
    raise ValueError("\n".join(msg))


def load_hf_model(model_dir: str, *, mesh: Mesh | None = None,
                  rules: sharding.Rules = sharding.TRAIN_RULES, **overrides) -> Transformer:
  """Loads a HF directory into a Transformer; with a mesh, parameters are created sharded.

  `overrides` replace ModelConfig fields (e.g. param_dtype="float32", dtype="bfloat16").
  """
  cfg = load_hf_config(model_dir, **overrides)
  graphdef, abs_state = nnx.split(abstract_model(cfg))
  variables = dict(nnx.to_flat_state(abs_state))
  entries = {e.hf_name: e for e in param_map(cfg)}

  files = list(st.iter_checkpoint_files(model_dir))
  readers = [st.SafetensorsFile(p) for p in files]
  found = {name: r.path for r in readers for name in r.keys()}
  _check_names(model_dir, entries, found, cfg)

  values: dict[tuple, jax.Array] = {}
  for reader in readers:
    for name in reader.keys():
      entry = entries.get(name)
      if entry is None:
        continue
      path, layer = _locate(cfg, entry.path)
      var = variables[path]
      target = var.get_value()
      shape = target.shape if layer is None else target.shape[1:]
      want = entry.to_hf(np.empty(shape, np.bool_)).shape
      if reader.shape(name) != want:
        raise ValueError(f"{reader.path}: tensor {name} has shape {reader.shape(name)}; the config "
                         f"expects {want}. Check config.json against the weights.")
      host = entry.to_ours(reader.get(name)).astype(target.dtype)
      shard = None if mesh is None else sharding.variable_sharding(var, mesh, rules)
      if layer is not None:
        shard = None if shard is None else jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(*tuple(shard.spec)[1:]))
      if shard is None:
        value = jax.device_put(np.ascontiguousarray(host))
      else:
        value = jax.make_array_from_callback(shape, shard, lambda idx, h=host: np.ascontiguousarray(h[idx]))
      if layer is None:
        values[path] = value
      else:
        if path not in values:  # the stacked parameter, filled one layer at a time on device
          full = sharding.variable_sharding(var, mesh, rules) if mesh is not None else None
          values[path] = jax.jit(lambda: jnp.zeros(target.shape, target.dtype), out_shardings=full)()
        values[path] = _set_layer(values[path], value, jnp.int32(layer))
      del host, value
  for path, var in variables.items():
    var.set_value(values[path])
  state = nnx.from_flat_state(variables)
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------ saving
def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _parse_size(size: int | str) -> int:
  if isinstance(size, int):
    return size
  s = size.strip().upper()
  for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
    if s.endswith(unit):
      return int(float(s[: -len(unit)]) * mult)
  return int(s)


def save_hf_model(model: Transformer, out_dir: str, *, dtype: str | None = None,
                  tokenizer: Any = None, max_shard_size: int | str = "5GB",
                  generation_config: dict | None = None) -> list[str]:
  """Writes `model` as a HF directory that `transformers.AutoModelForCausalLM` loads.

  dtype: "float32" / "bfloat16" / "float16" (default: the parameters' dtype). Returns the written
  safetensors file names. Only process 0 writes; every process must call this (gathers are
  collective).
  """
  cfg: ModelConfig = model.cfg
  state = nnx.state(model)
  variables = dict(nnx.to_flat_state(state))
  entries = param_map(cfg)
  out_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else (
      np.dtype(dtype) if dtype else None)

  # Plan shards from shapes alone.
  plan, shards, current, current_size = [], [], [], 0
  limit = _parse_size(max_shard_size)
  def value_of(e: Entry) -> jax.Array:
    path, layer = _locate(cfg, e.path)
    value = variables[path].get_value()
    return value if layer is None else layer_slice(value, layer)

  for e in entries:
    path, layer = _locate(cfg, e.path)
    var = variables[path]
    shape = var.get_value().shape if layer is None else var.get_value().shape[1:]
    shape = e.to_hf(np.empty(shape, dtype=np.bool_)).shape
    dt = out_dtype or np.dtype(var.get_value().dtype)
    nbytes = int(np.prod(shape)) * dt.itemsize
    if current and current_size + nbytes > limit:
      shards.append(current)
      current, current_size = [], 0
    current.append((e, shape, dt))
    current_size += nbytes
  shards.append(current)

  writer_process = jax.process_index() == 0
  if writer_process:
    os.makedirs(out_dir, exist_ok=True)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map, total = {}, 0
  for fname, shard in zip(names, shards):
    writer = (st.SafetensorsWriter(os.path.join(out_dir, fname), [(e.hf_name, s, d) for e, s, d in shard])
              if writer_process else None)
    for e, shape, dt in shard:
      host = e.to_hf(_to_host(value_of(e))).astype(dt)
      weight_map[e.hf_name] = fname
      total += host.nbytes
      if writer:
        writer.write(e.hf_name, host)
      del host
    if writer:
      writer.close()

  if writer_process:
    torch_dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(
        str(out_dtype) if out_dtype is not None else cfg.param_dtype, "float32")
    _write_json(os.path.join(out_dir, "config.json"), cfg.to_hf(torch_dtype))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.to_hf()["eos_token_id"],
           "pad_token_id": cfg.pad_token_id, "transformers_version": "5.23.0"}
    gen.update(generation_config or {})
    _write_json(os.path.join(out_dir, "generation_config.json"), {k: v for k, v in gen.items() if v is not None})
    index_path = os.path.join(out_dir, "model.safetensors.index.json")
    if len(shards) > 1:
      _write_json(index_path, {"metadata": {"total_size": total}, "weight_map": weight_map})
    elif os.path.exists(index_path):
      os.remove(index_path)
    if tokenizer is not None:
      tokenizer.save_pretrained(out_dir)
  return names


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
