"""Logit distillation losses (SPEC §11), computed over chunks of the sequence.

Per trained position, student p_s and teacher p_t over the vocabulary, both at temperature tau:
- forward KL  sum p_t (log p_t - log p_s)              (Hinton; "forward_kl")
- reverse KL  sum p_s (log p_s - log p_t)              ("reverse_kl"; on-policy distillation)
- generalised JSD(beta) = beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s
  (GKD, Agarwal et al. 2024; "jsd", 0 < beta < 1: at 0 and 1 this formula is identically 0, use
  the KLs for those limits).
Every divergence is multiplied by tau^2 (Hinton's gradient scale; SPEC states it for the forward
KL, applied to all three here so the temperature never rescales the learning rate). The loss is
the token mean over the mask, optionally mixed with the data's cross-entropy at tau = 1:
(1 - a) CE + a KD.

Neither model's [B, T, V] logits exist at once: both unembeddings run per chunk of `chunk`
positions inside a rematerialised scan (as `ops.logprobs`), the teacher's under stop_gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("forward_kl", "reverse_kl", "jsd")


def divergence(s_logits: jax.Array, t_logits: jax.Array, kind: str, beta: float = 0.5,
               temperature: float = 1.0) -> jax.Array:
  """[..., V] student and teacher logits -> [...] per-position divergence (times tau^2)."""
  ls = jax.nn.log_softmax(s_logits.astype(jnp.float32) / temperature, axis=-1)
  lt = jax.nn.log_softmax(t_logits.astype(jnp.float32) / temperature, axis=-1)
  if kind == "forward_kl":
    d = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
  elif kind == "reverse_kl":
    d = jnp.sum(jnp.exp(ls) * (ls - lt), axis=-1)
  elif kind == "jsd":
    lm = jnp.logaddexp(jnp.log(beta) + lt, jnp.log1p(-beta) + ls)
    d = beta * jnp.sum(jnp.exp(lt) * (lt - lm), axis=-1) + (1 - beta) * jnp.sum(jnp.exp(ls) * (ls - lm), axis=-1)
  else:
    raise ValueError(f"distill loss must be one of {', '.join(KINDS)}; got {kind!r}")
  return d * temperature ** 2


def chunked_kd(s_hidden: jax.Array, s_table: jax.Array, t_hidden: jax.Array, t_table: jax.Array,
               targets: jax.Array, *, kind: str, beta: float = 0.5, temperature: float = 1.0,
               chunk: int = 256) -> tuple[jax.Array, jax.Array]:
  """Student hidden [B, T, D_s] / table [V, D_s], teacher hidden [B, T, D_t] / table [V, D_t],
  targets [B, T] -> (per-token divergence [B, T], student log p(target) at tau = 1 [B, T])."""
  b, t, _ = s_hidden.shape
  chunk = max(1, min(chunk, t))
  pad = (-t) % chunk
  if pad:
    s_hidden = jnp.pad(s_hidden, ((0, 0), (0, pad), (0, 0)))
    t_hidden = jnp.pad(t_hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  n = (t + pad) // chunk
  split = lambda x: x.reshape((b, n, chunk) + x.shape[2:]).swapaxes(0, 1)  # noqa: E731  [n, B, c, ...]
  ws, wt = s_table.astype(s_hidden.dtype), jax.lax.stop_gradient(t_table.astype(t_hidden.dtype))

  @jax.checkpoint
  def one_chunk(hs, ht, tg):
    # [B, c, V]
    sl = jnp.einsum("BcD,VD->BcV", hs, ws, preferred_element_type=jnp.float32)
    tl = jax.lax.stop_gradient(jnp.einsum("BcD,VD->BcV", ht, wt, preferred_element_type=jnp.float32))
    d = divergence(sl, tl, kind, beta, temperature)
    lp = jnp.take_along_axis(sl, tg[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(sl, axis=-1)
    return d, lp

  _, (d, lp) = jax.lax.scan(lambda c, xs: (c, one_chunk(*xs)), None,
                            (split(s_hidden), split(jax.lax.stop_gradient(t_hidden)), split(targets)))
  unsplit = lambda x: x.swapaxes(0, 1).reshape(b, t + pad)[:, :t]  # noqa: E731
  return unsplit(d), unsplit(lp)


def kd_loss(per_token_kd: jax.Array, logp: jax.Array, mask: jax.Array, kd_weight: float, tokens: jax.Array):
  """(1 - a) CE + a KD (a = kd_weight), each a sum over masked tokens divided by `tokens` (the
  global count of trained tokens, so micro-batch shares add up to the global loss)."""
  m = mask.astype(jnp.float32)
  kd = jnp.sum(per_token_kd * m) / jnp.maximum(tokens, 1.0)
  ce = jnp.sum(-logp * m) / jnp.maximum(tokens, 1.0)
  return (1.0 - kd_weight) * ce + kd_weight * kd, {"kd_sum": jnp.sum(per_token_kd * m), "ce_sum": jnp.sum(-logp * m)}
