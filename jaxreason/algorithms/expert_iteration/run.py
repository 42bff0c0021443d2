"""Expert iteration (`algorithm: expert_iteration`, CS336 assignment 5; SPEC §5).

Each of `expert_iteration.rounds` rounds: sample `rollout.num_generations` completions for
`questions_per_round` questions from the current policy, keep the verified-correct ones (distinct
completions per question), write them as prompt/response rows to output_dir/data/ei_round{r}.jsonl
and run SFT on them for `epochs_per_round` epochs (the same SFT train step as `algorithm: sft`,
completion-only loss, through the same `train.loop.fit`). One train state and optimizer carry
across rounds; the learning-rate schedule spans an upper bound of the optimizer steps (every
completion kept). metrics.jsonl has one row per round (kept fraction, accuracy, mean SFT loss);
the SFT steps inside a round are logged every `train.log_every` steps to
output_dir/sft/metrics.jsonl. Checkpoints are written every `checkpoint.every_steps` SFT steps
(recording the round, the SFT data position and the question stream, so a preempted run resumes
mid-round where it stopped) and at the end of every round.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np

from jaxreason import sharding
from jaxreason.algorithms.sft.loss import make_sft_step
from jaxreason.data.pipeline import build_train_batches
from jaxreason.io_utils import write_jsonl
from jaxreason.rollout import QuestionStream, Rewards, RolloutSampler, load_questions
from jaxreason.train import metrics_log
from jaxreason.train.loop import (PreemptionGuard, StepOutput, fit, global_batch, make_checkpointer, make_logger,
                                  make_tx, restore_or_init, row_shardings, setup_run, with_final_eval)
from jaxreason.train.state import state_shardings
from jaxreason.lora.adapters import merged_params
from jaxreason.train.step import jit_step


def _kept_rows(c, correct: np.ndarray) -> list[dict]:
  rows, g = [], c.group_size
  for j, q in enumerate(c.questions):
    seen = set()
    for k in range(g):
      i = j * g + k
      text = c.graded_texts[i]
      if correct[i] and text not in seen:
        seen.add(text)
        rows.append({"id": f"{q.id}-{k}", "prompt": q.text, "response": text})
  return rows


def run_expert_iteration(cfg) -> dict[str, Any]:
  if not cfg.data.train:
    raise ValueError("data.train is empty: list question/answer files (or a task:) to sample from")
  rc, ec = cfg.rollout, cfg.expert_iteration
  rs = setup_run(cfg)
  tok = rs.tokenizer
  questions = load_questions([s.path for s in cfg.data.train], rs.out, rc.format, tok)
  gbs = cfg.train.global_batch_size
  micro = cfg.train.micro_batch_size or gbs
  accum = gbs // micro
  # Upper bound: every completion kept, one example per row.
  max_round_steps = math.ceil(ec.questions_per_round * rc.num_generations * ec.epochs_per_round / gbs)
  total_steps = ec.rounds * max_round_steps
  tx, schedule = make_tx(cfg, rs.abs_params, total_steps)
  shardings = state_shardings(rs.abs_state, tx, rs.mesh, rs.rules)
  ckpt = make_checkpointer(cfg)
  state, meta = restore_or_init(rs, tx, shardings, ckpt)
  meta = meta or {"step": 0, "round": 0, "round_data_state": None, "stream_position": 0}
  stream = QuestionStream(questions, cfg.seed, position=int(meta["stream_position"]))
  step = int(meta["step"])

  batch_sharding = row_shardings(rs.mesh, {k: 3 for k in ("inputs", "targets", "weights", "positions", "segments")})
  step_fn = jit_step(make_sft_step(rs.graphdef, tx, schedule, normalization=cfg.train.loss_normalization),
                     shardings, batch_sharding)
  roller = RolloutSampler(rs.graphdef, rs.abs_state, rs.model_cfg, rs.mesh, tok, rc)
  rewards = Rewards({ec.reward: 1.0} if ec.reward else {}, rc.format, rc.accuracy_reward)
  verifier = ec.reward or rewards.verifier_name

  logger = make_logger(rs, ec.rounds, int(meta["round"]))
  lc = cfg.logging
  os.makedirs(os.path.join(rs.out, "sft"), exist_ok=True)
  sft_logger = metrics_log.MetricsLogger(os.path.join(rs.out, "sft"), total_steps=total_steps, start_step=step,
                                         tensorboard=lc.tensorboard, progress_bar=False, is_main=rs.is_main)
  if rs.is_main:
    logger.message(f"expert iteration: {ec.rounds} rounds x {ec.questions_per_round} questions x "
                   f"{rc.num_generations} samples, verifier {verifier}, {ec.epochs_per_round} SFT epoch(s) per round"
                   + (f"; resumed in round {int(meta['round']) + 1} at step {step}" if step else ""))
  rounds_log = []
  try:
    with PreemptionGuard(cfg.checkpoint.save_on_preemption) as guard:
      for r in range(int(meta["round"]), ec.rounds):
        path = os.path.join(rs.out, "data", f"ei_round{r}.jsonl")
        resumed_mid_round = meta.get("round_data_state") is not None and int(meta["round"]) == r
        t0 = time.perf_counter()
        if not (resumed_mid_round and os.path.exists(path)):
          roller.set_params(merged_params(state))  # LoRA: a merged sampling copy
          c = roller.sample(stream.take(ec.questions_per_round), seed=cfg.seed * 1_000_003 + r)
          graded = rewards(c)
          correct = graded["reward" if ec.reward else "correct"] >= 1.0 - 1e-9
          rows = _kept_rows(c, correct)
          if rs.is_main:
            write_jsonl(path, rows)
          info = {"round": r + 1, "kept_fraction": float(correct.mean()), "kept": len(rows),
                  "accuracy": float(graded["correct"].mean()),
                  "completion_length": float(np.mean([len(t) for t in c.output.tokens])),
                  "time_rollout": time.perf_counter() - t0}
        else:
          rows = [json.loads(line) for line in open(path)]
          info = {"round": r + 1, "kept": len(rows)}
        if not rows:
          logger.message(f"round {r + 1}: no correct completion to train on; next round")
          meta = {"round_data_state": None}
          rounds_log.append(info)
          continue
        data = build_train_batches([(path, "prompt_response", 1.0)], tok, seq_len=cfg.data.seq_len,
                                   global_batch_size=gbs, packing=cfg.data.packing, seed=cfg.seed + r,
                                   num_epochs=ec.epochs_per_round, process_index=jax.process_index(),
                                   process_count=jax.process_count(), truncation=cfg.data.truncation)
        it = iter(data)
        done = 0
        if resumed_mid_round:
          it.set_state(meta["round_data_state"])
          done = int(meta.get("round_step", 0))
        round_start = step - done  # the global step at which this round's SFT began
        losses = []

        def train_step(state, step: int) -> StepOutput:
          local = next(it)
          tokens = float(np.count_nonzero(np.asarray(local["segments"]))) * jax.process_count()
          batch = global_batch(local, accum, gbs, batch_sharding)
          with sharding.use_mesh(rs.mesh, rs.rules):
            state, m = step_fn(state, batch)
          losses.append(m["loss"])
          return StepOutput(state, m, tokens=tokens, host={"round": r + 1})

        def save_meta(step: int, r=r, it=it, round_start=round_start) -> dict:  # a mid-round checkpoint
          return {"step": step, "round": r, "round_data_state": it.get_state(), "round_step": step - round_start,
                  "stream_position": stream.position}

        state, step, _ = fit(rs, state, start=step, total_steps=round_start + data.num_batches,
                             train_step=train_step, save_meta=save_meta, ckpt=ckpt, logger=sft_logger, guard=guard,
                             save_at_end=False)
        done = step - round_start
        info.update(sft_steps=done, sft_loss=float(np.mean(jax.device_get(losses))) if losses else float("nan"),
                    step=step, lr=float(schedule(step)))
        logger.advance()
        logger.log(r + 1, info)
        rounds_log.append(info)
        meta = {"round_data_state": None}
        ckpt.save(step, state, rs.model_cfg, {"step": step, "round": r + 1, "round_data_state": None,
                                              "round_step": 0, "stream_position": stream.position}, force=True)
  finally:
    ckpt.close()
    sft_logger.close()
    logger.close()
  return with_final_eval(cfg, {"final_step": step, "rounds": rounds_log})
