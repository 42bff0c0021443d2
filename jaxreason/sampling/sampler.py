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
class DecodeState:
  """The while-loop carry: one row per sample."""

  step: jax.Array       # [] iterations so far
  rng: jax.Array
  cache: KVCache
  logits: jax.Array     # [B, V] float32, for the next token
  position: jax.Array   # [B] position of the next token
  length: jax.Array     # [B] tokens emitted
  done: jax.Array       # [B] bool
  finish: jax.Array     # [B] a `Finish` code
  window: jax.Array     # [B, W] last W emitted tokens (stop sequences)
  budget: budget_lib.BudgetState
  out: Outputs


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
  padded: "SampleBatch | None" = None
  metrics: dict = dataclasses.field(default_factory=dict)


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
    return SamplingOutput(
        tokens=[t.tolist() for t in cut(self.tokens)], logprobs=cut(self.logprobs), entropies=cut(self.entropies),
        injected=cut(self.injected), finish_reason=[FINISH_REASONS[int(f)] for f in self.finish],
        thinking_tokens=self.thinking_tokens, answer_tokens=self.answer_tokens, waits=self.waits,
        forced_end=self.forced_end, truncated=self.truncated, prompt_index=self.prompt_index, padded=self,
        metrics=self.metrics)


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
               cache_len: int, newline_mask: jax.Array) -> DecodeState:
  """The one constructor: prefills the prompts once and repeats each prompt's rows `cfg.n` times."""
  b = tokens.shape[0]
  cache, logits, next_pos = _prefill(model, tokens, mask, cache_len)
  last_nl = newline_mask[tokens[:, -1]]  # prompts are left-padded: the last column is real
  if cfg.n > 1:  # share the prefill across the n samples of each prompt
    rep = functools.partial(jnp.repeat, repeats=cfg.n, total_repeat_length=b * cfg.n)
    cache = KVCache(k=rep(cache.k, axis=1), v=rep(cache.v, axis=1), positions=rep(cache.positions, axis=0),
                    segments=rep(cache.segments, axis=0), index=cache.index)
    logits, next_pos, last_nl = rep(logits, axis=0), rep(next_pos, axis=0), rep(last_nl, axis=0)
    b = b * cfg.n
  w = max([1] + [len(s) for s in cfg.stop_sequences])
  zeros = lambda dtype=jnp.int32: jnp.zeros((b,), dtype)
  return DecodeState(
      step=jnp.zeros((), jnp.int32), rng=rng, cache=cache, logits=logits, position=next_pos, length=zeros(),
      done=zeros(bool), finish=zeros(), window=jnp.full((b, w), -1, jnp.int32),
      budget=budget_lib.init(b, bf, last_nl), out=Outputs.init(b, cfg.max_new_tokens, cfg.pad_token_id))


def _write(out: Outputs, length, active, token, logp, injected) -> Outputs:
  """Writes this step's token (and its log-prob, entropy, injected flag) at each active row's length."""
  rows = jnp.arange(length.shape[0])
  idx = jnp.minimum(length, out.tokens.shape[1] - 1)
  put = lambda buf, val: buf.at[rows, idx].set(jnp.where(active, val, buf[rows, idx]))
  return Outputs(tokens=put(out.tokens, token), logprobs=put(out.logprobs, logp[rows, token]),
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
          newline_mask: jax.Array) -> DecodeState:
  """choose -> force -> write -> stop -> forward."""
  active = ~s.done
  rng, sub = jax.random.split(s.rng)
  proposal, logp = strategies.choose(s.logits, sub, cfg)
  f = budget_lib.force(s.budget, proposal, active, bf)
  token = f.token

  out = _write(s.out, s.length, active, token, logp, f.injected)
  length = s.length + active
  window = jnp.where(active[:, None], jnp.concatenate([s.window[:, 1:], token[:, None]], axis=1), s.window)
  bud = dataclasses.replace(f.state, last_nl=jnp.where(active, newline_mask[token], f.state.last_nl))

  ended = _stop(token, window, active & ~f.injected, length, bud.answer_tokens, bud.phase, active, cfg, bf)
  finish = jnp.where(ended != Finish.RUNNING, ended, s.finish)
  done = s.done | (ended != Finish.RUNNING)

  logits, cache = model(token[:, None], s.position[:, None], active[:, None].astype(jnp.int32), cache=s.cache)
  return DecodeState(step=s.step + 1, rng=rng, cache=cache, logits=logits[:, 0], position=s.position + active,
                     length=length, done=done, finish=finish, window=window, budget=bud, out=out)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "bf", "cache_len"))
def _generate(state, tokens, mask, rng, newline_mask, *, graphdef, cfg, bf, cache_len) -> DecodeState:
  model = nnx.merge(graphdef, state)
  s = init_state(model, tokens, mask, rng, cfg, bf, cache_len, newline_mask)

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


def _fetch(s: DecodeState) -> types.SimpleNamespace:
  """The result fields on the host (not the KV cache); gathered from every process on multi-host meshes."""
  out = dict(tokens=s.out.tokens, logprobs=s.out.logprobs, entropies=s.out.entropies, injected=s.out.injected,
             length=s.length, finish=s.finish, think_total=s.budget.think_total,
             answer_tokens=s.budget.answer_tokens, waits=s.budget.waits, forced=s.budget.forced)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    out = multihost_utils.process_allgather(out, tiled=True)
  else:
    out = jax.device_get(out)
  return types.SimpleNamespace(**{k: np.asarray(v) for k, v in out.items()})


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
    """Samples `cfg.n` completions per prompt (token ids); results in prompt order."""
    return self.generate_padded(prompts, cfg, budget, seed).to_output()

  def generate_padded(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
                      budget: BudgetForcing | None = None, seed: int | jax.Array = 0) -> SampleBatch:
    """`generate` with the results as padded arrays plus lengths."""
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
    return SampleBatch(
        tokens=s.tokens, logprobs=s.logprobs, entropies=s.entropies, injected=s.injected, length=s.length,
        finish=s.finish, thinking_tokens=s.think_total if budget is not None else np.zeros((n,), np.int32),
        answer_tokens=s.answer_tokens, waits=s.waits, forced_end=s.forced,
        prompt_index=np.repeat(np.arange(len(prompts)), cfg.n))
