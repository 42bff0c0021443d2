"""The jitted functions a config runs, as (jitted fn, abstract sharded args): THE adapter to train/.

Every reference to train-side step builders lives in this module, so a refactor of
`jaxreason.train` remaps only here. Each `Planned` holds what `plan` compiles and what its
analytic estimates need (rows, tokens, KV cache shape).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxreason import sharding
from jaxreason.models.config import ModelConfig
from jaxreason.plan.abstract import sharded_abstract_state


@dataclasses.dataclass
class Planned:
  name: str
  fn: Callable  # jitted
  args: tuple  # ShapeDtypeStructs with shardings
  kind: str  # "train" | "score" | "sample"
  rows: int  # sequences per call (global)
  seq_len: int  # tokens per row (train/score) or cache length (sample)
  new_tokens: int = 0  # sample: decode steps
  rules: Any = None
  mesh: Any = None
  notes: list = dataclasses.field(default_factory=list)


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _rows(mesh: Mesh, shape, dtype, lead: int = 1):
  """[A, B, ...] (lead=1) or [B, ...] (lead=0) rows sharded over data x fsdp along B."""
  spec = PartitionSpec(*([None] * lead), ("data", "fsdp"), *([None] * (len(shape) - lead - 1)))
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def train_state(cfg, model_cfg: ModelConfig, mesh: Mesh, total_steps: int = 1000):
  """(graphdef, abstract sharded TrainState, tx, schedule, state shardings) as the loop builds them."""
  from jaxreason.models.build import abstract_model
  from jaxreason.train.loop import make_tx
  from jaxreason.train.state import TrainState, state_shardings
  graphdef, abs_state = nnx.split(abstract_model(model_cfg))
  abs_params = nnx.to_pure_dict(abs_state)
  tx, schedule = make_tx(cfg, abs_params, total_steps)
  shardings = state_shardings(abs_state, tx, mesh, sharding.TRAIN_RULES)
  from jaxreason.lora.train import spec_of
  spec = spec_of(tx)  # LoRA: params are the adapters, the frozen (int8 with QLoRA) base rides in `frozen`
  if spec is not None:
    from jaxreason.lora import adapters as la
    frozen = jax.eval_shape(lambda p: la.split(p, spec, 0)[1], abs_params)
    abstract = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                              la.abstract_trainable(abs_params, spec))
    abstract = dataclasses.replace(abstract, frozen=frozen)
    return graphdef, abs_state, _abstract(abstract, shardings), tx, schedule, shardings
  abstract = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                            abs_params)
  return graphdef, abs_state, _abstract(abstract, shardings), tx, schedule, shardings


def _micro(cfg) -> tuple[int, int]:
  gbs = cfg.train.global_batch_size
  micro = cfg.train.micro_batch_size or gbs
  return gbs // micro, micro


def sft_functions(cfg, model_cfg, mesh) -> list[Planned]:
  from jaxreason.algorithms.sft.loss import make_sft_step
  from jaxreason.train.step import jit_step
  graphdef, _, state, tx, schedule, shardings = train_state(cfg, model_cfg, mesh)
  accum, micro = _micro(cfg)
  t = cfg.data.seq_len
  batch = {k: _rows(mesh, (accum, micro, t), jnp.float32 if k == "weights" else jnp.int32)
           for k in ("inputs", "targets", "weights", "positions", "segments")}
  step = make_sft_step(graphdef, tx, schedule, normalization=cfg.train.loss_normalization)
  fn = jit_step(step, shardings, {k: v.sharding for k, v in batch.items()})
  return [Planned("sft step", fn, (state, batch), "train", accum * micro, t, rules=sharding.TRAIN_RULES, mesh=mesh,
                  notes=[f"{accum} x {micro} rows x {t} tokens"])]


def _sampler(cfg, model_cfg, mesh, graphdef, abs_state, prompt_len: int) -> Planned:
  from jaxreason.sampling.sampler import _generate, _generate_continuous, bucket_length, num_slots
  from jaxreason.sampling import SamplingConfig
  rc = cfg.rollout
  rules = sharding.SAMPLING_RULES
  # The mesh RolloutSampler samples on: `rollout.mesh` if set; on a multi-host topology one host's
  # devices (each process samples its share of the questions on its own devices).
  from jaxreason.rollout import sampler_mesh
  processes = len({d.process_index for d in mesh.devices.flat})
  mesh = sampler_mesh(mesh, getattr(rc, "mesh", None), 0)
  state = sharded_abstract_state(abs_state, mesh, rules)
  dt = jnp.dtype(model_cfg.dtype)
  state = jax.tree.map(lambda v: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, dt, sharding=v.get_value().sharding)),
                       state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  questions = -(-(rc.batch_size or rc.prompts_per_step) // processes)  # each process samples its share
  p = bucket_length(prompt_len)
  scfg = SamplingConfig(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p,
                        top_k=rc.top_k, n=rc.num_generations, stop_token_ids=(0,))
  rep = NamedSharding(mesh, PartitionSpec())
  args = (state, _rows(mesh, (questions, p), jnp.int32, lead=0), _rows(mesh, (questions, p), jnp.int32, lead=0),
          jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep),
          jax.ShapeDtypeStruct((model_cfg.vocab_size,), jnp.bool_, sharding=rep),
          jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
  # The rollout engine (rollout.engine): continuous batching over the sampler's decode slots, or the
  # dense sampler with a row per completion.
  n = rc.num_generations
  if rc.engine == "dense":
    slots = questions * n
    fn = lambda *a: _generate(*a, graphdef=graphdef, cfg=scfg, bf=None, cache_len=p + rc.max_new_tokens)
  else:
    slots = num_slots(questions, n, rc.slots)
    fn = lambda *a: _generate_continuous(*a, graphdef=graphdef, cfg=scfg, bf=None, cache_len=p + rc.max_new_tokens,
                                         slots=slots)
  return Planned("sampler", jax.jit(fn), args, "sample", slots, p + rc.max_new_tokens,
                 new_tokens=rc.max_new_tokens, rules=rules, mesh=mesh,
                 notes=[f"{questions} prompts x {n} samples in {slots} decode slots, prompt {p}, "
                        f"{rc.max_new_tokens} new"]
                 + ([f"per process (1 of {processes}, on its {mesh.devices.size} devices)"] if processes > 1 else []))


def grpo_functions(cfg, model_cfg, mesh, prompt_len: int = 512) -> list[Planned]:
  from jaxreason.algorithms.grpo.loss import make_grpo_step, make_ref_scorer
  from jaxreason.train.step import jit_step
  rc, gc = cfg.rollout, cfg.grpo
  graphdef, abs_state, state, tx, schedule, shardings = train_state(cfg, model_cfg, mesh)
  accum, micro = _micro(cfg)
  t = -(-(prompt_len + rc.max_new_tokens) // 8) * 8
  batch = {k: _rows(mesh, (accum, micro, t), jnp.float32 if k in ("mask", "old_logp", "ref_logp") else jnp.int32)
           for k in ("inputs", "targets", "positions", "segments", "mask", "old_logp")
           + (("ref_logp",) if gc.beta > 0 else ())}
  batch.update(adv=_rows(mesh, (accum, micro), jnp.float32), valid=_rows(mesh, (accum, micro), jnp.float32))
  step = make_grpo_step(graphdef, tx, schedule, gc, temperature=rc.temperature, max_completion_length=rc.max_new_tokens)
  out = [Planned("grpo step", jit_step(step, shardings, {k: v.sharding for k, v in batch.items()}), (state, batch),
                 "train", accum * micro, t, rules=sharding.TRAIN_RULES, mesh=mesh,
                 notes=[f"{accum} x {micro} rows x {t} tokens (prompt {prompt_len} + {rc.max_new_tokens})"])]
  if gc.beta > 0:
    dt = jnp.dtype(model_cfg.dtype)
    ref = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dt if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype,
                                                      sharding=a.sharding),
                       state.params if state.frozen is None else  # LoRA: the reference is the base model
                       _abstract(nnx.to_pure_dict(abs_state), sharding.pure_shardings(abs_state, mesh, sharding.TRAIN_RULES)))
    rows = {k: _rows(mesh, (accum, micro, t), jnp.int32) for k in ("inputs", "targets", "positions", "segments")}
    out.append(Planned("reference scorer", make_ref_scorer(graphdef, rc.temperature), (ref, rows), "score",
                       accum * micro, t, rules=sharding.TRAIN_RULES, mesh=mesh,
                       notes=[f"{accum} x {micro} rows x {t} tokens, {model_cfg.dtype} weights"]))
  out.append(_sampler(cfg, model_cfg, mesh, graphdef, abs_state, prompt_len))
  return out


def dpo_functions(cfg, model_cfg, mesh, max_tokens: int) -> list[Planned]:
  from jaxreason.algorithms.dpo.loss import make_dpo_step
  from jaxreason.train.step import jit_step
  d = cfg.dpo
  graphdef, _, state, tx, schedule, shardings = train_state(cfg, model_cfg, mesh)
  accum, micro = _micro(cfg)
  batch = {k: _rows(mesh, (accum, micro, 2, max_tokens), jnp.int32) for k in ("tokens", "response_mask", "valid")}
  if d.precompute_ref:
    batch["ref_logps"] = _rows(mesh, (accum, micro, 2), jnp.float32)
  step = make_dpo_step(graphdef, tx, schedule, beta=d.beta, loss_type=d.loss_type,
                       label_smoothing=d.label_smoothing, precompute_ref=d.precompute_ref)
  fn = jit_step(step, shardings, {k: v.sharding for k, v in batch.items()})
  return [Planned("dpo pair step", fn, (state, batch), "train", accum * micro * 2, max_tokens,
                  rules=sharding.TRAIN_RULES, mesh=mesh, notes=[f"{accum} x {micro} pairs x {max_tokens} tokens"])]


def functions_for(cfg, model_cfg: ModelConfig, mesh: Mesh, *, prompt_len: int = 512) -> list[Planned]:
  """Every jitted function `cfg.algorithm` runs, at the config's shapes."""
  algo = cfg.algorithm
  if algo in ("sft", "pretrain"):
    return sft_functions(cfg, model_cfg, mesh)
  if algo == "grpo":
    return grpo_functions(cfg, model_cfg, mesh, prompt_len)
  if algo == "dpo":
    return dpo_functions(cfg, model_cfg, mesh, cfg.data.seq_len)
  if algo == "expert_iteration":
    return sft_functions(cfg, model_cfg, mesh) + [_sampler(cfg, model_cfg, mesh, *nnx.split(_abstract_model(model_cfg)),
                                                           prompt_len)]
  raise ValueError(f"plan: algorithm {algo!r} is not planned yet (sft, pretrain, grpo, dpo, expert_iteration are)")


def _abstract_model(model_cfg):
  from jaxreason.models.build import abstract_model
  return abstract_model(model_cfg)


def total_rows(cfg) -> int:
  return math.prod(_micro(cfg))
