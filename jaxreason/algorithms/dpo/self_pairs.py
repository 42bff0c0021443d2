"""DPO self-pairs (`dpo.self_pairs`): preference pairs from the initial policy's own answers."""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils

from jaxreason import sharding
from jaxreason.rollout import Rewards, RolloutSampler, load_questions
from jaxreason.io_utils import write_jsonl
from jaxreason.train.loop import initial_params


def build_self_pairs(rs, cfg) -> str:
  """DPO pairs from the initial model's own answers to `cfg.dpo.self_pairs` questions.

  Each question is sampled `rollout.num_generations` times; (right, wrong) answers, graded by the
  format's verifier, are paired (at most `dpo.pairs_per_question` per question, distinct
  completions). Written as {"prompt", "chosen", "rejected"} rows to output_dir/data/pairs.jsonl
  (reused when it exists: resuming does not resample).
  """
  path = os.path.join(cfg.output_dir, "data", "pairs.jsonl")
  if os.path.exists(path):
    return path
  questions = load_questions([cfg.dpo.self_pairs], cfg.output_dir, cfg.rollout.format, rs.tokenizer, name="pairs")
  roller = RolloutSampler(rs.graphdef, rs.abs_state, rs.model_cfg, rs.mesh, rs.tokenizer, cfg.rollout)
  with sharding.use_mesh(rs.mesh, rs.rules):
    roller.set_params(initial_params(cfg, rs.model_cfg, rs.mesh))
  rewards = Rewards({}, cfg.rollout.format, cfg.rollout.accuracy_reward)
  rows, stats = [], {"questions": len(questions), "with_pair": 0}
  batch = cfg.rollout.prompts_per_step
  for start in range(0, len(questions), batch):
    c = roller.sample(questions[start:start + batch], seed=cfg.seed * 1_000_003 + start)
    correct = rewards(c)["correct"]
    g = c.group_size
    for j, q in enumerate(c.questions):
      texts = [c.texts[j * g + k] for k in range(g)]
      right = list(dict.fromkeys(t for k, t in enumerate(texts) if correct[j * g + k]))
      wrong = list(dict.fromkeys(t for k, t in enumerate(texts) if not correct[j * g + k]))
      pairs = list(zip(right, wrong))[:cfg.dpo.pairs_per_question]
      stats["with_pair"] += bool(pairs)
      rows += [{"id": f"{q.id}-{k}", "prompt": q.text, "chosen": a, "rejected": b} for k, (a, b) in enumerate(pairs)]
  if not rows:
    raise ValueError(f"dpo.self_pairs: the initial model got every question of {cfg.dpo.self_pairs!r} all right "
                     "or all wrong; no (right, wrong) pairs to train on")
  if jax.process_index() == 0:
    write_jsonl(path, rows)
  if jax.process_count() > 1:  # the other processes read the file process 0 wrote
    multihost_utils.sync_global_devices("jaxreason:self_pairs")
  print(f"self_pairs: {len(rows)} pairs from {stats['with_pair']}/{stats['questions']} questions -> {path}")
  return path
