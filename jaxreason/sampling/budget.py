"""s1 budget forcing as a pure per-row function: `force(state, proposal, active, bf) -> Forced`.

The rules are `BudgetForcing`'s docstring (SPEC §3). `BudgetState` is the per-row sub-state the
decode loop carries; `force` decides, for one step, which token each row writes (the model's
proposal, the next queued injection, or the first token of a new injection), and returns the
updated sub-state. It touches nothing else of the loop (no cache, no buffers), so it can be
tested and read on its own.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxreason.sampling.config import BudgetForcing


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BudgetState:
  phase: jax.Array          # [B] 0 thinking, 1 answer (always 1 without budget forcing)
  think_gen: jax.Array      # [B] model-generated thinking tokens (the budget)
  think_total: jax.Array    # [B] all thinking-phase tokens (reported)
  answer_tokens: jax.Array  # [B] model-generated answer tokens
  waits: jax.Array          # [B] extensions used
  forced: jax.Array         # [B] bool: thinking was cut by the budget
  last_nl: jax.Array        # [B] bool: the last token (prompt or emitted) ends with a newline
  queue: jax.Array          # [B, Q] tokens to inject
  queue_len: jax.Array      # [B]
  queue_pos: jax.Array      # [B]


class Forced(NamedTuple):
  token: jax.Array      # [B] int32 the token each row writes
  injected: jax.Array   # [B] bool: written by budget forcing, not chosen by the model
  natural_end: jax.Array  # [B] bool: the model ended thinking itself (trigger emitted)
  state: BudgetState


def queue_width(bf: BudgetForcing | None) -> int:
  if bf is None:
    return 1
  return max(1, len(bf.wait_ids), len(bf.newline_ids + bf.end_ids + bf.forced_suffix_ids))


def init(batch: int, bf: BudgetForcing | None, last_nl: jax.Array) -> BudgetState:
  """Fresh rows: thinking when budget forcing is on (the prompt ends inside the thinking phase)."""
  zeros = lambda dtype=jnp.int32: jnp.zeros((batch,), dtype)
  return BudgetState(
      phase=zeros() if bf is not None else jnp.ones((batch,), jnp.int32),
      think_gen=zeros(), think_total=zeros(), answer_tokens=zeros(), waits=zeros(), forced=zeros(bool),
      last_nl=last_nl, queue=jnp.zeros((batch, queue_width(bf)), jnp.int32), queue_len=zeros(),
      queue_pos=zeros())


def _pad(seq: Sequence[int], q: int) -> np.ndarray:
  out = np.zeros((q,), np.int32)
  out[: len(seq)] = seq
  return out


def force(s: BudgetState, proposal: jax.Array, active: jax.Array, bf: BudgetForcing | None) -> Forced:
  """One step of budget forcing for rows that are `active`; `proposal` [B] is the model's choice.

  Order: a queued injection goes first; else a thinking row at its budget starts the forced end;
  else a proposed trigger starts a "Wait" (while extensions or the minimum remain) or ends thinking.
  Counters: the budget counts model-generated thinking tokens; `think_total` every thinking-phase
  token; `answer_tokens` model-generated answer tokens.
  """
  queued = active & (s.queue_pos < s.queue_len)
  queued_tok = jnp.take_along_axis(s.queue, jnp.minimum(s.queue_pos, s.queue.shape[1] - 1)[:, None], axis=1)[:, 0]
  token = jnp.where(queued, queued_tok, proposal)
  injected = queued
  queue_pos = jnp.where(queued, s.queue_pos + 1, s.queue_pos)
  if bf is None:
    answer_tokens = s.answer_tokens + (active & ~injected)
    return Forced(token, injected, jnp.zeros_like(active),
                  dataclasses.replace(s, answer_tokens=answer_tokens, queue_pos=queue_pos))

  qn = s.queue.shape[1]
  forced_seq = jnp.asarray(_pad(bf.end_ids + bf.forced_suffix_ids, qn))
  forced_nl_seq = jnp.asarray(_pad(bf.newline_ids + bf.end_ids + bf.forced_suffix_ids, qn))
  wait_seq = jnp.asarray(_pad(bf.wait_ids, qn))
  thinking = active & (s.phase == 0) & ~queued
  if bf.max_thinking_tokens is not None:
    budget_hit = thinking & (s.think_gen >= bf.max_thinking_tokens)
  else:
    budget_hit = jnp.zeros_like(thinking)
  trigger = thinking & ~budget_hit & (proposal == bf.trigger_id)
  want_wait = trigger & ((s.waits < bf.num_waits) | (s.think_gen < bf.min_thinking_tokens))
  natural_end = trigger & ~want_wait
  add_nl = ~s.last_nl & (len(bf.newline_ids) > 0)
  new_queue = jnp.where(budget_hit[:, None], jnp.where(add_nl[:, None], forced_nl_seq, forced_seq), wait_seq)
  new_len = jnp.where(budget_hit,
                      jnp.where(add_nl, len(bf.newline_ids), 0) + len(bf.end_ids) + len(bf.forced_suffix_ids),
                      len(bf.wait_ids))
  start = budget_hit | want_wait
  token = jnp.where(start, new_queue[:, 0], token)
  injected = injected | start
  phase = jnp.where(budget_hit | natural_end, 1, s.phase)
  answer_now = active & (s.phase == 1) & ~injected
  return Forced(token, injected, natural_end, BudgetState(
      phase=phase,
      think_gen=s.think_gen + (thinking & ~budget_hit & ~trigger),
      think_total=s.think_total + (active & (s.phase == 0) & ~budget_hit & ~natural_end),
      answer_tokens=s.answer_tokens + answer_now,
      waits=s.waits + want_wait,
      forced=s.forced | budget_hit,
      last_nl=s.last_nl,
      queue=jnp.where(start[:, None], new_queue, s.queue),
      queue_len=jnp.where(start, new_len, s.queue_len),
      queue_pos=jnp.where(start, 1, queue_pos)))
