"""Difficulty (SPEC §7, s1): drop the questions reference models solve; record trace length.

Each reference model ("solver") answers every question k times; a question any solver answers
correctly at least once (graded against the row's answer with a reward of the registry, default
the format's) is dropped, as s1 dropped what Qwen2.5-7B or -32B solved. A row's trace length (the
secondary difficulty signal, used by Diversity's ranking) is the token count of its thinking
under `tokenizer`, or its word count without one; `min_trace_length` drops shorter traces.

A solver is a model path (a HuggingFace directory or an Orbax checkpoint / run directory,
sampled through `jaxreason.sampling.Sampler` with the eval prompt of `format`), or a callable
`(rows, k) -> [[response] * k per row]` ("module:function" on the command line).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxreason.curate.stages import Row, Stage, StageResult

Solver = Callable[[list[Row], int], list[list[str]]]


@dataclasses.dataclass
class ModelSolver:
  """Samples k responses per question from a model with jaxreason's sampler (eval prompts)."""

  path: str
  format: str = "s1"
  temperature: float = 0.7
  max_new_tokens: int = 256
  batch_size: int = 16
  seed: int = 0
  tokenizer: str | None = None
  dtype: str = "float32"

  def __call__(self, rows: list[Row], k: int) -> list[list[str]]:
    from jaxreason import checkpoint
    from jaxreason.data.tokenizer import load_tokenizer
    from jaxreason.formats import generation_prompt
    from jaxreason.eval.run import load_any_model
    from jaxreason.sampling import SamplingConfig
    from jaxreason.sampling.sampler import Sampler, newline_mask_for
    tok = load_tokenizer(self.tokenizer or checkpoint.tokenizer_dir_for(self.path))
    model = load_any_model(self.path, dtype=self.dtype)
    sampler = Sampler(model, newline_mask=newline_mask_for(tok, model.cfg.vocab_size))
    stops = tuple(i for i in (tok.eos_token_id,) if i is not None)
    cfg = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, n=k,
                         stop_token_ids=stops, pad_token_id=tok.pad_token_id or 0)
    specials = [tok.decode([i]) for i in {*stops, tok.pad_token_id} if i is not None]
    out: list[list[str]] = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      prompts = [tok.encode(generation_prompt(self.format, str(r["question"]), None, tok), add_special_tokens=False)
                 for r in chunk]
      res = sampler.generate(prompts, cfg, seed=self.seed + start)
      texts = [tok.decode(t, skip_special_tokens=False) for t in res.tokens]
      for s in specials:
        texts = [t.replace(s, "") for t in texts]
      out += [texts[i * k:(i + 1) * k] for i in range(len(chunk))]  # n samples per prompt are consecutive
    return out


def resolve_solver(spec: str | Solver, **model_kwargs) -> Solver:
  """A callable, a "module:function" path, or a model path (-> ModelSolver)."""
  if callable(spec):
    return spec
  import os
  if not os.path.exists(spec) and ":" in spec:
    mod, _, attr = spec.partition(":")
    try:
      fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
      raise ValueError(f"solver {spec!r}: cannot load {attr!r} from module {mod!r} ({e})") from None
    return fn
  if not os.path.exists(spec):
    raise FileNotFoundError(f"solver {spec!r}: no such model directory (or module:function)")
  return ModelSolver(spec, **model_kwargs)


@dataclasses.dataclass
class Difficulty(Stage):
  solvers: Sequence[str | Solver]
  k: int = 4
  reward: str | None = None  # default: the eval format's reward
  format: str = "s1"
  tokenizer: Any = None  # for trace lengths in tokens
  min_trace_length: int = 0
  name = "difficulty"

  def run(self, rows, rng):
    from jaxreason.formats import FORMATS as EVAL_FORMATS
    from jaxreason.rewards import get_reward_fn, is_correct
    reward = get_reward_fn(self.reward or EVAL_FORMATS[self.format].reward)
    solved_by: list[list[str]] = [[] for _ in rows]
    rates: dict[str, list[float]] = {}
    for si, spec in enumerate(self.solvers):
      name = spec if isinstance(spec, str) else getattr(spec, "__name__", f"solver{si}")
      responses = resolve_solver(spec, format=self.format)(rows, self.k)
      if len(responses) != len(rows):
        raise ValueError(f"solver {name}: returned {len(responses)} response lists for {len(rows)} rows")
      rate = []
      for i, (row, rs) in enumerate(zip(rows, responses)):
        ok = [is_correct(reward(r, row["answer"])) for r in rs]
        rate.append(float(np.mean(ok)) if ok else 0.0)
        if any(ok):
          solved_by[i].append(f"{name} ({sum(ok)}/{len(ok)})")
      rates[name] = rate
    kept, dropped = [], []
    for i, row in enumerate(rows):
      length = self.trace_length(row)
      row = row | {"trace_length": length, "solve_rate": max((r[i] for r in rates.values()), default=0.0)}
      if solved_by[i]:
        dropped.append((row, "solved by " + ", ".join(solved_by[i])))
      elif length < self.min_trace_length:
        dropped.append((row, f"trace length {length} < {self.min_trace_length}"))
      else:
        kept.append(row)
    return StageResult(self.name, kept, dropped, {"solvers": list(rates)})

  def trace_length(self, row: Row) -> int:
    text = str(row.get("thinking") or "")
    if self.tokenizer is not None:
      return len(self.tokenizer.encode(text, add_special_tokens=False))
    return len(text.split())
