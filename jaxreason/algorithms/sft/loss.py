"""Supervised fine-tuning loss (s1, MiniMind reasoning distillation, CS336 SFT).

Completion-only cross-entropy: each target token has a weight (0 for prompt and padding, 1 for
response tokens, e.g. 10 for MiniMind's think/answer tag tokens). Normalisation (SPEC §2):
- "token" (default): sum(ce * w) / number of trained tokens (w > 0) in the GLOBAL batch. This is
  MiniMind's sum(ce * w) / sum(mask) and s1's mean over response tokens.
- "sequence": per example, sum(ce * w) / its trained tokens; then the mean over the examples of
  the global batch (packed rows hold several examples: segments count separately).
The normalisers are computed from the whole global batch before the micro-batch loop, so gradient
accumulation gives exactly the gradient of one big batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreason.ops.logprobs import token_logprobs
from jaxreason.train.step import make_train_step


def normalizers(weights: jax.Array, segments: jax.Array) -> dict[str, jax.Array]:
  """Global-batch counts: trained tokens and trained examples (row, segment) pairs."""
  trained = weights > 0
  tokens = jnp.sum(trained)
  # An example = a (row, segment) pair with at least one trained token.
  b, t = segments.shape
  ids = (jnp.arange(b)[:, None] * (t + 1) + segments).reshape(-1)
  per_example = jax.ops.segment_sum(trained.reshape(-1).astype(jnp.int32), ids, num_segments=b * (t + 1))
  examples = jnp.sum(per_example > 0)
  return {"tokens": tokens.astype(jnp.float32), "examples": examples.astype(jnp.float32)}


def sft_loss_terms(model, batch: dict[str, jax.Array], *, normalization: str, norms: dict[str, jax.Array],
                   chunk: int = 512):
  """Loss contribution of one micro-batch (summing over micro-batches gives the global loss).

  batch: inputs, targets, weights, positions, segments — each [B, T].
  Returns (loss, aux) with aux = sums for logging (ce_sum, tokens).
  """
  hidden, _ = model.hidden_states(batch["inputs"], batch["positions"], batch["segments"])
  logp = token_logprobs(hidden, model.unembedding(), batch["targets"], chunk=chunk)
  w = batch["weights"].astype(jnp.float32)
  ce = -logp * w
  if normalization == "token":
    loss = jnp.sum(ce) / jnp.maximum(norms["tokens"], 1.0)
  elif normalization == "sequence":
    b, t = batch["segments"].shape
    ids = (jnp.arange(b)[:, None] * (t + 1) + batch["segments"]).reshape(-1)
    num = jax.ops.segment_sum(ce.reshape(-1), ids, num_segments=b * (t + 1))
    den = jax.ops.segment_sum((w > 0).reshape(-1).astype(jnp.float32), ids, num_segments=b * (t + 1))
    per_example = jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)
    loss = jnp.sum(per_example) / jnp.maximum(norms["examples"], 1.0)
  else:
    raise ValueError(f"loss normalization must be 'token' or 'sequence', got {normalization!r}")
  trained = (w > 0).astype(jnp.float32)
  aux = {"nll_sum": jnp.sum(-logp * trained), "tokens": jnp.sum(trained)}
  return loss, aux


def make_sft_step(graphdef, tx, schedule, *, normalization: str = "token", chunk: int = 512):
  """`train.step.make_train_step` with the SFT loss: step(state, batch [A, B, T]) -> (state, metrics)."""

  def loss_fn(params, mb, norms):
    loss, aux = sft_loss_terms(nnx.merge(graphdef, params), mb, normalization=normalization, norms=norms, chunk=chunk)
    return loss, {"nll_sum": aux["nll_sum"]}

  def metrics_fn(sums, norms, flat):
    return {"nll_per_token": sums["nll_sum"] / jnp.maximum(norms["tokens"], 1.0), "trained_tokens": norms["tokens"],
            "tokens": jnp.sum(flat["segments"] > 0).astype(jnp.float32)}

  return make_train_step(tx, schedule, loss_fn, lambda flat: normalizers(flat["weights"], flat["segments"]),
                         metrics_fn)
