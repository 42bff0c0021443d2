"""Evaluation: sample answers at several thinking budgets, grade them, write the s1 report.

For each budget (max thinking tokens; None = no cap) every question is sampled `n` times with
budget forcing (SPEC §3), graded with the format's reward (SPEC §4), and summarised (SPEC §8):
`samples.jsonl`, `summary.json` and `scaling.png` (accuracy vs mean thinking tokens) in `out`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import numpy as np

from jaxreason import generation
from jaxreason.formats import FORMATS, generation_prompt


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  model: str
  data: str
  out: str
  format: str = "s1"
  budgets: tuple[int | None, ...] = (None,)
  num_waits: int = 0
  wait: str = "Wait"
  min_thinking_tokens: int = 0
  max_answer_tokens: int | None = None
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  n: int = 1
  max_new_tokens: int = 1024
  backend: str = "jax"
  seed: int = 0
  batch_size: int = 16
  reward: str | None = None  # default: the format's
  split: str | None = None
  limit: int | None = None
  ks: tuple[int, ...] = ()
  dtype: str = "float32"
  tokenizer: str | None = None  # default: the model dir, or a checkpoint run's tokenizer/ folder

  @staticmethod
  def config_prepare(raw: dict, key, where) -> dict:
    """YAML may give `budgets` and `ks` as comma-separated strings, as on the command line."""
    raw = dict(raw)
    if isinstance(raw.get("budgets"), (str, int)):
      raw["budgets"] = parse_budgets(raw["budgets"])
    elif isinstance(raw.get("budgets"), (list, tuple)):
      raw["budgets"] = tuple(None if b in (None, "none") else b for b in raw["budgets"])
    if isinstance(raw.get("ks"), str):
      raw["ks"] = tuple(int(k) for k in raw["ks"].split(","))
    return {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in raw.items()}

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
    if self.backend not in ("jax", "vllm"):
      raise ValueError(f"backend must be 'jax' or 'vllm', got {self.backend!r}")
    if FORMATS[self.format].think_end is None and any(b is not None for b in self.budgets):
      raise ValueError(f"format {self.format!r} has no thinking phase: use --budgets none")


def parse_budgets(text: str) -> tuple[int | None, ...]:
  out = []
  for part in str(text).split(","):
    part = part.strip().lower()
    if part in ("none", "inf", ""):
      out.append(None)
    else:
      try:
        value = int(part)
      except ValueError:
        raise ValueError(f"--budgets: {part!r} is not an integer or 'none'") from None
      if value < 0:
        raise ValueError(f"--budgets: {value} is negative")
      out.append(value)
  return tuple(out)


def load_examples(spec: str, split: str | None, limit: int | None, *, with_rows: bool = False):
  """`{"id", "question" | "prompt", "answer"}` per row (`data.sources.eval_examples`); with
  `with_rows`, (examples, the source rows) (reward functions may read any column)."""
  from jaxreason.data import sources
  if spec.startswith("task:"):
    from jaxreason.data.tasks import load_task
    rows = load_task(spec[len("task:"):])
  else:
    rows = sources.read_rows(spec, split=split, limit=limit)
  rows = list(rows)
  examples = sources.eval_examples(rows, spec)
  if limit:
    examples, rows = examples[:limit], rows[:limit]
  return (examples, rows) if with_rows else examples


class _Progress:
  """tqdm when available; counts generated samples and shows the ETA."""

  def __init__(self, total: int, desc: str):
    from tqdm import tqdm
    self.bar = tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True)

  def update(self, k: int, **postfix):
    self.bar.set_postfix(**postfix)
    self.bar.update(k)

  def close(self):
    self.bar.close()


_SAMPLERS: dict = {}  # (model dir, dtype) -> Sampler, reused across budgets and calls


def _generate_jax(model_dir, cfg: EvalConfig, prompts, bf, tokenizer, sampling_cfg, progress, seed):
  from jaxreason.sampling.sampler import Sampler, newline_mask_for
  key = (model_dir, cfg.dtype)
  if key not in _SAMPLERS:
    _SAMPLERS.clear()
    model = load_any_model(model_dir, dtype=cfg.dtype)
    _SAMPLERS[key] = Sampler(model, newline_mask=newline_mask_for(tokenizer, model.cfg.vocab_size))
  clock = {"t": time.perf_counter()}

  def on_batch(start, out):
    toks = sum(len(x) for x in out.tokens)
    progress.update(len(out.tokens), tok_s=f"{toks / (time.perf_counter() - clock['t']):.0f}")
    clock["t"] = time.perf_counter()

  return generation.generate(_SAMPLERS[key], prompts, sampling_cfg, bf, batch_size=cfg.batch_size,
                             seed_for=lambda start: seed + start, on_batch=on_batch)


def load_any_model(path: str, **overrides):
  """An Orbax checkpoint (run/checkpoints/step dir) or a HuggingFace model directory."""
  from jaxreason import checkpoint
  from jaxreason.models.hf import load_hf_model
  if checkpoint.is_checkpoint(path):
    return checkpoint.load_model(path, **overrides)
  return load_hf_model(path, **overrides)


def resolve_tokenizer(cfg: EvalConfig):
  from jaxreason import checkpoint
  from jaxreason.data.tokenizer import load_tokenizer
  return load_tokenizer(cfg.tokenizer or checkpoint.tokenizer_dir_for(cfg.model))


def _hf_dir_for_vllm(model_dir: str, out: str, tokenizer) -> str:
  """vLLM reads HuggingFace directories: export an Orbax checkpoint first (once)."""
  from jaxreason import checkpoint
  if not checkpoint.is_checkpoint(model_dir):
    return model_dir
  from jaxreason.models.hf import save_hf_model
  target = os.path.join(out, "hf_export")
  if not os.path.exists(os.path.join(target, "config.json")):
    save_hf_model(checkpoint.load_model(model_dir), target, tokenizer=tokenizer)
  return target


def _generate_vllm(model_dir, cfg: EvalConfig, prompts, bf, tokenizer, sampling_cfg, progress, seed):
  from jaxreason.eval import vllm_backend
  from jaxreason.sampling.sampler import newline_mask_for
  model_dir = _hf_dir_for_vllm(model_dir, cfg.out, tokenizer)
  vocab = len(tokenizer)
  job = vllm_backend.job_from_config(prompts, sampling_cfg, bf, newline_mask_for(tokenizer, vocab), seed=seed)
  max_len = max(len(p) for p in prompts) + sampling_cfg.max_new_tokens + 8
  (out,) = vllm_backend.generate_vllm(model_dir, [job], max_model_len=max_len,
                                      dtype="float32" if cfg.dtype == "float32" else "bfloat16", seed=seed)
  progress.update(len(prompts) * sampling_cfg.n)
  return out


def run_eval(cfg: EvalConfig, *, tokenizer=None, log=print) -> dict[str, Any]:
  from jaxreason.eval import metrics, report
  from jaxreason.rewards import call_reward, extract_answer, get_reward_fn, is_correct, reward_value

  ef = FORMATS[cfg.format]
  tokenizer = tokenizer or resolve_tokenizer(cfg)
  examples, source_rows = load_examples(cfg.data, cfg.split, cfg.limit, with_rows=True)
  reward_fn = get_reward_fn(cfg.reward or ef.reward)
  texts = [generation_prompt(cfg.format, ex.get("question"), ex.get("prompt"), tokenizer) for ex in examples]
  prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
  sampling_cfg = generation.sampling_config(tokenizer, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                            top_p=cfg.top_p, top_k=cfg.top_k, n=cfg.n)
  generate = _generate_jax if cfg.backend == "jax" else _generate_vllm
  os.makedirs(cfg.out, exist_ok=True)

  rows: list[dict] = []
  for budget in cfg.budgets:
    bf = generation.budget_forcing(cfg.format, tokenizer, budget, cfg.num_waits, cfg.wait, cfg.min_thinking_tokens,
                        cfg.max_answer_tokens)
    progress = _Progress(len(prompts) * cfg.n, desc=f"budget {budget if budget is not None else 'none'}")
    try:
      out = generate(cfg.model, cfg, prompts, bf, tokenizer, sampling_cfg, progress, cfg.seed)
    finally:
      progress.close()
    responses, graded_texts = generation.decode(tokenizer, out)
    for j, toks in enumerate(out.tokens):
      i = int(out.prompt_index[j])
      ex, graded_text = examples[i], graded_texts[j]
      graded = call_reward(reward_fn, graded_text, ex["answer"], source_rows[i])
      reward = reward_value(graded)
      correct = is_correct(graded)
      model_tokens = ~np.asarray(out.injected[j], bool)
      ent = out.entropies[j][model_tokens]
      rows.append(dict(
          id=ex["id"], budget=budget, sample=j % cfg.n, prompt=texts[i],
          response=responses[j], response_token_ids=list(map(int, toks)), ground_truth=ex["answer"],
          answer=extract_answer(graded_text, ef.extract), reward=reward,
          format_reward=graded.get("format_reward") if isinstance(graded, dict) else None,
          correct=bool(correct), thinking_tokens=int(out.thinking_tokens[j]),
          answer_tokens=int(out.answer_tokens[j]), waits=int(out.waits[j]),
          forced_end=bool(out.forced_end[j]), truncated=bool(out.truncated[j]),
          finish_reason=out.finish_reason[j],
          mean_entropy=float(ent.mean()) if ent.size else None, length=len(toks)))

  ks = tuple(sorted(set(cfg.ks or ((1, cfg.n) if cfg.n > 1 else (1,)))))
  summary = metrics.summarize(rows, ks=ks)
  summary["config"] = dataclasses.asdict(cfg)
  report.write_samples(os.path.join(cfg.out, "samples.jsonl"), rows)
  report.write_summary(os.path.join(cfg.out, "summary.json"), summary)
  report.plot_scaling(os.path.join(cfg.out, "scaling.png"), summary)
  log(report.format_table(summary))
  log(f"wrote {cfg.out}/samples.jsonl, summary.json, scaling.png")
  return summary
