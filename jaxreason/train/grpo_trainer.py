"""GRPO training (`algorithm: grpo`): rollouts with the jitted sampler, rewards, clipped updates.

One training step (the unit of `train.max_steps`, as CS336's `n_grpo_steps`):
1. rollout: `rollout.prompts_per_step` questions x G completions from the current weights (the
   sampler reads the train state's parameters on device, resharded to the sampling preset);
   rewards from the registry (weighted), DAPO overlong shaping; with `grpo.dynamic_sampling`,
   groups whose rewards are all equal are dropped and replaced by freshly sampled groups until the
   batch is full (or `max_refills` rounds were spent; missing groups are then left out of the loss);
2. advantages per group (SPEC §5);
3. update: the rollout batch, shuffled, is cut into optimizer batches of `train.global_batch_size`
   completions (gradient accumulation over `micro_batch_size`) and passed over `num_iterations`
   times. With num_iterations == 1 the old log-probs are the policy's own (detached), so the ratio
   is exactly 1; with more, the sampler's stored log-probs are the old policy.
Normalisers (tokens, sequences) are counted over each optimizer batch globally before the
micro-batch loop, so accumulation equals one big batch; `dapo` divides by the completion tokens
of that batch (= TRL's generation batch when one rollout batch is one optimizer step).
The reference model (beta > 0) is the initial policy, frozen; with beta = 0 none is kept.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxreason import sharding
from jaxreason.ops.logprobs import token_logprobs
from jaxreason.train import grpo as grpo_lib
from jaxreason.train.loop import (PreemptionGuard, RunSetup, checkpoint_tick, global_batch, initial_params,
                                  make_checkpointer, make_logger, make_tx, restore_or_init, row_shardings,
                                  run_final_eval, setup_run)
from jaxreason.train.rollout import Completions, QuestionStream, Rewards, RolloutSampler, load_questions
from jaxreason.train.state import TrainState, state_shardings
from jaxreason.train.step import jit_step

sg = jax.lax.stop_gradient


# ------------------------------------------------------------------------------------- the step
def grpo_normalizers(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Counts over the whole optimizer batch ([N, T] rows): completion tokens and sequences."""
  return {"tokens": jnp.maximum(jnp.sum(batch["mask"]), 1.0),
          "sequences": jnp.maximum(jnp.sum(batch["valid"]), 1.0)}


def grpo_micro_loss(model, mb: dict[str, jax.Array], norms: dict[str, jax.Array], gcfg, *, temperature: float,
                    max_completion_length: int, on_policy: bool, chunk: int = 512):
  """One micro-batch's share of the optimizer batch's loss (summing micro-batches gives the loss).

  Returns (loss, sums) where sums are token-weighted metric sums (divided by the batch's tokens
  after accumulation).
  """
  hidden, _ = model.hidden_states(mb["inputs"], mb["positions"], mb["segments"])
  logp, entropy = token_logprobs(hidden, model.unembedding(), mb["targets"], chunk=chunk, temperature=temperature,
                                 with_entropy=True)
  mask = mb["mask"]
  old = sg(logp) if on_policy else mb["old_logp"]
  b = mask.shape[0]
  kind = gcfg.loss_type
  kwargs = dict(eps_low=gcfg.eps_low, eps_high=gcfg.eps_high, beta=gcfg.beta, ref_logp=mb.get("ref_logp"),
                importance_sampling_level=gcfg.importance_sampling_level, entropy=entropy,
                entropy_coef=gcfg.entropy_coef)
  if kind in ("bnpo", "dapo"):  # sum over the batch's tokens / its token count
    loss, m = grpo_lib.policy_loss(logp, old, mb["adv"], mask, loss_type="dapo", num_items_in_batch=norms["tokens"],
                                   **kwargs)
  elif kind == "grpo":  # mean over this micro-batch's sequences, reweighted to the batch's
    loss, m = grpo_lib.policy_loss(logp, old, mb["adv"], mask, loss_type="grpo", **kwargs)
    loss = loss * b / norms["sequences"]
  else:  # dr_grpo: sum / (B * max_completion_length)
    loss, m = grpo_lib.policy_loss(logp, old, mb["adv"], mask, loss_type="dr_grpo",
                                   max_completion_length=max_completion_length, **kwargs)
    loss = loss * b / norms["sequences"]
  tokens = jnp.sum(mask)
  sums = {k: v * jnp.maximum(tokens, 1.0) for k, v in m.items()}  # metrics are means over these tokens
  sums["sampler_logp_diff"] = jnp.sum(jnp.abs(sg(logp) - mb["old_logp"]) * mask)
  return loss, sums


def make_grpo_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, gcfg, *,
                   temperature: float, max_completion_length: int):
  on_policy = gcfg.num_iterations == 1

  def step(state: TrainState, batch: dict[str, jax.Array]):
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    norms = grpo_normalizers(flat)

    def micro(carry, mb):
      grads_acc, loss_acc, sums_acc = carry

      def loss_fn(params):
        model = nnx.merge(graphdef, params)
        return grpo_micro_loss(model, mb, norms, gcfg, temperature=temperature,
                               max_completion_length=max_completion_length, on_policy=on_policy)

      (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
      sums_acc = jax.tree.map(jnp.add, sums_acc, sums)
      return (grads_acc, loss_acc + loss, sums_acc), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    first = jax.tree.map(lambda x: x[0], batch)
    sums_shape = jax.eval_shape(
        lambda p: grpo_micro_loss(nnx.merge(graphdef, p), first, norms, gcfg, temperature=temperature,
                                  max_completion_length=max_completion_length, on_policy=on_policy)[1], state.params)
    sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
    (grads, loss, sums), _ = jax.lax.scan(micro, (zeros, jnp.zeros(()), sums0), batch)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {k: v / norms["tokens"] for k, v in sums.items()}
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state.step),
                   completion_tokens=jnp.sum(flat["mask"]))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def make_ref_scorer(graphdef, temperature: float, chunk: int = 512):
  """Jitted reference log-probs of rows [N, T] (no gradient), scored in micro-batches [A, B, T]."""

  @jax.jit
  def score(params, batch):
    def one(_, mb):
      model = nnx.merge(graphdef, params)
      hidden, _ = model.hidden_states(mb["inputs"], mb["positions"], mb["segments"])
      return None, token_logprobs(hidden, model.unembedding(), mb["targets"], chunk=chunk, temperature=temperature)
    return jax.lax.scan(one, None, batch)[1]

  return score


# ------------------------------------------------------------------------------------ the rows
def completion_rows(c: Completions, seq_len: int, pad_id: int, mask_truncated: bool) -> dict[str, np.ndarray]:
  """Prompt + completion per row, right-padded to seq_len: inputs/targets/positions/segments and
  the completion mask (model-sampled tokens up to and including the end token; budget-forcing
  injections excluded) with the sampler's log-probs aligned to the targets."""
  n = len(c)
  rows = {"inputs": np.full((n, seq_len), pad_id, np.int32), "targets": np.full((n, seq_len), pad_id, np.int32),
          "positions": np.zeros((n, seq_len), np.int32), "segments": np.zeros((n, seq_len), np.int32),
          "mask": np.zeros((n, seq_len), np.float32), "old_logp": np.zeros((n, seq_len), np.float32)}
  for i in range(n):
    prompt, comp = c.question(i).ids, c.output.tokens[i]
    toks = np.asarray(list(prompt) + list(comp), np.int32)
    length = len(toks) - 1
    if length > seq_len:
      raise ValueError(f"row {i}: {length} tokens do not fit the GRPO sequence length {seq_len}")
    rows["inputs"][i, :length] = toks[:-1]
    rows["targets"][i, :length] = toks[1:]
    rows["positions"][i, :length] = np.arange(length)
    rows["segments"][i, :length] = 1
    p = len(prompt) - 1  # the target index of the first completion token
    k = len(comp)
    sampled = ~np.asarray(c.output.injected[i], bool)
    if mask_truncated and c.output.truncated[i]:
      sampled[:] = False
    rows["mask"][i, p:p + k] = sampled
    rows["old_logp"][i, p:p + k] = np.where(sampled, c.output.logprobs[i], 0.0)
  return rows


# ------------------------------------------------------------------------------------ rollouts
class Rollout:
  """One step's rollout batch: the kept groups, their rewards and advantages, and statistics."""

  def __init__(self, completions: list[Completions], rewards: list[dict[str, np.ndarray]], keep: list[np.ndarray],
               num_groups: int, stats: dict[str, float]):
    self.parts = list(zip(completions, rewards, keep))
    self.num_groups, self.stats = num_groups, stats


def collect(roller: RolloutSampler, rewards: Rewards, stream: QuestionStream, cfg, step: int) -> Rollout:
  """Samples groups until `prompts_per_step` useful groups exist (dynamic sampling) or once."""
  rc, gc = cfg.rollout, cfg.grpo
  need, g = rc.prompts_per_step, rc.num_generations
  parts, kept_groups, rounds, sampled_groups, tokens = [], 0, 0, 0, 0
  while True:
    questions = stream.take(need)  # a refill samples a whole batch too (one compiled shape); extras are dropped
    seed = (cfg.seed * 1_000_003 + step) * 101 + rounds
    c = roller.sample(questions, seed=seed)
    r = rewards(c)
    lengths = np.asarray([len(t) for t in c.output.tokens])
    if gc.overlong_buffer:
      penalty = gc.overlong_penalty * np.asarray(
          grpo_lib.dapo_overlong_penalty(lengths, rc.max_new_tokens, gc.overlong_buffer))
      r["overlong_penalty"] = penalty
      r["reward"] = r["reward"] + penalty
    groups = r["reward"].reshape(-1, g)
    keep = np.asarray(grpo_lib.dynamic_sampling_filter(groups)) if gc.dynamic_sampling else np.ones(len(questions), bool)
    parts.append((c, r, keep))
    kept_groups += int(keep.sum())
    sampled_groups += len(questions)
    tokens += int(lengths.sum())
    rounds += 1
    if not gc.dynamic_sampling or kept_groups >= need or rounds > gc.max_refills:
      break
  stats = {"rollout/groups_sampled": sampled_groups, "rollout/groups_kept": min(kept_groups, need),
           "rollout/refills": rounds - 1, "rollout/tokens": tokens}
  return Rollout([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], need, stats)


def rollout_batch(ro: Rollout, cfg, seq_len: int, pad_id: int) -> tuple[dict[str, np.ndarray], dict[str, float], list]:
  """Rows [prompts_per_step * G, T] with advantages; metrics over every sampled completion."""
  g, gc = cfg.rollout.num_generations, cfg.grpo
  rows, rewards_kept, samples = [], [], []
  metric_rewards = {k: [] for k in ro.parts[0][1]}
  lengths, correct_all, thinking = [], [], []
  for c, r, keep in ro.parts:
    for k, v in r.items():
      metric_rewards[k].append(np.asarray(v, np.float32))
    lengths.append(np.asarray([len(t) for t in c.output.tokens]))
    thinking.append(np.asarray(c.output.thinking_tokens))
    correct_all.append(r["correct"])
    sel = np.repeat(keep, g)
    if sel.any():
      full = completion_rows(c, seq_len, pad_id, gc.mask_truncated_completions)
      rows.append({k: v[sel] for k, v in full.items()})
      rewards_kept.append(r["reward"][sel])
      samples += [(c.question(i), c.texts[i], float(r["reward"][i]), bool(r["correct"][i]))
                  for i in np.flatnonzero(sel)[::g][:4]]
  need = ro.num_groups * g
  if rows:
    batch = {k: np.concatenate([x[k] for x in rows])[:need] for k in rows[0]}
    rew = np.concatenate(rewards_kept)[:need]
    adv = np.asarray(grpo_lib.group_advantages(rew, g, scale_rewards=gc.scale_rewards, eps=gc.advantage_eps))
  else:
    batch, rew, adv = None, np.zeros((0,), np.float32), np.zeros((0,), np.float32)
  n = 0 if batch is None else len(adv)
  if n < need:  # dynamic sampling ran out of refills: fill with copies that carry no loss
    src = batch if batch is not None else completion_rows(ro.parts[-1][0], seq_len, pad_id, False)
    idx = np.arange(need - n) % len(src["inputs"])
    filler = {k: v[idx] for k, v in src.items()}
    filler["mask"] = np.zeros_like(filler["mask"])
    batch = filler if batch is None else {k: np.concatenate([batch[k], filler[k]]) for k in batch}
    adv = np.concatenate([adv, np.zeros((need - n,), np.float32)])
  # Cut the padding every row shares, to a multiple of 32 (a handful of compiled shapes).
  used = int(batch["segments"].astype(bool).sum(axis=1).max())
  width = min(seq_len, max(32, -(-used // 32) * 32))
  batch = {k: v[:, :width] for k, v in batch.items()}
  batch["adv"] = adv.astype(np.float32)
  batch["valid"] = (np.arange(need) < n).astype(np.float32)

  lengths, correct_all, thinking = map(np.concatenate, (lengths, correct_all, thinking))
  metrics = {f"reward/{k}" if k not in ("reward", "correct") else k: float(np.concatenate(v).mean())
             for k, v in metric_rewards.items()}
  allr = np.concatenate(metric_rewards["reward"])
  metrics["accuracy"] = metrics.pop("correct")
  metrics["reward_mean"] = metrics.pop("reward")
  metrics["reward_std"] = float(allr.std())
  metrics["completion_length"] = float(lengths.mean())
  metrics["completion_length_correct"] = float(lengths[correct_all].mean()) if correct_all.any() else float("nan")
  metrics["completion_length_wrong"] = float(lengths[~correct_all].mean()) if (~correct_all).any() else float("nan")
  metrics["thinking_tokens"] = float(thinking.mean())
  trunc = np.concatenate([c.output.truncated for c, _, _ in ro.parts])
  metrics["truncated_frac"] = float(trunc.mean())
  metrics["advantage_abs_mean"] = float(np.abs(adv[:n]).mean()) if n else 0.0
  metrics.update({k: float(v) for k, v in ro.stats.items()})
  return batch, metrics, samples


# ------------------------------------------------------------------------------------- the loop
def _check(cfg) -> None:
  rc = cfg.rollout
  if not cfg.init_from:
    raise ValueError("algorithm grpo starts from a trained policy: set init_from (an HF model dir or an Orbax run)")
  if rc.temperature <= 0:
    raise ValueError("rollout.temperature must be > 0 for GRPO (the policy is scored at that temperature)")
  if rc.num_generations < 2:
    raise ValueError("rollout.num_generations must be >= 2: advantages are relative to the group")
  n = rc.prompts_per_step * rc.num_generations
  if n % cfg.train.global_batch_size:
    raise ValueError(f"train.global_batch_size ({cfg.train.global_batch_size}) must divide the rollout batch "
                     f"rollout.prompts_per_step x rollout.num_generations = {n} completions")
  if not cfg.data.train:
    raise ValueError("data.train is empty: list question/answer files (or a task:) to draw prompts from")


def run_grpo(cfg) -> dict[str, Any]:
  _check(cfg)
  rc, gc = cfg.rollout, cfg.grpo
  rs = setup_run(cfg)
  tok = rs.tokenizer
  questions = load_questions([s.path for s in cfg.data.train], rs.out, rc.format, tok)
  prompt_len = max(len(q.ids) for q in questions)
  seq_len = -(-(prompt_len + rc.max_new_tokens) // 8) * 8
  n_rollout = rc.prompts_per_step * rc.num_generations
  gbs = cfg.train.global_batch_size
  micro = cfg.train.micro_batch_size or gbs
  accum = gbs // micro
  updates_per_step = (n_rollout // gbs) * gc.num_iterations
  total_steps = cfg.train.max_steps or math.ceil(cfg.data.num_epochs * len(questions) / rc.prompts_per_step)
  tx, schedule = make_tx(cfg, rs.abs_params, total_steps * updates_per_step)
  shardings = state_shardings(rs.abs_state, tx, rs.mesh, rs.rules)
  ckpt = make_checkpointer(cfg)
  state, meta = restore_or_init(rs, tx, shardings, ckpt)
  start = int(meta["step"]) if meta else 0
  stream = QuestionStream(questions, cfg.seed, position=int(meta["stream_position"]) if meta else 0)

  ref_params, ref_score = None, None
  if gc.beta > 0:  # the frozen initial policy, in the compute dtype
    with sharding.use_mesh(rs.mesh, rs.rules):
      ref_params = initial_params(cfg, rs.model_cfg, rs.mesh)
    dt = jnp.dtype(rs.model_cfg.dtype)
    ref_params = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, ref_params)
    ref_score = make_ref_scorer(rs.graphdef, rc.temperature)

  ranks = {k: 3 for k in ("inputs", "targets", "positions", "segments", "mask", "old_logp")}
  ranks.update(adv=2, valid=2, **({"ref_logp": 3} if gc.beta > 0 else {}))
  batch_sharding = row_shardings(rs.mesh, ranks)
  from jaxreason.train import nan_guard
  step_fn = jit_step(nan_guard.guard_step(make_grpo_step(rs.graphdef, tx, schedule, gc, temperature=rc.temperature,  # issue 16
                                                         max_completion_length=rc.max_new_tokens)), shardings, batch_sharding)
  nans = nan_guard.NanGuard.from_config(cfg)
  roller = RolloutSampler(rs.graphdef, rs.abs_state, rs.model_cfg, rs.mesh, tok, rc)
  rewards = Rewards(gc.rewards, rc.format)

  logger = make_logger(rs, total_steps, start)
  if rs.is_main:
    logger.message(
        f"GRPO: {rs.model_cfg.num_params() / 1e6:.2f}M params; mesh {dict(rs.mesh.shape)}; {total_steps} steps x "
        f"{rc.prompts_per_step} questions x {rc.num_generations} completions ({len(questions)} questions); "
        f"{updates_per_step} optimizer update(s) per step of {gbs} completions ({accum} micro-batch(es)); "
        f"loss {gc.loss_type}, IS level {gc.importance_sampling_level}, beta {gc.beta}, rewards "
        f"{rewards.weights}" + (f"; resumed at step {start}" if start else ""))
  samples_path = os.path.join(rs.out, "rollouts.jsonl")
  proc, nproc = jax.process_index(), jax.process_count()

  def save(step: int, force: bool = False):
    nans.check()  # issue 16
    meta = {"step": step, "stream_position": stream.position, "seed": cfg.seed, "total_steps": total_steps}
    ckpt.save(step, state, rs.model_cfg, meta, force=force)

  last: dict[str, Any] = {}
  step = start
  try:
    with PreemptionGuard(cfg.checkpoint.save_on_preemption) as guard:
      while step < total_steps:
        t0 = time.perf_counter()
        roller.set_params(state.params)
        ro = collect(roller, rewards, stream, cfg, step)
        rows, metrics, samples = rollout_batch(ro, cfg, seq_len, tok.pad_token_id or 0)
        t1 = time.perf_counter()
        if ref_score is not None:
          rows["ref_logp"] = _score_rows(ref_score, ref_params, rows, micro, rs)
        perm = np.random.default_rng([cfg.seed, step]).permutation(n_rollout)
        update_metrics, train_tokens = [], 0
        for it in range(gc.num_iterations):
          order = perm if it == 0 else np.random.default_rng([cfg.seed, step, it]).permutation(n_rollout)
          for u in range(n_rollout // gbs):
            sel = order[u * gbs:(u + 1) * gbs]
            per = gbs // nproc
            local = {k: v[sel][proc * per:(proc + 1) * per] for k, v in rows.items()}
            train_tokens += int(rows["segments"][sel].astype(bool).sum())
            batch = global_batch(local, accum, gbs, batch_sharding)
            with sharding.use_mesh(rs.mesh, rs.rules):
              state, m = step_fn(state, batch)
            update_metrics.append(m)
            nans.observe(step + 1, m)  # issue 16
        update_metrics = jax.device_get(update_metrics)
        nans.check()
        t2 = time.perf_counter()
        step += 1
        logger.advance()
        for k in update_metrics[0]:
          metrics[k] = float(np.mean([float(m[k]) for m in update_metrics]))
        metrics.update({"time_rollout": t1 - t0, "time_update": t2 - t1,
                        "rollout_tokens_per_sec": ro.stats["rollout/tokens"] / max(t1 - t0, 1e-9),
                        "train_tokens_per_sec": train_tokens / max(t2 - t1, 1e-9), "epoch": stream.epoch})
        last = metrics
        if step % cfg.train.log_every == 0 or step == total_steps or step == start + 1:
          logger.log(step, metrics)
        if rs.is_main and gc.log_samples_every and (step % gc.log_samples_every == 0 or step == start + 1):
          _log_samples(samples_path, step, samples, logger)
        checkpoint_tick(cfg, step, total_steps, save, guard, ckpt, logger)
  finally:
    ckpt.close()
    logger.close()

  result: dict[str, Any] = {"final_step": step, "metrics": last}
  if cfg.eval is not None:
    result["eval"] = run_final_eval(cfg)
  return result


def _score_rows(score, params, rows: dict[str, np.ndarray], micro: int, rs: RunSetup) -> np.ndarray:
  n, t = rows["inputs"].shape
  keys = ("inputs", "targets", "positions", "segments")
  batch = {k: jnp.asarray(rows[k].reshape(n // micro, micro, t)) for k in keys}
  with sharding.use_mesh(rs.mesh, rs.rules):
    out = score(params, batch)
  if jax.process_count() > 1:  # the rows are the same on every process: gather the whole result
    from jax.experimental import multihost_utils
    out = multihost_utils.process_allgather(out, tiled=True)
  return np.asarray(jax.device_get(out)).reshape(n, t)


def _log_samples(path: str, step: int, samples: list, logger) -> None:
  with open(path, "a") as f:
    for q, text, reward, correct in samples:
      f.write(json.dumps({"step": step, "id": q.id, "prompt": q.text, "response": text, "reward": reward,
                          "correct": correct, "answer": q.answer}, default=str) + "\n")
  if samples:
    q, text, reward, correct = samples[0]
    snippet = text if len(text) <= 300 else text[:150] + " ... " + text[-150:]
    logger.message(f"step {step} sample (reward {reward:+.2f}, {'right' if correct else 'wrong'}; answer "
                   f"{q.answer}): {snippet!r}")
