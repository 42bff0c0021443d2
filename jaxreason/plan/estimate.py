"""Analytic per-device memory, FLOPs and bytes for the planned functions (independent of XLA).

Memory from the shardings (exact shard sizes of every argument), plus formulas for what lives only
inside a program: gradients (the fp32 accumulator and one micro-batch's grads), the KV cache
(2 x layers x rows x length x kv_heads x head_dim x bytes, divided as the rules split rows and KV
heads) and, as a rough guide, activations. FLOPs count matmuls (2 per multiply-add) and causal
attention; training is 3 forward passes (model FLOPs, for MFU), plus one more with full remat
(hardware FLOPs). `cost_analysis()` counts each loop body once, so these replace its figures.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from jaxreason.models.config import ModelConfig


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs / arrays with shardings (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    s = getattr(leaf, "sharding", None)
    shape = s.shard_shape(leaf.shape) if s is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def axis_size(mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def axis_size_cfg(mesh_cfg, num_devices: int) -> int:
  """data x fsdp of a MeshConfig on `num_devices` (the devices a batch splits over)."""
  data, fsdp, _ = mesh_cfg.shape(num_devices)
  return data * fsdp


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters used in matmuls per token (all but the embedding lookup; the unembedding counts)."""
  d, v = cfg.hidden_size, cfg.vocab_size
  return cfg.num_params() - (0 if cfg.tie_word_embeddings else v * d)


def forward_flops(cfg: ModelConfig, rows: int, q_len: int, ctx: float) -> float:
  """Forward FLOPs of `rows` x `q_len` query tokens attending to `ctx` keys on average."""
  attn = 4 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * ctx
  return rows * q_len * (2 * matmul_params(cfg) + attn)


def kv_cache_bytes(cfg: ModelConfig, rows: int, length: int, mesh, rules, dtype_bytes: int) -> int:
  """Per device: 2 x layers x rows x length x kv_heads x head_dim x bytes over the row/head shards."""
  from jaxreason import sharding
  spec = sharding.logical_to_spec(("act_batch", None, "act_kv_heads", None), rules, mesh,
                                  (rows, length, cfg.num_kv_heads, cfg.resolved_head_dim))
  row_shards, head_shards = axis_size(mesh, spec[0]), axis_size(mesh, spec[2])
  return (2 * cfg.num_layers * math.ceil(rows / row_shards) * length
          * math.ceil(cfg.num_kv_heads / head_shards) * cfg.resolved_head_dim * dtype_bytes)


def activation_bytes(cfg: ModelConfig, rows_local: int, t: int, tensor: int, dtype_bytes: int) -> int:
  """Rough activation peak of a train micro-batch per device: with remat each layer keeps its input
  [B, T, D]; one layer's forward/backward intermediates (q/k/v/o, MLP [B, T, F] x 3) are live at a
  time. Attention logits are left out (splash/cuDNN keep them in blocks; the einsum path on CPU
  materialises [B, N, T, T] fp32, which this does not count)."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  tokens = rows_local * t
  kept = cfg.num_layers * tokens * d * dtype_bytes if cfg.remat != "none" else 0
  layer = tokens * ((2 * n + 2 * k) * h + 3 * f // tensor + 2 * d) * dtype_bytes * 2
  if cfg.remat == "none":
    layer *= cfg.num_layers
  return kept + layer
