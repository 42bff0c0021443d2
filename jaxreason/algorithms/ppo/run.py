"""PPO training (`algorithm: ppo`): rollouts, k1-KL token rewards, GAE from the critic, clipped updates.

One training step (the unit of `train.max_steps`):
1. rollout: `rollout.prompts_per_step` questions x `num_generations` completions (GRPO's rollout
   code: the jitted sampler on the current weights, registry rewards or `reward_model:RUN`);
2. scoring with the rollout models (detached): the policy's log-probs (the old policy), the
   frozen reference's (beta > 0; none is kept at beta = 0) and the critic's values;
3. token rewards r_t = -beta (logp_old - ref) + R at the last completion token, GAE (gamma,
   lambda), returns G = A + V, advantages whitened over the batch (SPEC §9; `algorithms.advantages`);
   another estimator may be chosen (`ppo.advantage_estimator`), the critic then only learns;
4. `ppo.ppo_epochs` passes over the shuffled rollout batch in mini-batches of
   `train.global_batch_size` completions (micro-batched), one joint policy + critic optimizer step
   each (`loss.make_ppo_step`); the first mini-batch of the first epoch is exactly on-policy.

The critic is the initial policy's decoder with a new value head, or a trained reward model
(`ppo.critic_init: reward_model:RUN`, its score head becomes the value head), with its own
optimizer (`ppo.critic_lr`). Checkpoints keep the policy as `params` (so eval/export read a PPO
run as any policy), and the critic's parameters with both optimizers' states in `opt_state`
({"opt": {"policy", "critic"}, "critic": params}): one atomic step directory resumes every
trained model exactly; the reference is the initial policy, re-read on resume.

LoRA (`lora:` section): the policy trains adapters over a frozen base (`TrainState.frozen`, as in
every other algorithm, `jaxreason.lora`); the sampler and the rollout scoring use a merged copy
made once per step, and the reference (beta > 0) is the frozen base itself (dequantised inside
the scorer's jit with QLoRA: no second copy is kept). The critic stays a full model with its own
full optimizer: verl's critic LoRA is a separate setting (`critic.model.lora_rank`, default 0)
and TRL's PPOTrainer applies its `peft_config` to the policy only. The checkpoint's `params` are
then the policy's adapters, with the `lora` item pointing at the base, so eval / export read the
run merged like any LoRA run; the critic and both optimizer states are in `opt_state` as above.
"""

from __future__ import annotations

import dataclasses
import os
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxreason import sharding
from jaxreason.algorithms import advantages as adv_lib
from jaxreason.algorithms.grpo.run import _log_samples, collect, rollout_batch, rollout_shape
from jaxreason.algorithms.ppo.loss import VALUE_HEAD, init_value_head, make_ppo_step, make_scorer, split_tx
from jaxreason.algorithms.rl_plots import write_rewards_plot
from jaxreason.checkpoint import config_to_json
from jaxreason.lora import adapters as lora_adapters
from jaxreason.rollout import QuestionStream, Rewards, RolloutSampler, load_questions, stream_meta
from jaxreason.train.loop import (StepOutput, fit_and_close, global_batch, initial_params, make_checkpointer, make_logger,
                                  make_tx, reference_params, row_shardings, setup_run, with_final_eval)
from jaxreason.train.state import TrainState, init_train_state, params_state_shardings, replicated
from jaxreason.train.step import jit_step

ROW_KEYS = ("inputs", "targets", "positions", "segments", "mask", "old_logp", "adv", "returns", "old_values")


def _check(cfg) -> None:
  rc = cfg.rollout
  if not cfg.init_from:
    raise ValueError("algorithm ppo starts from a trained policy: set init_from (an HF model dir or an Orbax run)")
  if rc.temperature <= 0:
    raise ValueError("rollout.temperature must be > 0 for PPO (the policy is scored at that temperature)")
  n = rc.prompts_per_step * rc.num_generations
  if n % cfg.train.global_batch_size:
    raise ValueError(f"train.global_batch_size ({cfg.train.global_batch_size}, the PPO mini-batch) must divide the "
                     f"rollout batch rollout.prompts_per_step x rollout.num_generations = {n} completions")
  if cfg.ppo.advantage_estimator in ("grpo", "rloo", "reinforce_pp_baseline") and rc.num_generations < 2:
    raise ValueError(f"ppo.advantage_estimator {cfg.ppo.advantage_estimator} is relative to the group: set "
                     "rollout.num_generations >= 2 (or use gae)")
  if not cfg.data.train:
    raise ValueError("data.train is empty: list question/answer files (or a task:) to draw prompts from")


# ------------------------------------------------------------------------------------ the critic
def _critic_setup(cfg, rs):
  """(critic graphdef, abstract decoder state, params_fn) for `ppo.critic_init`."""
  from jaxreason.config import EXECUTION_FIELDS
  from jaxreason.models.build import abstract_model
  mc = rs.model_cfg
  spec = cfg.ppo.critic_init
  if spec == "policy":
    def params_fn():
      head = init_value_head(mc.hidden_size, mc.initializer_range, cfg.seed + 1, jnp.dtype(mc.param_dtype))
      return {**initial_params(cfg, mc, rs.mesh), VALUE_HEAD: head}
    return rs.graphdef, rs.abs_state, mc, params_fn
  from jaxreason import checkpoint
  path = spec[len("reward_model:"):]
  if not checkpoint.is_checkpoint(path) or not checkpoint.is_reward_model(path):
    raise ValueError(f"ppo.critic_init {spec!r}: {path} is not a reward model run (train one with "
                     "`algorithm: reward_model`), or set critic_init: policy")
  rm_cfg = checkpoint.load_model_config(path).replace(**{k: getattr(mc, k) for k in EXECUTION_FIELDS})
  graphdef, abs_state = nnx.split(abstract_model(rm_cfg))

  def params_fn():
    import orbax.checkpoint as ocp
    from jaxreason.algorithms.reward_model.loss import SCORE_HEAD
    directory, step = checkpoint.resolve_checkpoint(path)
    _, target = checkpoint.abstract_params(rm_cfg, rs.mesh, rs.rules)
    one = replicated(rs.mesh)
    dtype = jnp.dtype(rm_cfg.param_dtype)
    target[SCORE_HEAD] = {"kernel": jax.ShapeDtypeStruct((rm_cfg.hidden_size, 1), dtype, sharding=one),
                          "bias": jax.ShapeDtypeStruct((), dtype, sharding=one)}
    with ocp.CheckpointManager(directory) as mngr:
      params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
    params = dict(params)
    params[VALUE_HEAD] = params.pop(SCORE_HEAD)
    return params
  return graphdef, abs_state, rm_cfg, params_fn


def _with_head(abs_params: dict, hidden: int, dtype) -> dict:
  return {**abs_params, VALUE_HEAD: {"kernel": jax.ShapeDtypeStruct((hidden, 1), dtype),
                                     "bias": jax.ShapeDtypeStruct((), dtype)}}


# ------------------------------------------------------------------------- checkpoint layout
def to_saved(state: TrainState) -> TrainState:
  """Joint state -> the checkpoint's layout: params = the policy (eval/export read it as any run)."""
  return TrainState(step=state.step, params=state.params["policy"],
                    opt_state={"opt": state.opt_state, "critic": state.params["critic"]})


def from_saved(state: TrainState, frozen=None) -> TrainState:
  """The checkpoint's layout -> the joint state; `frozen`: the policy's LoRA base (not saved)."""
  return TrainState(step=state.step, params={"policy": state.params, "critic": state.opt_state["critic"]},
                    opt_state=state.opt_state["opt"], frozen=frozen)


class JointCheckpointer:
  """`fit`'s checkpointer for the joint state (saves `to_saved(state)`)."""

  def __init__(self, ckpt):
    self.ckpt, self.directory = ckpt, ckpt.directory

  def save(self, step, state, model_cfg, meta, force=False, extra=None):
    return self.ckpt.save(step, to_saved(state), model_cfg, meta, force=force, extra=extra)

  def wait(self):
    self.ckpt.wait()

  def close(self):
    self.ckpt.close()


# ------------------------------------------------------------------------------------- the loop
def _score(fn, rows: dict[str, np.ndarray], micro: int) -> dict[str, np.ndarray]:
  n, t = rows["inputs"].shape
  batch = {k: jnp.asarray(rows[k].reshape(n // micro, micro, t)) for k in ("inputs", "targets", "positions", "segments")}
  out = fn(batch)
  if jax.process_count() > 1:  # the rows are the same on every process: gather the whole result
    out = multihost_utils.process_allgather(out, tiled=True)
  return {k: np.asarray(jax.device_get(v)).reshape(n, t) for k, v in out.items()}


def ppo_targets(pc, rows: dict[str, np.ndarray], score: np.ndarray, ref_logp: np.ndarray | None,
                group_size: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
  """(advantages [N, T], returns [N, T], metrics) from the rollout's old log-probs and values (SPEC §9)."""
  mask, values = rows["mask"], rows["old_values"]
  kl = None if ref_logp is None else (rows["old_logp"] - ref_logp) * mask
  est = pc.advantage_estimator
  r = adv_lib.token_rewards(score, mask, kl=kl, kl_coef=pc.beta)
  _, returns = adv_lib.gae(r, values, mask, pc.gamma, pc.lam)  # the critic's targets
  if est == "gae":
    adv, _ = adv_lib.token_advantages("gae", score, mask, kl=kl, kl_coef=pc.beta, values=values, gamma=pc.gamma,
                                      lam=pc.lam, whiten_advantages=pc.whiten_advantages)
  elif est in adv_lib.TOKEN_ESTIMATORS:
    adv, _ = adv_lib.token_advantages(est, score, mask, kl=kl, kl_coef=pc.beta, gamma=pc.gamma,
                                      whiten_advantages=pc.whiten_advantages)
  else:  # grpo / rloo: one advantage per completion on its tokens
    adv = (np.asarray(score, np.float32)[:, None] * mask).astype(np.float32)
  tokens = max(float(mask.sum()), 1.0)
  seqs = max(float((mask.sum(axis=1) > 0).sum()), 1.0)
  metrics = {"explained_variance": adv_lib.explained_variance(values, returns, mask),
             "returns_mean": float((returns * mask).sum() / tokens),
             "values_mean_rollout": float((values * mask).sum() / tokens),
             "advantage_abs_mean": float((np.abs(adv) * mask).sum() / tokens)}
  if kl is not None:
    metrics["kl"] = float(kl.sum() / tokens)
    metrics["non_score_reward"] = float(-pc.beta * kl.sum() / seqs)  # per completion
  return adv, returns, metrics


def run_ppo(cfg) -> dict[str, Any]:
  _check(cfg)
  rc, pc = cfg.rollout, cfg.ppo
  rs = setup_run(cfg)
  tok = rs.tokenizer
  questions = load_questions([s.path for s in cfg.data.train], rs.out, rc.format, tok)
  seq_len, n_rollout, gbs, micro, accum, total_steps = rollout_shape(cfg, questions)
  mini_batches = n_rollout // gbs
  updates_per_step = mini_batches * pc.ppo_epochs

  # The policy and the critic, each with its own optimizer, trained by one joint step.
  critic_def, critic_abs_state, critic_cfg, critic_params_fn = _critic_setup(cfg, rs)
  critic_abs = _with_head(nnx.to_pure_dict(critic_abs_state), critic_cfg.hidden_size,
                          jnp.dtype(critic_cfg.param_dtype))
  lora = cfg.lora  # LoRA: the policy's params are adapters over a frozen base; the critic is full
  tx_p, schedule = make_tx(cfg, rs.abs_params, total_steps * updates_per_step)
  critic_opt_cfg = dataclasses.replace(cfg, lora=None)
  if pc.critic_lr is not None:
    critic_opt_cfg = dataclasses.replace(critic_opt_cfg, optimizer=dataclasses.replace(cfg.optimizer, lr=pc.critic_lr))
  tx_c, _ = make_tx(critic_opt_cfg, critic_abs, total_steps * updates_per_step)
  tx = split_tx({"policy": tx_p, "critic": tx_c})
  one = replicated(rs.mesh)
  p_shard = sharding.pure_shardings(rs.abs_state, rs.mesh, rs.rules)
  c_shard = {**sharding.pure_shardings(critic_abs_state, rs.mesh, rs.rules), VALUE_HEAD: {"kernel": one, "bias": one}}
  sp = params_state_shardings(rs.abs_params, p_shard, tx_p, rs.mesh)
  sc = params_state_shardings(critic_abs, c_shard, tx_c, rs.mesh)
  shardings = TrainState(step=one, params={"policy": sp.params, "critic": c_shard},
                         opt_state={"policy": sp.opt_state, "critic": sc.opt_state}, frozen=sp.frozen)
  trained = dataclasses.replace(shardings, frozen=None)
  abs_policy = rs.abs_params if lora is None else lora_adapters.abstract_trainable(rs.abs_params, lora)
  abs_joint = {"policy": abs_policy, "critic": critic_abs}

  def policy_base() -> dict:
    with sharding.use_mesh(rs.mesh, rs.rules):
      return initial_params(cfg, rs.model_cfg, rs.mesh)

  def frozen_of(params: dict):  # LoRA: the policy's base, placed with its shardings
    return jax.device_put(lora_adapters.frozen_tree(params, lora, cfg.seed), shardings.frozen)

  base_ckpt = make_checkpointer(cfg)
  ckpt = JointCheckpointer(base_ckpt)
  latest = base_ckpt.latest_step()
  if latest is not None:
    abstract = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                              abs_joint)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, trained)
    saved, meta, _ = base_ckpt.restore(latest, to_saved(abstract))
    state = from_saved(saved, None if lora is None else frozen_of(policy_base()))
  else:
    policy, frozen = policy_base(), None
    if lora is not None:  # fresh adapters (B = 0: the first rollout is the base's) beside the frozen base
      policy, frozen = lora_adapters.split(policy, lora, cfg.seed)
      policy = jax.device_put(policy, trained.params["policy"])
      frozen = jax.device_put(frozen, shardings.frozen)
    with sharding.use_mesh(rs.mesh, rs.rules):
      params = {"policy": policy, "critic": critic_params_fn()}
      state = dataclasses.replace(init_train_state(params, tx, trained), frozen=frozen)
    meta = None
  start = int(meta["step"]) if meta else 0
  stream = QuestionStream(questions, cfg.seed, position=int(meta["stream_position"]) if meta else 0)

  ref_params = reference_params(rs, state) if pc.beta > 0 else None  # LoRA: {} (the frozen base)
  scorer = make_scorer(rs.graphdef, critic_def, rc.temperature)

  ranks = {k: 3 for k in ROW_KEYS}
  ranks.update(valid=2, fresh=2, **({"sampler_logp": 3} if pc.is_correction != "none" else {}))
  batch_sharding = row_shardings(rs.mesh, ranks)
  step_fn = jit_step(make_ppo_step(rs.graphdef, critic_def, tx, schedule, pc, temperature=rc.temperature),
                     shardings, batch_sharding)
  roller = RolloutSampler(rs.graphdef, rs.abs_state, rs.model_cfg, rs.mesh, tok, rc)
  rewards = Rewards(pc.rewards, rc.format, rc.accuracy_reward)
  view = types.SimpleNamespace(rollout=rc, grpo=pc, seed=cfg.seed)  # what GRPO's rollout code reads

  logger = make_logger(rs, total_steps, start)
  if rs.is_main:
    logger.message(
        f"PPO: {rs.model_cfg.num_params() / 1e6:.2f}M-param policy, critic from {pc.critic_init} "
        f"({critic_cfg.num_params() / 1e6:.2f}M); mesh {dict(rs.mesh.shape)}; {total_steps} steps x "
        f"{rc.prompts_per_step} questions x {rc.num_generations} completions; {pc.ppo_epochs} epoch(s) x "
        f"{mini_batches} mini-batch(es) of {gbs} ({accum} micro-batch(es)); estimator {pc.advantage_estimator}, "
        f"beta {pc.beta}, gamma {pc.gamma}, lambda {pc.lam}, vf_coef {pc.vf_coef}"
        + (f"; LoRA rank {lora.rank} on {', '.join(lora.projections)} of the policy "
           f"({lora_adapters.tree_bytes(state.params['policy']) / 2**20:.1f} MiB of adapters), full critic"
           if lora is not None else "")
        + (f"; resumed at step {start}" if start else ""))
  samples_path = os.path.join(rs.out, "rollouts.jsonl")
  proc, nproc = jax.process_index(), jax.process_count()

  def train_step(state, step: int) -> StepOutput:
    t0 = time.perf_counter()
    # LoRA: one merged copy per step, for the sampler and the rollout's old log-probs
    policy = state.params["policy"] if lora is None else lora_adapters.merged_params(
        dataclasses.replace(state, params=state.params["policy"]))
    roller.set_params(policy)
    ro = collect(roller, rewards, stream, view, step)
    rows, metrics, samples = rollout_batch(ro, view, seq_len, tok.pad_token_id or 0)
    t1 = time.perf_counter()
    score = rows.pop("adv")  # per completion: R (gae, reinforce_pp), R - group mean, or grpo / rloo advantages
    metrics["sequence_score_abs_mean"] = metrics.pop("advantage_abs_mean")  # |score|; token advantages below
    sampler_logp = rows.pop("old_logp")
    with sharding.use_mesh(rs.mesh, rs.rules):
      own = _score(lambda b: scorer(policy, state.params["critic"], b), rows, micro)
      ref = None
      if ref_params is not None:  # LoRA: the frozen base with no adapters, merged inside the scorer
        ref = _score(lambda b: scorer(ref_params, None, b, state.frozen), rows, micro)["logp"]
    del policy
    rows["old_logp"], rows["old_values"] = own["logp"] * rows["mask"], own["values"] * rows["mask"]
    if pc.is_correction != "none":
      rows["sampler_logp"] = sampler_logp
    rows["adv"], rows["returns"], target_metrics = ppo_targets(pc, rows, score, ref, rc.num_generations)
    metrics.update(target_metrics)
    metrics["token_mult_prob_error_rollout"] = float(
        (np.exp(np.abs(sampler_logp - rows["old_logp"])) * rows["mask"]).sum() / max(rows["mask"].sum(), 1.0))
    t2 = time.perf_counter()
    update_metrics, train_tokens = [], 0
    for epoch in range(pc.ppo_epochs):
      order = np.random.default_rng([cfg.seed, step, epoch]).permutation(n_rollout)
      for u in range(mini_batches):
        sel = order[u * gbs:(u + 1) * gbs]
        mb = {k: v[sel] for k, v in rows.items()}
        mb["fresh"] = np.full((gbs,), float(epoch == 0 and u == 0), np.float32)
        per = gbs // nproc
        local = {k: v[proc * per:(proc + 1) * per] for k, v in mb.items()}
        train_tokens += int(mb["segments"].astype(bool).sum())
        batch = global_batch(local, accum, gbs, batch_sharding)
        with sharding.use_mesh(rs.mesh, rs.rules):
          state, m = step_fn(state, batch)
        update_metrics.append(m)
    update_metrics = jax.device_get(update_metrics)
    t3 = time.perf_counter()
    for k in update_metrics[0]:
      metrics[k] = float(np.mean([float(m[k]) for m in update_metrics]))
    metrics.update({"time_rollout": t1 - t0, "time_score": t2 - t1, "time_update": t3 - t2,
                    "rollout_share": (t1 - t0) / max(t3 - t0, 1e-9),
                    "rollout_tokens_per_sec": ro.stats["rollout/tokens"] / max(t1 - t0, 1e-9),
                    "train_tokens_per_sec": train_tokens / max(t3 - t2, 1e-9), "epoch": stream.epoch})
    done = step + 1
    if rs.is_main and pc.log_samples_every and (done % pc.log_samples_every == 0 or done == start + 1):
      _log_samples(samples_path, done, samples, logger)
    return StepOutput(state, metrics)

  save_meta = stream_meta(stream, cfg.seed, total_steps)

  marker = {"ppo_critic": {"critic_init": pc.critic_init, "layout": "opt_state/critic: critic params "
                           "(decoder + value_head); opt_state/opt: {policy, critic} optimizer states",
                           "model_config": config_to_json(critic_cfg)}}
  _, step, last = fit_and_close(rs, state, start=start, total_steps=total_steps, train_step=train_step,
                                save_meta=save_meta, ckpt=ckpt, logger=logger, log_first=True, extra_items=marker)
  if rs.is_main:
    write_rewards_plot(rs.out)
  return with_final_eval(cfg, {"final_step": step, "metrics": last})
