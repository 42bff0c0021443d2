"""Per-process rollouts: each process samples its share of the prompts, results are gathered.

`generate_share` runs `Sampler.generate_padded` on this process's contiguous share of the prompts
(no replication) with `row_offset`, so every sample draws the random numbers it would draw in the
whole batch: the gathered results equal one process sampling everything (same seeds per
question; tests/test_engine.py), in prompt order. The sampler must hold process-local weights
(replicated or sharded over this process's devices only), since each process runs its own program
on different prompts.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from jaxreason.sampling.config import BudgetForcing, SamplingConfig
from jaxreason.sampling.sampler import SampleBatch, Sampler


def share(num_prompts: int, process_index: int, process_count: int) -> range:
  """Prompts [start, stop) of one process: contiguous, ceil(num / count) each (the last may hold fewer)."""
  size = -(-num_prompts // process_count)
  return range(min(process_index * size, num_prompts), min((process_index + 1) * size, num_prompts))


def generate_share(sampler: Sampler, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
                   budget: BudgetForcing | None = None, seed: int | jax.Array = 0, *,
                   process_index: int | None = None, process_count: int | None = None, gather: bool = True,
                   **kw) -> SampleBatch:
  """Samples this process's share of `prompts`; with `gather`, returns every process's results.

  Each process pads its share to ceil(num / count) prompts (repeating its first prompt) so the
  gather sees equal shapes; the padding rows are dropped. Without `gather` it returns only its own
  rows (`prompt_index` global). `process_index` / `process_count` default to jax's.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  mine = share(len(prompts), index, count)
  size = -(-len(prompts) // count)
  local = [prompts[i] for i in mine] or [prompts[0]]
  local = local + [local[0]] * (size - len(local))
  out = sampler.generate_padded(local, cfg, budget, seed, row_offset=mine.start * cfg.n, **kw)
  real = len(mine) * cfg.n
  arrays = {f.name: getattr(out, f.name) for f in dataclasses.fields(SampleBatch) if f.name != "metrics"}
  arrays["prompt_index"] = arrays["prompt_index"] + mine.start
  if not gather or count == 1:
    return SampleBatch(**{k: v[:real] for k, v in arrays.items()}, metrics=out.metrics)
  from jax.experimental import multihost_utils
  arrays["valid"] = np.arange(size * cfg.n) < real
  allv = {k: np.asarray(v) for k, v in multihost_utils.process_allgather(arrays, tiled=True).items()}
  keep = allv.pop("valid")
  return SampleBatch(**{k: v[keep] for k, v in allv.items()}, metrics=out.metrics)
