"""`algorithm: reward_model`: a pairwise (Bradley-Terry) reward model, as TRL's RewardTrainer.

The decoder (`init_from`, or from scratch as `model`) plus a scalar head on the last token's hidden
state (`loss.py`), trained on preference pairs (`algorithms.pairs`) with `train.loop.fit`. Its
checkpoints carry a `reward_model` item, so loading one as a policy fails clearly;
`loss.load_scorer` reads them (GRPO's `reward_model:PATH` reward).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreason import sharding
from jaxreason.algorithms import pairs
from jaxreason.algorithms.reward_model.loss import SCORE_HEAD, init_score_head, make_reward_model_step
from jaxreason.checkpoint import REWARD_MODEL_ITEM
from jaxreason.train.loop import RunSetup, initial_params, make_checkpointer, make_tx, restore_or_init, setup_run
from jaxreason.train.state import params_state_shardings, replicated
from jaxreason.train.step import jit_step


@dataclasses.dataclass
class RewardModelSetup(RunSetup):
  """A RunSetup whose parameters are the decoder's plus the score head."""

  @property
  def abs_params(self) -> dict:
    d, dtype = self.model_cfg.hidden_size, jnp.dtype(self.model_cfg.param_dtype)
    return {**nnx.to_pure_dict(self.abs_state),
            SCORE_HEAD: {"kernel": jax.ShapeDtypeStruct((d, 1), dtype), "bias": jax.ShapeDtypeStruct((), dtype)}}


def run_reward_model(cfg) -> dict[str, Any]:
  """A pairwise reward model on the decoder (see the module docstring)."""
  if cfg.eval is not None:
    raise ValueError("algorithm reward_model trains a scorer, not a policy: it cannot be evaluated by sampling; "
                     "set eval: null")
  base = setup_run(cfg)
  rs = RewardModelSetup(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
  data = pairs.pair_data(cfg, rs.tokenizer, max_tokens=cfg.data.seq_len)
  total_steps = pairs.total_steps_for(cfg, data)
  tx, schedule = make_tx(cfg, rs.abs_params, total_steps)
  one = replicated(rs.mesh)
  param_shardings = {**sharding.pure_shardings(rs.abs_state, rs.mesh, rs.rules),
                     SCORE_HEAD: {"kernel": one, "bias": one}}
  shardings = params_state_shardings(rs.abs_params, param_shardings, tx, rs.mesh)
  ckpt = make_checkpointer(cfg)
  mc = rs.model_cfg

  def params_fn():
    head = init_score_head(mc.hidden_size, mc.initializer_range, cfg.seed, jnp.dtype(mc.param_dtype))
    return {**initial_params(cfg, mc, rs.mesh), SCORE_HEAD: head}

  state, meta = restore_or_init(rs, tx, shardings, ckpt, params_fn=params_fn)
  step_fn = make_reward_model_step(rs.graphdef, tx, schedule, center_coef=cfg.reward_model.center_coef)
  jitted = jit_step(step_fn, shardings, pairs.rows_sharding(rs.mesh))
  marker = {REWARD_MODEL_ITEM: {"head": "linear on the last token's final hidden state", "seq_len": cfg.data.seq_len,
                                "center_coef": cfg.reward_model.center_coef}}
  step, last = pairs.fit_pairs(rs, data, state, meta, jitted, ckpt, total_steps, extra_items=marker)
  return {"final_step": step, "metrics": last}
