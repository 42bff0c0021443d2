"""Rotary position embeddings, HuggingFace (`rotate_half`, non-interleaved) convention.

Frequencies follow `transformers.modeling_rope_utils`: `default`, `linear` and `llama3` scaling.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxreason.models.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """[head_dim // 2] float32 inverse frequencies, computed in float64 on the host like HF."""
  dim = cfg.resolved_head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  sc = cfg.rope_scaling
  if sc.rope_type == "linear":
    inv = inv / sc.factor
  elif sc.rope_type == "llama3":
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(is_medium, smoothed, scaled)
  return np.asarray(inv, dtype=np.float32)


def sin_cos(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """positions [B, T] int -> (sin, cos) each [B, T, head_dim] float32."""
  # [B, T, H/2]
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jnp.ndarray, sin: jnp.ndarray, cos: jnp.ndarray) -> jnp.ndarray:
  """x [B, T, N, H]; sin/cos [B, T, H]. Computed in float32, returned in x.dtype."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(dtype)
