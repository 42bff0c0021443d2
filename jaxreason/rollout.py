"""Sampling from the policy being trained: GRPO rollouts, expert iteration, DPO self-pairs.

Questions come from the run's data (`data.train`, or a given spec) as question/answer rows and are
rendered in `rollout.format` exactly as at evaluation (prompt + thinking opener), so budget forcing
works during rollouts too. The jitted `Sampler` reads the train state's parameters directly: they
are resharded on device to the sampling preset (no host copy) and cast to the compute dtype.
Sampling and decoding go through the one generation front end (`jaxreason.generation`, shared with
evaluation). Completions are graded with the reward registry (several weighted functions allowed);
each reward function receives the completion text (see `jaxreason.rewards.registry`), the row's
answer and, as keyword arguments, any other column of the question's data row it asks for.

On several processes the rollouts are split: the sampler holds a process-local copy of the weights
(replicated, or tensor-sharded over the process's own devices), each process samples only its
share of every sampler batch (`sampling.distributed.generate_share`, rows seeded as in the whole
batch), grades its own completions (`sample(..., rewards=...)`), and one host allgather gives every
process the whole batch (tokens, log-probs, rewards) in question order, as one process would have
produced it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxreason import sharding
from jaxreason.data import sources
from jaxreason import generation
from jaxreason.formats import FORMATS, generation_prompt
from jaxreason.rewards import apply_reward, get_reward_fn, is_correct, reward_value
from jaxreason.sampling import distributed
from jaxreason.sampling.sampler import Sampler, SamplingOutput, newline_mask_for
from jaxreason.train.loop import materialize_task


@dataclasses.dataclass(frozen=True)
class Question:
  id: Any
  text: str  # the generation prompt (format prompt + thinking opener)
  ids: tuple[int, ...]
  answer: Any
  row: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False, hash=False)  # the data row


def load_questions(specs: Sequence[str], out_dir: str, fmt: str, tokenizer, *, name: str = "train") -> list[Question]:
  """Question/answer rows from files or built-in tasks (written under out_dir/data/ like SFT data)."""
  questions: list[Question] = []
  for i, spec in enumerate(specs):
    path = materialize_task(spec, out_dir, f"{name}{i}") if spec.startswith("task:") else spec
    rows = list(sources.read_rows(path))
    for ex, row in zip(sources.eval_examples(rows, path), rows):
      text = generation_prompt(fmt, ex.get("question"), ex.get("prompt"), tokenizer)
      ids = tuple(tokenizer.encode(text, add_special_tokens=False))
      questions.append(Question(id=(i, ex["id"]) if len(specs) > 1 else ex["id"], text=text, ids=ids,
                                answer=ex["answer"], row=row))
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


def stream_meta(stream: "QuestionStream", seed: int, total_steps: int):
  """A rollout trainer's `save_meta` for `fit`: the step, the question stream's position (exact
  resume), the seed and the run's length."""
  return lambda step: {"step": step, "stream_position": stream.position, "seed": seed, "total_steps": total_steps}


@dataclasses.dataclass
class Completions:
  """G completions per question, question-major (question j -> rows j*G .. j*G+G-1)."""

  questions: list[Question]
  group_size: int
  output: SamplingOutput
  texts: list[str]        # decoded responses
  graded_texts: list[str]  # without end-of-turn markers (what rewards see)
  local_rows: np.ndarray | None = None  # rows this process sampled (and graded); None: all of them

  def __len__(self) -> int:
    return len(self.texts)

  def question(self, row: int) -> Question:
    return self.questions[row // self.group_size]


def sampler_mesh(mesh, layout, process_index: int):
  """The mesh rollouts sample on, given the training mesh and `rollout.mesh` (None: default).

  On a mesh whose devices span several processes: a mesh of `process_index`'s devices only (`layout`
  lays them out; default: the training mesh's tensor axis where it divides them, the rest as data
  parallelism), so no collective crosses processes while sampling. On one process: `layout` over the
  same devices, or the training mesh itself. The plan (`jaxreason.plan`) compiles the sampler on
  this mesh too, for process 0 of a multi-host topology."""
  devices = list(mesh.devices.flat)
  if len({d.process_index for d in devices}) > 1:
    local = [d for d in devices if d.process_index == process_index]
    tensor = mesh.shape["tensor"] if len(local) % mesh.shape["tensor"] == 0 else 1
    return sharding.make_mesh(layout or sharding.MeshConfig(data=1, fsdp=-1, tensor=tensor), local)
  if layout is not None:  # a sampling mesh of its own over the same devices
    return sharding.make_mesh(layout, devices)
  return mesh


class RolloutSampler:
  """The jitted sampler fed from train-state parameters, with the rollout settings.

  One process: the sampler runs on the training mesh (or `rollout.mesh` over the same devices).
  Several processes: on a mesh of this process's devices only (`rollout.mesh` then lays out those;
  default: the training mesh's tensor axis where it divides them, the rest as data parallelism),
  so no collective crosses processes while sampling.
  """

  def __init__(self, graphdef, abs_state, model_cfg, mesh, tokenizer, rcfg):
    self.split = jax.process_count() > 1
    train_mesh, layout = mesh, getattr(rcfg, "mesh", None)
    mesh = sampler_mesh(train_mesh, layout, jax.process_index())
    self.rcfg, self.tokenizer, self.mesh = rcfg, tokenizer, mesh
    self.sampling_shardings = sharding.pure_shardings(abs_state, mesh, sharding.SAMPLING_RULES)
    self.sampling_cfg = generation.sampling_config(
        tokenizer, max_new_tokens=rcfg.max_new_tokens, temperature=rcfg.temperature, top_p=rcfg.top_p,
        top_k=rcfg.top_k, n=rcfg.num_generations, stop=rcfg.stop)
    self.budget = generation.budget_forcing(rcfg.format, tokenizer, rcfg.max_thinking_tokens, rcfg.num_waits)
    self.sampler = Sampler.for_graph(graphdef, model_cfg, newline_mask_for(tokenizer, model_cfg.vocab_size))
    self.sampler.engine, self.sampler.slots = rcfg.engine, rcfg.slots
    if self.split:
      # Every process's sampler mesh side by side under a leading "process" axis: the weights laid
      # out there as each local sampler wants them (sharded within a process, the same copy in
      # every process) are one reshard from the training layout, and a process's shards of that
      # array are its local sampler's array. No device holds more than its local shard.
      stacked = np.stack([sampler_mesh(train_mesh, layout, p).devices for p in range(jax.process_count())])
      across = Mesh(stacked, ("process", *mesh.axis_names))
      self._to_local_layout = jax.jit(lambda t: t, out_shardings=jax.tree.map(
          lambda sh: NamedSharding(across, sh.spec), self.sampling_shardings))

  def set_params(self, params: dict) -> None:
    """Points the sampler at `params` (a pure dict on device): resharded to the sampling preset
    (device to device; a no-op where the layouts agree) and cast to the compute dtype. On several
    processes one reshard (run by every process at the same point) lays the weights out in every
    process as its local sampler shards them; this process's shards then become its sampler's
    weights, without a copy."""
    if self.split:
      laid_out = self._to_local_layout(params)

      def local(x, sh):
        by_device = {s.device: s.data for s in x.addressable_shards}
        return jax.make_array_from_single_device_arrays(
            x.shape, sh, [by_device[d] for d in sh.addressable_devices_indices_map(x.shape)])

      params = jax.tree.map(local, laid_out, self.sampling_shardings)
    self.sampler.set_state(jax.device_put(params, self.sampling_shardings))

  def sample(self, questions: Sequence[Question], seed: int, n: int | None = None, rewards: "Rewards | None" = None):
    """G completions per question. With `rewards`, returns (completions, rewards(completions)):
    on several processes each process grades only the completions it sampled (unless a reward
    needs the whole batch, e.g. a reward model), and the values are gathered with the rows."""
    cfg = self.sampling_cfg if n is None else dataclasses.replace(self.sampling_cfg, n=n)
    prompts = [q.ids for q in questions]
    seed_for = lambda start: jax.random.fold_in(jax.random.key(seed), start)
    if not self.split:
      with sharding.use_mesh(self.mesh, sharding.SAMPLING_RULES):
        output = generation.generate(self.sampler, prompts, cfg, self.budget, batch_size=self.rcfg.batch_size,
                                     seed_for=seed_for)
      c = self._completions(questions, cfg.n, output)
      return c if rewards is None else (c, rewards(c))
    grade_here = rewards is not None and rewards.per_row
    chunk = self.rcfg.batch_size or len(prompts)
    outs, values, local_rows = [], [], []
    for start in range(0, len(prompts), chunk):
      part = prompts[start:start + chunk]
      with sharding.use_mesh(self.mesh, sharding.SAMPLING_RULES):
        mine = distributed.generate_share(self.sampler, part, cfg, self.budget, seed_for(start), gather=False)
      rows = distributed.share(len(part), jax.process_index(), jax.process_count())
      local_rows.append(np.arange(rows.start * cfg.n, rows.stop * cfg.n) + start * cfg.n)
      graded = {}
      if grade_here:
        graded = rewards(self._completions([questions[start + i] for i in rows], cfg.n, mine.to_output()))
      full, graded = distributed.gather_share(mine, len(part), cfg.n, graded)
      outs.append(full.to_output())
      values.append(graded)
    output = outs[0] if len(outs) == 1 else generation.concat(outs, cfg.n)
    c = self._completions(questions, cfg.n, output, local_rows=np.concatenate(local_rows))
    if rewards is None:
      return c
    if not grade_here:
      return c, rewards(c)
    return c, {k: np.concatenate([v[k] for v in values]) for k in values[0]}

  def _completions(self, questions, n: int, output: SamplingOutput, **kw) -> Completions:
    texts, graded = generation.decode(self.tokenizer, output)
    return Completions(list(questions), n, output, texts, graded, **kw)


# ---------------------------------------------------------------------------------------- rewards
class Rewards:
  """Weighted reward functions -> per-completion totals and per-function values.

  Names are registry names or `module:function` (SPEC §4), or `reward_model:PATH` for a trained
  reward model (scored in batches with the prompt). {}: the rollout format's own reward.
  `accuracy`: the reward whose verdict (`rewards.is_correct`) is "correct" (logged accuracy, the
  right/wrong split of DPO self-pairs); None: the format's reward (`rollout.accuracy_reward`).
  """

  def __init__(self, weights: dict[str, float], fmt: str, accuracy: str | None = None):
    self.weights = dict(weights) or {FORMATS[fmt].reward: 1.0}
    self.verifier_name = accuracy or FORMATS[fmt].reward
    if self.verifier_name.startswith("reward_model:"):
      raise ValueError(f"rollout.accuracy_reward {self.verifier_name!r}: a reward model scores, it does not verify; "
                       "name a rule reward (e.g. the format's) or a module:function that returns 1 when right")
    self.verifier = get_reward_fn(self.verifier_name)
    self.fns: dict[str, Any] = {}
    for name in self.weights:
      if name.startswith("reward_model:"):
        from jaxreason.algorithms.reward_model.loss import load_scorer  # only for this reward (loads a checkpoint)
        self.fns[name] = load_scorer(name[len("reward_model:"):])
      else:
        self.fns[name] = get_reward_fn(name)
    # Every value depends on its own row only (no reward model batching the whole rollout), so
    # each process can grade the rows it sampled.
    self.per_row = not any(name.startswith("reward_model:") for name in self.fns)

  def __call__(self, c: Completions) -> dict[str, np.ndarray]:
    """{"reward": [N] weighted total, "correct": [N] bool (the accuracy reward's verdict), name: [N] each}."""
    questions = [c.question(i) for i in range(len(c))]
    answers, rows = [q.answer for q in questions], [q.row for q in questions]
    out: dict[str, np.ndarray] = {}
    graded_by: dict[str, list] = {}
    total = np.zeros((len(c),), np.float32)
    for name, fn in self.fns.items():
      if name.startswith("reward_model:"):
        values = np.asarray(fn([q.text for q in questions], c.graded_texts), np.float32)
      else:
        graded_by[name] = apply_reward(fn, c.graded_texts, answers, rows=rows)
        values = np.asarray([reward_value(g) for g in graded_by[name]], np.float32)
      out[name] = values
      total += self.weights[name] * values
    graded = graded_by.get(self.verifier_name)
    if graded is None:
      graded = apply_reward(self.verifier, c.graded_texts, answers, rows=rows)
    out["correct"] = np.asarray([is_correct(g) for g in graded])
    out["reward"] = total
    return out
