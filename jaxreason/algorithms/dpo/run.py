"""`algorithm: dpo`: DPO (Rafailov et al. 2023, as TRL's DPOTrainer; loss in `loss.py`).

Reads pairs (data format `preference`, `jaxreason.data.preference`; see `algorithms.pairs`). The
policy starts from `init_from`, and the reference is those same initial weights, frozen. With
`dpo.precompute_ref` the reference's sequence log-probs of every pair are computed once up front
(recomputed on resume) and travel with the batches; otherwise the reference parameters stay on
device and are run in each step. `dpo.self_pairs` first builds pairs from the initial policy's own
right and wrong answers (`self_pairs.build_self_pairs`) and trains on them with `data.train`.
The loop is `train.loop.fit` (resume from the latest checkpoint, whose train_meta holds the
position in the pair stream; checkpoints every `checkpoint.every_steps` and at the end; a save on
SIGTERM). Checkpoints are ordinary policy checkpoints; `eval` runs at the end as for SFT.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxreason import sharding
from jaxreason.algorithms import pairs
from jaxreason.algorithms.dpo.loss import make_dpo_step, pair_ref_logps
from jaxreason.algorithms.dpo.self_pairs import build_self_pairs
from jaxreason.data.preference import PreferenceBatches
from jaxreason.train.loop import (RunSetup, initial_params, make_checkpointer, make_tx, restore_or_init, setup_run,
                                  with_final_eval)
from jaxreason.train.state import replicated, state_shardings
from jaxreason.train.step import jit_step


def precompute_ref_logps(rs: RunSetup, data: PreferenceBatches, ref_params: dict, param_shardings: dict,
                         pairs_per_call: int) -> np.ndarray:
  """The reference's sequence log-probs of every pair, [num_pairs, 2] (chosen, rejected), on every process."""
  rows = pairs.rows_sharding(rs.mesh, leading=0)
  fn = jax.jit(pair_ref_logps(rs.graphdef), in_shardings=(param_shardings, rows), out_shardings=replicated(rs.mesh))
  n = len(data.pairs)
  local = pairs_per_call // jax.process_count()
  lo = jax.process_index() * local
  out = np.zeros((n, 2), np.float32)
  for start in range(0, n, pairs_per_call):
    idx = np.minimum(np.arange(start, start + pairs_per_call), n - 1)  # the last call repeats the last pair
    part = data.batch(idx[lo:lo + local])
    del part["index"]
    batch = {k: jax.make_array_from_process_local_data(rows, v, (pairs_per_call,) + v.shape[1:])
             for k, v in part.items()}
    with sharding.use_mesh(rs.mesh, rs.rules):
      logps = fn(ref_params, batch)
    m = min(n - start, pairs_per_call)
    out[start:start + m] = np.asarray(jax.device_get(logps))[:m]
  return out


def run_dpo(cfg) -> dict[str, Any]:
  """DPO from `init_from` against its frozen copy (see the module docstring)."""
  if not cfg.init_from:
    raise ValueError("algorithm dpo needs init_from: the policy to start from (an SFT run directory, a checkpoint "
                     "or a HuggingFace model directory); its weights are also the frozen reference model")
  rs = setup_run(cfg)
  extra = (build_self_pairs(rs, cfg),) if cfg.dpo.self_pairs else ()
  data = pairs.pair_data(cfg, rs.tokenizer, max_tokens=cfg.data.seq_len + 1, extra=extra)
  total_steps = pairs.total_steps_for(cfg, data)
  tx, schedule = make_tx(cfg, rs.abs_params, total_steps)
  shardings = state_shardings(rs.abs_state, tx, rs.mesh, rs.rules)
  ckpt = make_checkpointer(cfg)
  with sharding.use_mesh(rs.mesh, rs.rules):
    ref_params = initial_params(cfg, rs.model_cfg, rs.mesh)
  state, meta = restore_or_init(rs, tx, shardings, ckpt, params_fn=lambda: jax.tree.map(jnp.copy, ref_params))

  ref_shardings = sharding.pure_shardings(rs.abs_state, rs.mesh, rs.rules)  # the model's (also with LoRA)
  d = cfg.dpo
  step_fn = make_dpo_step(rs.graphdef, tx, schedule, beta=d.beta, loss_type=d.loss_type,
                          label_smoothing=d.label_smoothing, precompute_ref=d.precompute_ref)
  batch_sharding = pairs.rows_sharding(rs.mesh)
  if d.precompute_ref:
    table = precompute_ref_logps(rs, data, ref_params, ref_shardings,
                                 cfg.train.micro_batch_size or cfg.train.global_batch_size)
    del ref_params
    jitted = jit_step(step_fn, shardings, batch_sharding)

    def prepare(local):
      return {**pairs.without_index(local), "ref_logps": table[local["index"]]}
  else:
    with_ref = jit_step(step_fn, shardings, batch_sharding, ref_shardings)

    def jitted(state, batch):
      return with_ref(state, batch, ref_params)
    prepare = pairs.without_index

  step, last = pairs.fit_pairs(rs, data, state, meta, jitted, ckpt, total_steps, prepare=prepare)
  return with_final_eval(cfg, {"final_step": step, "metrics": last})
