"""Token log-probabilities from hidden states without materialising [B, T, V] logits at once.

The unembedding and log-softmax run over chunks of the sequence inside a `lax.scan` whose body is
rematerialised (`jax.checkpoint`), so the forward keeps one chunk of logits alive and the backward
recomputes each chunk's logits instead of storing them. Everything is float32 whatever the compute
dtype (matmul inputs stay in the compute dtype with float32 accumulation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(hidden: jax.Array, table: jax.Array, targets: jax.Array, *, chunk: int = 512,
                   temperature: float = 1.0, with_entropy: bool = False):
  """hidden [B, T, D], table [V, D], targets [B, T] -> log p(targets) [B, T] float32.

  `temperature` divides the logits first (GRPO scores with the sampling temperature). With
  `with_entropy`, also returns the entropy [B, T] of each position's distribution.
  """
  b, t, d = hidden.shape
  chunk = max(1, min(chunk, t))
  pad = (-t) % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  n = (t + pad) // chunk
  # [n, B, c, D] and [n, B, c]
  hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
  ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
  w = table.astype(hidden.dtype)

  @jax.checkpoint
  def one_chunk(h, tg):
    # [B, c, V]
    logits = jnp.einsum("BcD,VD->BcV", h, w, preferred_element_type=jnp.float32)
    if temperature != 1.0:
      logits = logits / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tg[..., None], axis=-1)[..., 0]
    if not with_entropy:
      return picked - lse, jnp.zeros_like(lse)
    probs = jnp.exp(logits - lse[..., None])
    ent = lse - jnp.sum(probs * logits, axis=-1)
    return picked - lse, ent

  def body(carry, xs):
    return carry, one_chunk(*xs)

  _, (lp, ent) = jax.lax.scan(body, None, (hs, ts))
  lp = lp.swapaxes(0, 1).reshape(b, t + pad)[:, :t]
  if with_entropy:
    return lp, ent.swapaxes(0, 1).reshape(b, t + pad)[:, :t]
  return lp
