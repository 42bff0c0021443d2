"""The jitted sampler: prefill + `lax.while_loop` decode over a preallocated KV cache.

Weights enter the compiled function as arguments (an `nnx.State`), never as constants, so one
compilation serves every weight update (GRPO). The loop state is an explicit pytree
(`DecodeState`, with budget forcing's `BudgetState` inside). Prompts are left-padded to a bucketed
length (powers of two), so a new prompt length rarely recompiles. One decode step reads
choose -> force (`budget.force`, SPEC §3) -> write -> stop -> forward.

Two engines behind `Sampler.generate`:
- "continuous" (default): S decode slots over the queue of all prompts' n samples. The first S/n
  prompts are prefilled together; whenever rows finish, pending rows go into the free slots inside
  the same while loop (a prompt is prefilled once into `PromptBuffer` and copied into a slot for
  each of its samples; each slot writes the cache at its own index). No recompilation, no host
  round trip per token; results by sample row, in prompt order. Once the queue is empty and the
  live rows fit in half the slots, the live slots are compacted into half as many (down to
  `MIN_SLOTS`), so the long tail of lengths does not run mostly empty slots (one host round trip
  per halving; the tail's loop has nothing left to insert, so it compiles without the prefill and
  costs about what the dense sampler's loop does, once per slot count and prompt bucket).
- "dense": every sample in its own row, decoded until the longest row ends (the earlier sampler).
Row r's token t draws from fold_in(fold_in(key(seed), r), t), so both engines, any slot count and
any split across processes (`distributed.generate_share`) give the same samples.
"""
from __future__ import annotations

import dataclasses
import functools
import time
import types
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreason.models.transformer import KVCache, Transformer
from jaxreason.ops import masks
from jaxreason.sampling import budget as budget_lib
from jaxreason.sampling import strategies
from jaxreason.sampling.config import FINISH_REASONS, BudgetForcing, Finish, SamplingConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Outputs:
  """What the loop writes per emitted token: [B, M] buffers (M = max_new_tokens)."""

  tokens: jax.Array     # [B, M] emitted tokens (pad after the end)
  logprobs: jax.Array   # [B, M] log-prob of each token under the scaled distribution
  entropies: jax.Array  # [B, M] entropy of that distribution
  injected: jax.Array   # [B, M] True where budget forcing injected the token

  @classmethod
  def init(cls, batch: int, m: int, pad_id: int) -> "Outputs":
    return cls(tokens=jnp.full((batch, m), pad_id, jnp.int32), logprobs=jnp.zeros((batch, m), jnp.float32),
               entropies=jnp.zeros((batch, m), jnp.float32), injected=jnp.zeros((batch, m), bool))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowStats:
  """Per-sample counters, [N] (indexed by sample row, not by slot)."""

  length: jax.Array         # tokens emitted
  finish: jax.Array         # a `Finish` code
  think_total: jax.Array    # thinking-phase tokens
  answer_tokens: jax.Array  # model-generated answer tokens
  waits: jax.Array
  forced: jax.Array         # bool

  @classmethod
  def init(cls, n: int) -> "RowStats":
    z = jnp.zeros((n,), jnp.int32)
    return cls(length=z, finish=z, think_total=z, answer_tokens=z, waits=z, forced=jnp.zeros((n,), bool))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """The while-loop carry. S decode slots, each holding one sample row (or none); results are
  written by row, so they do not depend on which slot a row ran in."""

  step: jax.Array       # [] decode steps so far
  rng: jax.Array        # base key; a row's token t uses fold_in(fold_in(rng, row), t)
  cache: KVCache        # k [L, S, K, H, C], v [L, S, K, C, H]
  logits: jax.Array     # [S, V] float32, for the next token
  position: jax.Array   # [S] position of the next token
  length: jax.Array     # [S] tokens emitted by the slot's row
  done: jax.Array       # [S] bool (True for a free slot)
  finish: jax.Array     # [S] a `Finish` code
  window: jax.Array     # [S, W] last W emitted tokens (stop sequences)
  row: jax.Array        # [S] the sample row in each slot (N: none)
  row_offset: jax.Array  # [] global index of row 0 (RNG only: a share of a larger batch draws as in it)
  budget: budget_lib.BudgetState
  out: Outputs          # [N, M]
  stats: RowStats       # [N]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PromptBuffer:
  """Continuous batching: the last prefilled prompt, copied into each slot that takes one of its
  n samples (one prefill per prompt)."""

  k: jax.Array          # [L, 1, K, H, P] (`KVCache`'s layouts)
  v: jax.Array
  positions: jax.Array  # [1, P]
  segments: jax.Array   # [1, P]
  logits: jax.Array     # [1, V]
  next_pos: jax.Array   # [1]
  prompt: jax.Array     # [] which prompt (-1: none)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EngineState:
  decode: DecodeState
  next_row: jax.Array   # [] the next pending sample row
  buffer: PromptBuffer
  inserted: jax.Array   # [] rows inserted inside the loop (prefill/insert count)
  live: jax.Array       # [] slots holding an unfinished row when the loop stopped


DEFAULT_SLOTS = 256  # continuous batching: decode slots when the caller names none
# Continuous batching shrinks its slot count by halves once the queue is empty and the live rows fit
# in half the slots (the long tail would otherwise run most slots empty), down to this many slots.
MIN_SLOTS = 16


@dataclasses.dataclass
class SamplingOutput:
  """Host-side results, one entry per sample (prompt-major: prompt i -> rows i*n .. i*n+n-1).

  The list fields are today's interface; `padded` holds the same results as padded [N, M] arrays
  plus lengths (what vectorised callers should use), and `metrics` the engine's counters.
  """

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
  # Not dataclass fields (callers build and concatenate SamplingOutputs field by field):
  padded = None   # SampleBatch | None: set by `SampleBatch.to_output`
  metrics = None  # dict | None: the engine's counters, likewise


@dataclasses.dataclass
class SampleBatch:
  """Results as padded arrays: row r is sample r % n of prompt r // n; entries past `length[r]` are
  padding (pad id / 0 / False)."""

  tokens: np.ndarray           # [N, M] int32
  logprobs: np.ndarray         # [N, M] float32
  entropies: np.ndarray        # [N, M] float32
  injected: np.ndarray         # [N, M] bool
  length: np.ndarray           # [N] tokens emitted
  finish: np.ndarray           # [N] `Finish` codes
  thinking_tokens: np.ndarray  # [N] (0 without budget forcing)
  answer_tokens: np.ndarray    # [N]
  waits: np.ndarray            # [N]
  forced_end: np.ndarray       # [N] bool
  prompt_index: np.ndarray     # [N]
  metrics: dict = dataclasses.field(default_factory=dict)

  @property
  def truncated(self) -> np.ndarray:
    return np.isin(self.finish, (Finish.LENGTH, Finish.ANSWER_LENGTH))

  @property
  def mask(self) -> np.ndarray:
    """[N, M] bool: the emitted part of each row."""
    return np.arange(self.tokens.shape[1])[None] < self.length[:, None]

  def to_output(self) -> SamplingOutput:
    """Today's list-per-sample interface (`Sampler.generate`'s return value)."""
    lens = self.length
    cut = lambda a: [a[i, :lens[i]] for i in range(len(lens))]
    out = SamplingOutput(
        tokens=[t.tolist() for t in cut(self.tokens)], logprobs=cut(self.logprobs), entropies=cut(self.entropies),
        injected=cut(self.injected), finish_reason=[FINISH_REASONS[int(f)] for f in self.finish],
        thinking_tokens=self.thinking_tokens, answer_tokens=self.answer_tokens, waits=self.waits,
        forced_end=self.forced_end, truncated=self.truncated, prompt_index=self.prompt_index)
    out.padded, out.metrics = self, self.metrics
    return out


def bucket_length(n: int, minimum: int = 16) -> int:
  """Next power of two >= n (at least `minimum`)."""
  b = minimum
  while b < n:
    b *= 2
  return b


def _prefill(model: Transformer, tokens, mask, cache_len: int):
  """Left-padded prompts [B, P] -> (cache with the prompts at slots [0, P), next-token logits [B, V],
  next position [B])."""
  positions = masks.positions_from_padding(mask)
  cache = KVCache.init(model.cfg, tokens.shape[0], cache_len)
  hidden, cache = model.hidden_states(tokens, positions, mask.astype(jnp.int32), cache)
  logits = model.logits(hidden[:, -1:])[:, 0]
  return cache, logits, jnp.sum(mask, axis=-1).astype(jnp.int32)


def init_state(model: Transformer, tokens, mask, rng, cfg: SamplingConfig, bf: BudgetForcing | None,
               cache_len: int, newline_mask: jax.Array, num_rows: int | None = None) -> DecodeState:
  """The one constructor: prefills `tokens` [B, P] once and repeats each prompt's rows `cfg.n`
  times into B * n slots holding rows 0 .. B*n - 1; result buffers for `num_rows` rows (default B*n)."""
  b = tokens.shape[0]
  cache, logits, next_pos = _prefill(model, tokens, mask, cache_len)
  last_nl = newline_mask[tokens[:, -1]]  # prompts are left-padded: the last column is real
  if cfg.n > 1:  # share the prefill across the n samples of each prompt
    rep = functools.partial(jnp.repeat, repeats=cfg.n, total_repeat_length=b * cfg.n)
    cache = KVCache(k=rep(cache.k, axis=1), v=rep(cache.v, axis=1), positions=rep(cache.positions, axis=0),
                    segments=rep(cache.segments, axis=0), index=cache.index)
    logits, next_pos, last_nl = rep(logits, axis=0), rep(next_pos, axis=0), rep(last_nl, axis=0)
    b = b * cfg.n
  num_rows = b if num_rows is None else num_rows
  w = max([1] + [len(s) for s in cfg.stop_sequences])
  zeros = lambda dtype=jnp.int32: jnp.zeros((b,), dtype)
  return DecodeState(
      step=jnp.zeros((), jnp.int32), rng=rng, cache=cache, logits=logits, position=next_pos, length=zeros(),
      done=zeros(bool), finish=zeros(), window=jnp.full((b, w), -1, jnp.int32),
      row=jnp.arange(b, dtype=jnp.int32), row_offset=jnp.zeros((), jnp.int32),
      budget=budget_lib.init(b, bf, last_nl),
      out=Outputs.init(num_rows, cfg.max_new_tokens, cfg.pad_token_id), stats=RowStats.init(num_rows))


def _write(out: Outputs, rows, length, token, logp, injected) -> Outputs:
  """Writes this step's token (and its log-prob, entropy, injected flag) at [row, length]
  (rows out of range, i.e. inactive slots, write nothing)."""
  idx = jnp.minimum(length, out.tokens.shape[1] - 1)
  put = lambda buf, val: buf.at[rows, idx].set(val, mode="drop")
  slots = jnp.arange(token.shape[0])
  return Outputs(tokens=put(out.tokens, token), logprobs=put(out.logprobs, logp[slots, token]),
                 entropies=put(out.entropies, strategies.entropy(logp)), injected=put(out.injected, injected))


def _stop(token, window, model_token, length, answer_tokens, phase, active, cfg: SamplingConfig,
          bf: BudgetForcing | None):
  """[B] Finish code for rows that end at this step (RUNNING for the others)."""
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
  return jnp.where(stop, Finish.STOP, jnp.where(answer_cap, Finish.ANSWER_LENGTH,
                                                jnp.where(length_cap, Finish.LENGTH, Finish.RUNNING)))


def _step(model: Transformer, s: DecodeState, cfg: SamplingConfig, bf: BudgetForcing | None,
          newline_mask: jax.Array, prompt_len: int | None = None) -> DecodeState:
  """choose -> force -> write -> stop -> forward, for every slot.

  `prompt_len` None: the dense layout (all rows write the cache at one shared index). Else
  continuous batching: a slot's row writes at prompt_len + its length (free slots write nothing).
  """
  active = ~s.done
  n_rows = s.stats.length.shape[0]
  rows = jnp.where(active, s.row, n_rows)
  keys = jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(s.rng, r), t))(s.row + s.row_offset, s.length)
  proposal, logp = strategies.choose_rows(s.logits, keys, cfg)
  f = budget_lib.force(s.budget, proposal, active, bf)
  token = f.token

  out = _write(s.out, rows, s.length, token, logp, f.injected)
  length = s.length + active
  window = jnp.where(active[:, None], jnp.concatenate([s.window[:, 1:], token[:, None]], axis=1), s.window)
  bud = dataclasses.replace(f.state, last_nl=jnp.where(active, newline_mask[token], f.state.last_nl))

  ended = _stop(token, window, active & ~f.injected, length, bud.answer_tokens, bud.phase, active, cfg, bf)
  finish = jnp.where(ended != Finish.RUNNING, ended, s.finish)
  done = s.done | (ended != Finish.RUNNING)
  put = lambda buf, val: buf.at[rows].set(val, mode="drop")
  stats = RowStats(length=put(s.stats.length, length), finish=put(s.stats.finish, finish),
                   think_total=put(s.stats.think_total, bud.think_total),
                   answer_tokens=put(s.stats.answer_tokens, bud.answer_tokens), waits=put(s.stats.waits, bud.waits),
                   forced=put(s.stats.forced, bud.forced))

  cache = s.cache
  if prompt_len is not None:
    cache = dataclasses.replace(cache, index=jnp.where(active, prompt_len + s.length, cache.length))
  logits, cache = model(token[:, None], s.position[:, None], active[:, None].astype(jnp.int32), cache=cache)
  return DecodeState(step=s.step + 1, rng=s.rng, cache=cache, logits=logits[:, 0], position=s.position + active,
                     length=length, done=done, finish=finish, window=window, row=s.row, row_offset=s.row_offset,
                     budget=bud, out=out,
                     stats=stats)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "bf", "cache_len"))
def _generate(state, tokens, mask, rng, newline_mask, row_offset, *, graphdef, cfg, bf, cache_len) -> DecodeState:
  """The dense sampler: every prompt in its own slots, decoded until the longest row ends."""
  model = nnx.merge(graphdef, state)
  s = init_state(model, tokens, mask, rng, cfg, bf, cache_len, newline_mask)
  s = dataclasses.replace(s, row_offset=row_offset)

  def cond(s):
    return (s.step < cfg.max_new_tokens) & ~jnp.all(s.done)

  def body(s):
    return _step(model, s, cfg, bf, newline_mask)

  return jax.lax.while_loop(cond, body, s)


def _fill_buffer(model: Transformer, tokens, mask, prompt) -> PromptBuffer:
  """Prefills prompt `prompt` (a traced index into tokens [Np, P]) alone."""
  p = tokens.shape[1]
  one = lambda a: jax.lax.dynamic_slice_in_dim(a, prompt, 1, axis=0)
  cache, logits, next_pos = _prefill(model, one(tokens), one(mask), p)
  return PromptBuffer(k=cache.k, v=cache.v, positions=cache.positions, segments=cache.segments, logits=logits,
                      next_pos=next_pos, prompt=prompt)


def _insert(model: Transformer, e: EngineState, tokens, mask, cfg: SamplingConfig, bf: BudgetForcing | None,
            newline_mask: jax.Array) -> EngineState:
  """Puts the next pending row into the first free slot (prefilling its prompt unless buffered)."""
  s, r = e.decode, e.next_row
  prompt = r // cfg.n
  buf = jax.lax.cond(prompt != e.buffer.prompt, lambda: _fill_buffer(model, tokens, mask, prompt),
                     lambda: e.buffer)
  slot = jnp.argmax(s.done).astype(jnp.int32)
  c = s.cache
  pad = jnp.zeros((1, c.positions.shape[1] - buf.positions.shape[1]), jnp.int32)
  put5 = lambda a, b: jax.lax.dynamic_update_slice(a, b.astype(a.dtype), (0, slot, 0, 0, 0))
  put2 = lambda a, b: jax.lax.dynamic_update_slice(a, jnp.concatenate([b, pad], axis=1), (slot, 0))
  cache = KVCache(k=put5(c.k, buf.k), v=put5(c.v, buf.v), positions=put2(c.positions, buf.positions),
                  segments=put2(c.segments, buf.segments), index=c.index)
  last_nl = newline_mask[tokens[prompt, -1]][None]
  fresh = budget_lib.init(1, bf, last_nl)
  at = lambda a, val: a.at[slot].set(val)
  s = dataclasses.replace(
      s, cache=cache, logits=at(s.logits, buf.logits[0]), position=at(s.position, buf.next_pos[0]),
      length=at(s.length, 0), done=at(s.done, False), finish=at(s.finish, Finish.RUNNING),
      window=at(s.window, -1), row=at(s.row, r),
      budget=jax.tree.map(lambda a, f: a.at[slot].set(f[0]), s.budget, fresh))
  return dataclasses.replace(e, decode=s, next_row=r + 1, buffer=buf, inserted=e.inserted + 1)


def _engine_loop(model: Transformer, e: EngineState, tokens, mask, cfg: SamplingConfig, bf: BudgetForcing | None,
                 newline_mask: jax.Array, shrink_at: int) -> EngineState:
  """Decodes (refilling free slots from the queue) until every row is done or, with `shrink_at` > 0,
  until the queue is empty and at most `shrink_at` slots are live (the caller then compacts)."""
  num_rows = tokens.shape[0] * cfg.n

  def refill(e):
    can = lambda e: jnp.any(e.decode.done) & (e.next_row < num_rows)
    return jax.lax.while_loop(can, lambda e: _insert(model, e, tokens, mask, cfg, bf, newline_mask), e)

  def cond(e):
    pending = e.next_row < num_rows
    go = ~jnp.all(e.decode.done) | pending
    if shrink_at:
      go = go & (pending | (jnp.sum(~e.decode.done) > shrink_at))
    return go

  def body(e):
    e = refill(e)
    return dataclasses.replace(e, decode=_step(model, e.decode, cfg, bf, newline_mask, prompt_len=tokens.shape[1]))

  e = jax.lax.while_loop(cond, body, e)
  return dataclasses.replace(e, live=jnp.sum(~e.decode.done).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "bf", "cache_len", "slots", "shrink_at"))
def _generate_continuous(state, tokens, mask, rng, newline_mask, row_offset, *, graphdef, cfg, bf, cache_len,
                         slots, shrink_at=0) -> EngineState:
  """Continuous batching: `slots` decode slots over the queue of all prompts' n samples.

  The first slots // n prompts are prefilled together; whenever slots are free at the top of an
  iteration, pending rows are inserted (a prompt is prefilled once, into `PromptBuffer`, and
  copied into a slot for each of its samples), all inside the one jitted while loop. With
  `shrink_at` the loop stops early for `_compact` (see `_engine_loop`).
  """
  model = nnx.merge(graphdef, state)
  num_prompts, p = tokens.shape
  num_rows = num_prompts * cfg.n
  first = slots // cfg.n
  s = init_state(model, tokens[:first], mask[:first], rng, cfg, bf, cache_len, newline_mask, num_rows=num_rows)
  s = dataclasses.replace(s, cache=dataclasses.replace(s.cache, index=jnp.full((slots,), p, jnp.int32)),
                          row_offset=row_offset)
  c = model.cfg
  kl, h = (c.num_layers, 1, c.num_kv_heads), c.resolved_head_dim
  empty = PromptBuffer(k=jnp.zeros(kl + (h, p), s.cache.k.dtype), v=jnp.zeros(kl + (p, h), s.cache.v.dtype),
                       positions=jnp.zeros((1, p), jnp.int32), segments=jnp.zeros((1, p), jnp.int32),
                       logits=jnp.zeros((1, s.logits.shape[1]), s.logits.dtype), next_pos=jnp.zeros((1,), jnp.int32),
                       prompt=jnp.asarray(-1, jnp.int32))
  zero = jnp.zeros((), jnp.int32)
  e = EngineState(decode=s, next_row=jnp.asarray(slots, jnp.int32), buffer=empty, inserted=zero, live=zero)
  return _engine_loop(model, e, tokens, mask, cfg, bf, newline_mask, shrink_at)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "bf", "prompt_len", "shrink_at"))
def _resume_tail(state, e: EngineState, newline_mask, *, graphdef, cfg, bf, prompt_len: int,
                 shrink_at=0) -> EngineState:
  """`_generate_continuous`'s loop continued from `e` (after `_compact`) once the queue is empty: the
  same decode steps, without the refill and its prefill (nothing is pending: the loop only stops to
  shrink when no row is), so this program compiles like the dense sampler's, not like the engine's."""
  model = nnx.merge(graphdef, state)

  def cond(e):
    live = jnp.sum(~e.decode.done)
    return (live > shrink_at) if shrink_at else (live > 0)

  def body(e):
    return dataclasses.replace(e, decode=_step(model, e.decode, cfg, bf, newline_mask, prompt_len=prompt_len))

  e = jax.lax.while_loop(cond, body, e)
  return dataclasses.replace(e, live=jnp.sum(~e.decode.done).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("slots",))
def _compact(e: EngineState, *, slots: int) -> EngineState:
  """The live slots (at most `slots`) moved, in slot order, into a state of `slots` slots; free slots
  fill the rest. Per-row results are indexed by row, so they do not move."""
  s = e.decode
  keep = jnp.argsort(s.done, stable=True)[:slots]  # live slots first
  take = lambda a, axis=0: jnp.take(a, keep, axis=axis)
  c = s.cache
  cache = KVCache(k=take(c.k, 1), v=take(c.v, 1), positions=take(c.positions), segments=take(c.segments),
                  index=take(c.index))
  s = dataclasses.replace(s, cache=cache, logits=take(s.logits), position=take(s.position), length=take(s.length),
                          done=take(s.done), finish=take(s.finish), window=take(s.window), row=take(s.row),
                          budget=jax.tree.map(take, s.budget))
  return dataclasses.replace(e, decode=s)


def num_slots(num_prompts: int, n: int, slots: int | None = None) -> int:
  """Decode slots for continuous batching: `slots` (default DEFAULT_SLOTS), a multiple of n, at most
  every row (a batch that fits runs in one wave, as the dense sampler would)."""
  return max(n, min(slots or DEFAULT_SLOTS, num_prompts * n) // n * n)


def _shrink_at(slots: int, min_slots: int) -> int:
  """The live count at which a loop over `slots` slots stops to halve them (0: never)."""
  return slots // 2 if slots // 2 >= max(min_slots, 1) else 0


def _scalar(x) -> int:
  return int(np.asarray(x.addressable_data(0)))  # a replicated scalar


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


def _fetch(s: DecodeState) -> types.SimpleNamespace:
  """The result fields on the host (not the KV cache); gathered from every process when the sampler
  runs on a multi-host mesh (not when its weights, and so its program, are process-local)."""
  out = dict(tokens=s.out.tokens, logprobs=s.out.logprobs, entropies=s.out.entropies, injected=s.out.injected,
             length=s.stats.length, finish=s.stats.finish, think_total=s.stats.think_total,
             answer_tokens=s.stats.answer_tokens, waits=s.stats.waits, forced=s.stats.forced)
  if not all(x.is_fully_addressable for x in out.values()):
    from jax.experimental import multihost_utils
    out = multihost_utils.process_allgather(out, tiled=True)
  else:
    out = jax.device_get(out)
  out["steps"] = s.step.addressable_data(0)  # replicated scalar
  return types.SimpleNamespace(**{k: np.asarray(v) for k, v in out.items()})


class Sampler:
  """Generates from a model. `generate(prompts, cfg, budget)` takes token-id prompts.

  Decoding reads every weight once per step, so weights are held in the model's compute dtype
  (`cfg.dtype`): with fp32 master weights and bf16 compute the sampler keeps a bf16 copy (half the
  memory traffic); with fp32 compute it uses the model's arrays as they are, without a copy.
  """

  engine = "continuous"
  slots: int | None = None
  min_slots: int = MIN_SLOTS

  def __init__(self, model: Transformer, newline_mask: np.ndarray | None = None, *, engine: str = "continuous",
               slots: int | None = None, min_slots: int = MIN_SLOTS):
    self.engine, self.slots, self.min_slots = engine, slots, min_slots
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
               budget: BudgetForcing | None = None, seed: int | jax.Array = 0, *,
               engine: str | None = None, slots: int | None = None, min_slots: int | None = None) -> SamplingOutput:
    """Samples `cfg.n` completions per prompt (token ids); results in prompt order. Row r's
    tokens depend only on (seed, r, the weights), not on the engine or the slot it ran in."""
    return self.generate_padded(prompts, cfg, budget, seed, engine=engine, slots=slots,
                                min_slots=min_slots).to_output()

  def generate_padded(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
                      budget: BudgetForcing | None = None, seed: int | jax.Array = 0, *,
                      engine: str | None = None, slots: int | None = None, min_slots: int | None = None,
                      row_offset: int = 0) -> SampleBatch:
    """`generate` with the results as padded arrays plus lengths, and the engine's metrics.

    engine: "continuous" (default, `self.engine`) or "dense"; slots: decode slots for continuous
    batching (default `self.slots`, else DEFAULT_SLOTS; rounded to a multiple of n); min_slots: the
    fewest slots the tail of a continuous batch shrinks to (default `self.min_slots`, MIN_SLOTS; a
    value >= slots never shrinks); row_offset:
    these prompts' first row in a larger batch (rows draw their random numbers as they would there;
    `jaxreason.sampling.distributed` uses it).
    """
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
    engine = engine or self.engine
    n = len(prompts) * cfg.n
    offset = jnp.asarray(row_offset, jnp.int32)
    t0 = time.perf_counter()
    if engine == "dense":
      slots = n
      s = _generate(self.state, jnp.asarray(tokens), jnp.asarray(mask), rng, self.newline_mask, offset,
                    graphdef=self.graphdef, cfg=cfg, bf=budget, cache_len=p + cfg.max_new_tokens)
      inserted = 0
    elif engine == "continuous":
      slots = self.num_slots(len(prompts), cfg.n, slots)
      e, slot_steps, levels = self._continuous(tokens, mask, rng, offset, cfg, budget, slots,
                                               self.min_slots if min_slots is None else min_slots)
      s, inserted = e.decode, _scalar(e.inserted)
    else:
      raise ValueError(f"generate: engine must be 'continuous' or 'dense', got {engine!r}")
    s = _fetch(s)
    seconds = time.perf_counter() - t0
    useful, steps = int(s.length.sum()), int(s.steps)
    if engine == "dense":
      slot_steps, levels = steps * slots, [slots]
    metrics = dict(engine=engine, slots=slots, decode_steps=steps, slot_steps=slot_steps, slot_levels=levels,
                   tokens=useful, seconds=seconds, tokens_per_s=useful / max(seconds, 1e-9), inserted=inserted,
                   slot_occupancy=useful / max(slot_steps, 1), padding_waste=1 - useful / max(slot_steps, 1),
                   longest=int(s.length.max()))
    return SampleBatch(
        tokens=s.tokens, logprobs=s.logprobs, entropies=s.entropies, injected=s.injected, length=s.length,
        finish=s.finish, thinking_tokens=s.think_total if budget is not None else np.zeros((n,), np.int32),
        answer_tokens=s.answer_tokens, waits=s.waits, forced_end=s.forced,
        prompt_index=np.repeat(np.arange(len(prompts)), cfg.n), metrics=metrics)

  def _continuous(self, tokens, mask, rng, offset, cfg, budget, slots: int, min_slots: int):
    """Continuous batching over `slots` slots, halving them (`_compact`) whenever the queue is
    empty and the live rows fit in half, down to `min_slots`: the long tail of lengths then runs
    in fewer slots instead of mostly empty ones (one host round trip per halving). Returns the
    final state, the slot-steps run (sum over levels of steps x slots) and the slot counts used."""
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    kw = dict(graphdef=self.graphdef, cfg=cfg, bf=budget)
    e = _generate_continuous(self.state, tokens, mask, rng, self.newline_mask, offset, cache_len=mask.shape[1] +
                             cfg.max_new_tokens, slots=slots, shrink_at=_shrink_at(slots, min_slots), **kw)
    levels, slot_steps, before = [slots], 0, 0
    while True:
      step, live = _scalar(e.decode.step), _scalar(e.live)
      slot_steps, before = slot_steps + (step - before) * levels[-1], step
      if live == 0:
        return e, slot_steps, levels
      new = levels[-1] // 2
      while live <= _shrink_at(new, min_slots):  # halve again while the live rows fit
        new //= 2
      levels.append(new)
      e = _compact(e, slots=new)
      e = _resume_tail(self.state, e, self.newline_mask, prompt_len=tokens.shape[1],
                       shrink_at=_shrink_at(new, min_slots), **kw)

  def num_slots(self, num_prompts: int, n: int, slots: int | None = None) -> int:
    """`num_slots` with `slots` defaulting to `self.slots`."""
    return num_slots(num_prompts, n, slots or self.slots)
