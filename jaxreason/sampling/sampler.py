"""The jitted sampler: prefill + `lax.while_loop` decode over a preallocated KV cache.

Weights enter the compiled function as arguments (an `nnx.State`), never as constants, so one
compilation serves every weight update (GRPO). The loop state is an explicit pytree. Prompts are
left-padded to a bucketed length (powers of two), so a new prompt length rarely recompiles.
`n` samples per prompt share one prefill: the prompt's cache rows are repeated after prefill.
Budget forcing (SPEC §3, see `BudgetForcing`) is per-row state inside the same loop.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreason.models.transformer import KVCache, Transformer
from jaxreason.ops import masks
from jaxreason.sampling import strategies
from jaxreason.sampling.config import FINISH_REASONS, BudgetForcing, SamplingConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoopState:
  step: jax.Array           # [] iterations so far
  rng: jax.Array
  cache: KVCache
  logits: jax.Array         # [B, V] float32, for the next token
  position: jax.Array       # [B] position of the next token
  tokens: jax.Array         # [B, M] emitted tokens (M = max_new_tokens)
  logprobs: jax.Array       # [B, M] log-prob of each emitted token under the scaled distribution
  entropies: jax.Array      # [B, M] entropy of that distribution
  injected: jax.Array       # [B, M] True where budget forcing injected the token
  length: jax.Array         # [B] tokens emitted
  done: jax.Array           # [B] bool
  finish: jax.Array         # [B] index into FINISH_REASONS
  window: jax.Array         # [B, W] last W emitted tokens (stop sequences)
  phase: jax.Array          # [B] 0 thinking, 1 answer
  think_gen: jax.Array      # [B] model-generated thinking tokens (the budget)
  think_total: jax.Array    # [B] all thinking-phase tokens (reported)
  answer_tokens: jax.Array  # [B] model-generated answer tokens
  waits: jax.Array          # [B] extensions used
  forced: jax.Array         # [B] bool: thinking was cut by the budget
  last_nl: jax.Array        # [B] bool: the last emitted token ends with a newline
  queue: jax.Array          # [B, Q] tokens to inject
  queue_len: jax.Array      # [B]
  queue_pos: jax.Array      # [B]


@dataclasses.dataclass
class SamplingOutput:
  """Host-side results, one entry per sample (prompt-major: prompt i -> rows i*n .. i*n+n-1)."""

  tokens: list[list[int]]
  logprobs: list[np.ndarray]
  entropies: list[np.ndarray]
  injected: list[np.ndarray]
  finish_reason: list[str]
  thinking_tokens: np.ndarray
  answer_tokens: np.ndarray
  waits: np.ndarray
  forced_end: np.ndarray
  truncated: np.ndarray  # ended by a length limit instead of a stop token/sequence
  prompt_index: np.ndarray


def bucket_length(n: int, minimum: int = 16) -> int:
  """Next power of two >= n (at least `minimum`)."""
  b = minimum
  while b < n:
    b *= 2
  return b


def _pad_queue(seq: Sequence[int], q: int) -> np.ndarray:
  out = np.zeros((q,), np.int32)
  out[: len(seq)] = seq
  return out


def _initial_state(model: Transformer, tokens, mask, rng, cfg: SamplingConfig, bf: BudgetForcing | None,
                   cache_len: int, newline_mask: jax.Array) -> LoopState:
  b = tokens.shape[0]
  positions = masks.positions_from_padding(mask)
  cache = KVCache.init(model.cfg, b, cache_len)
  hidden, cache = model.hidden_states(tokens, positions, mask.astype(jnp.int32), cache)
  logits = model.logits(hidden[:, -1:])[:, 0]
  next_pos = jnp.sum(mask, axis=-1).astype(jnp.int32)
  last_nl = newline_mask[tokens[:, -1]]  # prompts are left-padded: the last column is real
  if cfg.n > 1:  # share the prefill across the n samples of each prompt
    rep = functools.partial(jnp.repeat, repeats=cfg.n, total_repeat_length=b * cfg.n)
    cache = KVCache(k=rep(cache.k, axis=1), v=rep(cache.v, axis=1), positions=rep(cache.positions, axis=0),
                    segments=rep(cache.segments, axis=0), index=cache.index)
    logits, next_pos, last_nl = rep(logits, axis=0), rep(next_pos, axis=0), rep(last_nl, axis=0)
    b = b * cfg.n
  m = cfg.max_new_tokens
  w = max([1] + [len(s) for s in cfg.stop_sequences])
  q = 1 if bf is None else max(1, len(bf.wait_ids), len(bf.newline_ids + bf.end_ids + bf.forced_suffix_ids))
  zeros = lambda dtype=jnp.int32: jnp.zeros((b,), dtype)
  return LoopState(
      step=jnp.zeros((), jnp.int32), rng=rng, cache=cache, logits=logits, position=next_pos,
      tokens=jnp.full((b, m), cfg.pad_token_id, jnp.int32), logprobs=jnp.zeros((b, m), jnp.float32),
      entropies=jnp.zeros((b, m), jnp.float32), injected=jnp.zeros((b, m), bool),
      length=zeros(), done=zeros(bool), finish=zeros(), window=jnp.full((b, w), -1, jnp.int32),
      phase=zeros() if bf is not None else jnp.ones((b,), jnp.int32),
      think_gen=zeros(), think_total=zeros(), answer_tokens=zeros(), waits=zeros(), forced=zeros(bool),
      last_nl=last_nl, queue=jnp.zeros((b, q), jnp.int32), queue_len=zeros(), queue_pos=zeros())


def _step(model: Transformer, s: LoopState, cfg: SamplingConfig, bf: BudgetForcing | None,
          newline_mask: jax.Array) -> LoopState:
  b = s.length.shape[0]
  rows = jnp.arange(b)
  rng, sub = jax.random.split(s.rng)
  proposal, logp = strategies.choose(s.logits, sub, cfg)
  active = ~s.done

  queued = active & (s.queue_pos < s.queue_len)
  queued_tok = jnp.take_along_axis(s.queue, jnp.minimum(s.queue_pos, s.queue.shape[1] - 1)[:, None], axis=1)[:, 0]
  token = jnp.where(queued, queued_tok, proposal)
  injected = queued
  queue, queue_len = s.queue, s.queue_len
  queue_pos = jnp.where(queued, s.queue_pos + 1, s.queue_pos)
  phase, waits, forced, think_gen, think_total = s.phase, s.waits, s.forced, s.think_gen, s.think_total

  if bf is not None:
    qn = s.queue.shape[1]
    forced_seq = jnp.asarray(_pad_queue(bf.end_ids + bf.forced_suffix_ids, qn))
    forced_nl_seq = jnp.asarray(_pad_queue(bf.newline_ids + bf.end_ids + bf.forced_suffix_ids, qn))
    wait_seq = jnp.asarray(_pad_queue(bf.wait_ids, qn))
    thinking = active & (phase == 0) & ~queued
    if bf.max_thinking_tokens is not None:
      budget_hit = thinking & (think_gen >= bf.max_thinking_tokens)
    else:
      budget_hit = jnp.zeros_like(thinking)
    trigger = thinking & ~budget_hit & (proposal == bf.trigger_id)
    want_wait = trigger & ((waits < bf.num_waits) | (think_gen < bf.min_thinking_tokens))
    natural_end = trigger & ~want_wait
    add_nl = ~s.last_nl & (len(bf.newline_ids) > 0)
    new_queue = jnp.where(budget_hit[:, None], jnp.where(add_nl[:, None], forced_nl_seq, forced_seq), wait_seq)
    new_len = jnp.where(budget_hit,
                        jnp.where(add_nl, len(bf.newline_ids), 0) + len(bf.end_ids) + len(bf.forced_suffix_ids),
                        len(bf.wait_ids))
    start = budget_hit | want_wait
    token = jnp.where(start, new_queue[:, 0], token)
    injected = injected | start
    queue = jnp.where(start[:, None], new_queue, queue)
    queue_len = jnp.where(start, new_len, queue_len)
    queue_pos = jnp.where(start, 1, queue_pos)
    waits = waits + want_wait
    forced = forced | budget_hit
    think_gen = think_gen + (thinking & ~budget_hit & ~trigger)
    think_total = think_total + (active & (phase == 0) & ~budget_hit & ~natural_end)
    answer_now = active & (phase == 1) & ~injected
    phase = jnp.where(budget_hit | natural_end, 1, phase)
  else:
    answer_now = active & ~injected
  answer_tokens = s.answer_tokens + answer_now

  idx = jnp.minimum(s.length, cfg.max_new_tokens - 1)
  write = lambda buf, val: buf.at[rows, idx].set(jnp.where(active, val, buf[rows, idx]))
  tokens = write(s.tokens, token)
  logprobs = write(s.logprobs, logp[rows, token])
  entropies = write(s.entropies, strategies.entropy(logp))
  injected_buf = write(s.injected, injected)
  length = s.length + active
  window = jnp.where(active[:, None], jnp.concatenate([s.window[:, 1:], token[:, None]], axis=1), s.window)

  model_token = active & ~injected
  stop = jnp.zeros_like(active)
  if cfg.stop_token_ids:
    stop = stop | (model_token & jnp.isin(token, jnp.asarray(cfg.stop_token_ids)))
  for seq in cfg.stop_sequences:
    tail = window[:, -len(seq):]
    stop = stop | (model_token & jnp.all(tail == jnp.asarray(seq, jnp.int32)[None], axis=1))
  answer_cap = jnp.zeros_like(active)
  if bf is not None and bf.max_answer_tokens is not None:
    answer_cap = active & ~stop & (answer_tokens >= bf.max_answer_tokens) & (phase == 1)
  length_cap = active & ~stop & (length >= cfg.max_new_tokens)
  finish = jnp.where(stop, 1, jnp.where(answer_cap, 3, jnp.where(length_cap, 2, s.finish)))
  done = s.done | stop | answer_cap | length_cap
  last_nl = jnp.where(active, newline_mask[token], s.last_nl)

  logits, cache = model(token[:, None], s.position[:, None], active[:, None].astype(jnp.int32), cache=s.cache)
  return LoopState(
      step=s.step + 1, rng=rng, cache=cache, logits=logits[:, 0], position=s.position + active,
      tokens=tokens, logprobs=logprobs, entropies=entropies, injected=injected_buf, length=length,
      done=done, finish=finish, window=window, phase=phase, think_gen=think_gen,
      think_total=think_total, answer_tokens=answer_tokens, waits=waits, forced=forced,
      last_nl=last_nl, queue=queue, queue_len=queue_len, queue_pos=queue_pos)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "bf", "cache_len"))
def _generate(state, tokens, mask, rng, newline_mask, *, graphdef, cfg, bf, cache_len) -> LoopState:
  model = nnx.merge(graphdef, state)
  s = _initial_state(model, tokens, mask, rng, cfg, bf, cache_len, newline_mask)

  def cond(s):
    return (s.step < cfg.max_new_tokens) & ~jnp.all(s.done)

  def body(s):
    return _step(model, s, cfg, bf, newline_mask)

  return jax.lax.while_loop(cond, body, s)


def newline_mask_for(tokenizer, vocab_size: int) -> np.ndarray:
  """[V] bool: tokens whose text ends with a newline (for s1's '\\n' before a forced delimiter)."""
  mask = np.zeros((vocab_size,), bool)
  for tok_id in range(min(vocab_size, len(tokenizer))):
    text = tokenizer.decode([tok_id])
    mask[tok_id] = text.endswith("\n")
  return mask


def _cast_state(state, dtype):
  """Floating parameters cast to `dtype` (a no-op, no copy, when they already have it)."""
  dtype = jnp.dtype(dtype)
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x
  return jax.tree.map(cast, state)


_RESULT_FIELDS = ("tokens", "logprobs", "entropies", "injected", "length", "finish", "think_total", "answer_tokens",
                  "waits", "forced")


def _fetch(s: LoopState) -> types.SimpleNamespace:
  """The result fields on the host (not the KV cache); gathered from every process on multi-host meshes."""
  out = {f: getattr(s, f) for f in _RESULT_FIELDS}
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    out = multihost_utils.process_allgather(out, tiled=True)
  else:
    out = jax.device_get(out)
  return types.SimpleNamespace(**out)


class Sampler:
  """Generates from a model. `generate(prompts, cfg, budget)` takes token-id prompts.

  Decoding reads every weight once per step, so weights are held in the model's compute dtype
  (`cfg.dtype`): with fp32 master weights and bf16 compute the sampler keeps a bf16 copy (half the
  memory traffic); with fp32 compute it uses the model's arrays as they are, without a copy.
  """

  def __init__(self, model: Transformer, newline_mask: np.ndarray | None = None):
    self.graphdef, state = nnx.split(model)
    self.cfg = model.cfg
    self.state = _cast_state(state, model.cfg.dtype)
    vocab = model.cfg.vocab_size
    self.newline_mask = jnp.asarray(newline_mask if newline_mask is not None else np.zeros((vocab,), bool))

  @classmethod
  def for_graph(cls, graphdef, cfg, newline_mask: np.ndarray | None = None) -> "Sampler":
    """A sampler with no weights yet (trainers): `set_state` before `generate`."""
    self = cls.__new__(cls)
    self.graphdef, self.cfg, self.state = graphdef, cfg, None
    self.newline_mask = jnp.asarray(newline_mask if newline_mask is not None else np.zeros((cfg.vocab_size,), bool))
    return self

  def update_weights(self, model: Transformer) -> None:
    """Points the sampler at new weights (no recompilation; no copy when dtypes already match)."""
    self.state = _cast_state(nnx.state(model), model.cfg.dtype)

  def set_state(self, state) -> None:
    """Points the sampler at a parameter tree (nnx.State or pure dict) for `graphdef`."""
    self.state = _cast_state(state, self.cfg.dtype)

  def generate(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
               budget: BudgetForcing | None = None, seed: int | jax.Array = 0) -> SamplingOutput:
    if not prompts:
      raise ValueError("generate: no prompts given")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
      raise ValueError(f"generate: prompt {lengths.index(0)} is empty; every prompt needs at least one token")
    p = bucket_length(max(lengths))
    tokens = np.full((len(prompts), p), cfg.pad_token_id, np.int32)
    mask = np.zeros((len(prompts), p), np.int32)
    for i, ids in enumerate(prompts):
      tokens[i, p - len(ids):] = ids
      mask[i, p - len(ids):] = 1
    rng = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
    s = _generate(self.state, jnp.asarray(tokens), jnp.asarray(mask), rng, self.newline_mask,
                  graphdef=self.graphdef, cfg=cfg, bf=budget, cache_len=p + cfg.max_new_tokens)
    s = _fetch(s)
    n = len(prompts) * cfg.n
    lens = np.asarray(s.length)
    finish = [FINISH_REASONS[int(f)] for f in np.asarray(s.finish)]
    return SamplingOutput(
        tokens=[np.asarray(s.tokens[i, :lens[i]]).tolist() for i in range(n)],
        logprobs=[np.asarray(s.logprobs[i, :lens[i]]) for i in range(n)],
        entropies=[np.asarray(s.entropies[i, :lens[i]]) for i in range(n)],
        injected=[np.asarray(s.injected[i, :lens[i]]) for i in range(n)],
        finish_reason=finish,
        thinking_tokens=np.asarray(s.think_total) if budget is not None else np.zeros((n,), np.int32),
        answer_tokens=np.asarray(s.answer_tokens),
        waits=np.asarray(s.waits),
        forced_end=np.asarray(s.forced),
        truncated=np.asarray([f in ("length", "answer_length") for f in finish]),
        prompt_index=np.repeat(np.arange(len(prompts)), cfg.n),
    )
