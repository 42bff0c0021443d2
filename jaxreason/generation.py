"""The one generation front end: prompts -> sampled, decoded completions, for evaluation and rollouts.

`sampling_config` builds the SamplingConfig both use (the tokenizer's eos always stops; extra stop
strings become stop sequences), `budget_forcing` the format's budget-forcing setup, `generate`
runs a Sampler over prompts in batches, and `decode` turns token ids into text:

- `texts`: the completion decoded with special tokens kept (what samples.jsonl / rollouts show);
- `graded_texts`: the same without the end-of-turn/eos/pad token text. This is exactly what a
  reward function receives as its response: the completion only, so NOT the prompt and not the
  format's thinking opener (e.g. s1's "<|im_start|>think\\n", which ends the prompt), but with any
  budget-forcing injections ("Wait", the forced end of thinking and suffix) that are part of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from jaxreason.formats import FORMATS
from jaxreason.sampling import BudgetForcing, SamplingConfig
from jaxreason.sampling.sampler import SamplingOutput


def stop_token_ids(tokenizer) -> tuple[int, ...]:
  return tuple(sorted({i for i in (tokenizer.eos_token_id,) if i is not None}))


def sampling_config(tokenizer, *, max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                    n: int = 1, stop: Sequence[str] = ()) -> SamplingConfig:
  """Stops at the tokenizer's eos (and at any `stop` string); pads with its pad id."""
  stops = tuple(tuple(tokenizer.encode(s, add_special_tokens=False)) for s in stop)
  return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, n=n,
                        stop_token_ids=stop_token_ids(tokenizer), stop_sequences=stops,
                        pad_token_id=tokenizer.pad_token_id or 0)


def budget_forcing(name: str, tokenizer, max_thinking_tokens: int | None, num_waits: int,
                   wait: str = "Wait", min_thinking_tokens: int = 0,
                   max_answer_tokens: int | None = None) -> BudgetForcing | None:
  """The format's budget forcing (SPEC §3); None for formats without a thinking phase."""
  ef = FORMATS[name]
  if ef.think_end is None:
    return None
  ids = lambda s: tokenizer.encode(s, add_special_tokens=False) if s else []
  end_ids = ids(ef.think_end)
  return BudgetForcing(
      trigger_id=end_ids[0], end_ids=tuple(end_ids), wait_ids=tuple(ids(wait)),
      forced_suffix_ids=tuple(ids(ef.forced_suffix)), newline_ids=tuple(ids("\n")),
      max_thinking_tokens=max_thinking_tokens, min_thinking_tokens=min_thinking_tokens,
      num_waits=num_waits, max_answer_tokens=max_answer_tokens)


def end_markers(tokenizer) -> list[str]:
  """The text of the tokens that end a completion (eos, pad): removed before grading."""
  ids = set(stop_token_ids(tokenizer)) | {tokenizer.pad_token_id}
  return [tokenizer.decode([i]) for i in ids if i is not None]


def decode(tokenizer, output: SamplingOutput) -> tuple[list[str], list[str]]:
  """(texts, graded_texts) of every completion; see the module docstring."""
  markers = end_markers(tokenizer)
  texts = [tokenizer.decode(t, skip_special_tokens=False) for t in output.tokens]
  graded = []
  for t in texts:
    for marker in markers:
      t = t.replace(marker, "")
    graded.append(t)
  return texts, graded


def generate(sampler, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, bf: BudgetForcing | None, *,
             batch_size: int | None, seed_for: Callable[[int], Any],
             on_batch: Callable[[int, SamplingOutput], None] | None = None) -> SamplingOutput:
  """`sampler.generate` over `prompts` in batches of `batch_size` prompts (None: one batch), with
  seed `seed_for(first prompt index)` per batch; the outputs joined in prompt order (their
  `prompt_index` global). `on_batch(start, output)` after each batch (e.g. a progress bar)."""
  chunk = batch_size or len(prompts)
  outs = []
  for start in range(0, len(prompts), chunk):
    out = sampler.generate(list(prompts[start:start + chunk]), cfg, bf, seed=seed_for(start))
    if on_batch is not None:
      on_batch(start, out)
    outs.append(out)
  return outs[0] if len(outs) == 1 else concat(outs, cfg.n)


def concat(outs: list[SamplingOutput], n: int) -> SamplingOutput:
  """Joins batch outputs (each with n completions per prompt) into one, prompt indices offset."""
  offset, index = 0, []
  for o in outs:
    index.append(o.prompt_index + offset)
    offset += len(o.tokens) // n
  fields = {}
  for f in dataclasses.fields(SamplingOutput):
    values = [getattr(o, f.name) for o in outs]
    if f.name == "prompt_index":
      fields[f.name] = np.concatenate(index)
    elif isinstance(values[0], list):
      fields[f.name] = [x for v in values for x in v]
    else:
      fields[f.name] = np.concatenate(values)
  out = SamplingOutput(**fields)
  out.metrics = merge_engine_metrics([getattr(o, "metrics", None) for o in outs])
  return out


def merge_engine_metrics(parts: list[dict | None]) -> dict | None:
  """The engine counters of several `generate` calls as one (occupancy over all their slot-steps)."""
  parts = [m for m in parts if m]
  if not parts:
    return None
  tokens = sum(m["tokens"] for m in parts)
  slot_steps = sum(m["slot_steps"] for m in parts)
  seconds = sum(m["seconds"] for m in parts)
  return dict(engine=parts[0]["engine"], slots=max(m["slots"] for m in parts),
              decode_steps=sum(m["decode_steps"] for m in parts), slot_steps=slot_steps, tokens=tokens, seconds=seconds,
              tokens_per_s=tokens / max(seconds, 1e-9), inserted=sum(m["inserted"] for m in parts),
              slot_occupancy=tokens / max(slot_steps, 1), padding_waste=1 - tokens / max(slot_steps, 1),
              longest=max(m["longest"] for m in parts))
