"""The one registry of generation formats: prompt, thinking delimiters, forced suffix, default reward.

Used wherever the model generates: evaluation (`python -m jaxreason.eval`, the final eval of a
training run) and training rollouts (GRPO, expert iteration, DPO self-pairs), through
`jaxreason.generation`. The prompt templates themselves are the training data formats of
`jaxreason.data.formats` (so a model is prompted exactly as it was trained); this table adds what
generation needs on top. Pure Python (no JAX).
"""

from __future__ import annotations

import dataclasses

from jaxreason.data import formats as fmt


@dataclasses.dataclass(frozen=True)
class GenerationFormat:
  name: str
  think_open: str | None  # appended to the prompt to start thinking (None: no thinking phase)
  think_end: str | None   # end-of-thinking delimiter forced by the budget
  forced_suffix: str      # appended after a forced end (s1: "\nFinal Answer:")
  reward: str             # default reward function (also the default verifier of "correct")
  extract: str            # answer extraction mode (for maj@k and the per-sample answer)


FORMATS = {
    "s1": GenerationFormat("s1", fmt.S1_THINK_START, fmt.S1_THINK_END, "\nFinal Answer:", "s1_answer", "s1"),
    "think": GenerationFormat("think", "<think>\n", "</think>\n<answer>\n", "", "think_answer", "r1_zero"),
    "r1_zero": GenerationFormat("r1_zero", "", " </think> <answer>", "", "r1_zero", "r1_zero"),
    "boxed": GenerationFormat("boxed", None, None, "", "boxed", "boxed"),
    "chat": GenerationFormat("chat", None, None, "", "simplerl_v1", "simplerl"),
    "raw": GenerationFormat("raw", None, None, "", "simplerl_v1", "simplerl"),
}


def generation_prompt(name: str, question: str | None, prompt: str | None, tokenizer) -> str:
  """The text the model continues from: the format's prompt for `question` (or `prompt` verbatim
  when a row has no question, and always for "raw"), then the thinking opener."""
  ef = FORMATS[name]
  if name == "raw" or (prompt is not None and question is None):
    text = prompt if prompt is not None else question
  else:
    text = fmt.get_format(name).prompt(question, tokenizer)
  return text + (ef.think_open or "")
