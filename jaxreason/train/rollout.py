"""Sampling from the policy being trained: GRPO rollouts, expert iteration, DPO self-pairs.

Questions come from the run's data (`data.train`, or a given spec) as question/answer rows and are
rendered in `rollout.format` exactly as at evaluation (prompt + thinking opener), so budget forcing
works during rollouts too. The jitted `Sampler` reads the train state's parameters directly: they
are resharded on device to the sampling preset (no host copy) and cast to the compute dtype.
Completions are graded with the reward registry (several weighted functions allowed).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from jaxreason import sharding
from jaxreason.eval.formats import EVAL_FORMATS, budget_forcing, generation_prompt
from jaxreason.sampling import SamplingConfig
from jaxreason.sampling.sampler import Sampler, SamplingOutput, newline_mask_for


@dataclasses.dataclass(frozen=True)
class Question:
  id: Any
  text: str  # the generation prompt (format prompt + thinking opener)
  ids: tuple[int, ...]
  answer: Any


def load_questions(specs: Sequence[str], out_dir: str, fmt: str, tokenizer, *, name: str = "train") -> list[Question]:
  """Question/answer rows from files or built-in tasks (written under out_dir/data/ like SFT data)."""
  from jaxreason.data import sources
  from jaxreason.train.loop import materialize_task
  questions: list[Question] = []
  for i, spec in enumerate(specs):
    path = materialize_task(spec, out_dir, f"{name}{i}") if spec.startswith("task:") else spec
    for ex in sources.eval_examples(sources.read_rows(path), path):
      text = generation_prompt(fmt, ex.get("question"), ex.get("prompt"), tokenizer)
      ids = tuple(tokenizer.encode(text, add_special_tokens=False))
      questions.append(Question(id=(i, ex["id"]) if len(specs) > 1 else ex["id"], text=text, ids=ids,
                                answer=ex["answer"]))
  if not questions:
    raise ValueError(f"no questions in {list(specs)}")
  return questions


class QuestionStream:
  """Seeded shuffled passes over the questions; the position is the resumable state."""

  def __init__(self, questions: Sequence[Question], seed: int, position: int = 0):
    self.questions, self.seed, self.position = list(questions), seed, position

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.questions))

  def take(self, k: int) -> list[Question]:
    n = len(self.questions)
    out = []
    for _ in range(k):
      epoch, i = divmod(self.position, n)
      out.append(self.questions[int(self._order(epoch)[i])])
      self.position += 1
    return out

  @property
  def epoch(self) -> float:
    return self.position / len(self.questions)


@dataclasses.dataclass
class Completions:
  """G completions per question, question-major (question j -> rows j*G .. j*G+G-1)."""

  questions: list[Question]
  group_size: int
  output: SamplingOutput
  texts: list[str]        # decoded responses
  graded_texts: list[str]  # without end-of-turn markers (what rewards see)

  def __len__(self) -> int:
    return len(self.texts)

  def question(self, row: int) -> Question:
    return self.questions[row // self.group_size]


class RolloutSampler:
  """The jitted sampler fed from train-state parameters, with the rollout settings."""

  def __init__(self, graphdef, abs_state, model_cfg, mesh, tokenizer, rcfg):
    if getattr(rcfg, "mesh", None) is not None:  # a sampling mesh of its own over the same devices
      mesh = sharding.make_mesh(rcfg.mesh, list(mesh.devices.flat))
    self.rcfg, self.tokenizer, self.mesh = rcfg, tokenizer, mesh
    self.sampling_shardings = sharding.pure_shardings(abs_state, mesh, sharding.SAMPLING_RULES)
    stop_ids = tuple(sorted({i for i in (tokenizer.eos_token_id,) if i is not None}))
    stops = tuple(tuple(tokenizer.encode(s, add_special_tokens=False)) for s in rcfg.stop)
    self.end_markers = [tokenizer.decode([i]) for i in set(stop_ids) | {tokenizer.pad_token_id} if i is not None]
    self.sampling_cfg = SamplingConfig(
        max_new_tokens=rcfg.max_new_tokens, temperature=rcfg.temperature, top_p=rcfg.top_p, top_k=rcfg.top_k,
        n=rcfg.num_generations, stop_token_ids=stop_ids, stop_sequences=stops,
        pad_token_id=tokenizer.pad_token_id or 0)
    self.budget = budget_forcing(rcfg.format, tokenizer, rcfg.max_thinking_tokens, rcfg.num_waits)
    self.sampler = Sampler.for_graph(graphdef, model_cfg, newline_mask_for(tokenizer, model_cfg.vocab_size))

  def set_params(self, params: dict) -> None:
    """Points the sampler at `params` (a pure dict on device): resharded to the sampling preset
    (device to device; a no-op where the layouts agree) and cast to the compute dtype."""
    self.sampler.set_state(jax.device_put(params, self.sampling_shardings))

  def sample(self, questions: Sequence[Question], seed: int, n: int | None = None) -> Completions:
    cfg = self.sampling_cfg if n is None else dataclasses.replace(self.sampling_cfg, n=n)
    chunk = self.rcfg.batch_size or len(questions)
    outs = []
    with sharding.use_mesh(self.mesh, sharding.SAMPLING_RULES):
      for start in range(0, len(questions), chunk):
        part = questions[start:start + chunk]
        rng = jax.random.fold_in(jax.random.key(seed), start)
        outs.append(self.sampler.generate([q.ids for q in part], cfg, self.budget, seed=rng))
    output = outs[0] if len(outs) == 1 else _concat(outs, cfg.n)
    texts = [self.tokenizer.decode(t, skip_special_tokens=False) for t in output.tokens]
    graded = []
    for t in texts:
      for marker in self.end_markers:
        t = t.replace(marker, "")
      graded.append(t)
    return Completions(list(questions), cfg.n, output, texts, graded)


def _concat(outs: list[SamplingOutput], n: int) -> SamplingOutput:
  offset, index = 0, []
  for o in outs:
    index.append(o.prompt_index + offset)
    offset += len(o.tokens) // n
  fields = {}
  for f in dataclasses.fields(SamplingOutput):
    values = [getattr(o, f.name) for o in outs]
    if f.name == "prompt_index":
      fields[f.name] = np.concatenate(index)
    elif isinstance(values[0], list):
      fields[f.name] = [x for v in values for x in v]
    else:
      fields[f.name] = np.concatenate(values)
  return SamplingOutput(**fields)


# ---------------------------------------------------------------------------------------- rewards
class Rewards:
  """Weighted reward functions -> per-completion totals and per-function values.

  Names are registry names or `module:function` (SPEC §4), or `reward_model:PATH` for a trained
  reward model (scored in batches with the prompt). {}: the rollout format's own reward.
  """

  def __init__(self, weights: dict[str, float], fmt: str):
    from jaxreason.rewards import get_reward_fn
    self.weights = dict(weights) or {EVAL_FORMATS[fmt].reward: 1.0}
    self.verifier_name = EVAL_FORMATS[fmt].reward
    self.verifier = get_reward_fn(self.verifier_name)
    self.fns: dict[str, Any] = {}
    for name in self.weights:
      if name.startswith("reward_model:"):
        from jaxreason.train.reward_model import load_scorer
        self.fns[name] = load_scorer(name[len("reward_model:"):])
      else:
        self.fns[name] = get_reward_fn(name)

  def __call__(self, c: Completions) -> dict[str, np.ndarray]:
    """{"reward": [N] weighted total, "correct": [N] bool (the format's verifier), name: [N] each}."""
    from jaxreason.rewards import apply_reward, is_correct, reward_value
    answers = [c.question(i).answer for i in range(len(c))]
    out: dict[str, np.ndarray] = {}
    total = np.zeros((len(c),), np.float32)
    for name, fn in self.fns.items():
      if name.startswith("reward_model:"):
        values = np.asarray(fn([c.question(i).text for i in range(len(c))], c.graded_texts), np.float32)
      else:
        values = np.asarray([reward_value(g) for g in apply_reward(fn, c.graded_texts, answers)], np.float32)
      out[name] = values
      total += self.weights[name] * values
    graded = apply_reward(self.verifier, c.graded_texts, answers)
    out["correct"] = np.asarray([is_correct(g) for g in graded])
    out["reward"] = total
    return out


# ------------------------------------------------------------------------------------ DPO pairs
def build_self_pairs(rs, cfg) -> str:
  """DPO pairs from the initial model's own answers to `cfg.dpo.self_pairs` questions.

  Each question is sampled `rollout.num_generations` times; (right, wrong) answers, graded by the
  format's verifier, are paired (at most `dpo.pairs_per_question` per question, distinct
  completions). Written as {"prompt", "chosen", "rejected"} rows to output_dir/data/pairs.jsonl
  (reused when it exists: resuming does not resample).
  """
  from jaxreason.train.loop import initial_params
  path = os.path.join(cfg.output_dir, "data", "pairs.jsonl")
  if os.path.exists(path):
    return path
  questions = load_questions([cfg.dpo.self_pairs], cfg.output_dir, cfg.rollout.format, rs.tokenizer, name="pairs")
  roller = RolloutSampler(rs.graphdef, rs.abs_state, rs.model_cfg, rs.mesh, rs.tokenizer, cfg.rollout)
  with sharding.use_mesh(rs.mesh, rs.rules):
    roller.set_params(initial_params(cfg, rs.model_cfg, rs.mesh))
  rewards = Rewards({}, cfg.rollout.format)
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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)
  if jax.process_count() > 1:  # the other processes read the file process 0 wrote
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("jaxreason:self_pairs")
  print(f"self_pairs: {len(rows)} pairs from {stats['with_pair']}/{stats['questions']} questions -> {path}")
  return path
