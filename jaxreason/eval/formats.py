"""How each prompt format thinks and answers at evaluation time.

For formats with a thinking phase the generation prompt is the format's prompt plus the thinking
opener (s1: `<|im_start|>think\\n`, think: `<think>\\n`; r1_zero's prompt already ends in
`<think>`), and budget forcing uses the format's end-of-thinking delimiter. Formats without a
thinking phase (boxed, chat, raw) are evaluated without budget forcing.
"""

from __future__ import annotations

import dataclasses

from jaxreason.data import formats as fmt
from jaxreason.sampling import BudgetForcing


@dataclasses.dataclass(frozen=True)
class EvalFormat:
  name: str
  think_open: str | None  # appended to the prompt to start thinking (None: no thinking phase)
  think_end: str | None   # end-of-thinking delimiter forced by the budget
  forced_suffix: str      # appended after a forced end (s1: "\nFinal Answer:")
  reward: str             # default reward function
  extract: str            # answer extraction mode (for maj@k and the per-sample answer)


EVAL_FORMATS = {
    "s1": EvalFormat("s1", fmt.S1_THINK_START, fmt.S1_THINK_END, "\nFinal Answer:", "s1_answer", "s1"),
    "think": EvalFormat("think", "<think>\n", "</think>\n<answer>\n", "", "think_answer", "r1_zero"),
    "r1_zero": EvalFormat("r1_zero", "", " </think> <answer>", "", "r1_zero", "r1_zero"),
    "boxed": EvalFormat("boxed", None, None, "", "boxed", "boxed"),
    "chat": EvalFormat("chat", None, None, "", "simplerl_v1", "simplerl"),
    "raw": EvalFormat("raw", None, None, "", "simplerl_v1", "simplerl"),
}


def generation_prompt(name: str, question: str | None, prompt: str | None, tokenizer) -> str:
  """The text the model continues from."""
  ef = EVAL_FORMATS[name]
  if name == "raw" or (prompt is not None and question is None):
    text = prompt if prompt is not None else question
  else:
    text = fmt.get_format(name).prompt(question, tokenizer)
  return text + (ef.think_open or "")


def budget_forcing(name: str, tokenizer, max_thinking_tokens: int | None, num_waits: int,
                   wait: str = "Wait", min_thinking_tokens: int = 0,
                   max_answer_tokens: int | None = None) -> BudgetForcing | None:
  ef = EVAL_FORMATS[name]
  if ef.think_end is None:
    return None
  ids = lambda s: tokenizer.encode(s, add_special_tokens=False) if s else []
  end_ids = ids(ef.think_end)
  return BudgetForcing(
      trigger_id=end_ids[0], end_ids=tuple(end_ids), wait_ids=tuple(ids(wait)),
      forced_suffix_ids=tuple(ids(ef.forced_suffix)), newline_ids=tuple(ids("\n")),
      max_thinking_tokens=max_thinking_tokens, min_thinking_tokens=min_thinking_tokens,
      num_waits=num_waits, max_answer_tokens=max_answer_tokens)
