"""Parameterised layers. Modules own parameters; math lives in `jaxreason.ops`.

Parameters carry `logical_axes` metadata (names from `jaxreason.sharding`). Weights are stored in
`param_dtype` and cast to the compute `dtype` where they are used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreason import sharding
from jaxreason.ops import attention as attention_ops
from jaxreason.ops import masks
from jaxreason.ops.activations import swiglu
from jaxreason.ops import rope as rope_ops


def _param(rngs: nnx.Rngs, shape, std: float, dtype, axes) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """HF RMSNorm: normalise in float32, cast back to x.dtype, then multiply by the scale."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * normed.astype(x.dtype)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, param_dtype, axis_name: str = "norm"):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)


class Embed(nnx.Module):
  """Token embedding [V, D]; `attend` gives the tied unembedding."""

  def __init__(self, vocab: int, dim: int, std: float, param_dtype, rngs: nnx.Rngs):
    self.embedding = _param(rngs, (vocab, dim), std, param_dtype, ("vocab", "embed"))

  def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
    # [B, T, D]
    return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)


def unembed(x: jax.Array, table: jax.Array) -> jax.Array:
  """x [B, T, D], table [V, D] -> float32 logits [B, T, V]."""
  return jnp.einsum("BTD,VD->BTV", x, table.astype(x.dtype), preferred_element_type=jnp.float32)


def project(eq: str, x: jax.Array, w, dtype) -> jax.Array:
  """x times a projection weight (einsum `eq`) in `dtype`. A LoRA weight kept unmerged
  (`jaxreason.lora.adapters.LoraWeight`) adds its low-rank path itself."""
  if hasattr(w, "lora_project"):
    return w.lora_project(eq, x, dtype)
  return jnp.einsum(eq, x, w.astype(dtype))


def write_cache(buf: jax.Array, layer: int, index: jax.Array, val: jax.Array, *, keys: bool = False) -> jax.Array:
  """Writes val [B, T, K, H] into layer `layer` of the value cache buf [L, B, K, S, H] (or, with
  `keys`, of the key cache [L, B, K, H, S]) at slots [index, index + T).

  `index` is a scalar (all rows at one slot: prefill, the dense sampler) or [B] (each row at its own
  slot: continuous batching; an index >= S drops that row's write). In place inside a jitted loop.
  """
  val = val.astype(buf.dtype)
  if index.ndim == 0:
    block = jnp.transpose(val, (0, 2, 3, 1)) if keys else jnp.swapaxes(val, 1, 2)  # [B,K,H,T] / [B,K,T,H]
    start = (layer, 0, 0, 0, index) if keys else (layer, 0, 0, index, 0)
    return jax.lax.dynamic_update_slice(buf, block[None], start)
  b, t = val.shape[:2]
  rows, slots = jnp.arange(b)[:, None], index[:, None] + jnp.arange(t)[None]
  # Advanced indices split by slices: the indexed dims [B, T] come first, then [K, H] (val's layout).
  if keys:
    return buf.at[layer, rows, :, :, slots].set(val, mode="drop")
  return buf.at[layer, rows, :, slots].set(val, mode="drop")


class Attention(nnx.Module):
  """GQA self-attention with RoPE; optional q/k/v bias (Qwen2) and per-head q/k RMSNorm (Qwen3)."""

  def __init__(self, cfg, rngs: nnx.Rngs, out_std: float):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    pd, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
    self.cfg = cfg
    self.q_proj = _param(rngs, (d, n, h), std, pd, ("embed", "heads", "head_dim"))
    self.k_proj = _param(rngs, (d, k, h), std, pd, ("embed", "kv_heads", "head_dim"))
    self.v_proj = _param(rngs, (d, k, h), std, pd, ("embed", "kv_heads", "head_dim"))
    self.o_proj = _param(rngs, (n, h, d), out_std, pd, ("heads", "head_dim", "embed"))
    if cfg.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((n, h), pd), logical_axes=("heads", "head_dim"))
      self.k_bias = nnx.Param(jnp.zeros((k, h), pd), logical_axes=("kv_heads", "head_dim"))
      self.v_bias = nnx.Param(jnp.zeros((k, h), pd), logical_axes=("kv_heads", "head_dim"))
    if cfg.o_bias:
      self.o_bias = nnx.Param(jnp.zeros((d,), pd), logical_axes=("embed",))
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, cfg.rms_norm_eps, pd, "head_dim")
      self.k_norm = RMSNorm(h, cfg.rms_norm_eps, pd, "head_dim")

  def __call__(self, x, sin, cos, positions, segments, cache=None):
    """x [B, T, D] -> ([B, T, D], updated (k, v) cache or None).

    `cache` is (k [L, B, K, H, S], v [L, B, K, S, H] (`KVCache`'s layout), layer, kv_positions [B, S],
    kv_segments [B, S], index [] or [B]): this call's keys/values are written into layer `layer`
    at slots [index, index + T) (in place inside a jitted loop; per row when index is [B]) and
    attention runs over the filled part of that layer's cache with its positions and segments.
    """
    cfg, dt = self.cfg, x.dtype
    # [B, T, N, H]
    q = project("BTD,DNH->BTNH", x, self.q_proj[...], dt)
    # [B, T, K, H]
    k = project("BTD,DKH->BTKH", x, self.k_proj[...], dt)
    v = project("BTD,DKH->BTKH", x, self.v_proj[...], dt)
    if cfg.qkv_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = sharding.constrain(rope_ops.apply_rope(q, sin, cos), ("act_batch", "act_length", "act_heads", None))
    k = sharding.constrain(rope_ops.apply_rope(k, sin, cos), ("act_batch", "act_length", "act_kv_heads", None))
    v = sharding.constrain(v, ("act_batch", "act_length", "act_kv_heads", None))

    scale = cfg.resolved_head_dim ** -0.5
    if cache is None:
      mask = masks.attention_mask(positions, segments, positions, segments)
      out = attention_ops.attention(q, k, v, mask=mask, scale=scale, backend=cfg.attention_backend,
                                    q_segments=segments, kv_segments=segments, self_attention=True)
      new_cache = None
    else:
      ck, cv, layer, kv_pos, kv_seg, index = cache
      ck, cv = write_cache(ck, layer, index, k, keys=True), write_cache(cv, layer, index, v)
      new_cache = (ck, cv)
      # Only the filled part of the cache is attended (bucketed); rows write at their own index.
      live = jnp.max(jnp.where(index < cv.shape[3], index + k.shape[1], k.shape[1]))
      out = attention_ops.cached_attention(q, ck, cv, layer, positions, segments, kv_pos, kv_seg, live,
                                           scale=scale, backend=cfg.attention_backend)
    # [B, T, D]
    y = project("BTNH,NHD->BTD", out, self.o_proj[...], dt)
    if cfg.o_bias:
      y = y + self.o_bias[...].astype(dt)
    return y, new_cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg, rngs: nnx.Rngs, out_std: float):
    d, f = cfg.hidden_size, cfg.intermediate_size
    pd, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
    self.gate = _param(rngs, (d, f), std, pd, ("embed", "mlp"))
    self.up = _param(rngs, (d, f), std, pd, ("embed", "mlp"))
    self.down = _param(rngs, (f, d), out_std, pd, ("mlp", "embed"))
    self.bias = cfg.mlp_bias
    if cfg.mlp_bias:
      self.gate_bias = nnx.Param(jnp.zeros((f,), pd), logical_axes=("mlp",))
      self.up_bias = nnx.Param(jnp.zeros((f,), pd), logical_axes=("mlp",))
      self.down_bias = nnx.Param(jnp.zeros((d,), pd), logical_axes=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    # [B, T, F]
    g = project("BTD,DF->BTF", x, self.gate[...], dt)
    u = project("BTD,DF->BTF", x, self.up[...], dt)
    if self.bias:
      g, u = g + self.gate_bias[...].astype(dt), u + self.up_bias[...].astype(dt)
    h = sharding.constrain(swiglu(g, u), ("act_batch", "act_length", "act_mlp"))
    y = project("BTF,FD->BTD", h, self.down[...], dt)
    if self.bias:
      y = y + self.down_bias[...].astype(dt)
    return y
