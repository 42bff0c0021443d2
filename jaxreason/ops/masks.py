"""Attention masks from positions and segment ids.

Segment id 0 marks padding; tokens attend only within their own (non-zero) segment, and only to
keys at the same or an earlier position. Packed sequences (several documents per row, positions
restarting at 0) therefore never attend across documents, and left- or right-padded rows ignore
their pads. With a KV cache the key side is the cache: its positions and segment ids are stored
alongside it.
"""

from __future__ import annotations

import jax.numpy as jnp


def attention_mask(q_positions: jnp.ndarray, q_segments: jnp.ndarray,
                   kv_positions: jnp.ndarray, kv_segments: jnp.ndarray) -> jnp.ndarray:
  """[B, T] x2, [B, S] x2 -> bool [B, T, S] (True = may attend)."""
  same_segment = q_segments[:, :, None] == kv_segments[:, None, :]
  causal = kv_positions[:, None, :] <= q_positions[:, :, None]
  valid_key = kv_segments[:, None, :] != 0
  return same_segment & causal & valid_key


def positions_from_padding(padding_mask: jnp.ndarray) -> jnp.ndarray:
  """Positions counting real tokens only (left padding safe): cumsum(mask) - 1, clipped at 0."""
  m = padding_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)
