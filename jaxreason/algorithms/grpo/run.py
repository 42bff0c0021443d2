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
The reference model (beta > 0) is the initial policy, frozen; with beta = 0 none is kept. With LoRA it
is the frozen base itself (merged with no adapters inside the scorer's jit): no second copy.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxreason import generation, sharding
from jaxreason.algorithms import advantages as adv_lib
from jaxreason.algorithms.grpo import loss as grpo_lib
from jaxreason.algorithms.grpo.loss import make_grpo_step, make_ref_scorer
from jaxreason.rollout import Completions, QuestionStream, Rewards, RolloutSampler, load_questions, stream_meta
from jaxreason.train.loop import (RunSetup, StepOutput, fit_and_close, global_batch, make_checkpointer,
                                  make_logger, make_tx, reference_params, restore_or_init, row_shardings, setup_run,
                                  with_final_eval)
from jaxreason.train.state import state_shardings
from jaxreason.lora.adapters import merged_params
from jaxreason.train.step import jit_step


# ------------------------------------------------------------------------------------ the rows
def completion_rows(c: Completions, seq_len: int, pad_id: int, mask_truncated: bool) -> dict[str, np.ndarray]:
  """Prompt + completion per row, right-padded to seq_len: inputs/targets/positions/segments and
  the completion mask (model-sampled tokens up to and including the end token; budget-forcing
  injections excluded) with the sampler's log-probs aligned to the targets.

  Vectorised over rows from the sampler's padded results (`SampleBatch`: [N, M] tokens, log-probs,
  injected, lengths): row i's sequence is its prompt's P_i ids then its K_i completion tokens."""
  n = len(c)
  out = c.output
  padded = getattr(out, "padded", None)
  if padded is not None and len(padded.length) == n:
    comp, logp, injected = padded.tokens, padded.logprobs, padded.injected.astype(bool)
    k = np.asarray(padded.length, np.int64)
  else:  # a SamplingOutput built from lists (joined batches, tests): pad it here
    k = np.asarray([len(t) for t in out.tokens], np.int64)
    m = max(1, int(k.max()) if n else 1)
    valid = np.arange(m)[None] < k[:, None]
    comp, logp, injected = np.zeros((n, m), np.int32), np.zeros((n, m), np.float32), np.zeros((n, m), bool)
    if n:
      comp[valid] = np.concatenate([np.asarray(t, np.int32) for t in out.tokens])
      logp[valid] = np.concatenate([np.asarray(t, np.float32) for t in out.logprobs])
      injected[valid] = np.concatenate([np.asarray(t, bool) for t in out.injected])
  prompts = [c.question(i).ids for i in range(n)]
  plen = np.asarray([len(q) for q in prompts], np.int64)
  length = plen + k - 1  # inputs/targets per row
  too_long = np.flatnonzero(length > seq_len)
  if too_long.size:
    i = int(too_long[0])
    raise ValueError(f"row {i}: {int(length[i])} tokens do not fit the GRPO sequence length {seq_len}")
  pmax = max(1, int(plen.max()) if n else 1)
  prompt = np.full((n, pmax), pad_id, np.int32)
  if n:
    prompt[np.arange(pmax)[None] < plen[:, None]] = np.concatenate([np.asarray(q, np.int32) for q in prompts])
  # [n, seq_len + 1] token sequences: prompt ids at j < P_i, completion token j - P_i after.
  j = np.arange(seq_len + 1)[None]
  rows_i = np.arange(n)[:, None]
  in_prompt = j < plen[:, None]
  ci = np.clip(j - plen[:, None], 0, comp.shape[1] - 1)
  in_comp = ~in_prompt & (j - plen[:, None] < k[:, None])
  seq = np.where(in_prompt, prompt[rows_i, np.minimum(j, pmax - 1)], np.where(in_comp, comp[rows_i, ci], pad_id))
  live = j[:, :seq_len] < length[:, None]  # [n, seq_len]
  # The target at index t is token t + 1: completion token (t + 1 - P_i), sampled unless injected.
  ti = np.clip(j[:, :seq_len] + 1 - plen[:, None], 0, comp.shape[1] - 1)
  is_comp = (j[:, :seq_len] + 1 >= plen[:, None]) & live
  sampled = is_comp & ~injected[rows_i, ti]
  if mask_truncated:
    sampled &= ~np.asarray(out.truncated, bool)[:, None]
  return {"inputs": np.where(live, seq[:, :seq_len], pad_id).astype(np.int32),
          "targets": np.where(live, seq[:, 1:], pad_id).astype(np.int32),
          "positions": np.where(live, j[:, :seq_len], 0).astype(np.int32),
          "segments": live.astype(np.int32),
          "mask": sampled.astype(np.float32),
          "old_logp": np.where(sampled, logp[rows_i, ti], 0.0).astype(np.float32)}


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
  parts, kept_groups, rounds, sampled_groups, tokens, engine = [], 0, 0, 0, 0, []
  while True:
    questions = stream.take(need)  # a refill samples a whole batch too (one compiled shape); extras are dropped
    seed = (cfg.seed * 1_000_003 + step) * 101 + rounds
    c, r = roller.sample(questions, seed=seed, rewards=rewards)  # each process grades what it sampled
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
    engine.append(getattr(c.output, "metrics", None))
    rounds += 1
    if not gc.dynamic_sampling or kept_groups >= need or rounds > gc.max_refills:
      break
  stats = {"rollout/groups_sampled": sampled_groups, "rollout/groups_kept": min(kept_groups, need),
           "rollout/refills": rounds - 1, "rollout/tokens": tokens}
  counters = generation.merge_engine_metrics(engine)
  if counters:  # the rollout engine's own figures (ANCHORS-RL: what verl / NeMo-RL log)
    longest_s = counters["seconds"] * counters["longest"] / max(counters["decode_steps"], 1)
    stats.update({"rollout/slot_occupancy": counters["slot_occupancy"],
                  "rollout/padding_waste": counters["padding_waste"],
                  "rollout/decode_steps": counters["decode_steps"],
                  "rollout/tokens_per_sec_per_device": counters["tokens_per_s"] / jax.device_count(),
                  "rollout/longest_sample_tokens_per_sec": counters["longest"] / max(longest_s, 1e-9)})
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
    adv = adv_lib.sequence_scores(gc.advantage_estimator, rew, g, scale_rewards=gc.scale_rewards, eps=gc.advantage_eps)
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


class RolloutShape(NamedTuple):
  """What a rollout trainer (grpo, ppo) derives from its config and questions."""
  seq_len: int  # the longest prompt + rollout.max_new_tokens, rounded up to a multiple of 8
  n_rollout: int  # completions per step: prompts_per_step x num_generations
  gbs: int  # completions per optimizer update (train.global_batch_size)
  micro: int  # completions per micro-batch
  accum: int  # micro-batches per update
  total_steps: int  # train.max_steps, or data.num_epochs over the questions


def rollout_shape(cfg, questions) -> RolloutShape:
  rc = cfg.rollout
  prompt_len = max(len(q.ids) for q in questions)
  gbs = cfg.train.global_batch_size
  micro = cfg.train.micro_batch_size or gbs
  total = cfg.train.max_steps or math.ceil(cfg.data.num_epochs * len(questions) / rc.prompts_per_step)
  return RolloutShape(seq_len=-(-(prompt_len + rc.max_new_tokens) // 8) * 8,
                      n_rollout=rc.prompts_per_step * rc.num_generations, gbs=gbs, micro=micro, accum=gbs // micro,
                      total_steps=total)


def run_grpo(cfg) -> dict[str, Any]:
  _check(cfg)
  rc, gc = cfg.rollout, cfg.grpo
  rs = setup_run(cfg)
  tok = rs.tokenizer
  questions = load_questions([s.path for s in cfg.data.train], rs.out, rc.format, tok)
  seq_len, n_rollout, gbs, micro, accum, total_steps = rollout_shape(cfg, questions)
  updates_per_step = (n_rollout // gbs) * gc.num_iterations
  tx, schedule = make_tx(cfg, rs.abs_params, total_steps * updates_per_step)
  shardings = state_shardings(rs.abs_state, tx, rs.mesh, rs.rules)
  ckpt = make_checkpointer(cfg)
  state, meta = restore_or_init(rs, tx, shardings, ckpt)
  start = int(meta["step"]) if meta else 0
  stream = QuestionStream(questions, cfg.seed, position=int(meta["stream_position"]) if meta else 0)

  ref_params, ref_score = None, None
  token_level = gc.advantage_estimator in adv_lib.TOKEN_ESTIMATORS
  score_trainer = gc.is_correction != "none" and gc.num_iterations > 1  # the old policy's own log-probs
  if gc.beta > 0 or (token_level and gc.reward_kl_coef > 0):  # the frozen initial policy (LoRA: {}, the base)
    ref_params = reference_params(rs, state)
  if ref_params is not None or score_trainer:
    ref_score = make_ref_scorer(rs.graphdef, rc.temperature)

  ranks = {k: 3 for k in ("inputs", "targets", "positions", "segments", "mask", "old_logp")}
  ranks.update(adv=3 if token_level else 2, valid=2, **({"ref_logp": 3} if gc.beta > 0 else {}),
               **({"trainer_logp": 3} if score_trainer else {}))
  batch_sharding = row_shardings(rs.mesh, ranks)
  step_fn = jit_step(make_grpo_step(rs.graphdef, tx, schedule, gc, temperature=rc.temperature,
                                    max_completion_length=rc.max_new_tokens), shardings, batch_sharding)
  roller = RolloutSampler(rs.graphdef, rs.abs_state, rs.model_cfg, rs.mesh, tok, rc)
  rewards = Rewards(gc.rewards, rc.format, rc.accuracy_reward)

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

  def train_step(state, step: int) -> StepOutput:
    """One GRPO step: rollouts from the current weights, then the optimizer updates on them."""
    t0 = time.perf_counter()
    roller.set_params(merged_params(state))  # LoRA: a merged sampling copy
    ro = collect(roller, rewards, stream, cfg, step)
    rows, metrics, samples = rollout_batch(ro, cfg, seq_len, tok.pad_token_id or 0)
    t1 = time.perf_counter()
    if ref_params is not None:
      rows["ref_logp"] = _score_rows(ref_score, ref_params, rows, micro, rs, frozen=state.frozen)
    if score_trainer:
      rows["trainer_logp"] = _score_rows(ref_score, state.params, rows, micro, rs, frozen=state.frozen)
    t_ref = time.perf_counter()
    if token_level:  # REINFORCE++(-baseline): per-token returns, whitened over the batch (SPEC §9)
      kl = None
      if gc.reward_kl_coef > 0:
        kl = rows.get("trainer_logp", rows["old_logp"]) - rows["ref_logp"]
      rows["adv"], _ = adv_lib.token_advantages(gc.advantage_estimator, rows["adv"], rows["mask"], kl=kl,
                                                kl_coef=gc.reward_kl_coef, gamma=gc.gamma)
      if gc.beta == 0:
        rows.pop("ref_logp", None)
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
    update_metrics = jax.device_get(update_metrics)
    t2 = time.perf_counter()
    for k in update_metrics[0]:
      metrics[k] = float(np.mean([float(m[k]) for m in update_metrics]))
    # Seconds: rollout (sampling, rewards, rows), reference (log-probs of the frozen reference and, with
    # several iterations, of the old policy), update (the optimizer steps); PPO logs the same split.
    metrics.update({"time_rollout": t1 - t0, "time_reference": t_ref - t1, "time_update": t2 - t_ref,
                    "rollout_share": (t1 - t0) / max(t2 - t0, 1e-9),
                    "rollout_tokens_per_sec": ro.stats["rollout/tokens"] / max(t1 - t0, 1e-9),
                    "train_tokens_per_sec": train_tokens / max(t2 - t_ref, 1e-9), "epoch": stream.epoch})
    done = step + 1
    if rs.is_main and gc.log_samples_every and (done % gc.log_samples_every == 0 or done == start + 1):
      _log_samples(samples_path, done, samples, logger)
    return StepOutput(state, metrics)

  save_meta = stream_meta(stream, cfg.seed, total_steps)

  _, step, last = fit_and_close(rs, state, start=start, total_steps=total_steps, train_step=train_step,
                                save_meta=save_meta, ckpt=ckpt, logger=logger, log_first=True)
  if rs.is_main:
    from jaxreason.algorithms.rl_plots import write_rewards_plot
    write_rewards_plot(rs.out)
  return with_final_eval(cfg, {"final_step": step, "metrics": last})


def _score_rows(score, params, rows: dict[str, np.ndarray], micro: int, rs: RunSetup, frozen=None) -> np.ndarray:
  """Log-probs [N, T] of `params`; with `frozen` (LoRA) of `params` merged into that base."""
  n, t = rows["inputs"].shape
  keys = ("inputs", "targets", "positions", "segments")
  batch = {k: jnp.asarray(rows[k].reshape(n // micro, micro, t)) for k in keys}
  with sharding.use_mesh(rs.mesh, rs.rules):
    out = score(params, batch, frozen)
  if jax.process_count() > 1:  # the rows are the same on every process: gather the whole result
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
