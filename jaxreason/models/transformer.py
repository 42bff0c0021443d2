"""The decoder-only transformer: Qwen2/Qwen2.5, Qwen3 (dense) and Llama as config deltas.

A block reads like the papers: `x = x + attn(norm(x)); x = x + mlp(norm(x))`.
Inputs are tokens, positions and segment ids (0 = padding); see `jaxreason.ops.masks`.
Logits are float32 whatever the compute dtype.

Layer layouts (`ModelConfig.scan_layers`):
- scanned (default): `layers` is ONE Block whose parameters carry a leading [L] axis (logical axis
  `layers`, never sharded); the forward runs it with `jax.lax.scan`, so the compiled program holds
  one layer body whatever the depth. The remat policy wraps the scan body (per layer, as unscanned).
  With a KV cache the stacked cache [L, ...] is part of the scan carry and the body writes and
  reads its layer `i` (the same cache tuple the unscanned blocks get).
- unscanned: `layers` is a list of L Blocks, unrolled (`layers.<i>.` paths, as HF names them).
Both layouts initialise to the same values for a seed; `jaxreason.models.layout` converts.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreason import sharding
from jaxreason.models.config import ModelConfig
from jaxreason.nn.layers import MLP, Attention, Embed, RMSNorm, unembed
from jaxreason.ops import rope as rope_ops

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Dense per-layer KV cache with the positions and segment ids of each slot.

  k: [L, B, K, H, S] and v: [L, B, K, S, H]: per (row, KV head), keys transposed and values as
  they are, so a decode step's two attention dots (q.K^T, p.V) read the cache as the plain
  matrices a GEMM wants, with no transposed copy (about 2x faster decode attention on XLA:CPU
  than [L, B, S, K, H] for both). positions, segments: [B, S] (segment 0 = empty/padding);
  index: the next slot to write, [] shared by all rows (prompts left-padded to a common length)
  or [B] per row (continuous batching; an index >= S drops that row's write).
  """

  k: jax.Array
  v: jax.Array
  positions: jax.Array
  segments: jax.Array
  index: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, length: int, dtype=None) -> "KVCache":
    dtype = jnp.dtype(dtype or cfg.dtype)
    k, h = cfg.num_kv_heads, cfg.resolved_head_dim
    return cls(k=jnp.zeros((cfg.num_layers, batch, k, h, length), dtype),
               v=jnp.zeros((cfg.num_layers, batch, k, length, h), dtype),
               positions=jnp.zeros((batch, length), jnp.int32),
               segments=jnp.zeros((batch, length), jnp.int32),
               index=jnp.zeros((), jnp.int32))

  @property
  def length(self) -> int:
    """S, the slots per row."""
    return self.positions.shape[1]


def _write_slots(buf: jax.Array, index: jax.Array, val: jax.Array) -> jax.Array:
  """buf [B, S], val [B, T] written at slots [index, index + T) (index [] or [B])."""
  if index.ndim == 0:
    return jax.lax.dynamic_update_slice_in_dim(buf, val.astype(buf.dtype), index, axis=1)
  rows = jnp.arange(val.shape[0])[:, None]
  return buf.at[rows, index[:, None] + jnp.arange(val.shape[1])[None]].set(val.astype(buf.dtype), mode="drop")


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    out_std = cfg.initializer_range / math.sqrt(2 * cfg.num_layers)
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    self.attn = Attention(cfg, rngs, out_std)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    self.mlp = MLP(cfg, rngs, out_std)

  def __call__(self, x, sin, cos, positions, segments, cache=None):
    h, new_cache = self.attn(self.attn_norm(x), sin, cos, positions, segments, cache)
    x = x + h
    x = x + self.mlp(self.mlp_norm(x))
    return sharding.constrain(x, ("act_batch", "act_length", "act_embed")), new_cache


def _block_forward(block, x, sin, cos, positions, segments):
  return block(x, sin, cos, positions, segments)[0]


def stack_blocks(blocks: list[Block]) -> Block:
  """One Block holding `blocks`' parameters stacked on a new leading axis (logical name `layers`)."""
  graphdef, first = nnx.split(blocks[0])
  states = [dict(nnx.to_flat_state(nnx.state(b))) for b in blocks]
  flat = []
  for path, var in nnx.to_flat_state(first):
    stacked = jnp.stack([st[path].get_value() for st in states])
    axes = var.get_metadata().get("logical_axes") or (None,) * (stacked.ndim - 1)
    flat.append((path, var.replace(stacked, logical_axes=("layers",) + tuple(axes))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


class Transformer(nnx.Module):
  """Decoder-only LM. Initialisation: N(0, initializer_range), residual outputs /sqrt(2L)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = Embed(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range, pd, rngs)
    blocks = [Block(cfg, rngs) for _ in range(cfg.num_layers)]
    self.layers = stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    if not cfg.tie_word_embeddings:
      self.lm_head = nnx.Param(
          cfg.initializer_range * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pd),
          logical_axes=("vocab", "embed"))

  def hidden_states(self, tokens, positions=None, segments=None, cache: KVCache | None = None):
    """tokens [B, T] -> (final-normed hidden [B, T, D], updated cache or None)."""
    cfg = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segments is None:
      segments = jnp.ones(tokens.shape, jnp.int32)
    dtype = jnp.dtype(cfg.dtype)
    x = sharding.constrain(self.embed(tokens, dtype), ("act_batch", "act_length", "act_embed"))
    sin, cos = rope_ops.sin_cos(positions, rope_ops.inverse_frequencies(cfg))

    if cache is None:
      if cfg.scan_layers:
        return self.final_norm(self._scan(x, sin, cos, positions, segments)), None
      forward = _block_forward
      if cfg.remat != "none":
        forward = nnx.remat(_block_forward, policy=_REMAT_POLICIES[cfg.remat])
      for block in self.layers:
        x = forward(block, x, sin, cos, positions, segments)
      return self.final_norm(x), None

    index = cache.index
    kv_pos = _write_slots(cache.positions, index, positions)
    kv_seg = _write_slots(cache.segments, index, segments)
    ck, cv = cache.k, cache.v
    if cfg.scan_layers:
      x, ck, cv = self._scan_cached(x, sin, cos, positions, segments, ck, cv, kv_pos, kv_seg, index)
    else:
      for i, block in enumerate(self.layers):
        x, (ck, cv) = block(x, sin, cos, positions, segments, cache=(ck, cv, i, kv_pos, kv_seg, index))
    new_cache = KVCache(k=ck, v=cv, positions=kv_pos, segments=kv_seg, index=index + tokens.shape[1])
    return self.final_norm(x), new_cache

  def _scan(self, x, sin, cos, positions, segments):
    """x [B, T, D] through the stacked layers, one scan step per layer (remat per step)."""
    graphdef, stacked = nnx.split(self.layers)

    def body(x, layer_state):
      return _block_forward(nnx.merge(graphdef, layer_state), x, sin, cos, positions, segments), None

    if self.cfg.remat != "none":
      body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.cfg.remat])
    return jax.lax.scan(body, x, stacked)[0]

  def _scan_cached(self, x, sin, cos, positions, segments, ck, cv, kv_pos, kv_seg, index):
    """As `_scan` with the stacked cache in the carry; step i writes and reads cache layer i."""
    graphdef, stacked = nnx.split(self.layers)

    def body(carry, xs):
      x, ck, cv = carry
      layer_state, i = xs
      block = nnx.merge(graphdef, layer_state)
      x, (ck, cv) = block(x, sin, cos, positions, segments, cache=(ck, cv, i, kv_pos, kv_seg, index))
      return (x, ck, cv), None

    layer_ids = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
    return jax.lax.scan(body, (x, ck, cv), (stacked, layer_ids))[0]

  def unembedding(self) -> jax.Array:
    """[V, D] output table (the embedding when tied)."""
    return self.embed.embedding[...] if self.cfg.tie_word_embeddings else self.lm_head[...]

  def logits(self, hidden: jax.Array) -> jax.Array:
    return sharding.constrain(unembed(hidden, self.unembedding()), ("act_batch", "act_length", "act_vocab"))

  def __call__(self, tokens, positions=None, segments=None, cache: KVCache | None = None):
    """tokens [B, T] -> float32 logits [B, T, V] (and the updated cache when one is given)."""
    hidden, new_cache = self.hidden_states(tokens, positions, segments, cache)
    logits = self.logits(hidden)
    return logits if cache is None else (logits, new_cache)
