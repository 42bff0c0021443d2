"""Sampling and budget-forcing settings (static under jit: frozen, hashable)."""

from __future__ import annotations

import dataclasses
import enum


class Finish(enum.IntEnum):
  """Why a row ended (the codes the decode loop stores; `FINISH_REASONS[code]` is the name)."""

  RUNNING = 0
  STOP = 1           # a stop token or stop sequence
  LENGTH = 2         # max_new_tokens
  ANSWER_LENGTH = 3  # budget forcing's max_answer_tokens


FINISH_REASONS = tuple(f.name.lower() for f in Finish)  # ("running", "stop", "length", "answer_length")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are chosen and when a row stops.

  temperature 0 is greedy. top_k 0 and top_p 1.0 and min_p 0.0 disable those filters. Returned
  log-probs are log-softmax(logits / temperature) at the chosen token (raw logits when greedy),
  before top-k/top-p/min-p filtering, which is what GRPO's importance ratio needs.
  """

  max_new_tokens: int = 256
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  stop_token_ids: tuple[int, ...] = ()
  stop_sequences: tuple[tuple[int, ...], ...] = ()  # multi-token stops, e.g. the ids of "</answer>"
  n: int = 1  # samples per prompt; the prompt is prefilled once and its cache shared
  pad_token_id: int = 0

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.n < 1:
      raise ValueError(f"n must be >= 1, got {self.n}")
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
    object.__setattr__(self, "stop_sequences", tuple(tuple(int(t) for t in s) for s in self.stop_sequences if s))


@dataclasses.dataclass(frozen=True)
class BudgetForcing:
  """s1 budget forcing (SPEC §3), run inside the decode loop as per-row state.

  The prompt ends inside the thinking phase (e.g. with `<|im_start|>think\\n`). Each step, for a
  row that is thinking and has nothing queued to inject:
    1. if it has generated `max_thinking_tokens` thinking tokens, thinking is forced to end: the
       queue receives [`newline_ids` if the last token does not end a line] + `end_ids` +
       `forced_suffix_ids` (s1: "\\n" + "<|im_start|>answer" + "\\nFinal Answer:") and the row
       enters the answer phase;
    2. else if the model proposes `trigger_id` (the first token of the end delimiter; s1 stops on
       `<|im_start|>`): if fewer than `num_waits` extensions were used, or fewer than
       `min_thinking_tokens` thinking tokens exist, the token is dropped and `wait_ids` ("Wait")
       is injected instead; otherwise the trigger is emitted and the row enters the answer phase
       (the model writes the rest of the delimiter itself);
    3. else the proposal is emitted and counts as a thinking token.
  The budget counts model-generated thinking tokens (as s1's multi-call loop does: injected
  "Wait" strings are prompt text there); the reported `thinking_tokens` counts every token of
  the thinking phase, injected ones included. In the answer phase the row runs until a stop
  token/sequence or `max_answer_tokens` model tokens. A stop token (end of turn) emitted while
  thinking ends the row without an answer; `max_new_tokens` caps the whole output.
  """

  trigger_id: int
  end_ids: tuple[int, ...]
  wait_ids: tuple[int, ...]
  forced_suffix_ids: tuple[int, ...] = ()
  newline_ids: tuple[int, ...] = ()
  max_thinking_tokens: int | None = None
  min_thinking_tokens: int = 0
  num_waits: int = 0
  max_answer_tokens: int | None = None

  def __post_init__(self):
    if not self.end_ids or self.end_ids[0] != self.trigger_id:
      raise ValueError("BudgetForcing: end_ids must start with trigger_id (the delimiter's first token)")
    if self.num_waits > 0 or self.min_thinking_tokens > 0:
      if not self.wait_ids:
        raise ValueError("BudgetForcing: wait_ids must not be empty when num_waits or min_thinking_tokens is set")
    for name in ("end_ids", "wait_ids", "forced_suffix_ids", "newline_ids"):
      object.__setattr__(self, name, tuple(int(t) for t in getattr(self, name)))
