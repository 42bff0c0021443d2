"""Held-out perplexity for pre-training: mean next-token NLL over held-out batches, exp'd.

`make_heldout_eval(rs, data, batch_sharding)` returns `evaluate(params) -> {"heldout_nll",
"heldout_ppl"}`, over the first `data.heldout_batches` global batches of `data.heldout` (the same
batches every time: a fresh iterator each call). NLL is summed over every target with weight > 0
and divided by their count (token-level, as `nll_per_token` in training).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreason import sharding
from jaxreason.algorithms.sft import loss as sft


def make_heldout_eval(rs, data, batch_sharding):
  from jaxreason.train.loop import global_batch

  @jax.jit
  def nll(params, batch):
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    norms = sft.normalizers(flat["weights"], flat["segments"])
    _, aux = sft.sft_loss_terms(nnx.merge(rs.graphdef, params), flat, normalization="token", norms=norms)
    return aux["nll_sum"], aux["tokens"]

  def evaluate(params) -> dict[str, float]:
    total, count = jnp.zeros(()), jnp.zeros(())
    it = iter(data.heldout)
    for _ in range(data.heldout_batches):
      batch = global_batch(next(it), 1, data.global_batch_size, batch_sharding)
      with sharding.use_mesh(rs.mesh, rs.rules):
        s, c = nll(params, batch)
      total, count = total + s, count + c
    mean = float(total) / max(float(count), 1.0)
    return {"heldout_nll": mean, "heldout_ppl": math.exp(min(mean, 50.0))}

  return evaluate
