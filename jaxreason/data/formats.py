r"""Prompt and response formats of SPEC §1, as pure string functions and a registry by name.

A format turns a question into the prompt string the model is conditioned on, and (thinking,
answer) into the response string it is trained to produce. Chat formats render the prompt with the
tokenizer's chat template (`apply_chat_template(..., add_generation_prompt=True)`); without a
tokenizer, or with one that has no template, they use Qwen2.5-Instruct's template (`qwen_chatml`),
which all these recipes used. A chat response ends with the template's end-of-turn token
(`<|im_end|>` for Qwen), which is trained; the newline the template puts after it is not.

  s1       s1 (Muennighoff et al. 2025). Prompt: chat template, user = question. Response:
           <|im_start|>think\n{thinking}\n<|im_start|>answer\n{answer}<|im_end|>,
           answer = "Answer: {attempt}" unless the attempt contains "Answer:".
  think    MiniMind reasoning distillation. Prompt: chat template. Response:
           <think>\n{thinking}\n</think>\n<answer>\n{answer}\n</answer><|im_end|>
  r1_zero  CS336 assignment 5 R1-Zero prompt (plain text ending "Assistant: <think>"). Response:
           " {thinking} </think> <answer> {answer} </answer>" (no end token)
  boxed    Qwen2.5-Math CoT (SimpleRL): system "Please reason step by step, and put your final
           answer within \boxed{}.", user = question. Response: {response}<|im_end|>
  chat     chat template, user = question. Response: {response}<|im_end|>
  raw      prompt and response as given.

`render_chat` renders a multi-turn conversation and locates every assistant turn in it, so that
all assistant turns (with their end-of-turn tokens) are trained in one forward pass.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_MATH_COT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

# s1 delimiters. Thinking starts after S1_THINK_START; it ends with "\n" + S1_THINK_END + "\n", then the
# answer. Budget forcing cuts thinking by appending S1_THINK_END, and s1 stops on `<|im_start|>`.
S1_THINK_START = "<|im_start|>think\n"
S1_THINK_END = "<|im_start|>answer"
S1_ANSWER_START = "\n<|im_start|>answer\n"

# MiniMind think/answer tags (SPEC §2 up-weights these strings).
THINK_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

R1_ZERO_PROMPT = (
  "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
  "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
  "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
  "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer "
  "here </answer>.\nUser: {question}\nAssistant: <think>"
)

Message = Mapping[str, Any]


# ----------------------------------------------------------------------------------------------
# Chat rendering


def qwen_chatml(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
  """Qwen2.5-Instruct's chat template for plain system/user/assistant messages, in Python.

  Byte-identical to the jinja template (tokenizer.QWEN25_CHAT_TEMPLATE) for messages without tools.
  """
  out = []
  if not messages or messages[0]["role"] != "system":
    out.append(f"{IM_START}system\n{QWEN_DEFAULT_SYSTEM}{IM_END}\n")
  for m in messages:
    if m["role"] not in ("system", "user", "assistant"):
      raise ValueError(f"qwen_chatml renders system/user/assistant messages only, got role {m['role']!r}")
    out.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
  if add_generation_prompt:
    out.append(f"{IM_START}assistant\n")
  return "".join(out)


def apply_chat(messages: Sequence[Message], tokenizer: Any = None, add_generation_prompt: bool = False) -> str:
  """Render `messages` with the tokenizer's chat template, or Qwen2.5's ChatML if it has none."""
  if tokenizer is not None and getattr(tokenizer, "chat_template", None):
    return tokenizer.apply_chat_template(
      [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )
  return qwen_chatml(messages, add_generation_prompt=add_generation_prompt)


def end_of_turn(tokenizer: Any = None) -> str:
  """The string that closes an assistant turn in the tokenizer's chat template (`<|im_end|>` for Qwen)."""
  if tokenizer is None or not getattr(tokenizer, "chat_template", None):
    return IM_END
  marker = "\x00JAXREASON_CONTENT\x00"
  user = [{"role": "user", "content": "q"}]
  prefix = apply_chat(user, tokenizer, add_generation_prompt=True)
  full = apply_chat([*user, {"role": "assistant", "content": marker}], tokenizer)
  if not full.startswith(prefix) or marker not in full:
    raise ValueError(
      "The tokenizer's chat template does not render [user, assistant] as the generation prompt "
      "followed by the assistant text; cannot tell where an assistant turn ends."
    )
  eot = full[full.index(marker) + len(marker) :].rstrip("\n")
  return eot or (getattr(tokenizer, "eos_token", None) or "")


@dataclasses.dataclass(frozen=True)
class ChatRender:
  """A rendered conversation: `text`, and the character spans [start, end) of each assistant turn
  (its content plus its end-of-turn token; the `<|im_start|>assistant\\n` header is prompt)."""

  text: str
  assistant_spans: tuple[tuple[int, int], ...]

  def segments(self) -> list[tuple[str, bool]]:
    """The text cut into consecutive (piece, is_assistant) segments."""
    out, pos = [], 0
    for start, end in self.assistant_spans:
      if start > pos:
        out.append((self.text[pos:start], False))
      out.append((self.text[start:end], True))
      pos = end
    if pos < len(self.text):
      out.append((self.text[pos:], False))
    return out


def render_chat(messages: Sequence[Message], tokenizer: Any = None) -> ChatRender:
  """Render a multi-turn conversation and locate every assistant turn in it.

  Each assistant turn i is found by rendering messages[:i] with the generation prompt (the turn
  starts where that ends) and messages[:i+1] (the turn ends after the end-of-turn string that
  follows its content). Needs a template whose renderings of prefixes are prefixes of the whole
  (true for Qwen2.5 and ChatML; not for templates that rewrite earlier turns, e.g. Qwen3's
  removal of past thinking), and raises a clear error otherwise.
  """
  text = apply_chat(messages, tokenizer)
  spans = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    head = apply_chat(messages[:i], tokenizer, add_generation_prompt=True)
    upto = apply_chat(messages[: i + 1], tokenizer)
    content = str(m["content"])
    if not (text.startswith(head) and text.startswith(upto) and upto[len(head) :].startswith(content)):
      raise ValueError(
        f"Message {i} (assistant): the chat template does not render this conversation "
        "turn by turn (an earlier rendering is not a prefix of the full one), so assistant "
        "turns cannot be located. Use a template that does not rewrite past turns."
      )
    after = upto[len(head) + len(content) :]
    end = len(upto) - (len(after) - len(after.rstrip("\n")))
    spans.append((len(head), end))
  return ChatRender(text=text, assistant_spans=tuple(spans))


# ----------------------------------------------------------------------------------------------
# Formats


def _join_thinking(thinking: str | Sequence[str] | None) -> str:
  if thinking is None:
    raise ValueError("this format needs `thinking` (the reasoning trace)")
  return thinking if isinstance(thinking, str) else "\n".join(thinking)


def s1_answer(attempt: str) -> str:
  """s1's answer text: `Answer: {attempt}` unless the attempt already contains `Answer:`."""
  return attempt if "Answer:" in attempt else "Answer: " + attempt


def s1_response(thinking: str | Sequence[str], answer: str, eot: str = IM_END) -> str:
  """s1 assistant turn. As s1's data script: thinking steps joined by newlines, thinking and
  answer stripped, and `Answer: ` prefixed unless present."""
  body = _join_thinking(thinking).strip()
  return f"{S1_THINK_START}{body}{S1_ANSWER_START}{s1_answer(answer).strip()}{eot}"


def think_response(thinking: str | Sequence[str], answer: str, eot: str = IM_END) -> str:
  """MiniMind reasoning-distillation assistant turn: newline-separated think/answer tags."""
  return f"<think>\n{_join_thinking(thinking)}\n</think>\n<answer>\n{answer}\n</answer>{eot}"


def r1_zero_prompt(question: str) -> str:
  """CS336 assignment 5's R1-Zero prompt, ending `Assistant: <think>`."""
  return R1_ZERO_PROMPT.format(question=question)


def r1_zero_response(thinking: str | Sequence[str], answer: str, eot: str = "") -> str:
  """Continuation of the R1-Zero prompt: ` {thinking} </think> <answer> {answer} </answer>`
  (the spacing of the prompt's own example; the reward needs `</think> <answer>` and `</answer>`).
  CS336 trains and samples it without an end-of-sequence token (sampling stops at `</answer>`)."""
  return f" {_join_thinking(thinking)} </think> <answer> {answer} </answer>{eot}"


@dataclasses.dataclass(frozen=True)
class Format:
  """A named prompt/response format. `system`: system message for chat formats (None: the template's
  default); `chat`: prompt via the chat template, response closed by its end-of-turn token."""

  name: str
  recipe: str
  chat: bool
  thinking: bool
  system: str | None = None
  plain_prompt: Callable[[str], str] | None = None
  build_response: Callable[..., str] | None = None  # (thinking, answer, eot) -> str

  def messages(self, question: str) -> list[dict[str, str]]:
    sys = [{"role": "system", "content": self.system}] if self.system is not None else []
    return [*sys, {"role": "user", "content": question}]

  def prompt(self, question: str, tokenizer: Any = None) -> str:
    """The prompt string for `question` (ends where the model starts writing)."""
    if self.chat:
      return apply_chat(self.messages(question), tokenizer, add_generation_prompt=True)
    return self.plain_prompt(question) if self.plain_prompt else question

  def response(self, answer: str, thinking: str | Sequence[str] | None = None, tokenizer: Any = None) -> str:
    """The training response. Thinking formats take (thinking, answer); the others take the whole
    response text as `answer` and refuse `thinking`."""
    eot = end_of_turn(tokenizer) if self.chat else ""
    if not self.thinking:
      if thinking is not None:
        raise ValueError(f"format {self.name!r} has no thinking part; pass the whole response as `answer`")
      return answer + eot
    return self.build_response(thinking, answer, eot=eot)


FORMATS: dict[str, Format] = {
  f.name: f
  for f in (
    Format("s1", "s1: Qwen chat template + <|im_start|>think / <|im_start|>answer delimiters",
           chat=True, thinking=True, build_response=s1_response),
    Format("think", "MiniMind reasoning distillation: <think>/<answer> tags in a chat turn",
           chat=True, thinking=True, build_response=think_response),
    Format("r1_zero", "CS336 a5 R1-Zero plain prompt ending 'Assistant: <think>'",
           chat=False, thinking=True, plain_prompt=r1_zero_prompt, build_response=r1_zero_response),
    Format("boxed", "Qwen2.5-Math CoT: system 'Please reason step by step ... \\boxed{}.'",
           chat=True, thinking=False, system=QWEN_MATH_COT_SYSTEM),
    Format("chat", "plain chat template, question as the user message", chat=True, thinking=False),
    Format("raw", "prompt and response strings as they are", chat=False, thinking=False),
  )
}


def get_format(name: str) -> Format:
  """The format called `name`; an unknown name is an error that names the nearest valid one."""
  if name in FORMATS:
    return FORMATS[name]
  near = difflib.get_close_matches(name, list(FORMATS), n=1)
  hint = f" Did you mean {near[0]!r}?" if near else ""
  raise KeyError(f"Unknown format {name!r}.{hint} Valid formats: {sorted(FORMATS)}.")
