"""Per-process rollouts: each process samples its share of the prompts, results are gathered.

`generate_share` runs `Sampler.generate_padded` on this process's contiguous share of the prompts
(no replication) with `row_offset`, so every sample draws the random numbers it would draw in the
whole batch: the gathered results equal one process sampling everything (same seeds per
question; tests/test_engine.py, tests/test_rollout_split.py), in prompt order. The sampler must
hold process-local weights (replicated or sharded over this process's devices only,
`jaxreason.rollout.RolloutSampler` on several processes), since each process runs its own program
on different prompts. `gather_share` joins the shares (plus any per-row host arrays computed where
the rows are, e.g. rewards) with one host allgather.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import numpy as np

from jaxreason.sampling.config import BudgetForcing, SamplingConfig
from jaxreason.sampling.sampler import SampleBatch, Sampler

_ARRAYS = tuple(f.name for f in dataclasses.fields(SampleBatch) if f.name != "metrics")
# Engine counters summed over processes to form the whole batch's figures.
_SUMMED = ("tokens", "slots", "slot_steps", "inserted")


def share(num_prompts: int, process_index: int, process_count: int) -> range:
  """Prompts [start, stop) of one process: contiguous, ceil(num / count) each (the last may hold fewer)."""
  size = -(-num_prompts // process_count)
  return range(min(process_index * size, num_prompts), min((process_index + 1) * size, num_prompts))


def generate_share(sampler: Sampler, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
                   budget: BudgetForcing | None = None, seed: int | jax.Array = 0, *,
                   process_index: int | None = None, process_count: int | None = None, gather: bool = True,
                   **kw) -> SampleBatch:
  """Samples this process's share of `prompts`; with `gather`, returns every process's results.

  Each process pads its share to ceil(num / count) prompts (repeating its first prompt) so every
  process compiles one shape; the padding rows are dropped. Without `gather` it returns only its
  own rows (`prompt_index` global). `process_index` / `process_count` default to jax's.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  mine = share(len(prompts), index, count)
  size = -(-len(prompts) // count)
  local = [prompts[i] for i in mine] or [prompts[0]]
  local = local + [local[0]] * (size - len(local))
  out = sampler.generate_padded(local, cfg, budget, seed, row_offset=mine.start * cfg.n, **kw)
  real = len(mine) * cfg.n
  arrays = {k: getattr(out, k)[:real] for k in _ARRAYS}
  arrays["prompt_index"] = arrays["prompt_index"] + mine.start
  mine_batch = SampleBatch(**arrays, metrics=out.metrics)
  if not gather or count == 1:
    return mine_batch
  return gather_share(mine_batch, len(prompts), cfg.n)[0]


def gather_share(local: SampleBatch, num_prompts: int, n: int, extra: Mapping[str, np.ndarray] | None = None,
                 ) -> tuple[SampleBatch, dict[str, np.ndarray]]:
  """Every process's share (`generate_share(..., gather=False)`) joined in prompt order, with
  `extra` (per-row host arrays of the share, the same keys on every process) joined alongside.

  One `process_allgather` of host arrays: every process must call it, in the same order. The
  metrics become the whole batch's (tokens, slots, slot-steps summed; seconds, longest and decode
  steps the largest process's), so occupancy and tokens/s describe all processes together.
  """
  count = jax.process_count()
  extra = dict(extra or {})
  if count == 1:
    return local, extra
  rows = -(-num_prompts // count) * n
  real = len(local.length)

  def pad(a):
    a = np.asarray(a)
    return np.concatenate([a, np.zeros((rows - real,) + a.shape[1:], a.dtype)])

  m = local.metrics or {}
  counters = {k: np.asarray([float(m.get(k, 0))])
              for k in ("tokens", "slots", "slot_steps", "inserted", "seconds", "longest", "decode_steps")}
  sent = {"rows": {k: pad(getattr(local, k)) for k in _ARRAYS}, "extra": {k: pad(v) for k, v in extra.items()},
          "valid": np.arange(rows) < real, "counters": counters}
  from jax.experimental import multihost_utils
  got = jax.tree.map(np.asarray, multihost_utils.process_allgather(sent, tiled=True))
  keep = got["valid"]
  c = got["counters"]
  tot = {k: float(c[k].sum()) for k in _SUMMED}
  seconds = float(c["seconds"].max())
  metrics = dict(m, slots=int(tot["slots"]), tokens=int(tot["tokens"]), inserted=int(tot["inserted"]),
                 decode_steps=int(c["decode_steps"].max()), slot_steps=tot["slot_steps"], seconds=seconds,
                 tokens_per_s=tot["tokens"] / max(seconds, 1e-9), longest=int(c["longest"].max()),
                 slot_occupancy=tot["tokens"] / max(tot["slot_steps"], 1),
                 padding_waste=1 - tot["tokens"] / max(tot["slot_steps"], 1), processes=count)
  batch = SampleBatch(**{k: v[keep] for k, v in got["rows"].items()}, metrics=metrics)
  return batch, {k: v[keep] for k, v in got["extra"].items()}
