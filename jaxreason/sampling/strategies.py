"""Choosing the next token: greedy, temperature, top-k, top-p (nucleus), min-p."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxreason.sampling.config import SamplingConfig

_NEG = -1e30


def scaled_log_probs(logits: jax.Array, temperature: float) -> jax.Array:
  """[B, V] float32 logits -> log-softmax(logits / T) (raw when T == 0)."""
  logits = logits.astype(jnp.float32)
  if temperature > 0:
    logits = logits / temperature
  return jax.nn.log_softmax(logits, axis=-1)


def filter_logits(logp: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Masks tokens outside top-k / top-p / min-p (applied to temperature-scaled log-probs)."""
  if cfg.top_k > 0 and cfg.top_k < logp.shape[-1]:
    kth = jax.lax.top_k(logp, cfg.top_k)[0][..., -1:]
    logp = jnp.where(logp < kth, _NEG, logp)
  if cfg.min_p > 0:
    threshold = jnp.max(logp, axis=-1, keepdims=True) + jnp.log(cfg.min_p)
    logp = jnp.where(logp < threshold, _NEG, logp)
  if cfg.top_p < 1.0:
    sorted_logp = jnp.sort(logp, axis=-1)[..., ::-1]
    probs = jnp.exp(sorted_logp - jax.nn.logsumexp(sorted_logp, axis=-1, keepdims=True))
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    # keep a token if the mass of the tokens strictly more likely is < top_p (always keeps the top one)
    keep = cum_before < cfg.top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logp, jnp.inf), axis=-1, keepdims=True)
    logp = jnp.where(logp < cutoff, _NEG, logp)
  return logp


def choose(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig):
  """logits [B, V] -> (token [B] int32, log_probs [B, V] float32 of the scaled distribution)."""
  logp = scaled_log_probs(logits, cfg.temperature)
  if cfg.temperature == 0:
    token = jnp.argmax(logp, axis=-1)
  else:
    token = jax.random.categorical(rng, filter_logits(logp, cfg), axis=-1)
  return token.astype(jnp.int32), logp


def entropy(logp: jax.Array) -> jax.Array:
  """[B, V] log-probs -> [B] entropy in nats."""
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def choose_rows(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig):
  """`choose` with one key per row (keys [B]): a row's draw does not depend on the other rows."""
  logp = scaled_log_probs(logits, cfg.temperature)
  if cfg.temperature == 0:
    token = jnp.argmax(logp, axis=-1)
  else:
    token = jax.vmap(lambda k, lp: jax.random.categorical(k, lp))(keys, filter_logits(logp, cfg))
  return token.astype(jnp.int32), logp
