"""vLLM evaluation backend: generation (and s1 budget forcing as several vLLM calls) on an exported
checkpoint, from the jax side.

vLLM lives in its own venv (`bash tools/setup_vllm_venv.sh` creates `.venv-vllm`; it pins
transformers < 5.20, so it cannot share the main one). This module never imports vllm: it writes a
request file, runs `vllm_worker.py` with that venv's python (one `vllm.LLM` start for all jobs,
~35 s on CPU) and reads the results back as `SamplingOutput`s, one per job.

    from jaxreason.eval.vllm_backend import generate_vllm, job_from_config
    job = job_from_config(prompts, SamplingConfig(max_new_tokens=512, stop_token_ids=(eos,)),
                          BudgetForcing(...), newline_mask=newline_mask_for(tok, vocab))
    [out] = generate_vllm(export_dir, [job], max_model_len=4096)

Greedy outputs equal `Sampler.generate`'s token for token (tests/test_vllm_backend.py). Differences
from the jax sampler: sampled (temperature > 0) tokens come from vLLM's generator, not jax's; log-probs
are log-softmax of the raw logits (the jax sampler's at temperature 0 or 1), 0.0 for injected tokens;
entropies are zeros.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from jaxreason.sampling.config import BudgetForcing, SamplingConfig
from jaxreason.sampling.sampler import SamplingOutput

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_worker.py")
PYTHON_ENV = "JAXREASON_VLLM_PYTHON"


class VLLMError(RuntimeError):
  """The vLLM venv is missing or the worker failed."""


def vllm_python(python: str | None = None) -> str:
  """The interpreter of the vLLM venv: `python`, else $JAXREASON_VLLM_PYTHON, else .venv-vllm."""
  return python or os.environ.get(PYTHON_ENV) or os.path.join(REPO_ROOT, ".venv-vllm", "bin", "python")


def vllm_available(python: str | None = None) -> bool:
  """True if the vLLM venv's python exists (does not import vllm: that takes seconds)."""
  return os.path.exists(vllm_python(python))


def job_from_config(prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
                    budget: BudgetForcing | None = None, newline_mask: np.ndarray | None = None,
                    seed: int | None = 0, logprobs: bool = True) -> dict:
  """A worker job from the jax sampler's settings.

  newline_mask: [V] bool, True for tokens whose text ends with "\\n" (`newline_mask_for`); used for
  the newline before a forced end delimiter. Without it no token counts as ending a line.
  """
  if not prompts or min(len(p) for p in prompts) == 0:
    raise ValueError("job_from_config: every prompt needs at least one token")
  job: dict[str, Any] = {
      "prompts": [[int(t) for t in p] for p in prompts],
      "sampling": {
          "temperature": float(cfg.temperature), "top_p": float(cfg.top_p), "top_k": int(cfg.top_k),
          "min_p": float(cfg.min_p), "max_new_tokens": int(cfg.max_new_tokens),
          "stop_token_ids": list(cfg.stop_token_ids), "stop_sequences": [list(s) for s in cfg.stop_sequences],
          "n": int(cfg.n), "seed": None if seed is None else int(seed),
      },
      "budget": None,
      "logprobs": bool(logprobs),
  }
  if budget is not None:
    nl = [] if newline_mask is None else np.flatnonzero(np.asarray(newline_mask, bool)).tolist()
    job["budget"] = {
        "trigger_id": budget.trigger_id, "end_ids": list(budget.end_ids), "wait_ids": list(budget.wait_ids),
        "forced_suffix_ids": list(budget.forced_suffix_ids), "newline_ids": list(budget.newline_ids),
        "newline_token_ids": nl, "max_thinking_tokens": budget.max_thinking_tokens,
        "min_thinking_tokens": budget.min_thinking_tokens, "num_waits": budget.num_waits,
        "max_answer_tokens": budget.max_answer_tokens,
    }
  return job


def rows_to_output(rows: list[dict]) -> SamplingOutput:
  """The worker's rows of one job -> a `SamplingOutput` (injected positions -> per-token mask)."""
  tokens = [list(r["tokens"]) for r in rows]
  injected = []
  for r, toks in zip(rows, tokens):
    mask = np.zeros((len(toks),), bool)
    mask[np.asarray(r.get("injected", []), np.int64)] = True
    injected.append(mask)
  logprobs = [np.asarray(r["logprobs"], np.float32) if r.get("logprobs") else np.zeros((len(t),), np.float32)
              for r, t in zip(rows, tokens)]
  return SamplingOutput(
      tokens=tokens,
      logprobs=logprobs,
      entropies=[np.zeros((len(t),), np.float32) for t in tokens],
      injected=injected,
      finish_reason=[r["finish"] for r in rows],
      thinking_tokens=np.asarray([r["thinking_tokens"] for r in rows], np.int32),
      answer_tokens=np.asarray([r["answer_tokens"] for r in rows], np.int32),
      waits=np.asarray([r["waits"] for r in rows], np.int32),
      forced_end=np.asarray([r["forced_end"] for r in rows], bool),
      truncated=np.asarray([r["truncated"] for r in rows], bool),
      prompt_index=np.asarray([r["prompt_index"] for r in rows], np.int32),
  )


def _tail(path: str, n: int = 4000) -> str:
  try:
    with open(path, errors="replace") as f:
      text = f.read()
  except OSError:
    return ""
  return text[-n:]


def generate_vllm(model_dir: str, jobs: Sequence[dict], *, python: str | None = None,
                  max_model_len: int = 4096, dtype: str = "auto", seed: int = 0,
                  timeout: float | None = 1800, llm_kwargs: dict | None = None,
                  return_info: bool = False):
  """Runs `jobs` (from `job_from_config`) on vLLM in one worker process (one engine start).

  Returns one `SamplingOutput` per job (with `return_info`, also the worker's info: vLLM version,
  timing, number of calls). `llm_kwargs` go to `vllm.LLM` (e.g. {"enforce_eager": True}).
  """
  if not jobs:
    return ([], {}) if return_info else []
  py = vllm_python(python)
  if not os.path.exists(py):
    raise VLLMError(f"no vLLM python at {py}: run tools/setup_vllm_venv.sh (creates .venv-vllm), or set "
                    f"{PYTHON_ENV} to a python that has vllm")
  if not os.path.exists(os.path.join(model_dir, "config.json")):
    raise FileNotFoundError(f"{model_dir}: no config.json; export the model first (python -m jaxreason.export)")
  request = {"model": os.path.abspath(model_dir), "max_model_len": int(max_model_len), "dtype": dtype,
             "seed": int(seed), "llm_kwargs": llm_kwargs or {}, "jobs": list(jobs)}
  with tempfile.TemporaryDirectory(prefix="jaxreason-vllm-") as tmp:
    req_path, out_path = os.path.join(tmp, "request.json"), os.path.join(tmp, "out.json")
    log_path = os.path.join(tmp, "worker.log")
    with open(req_path, "w") as f:
      json.dump(request, f, separators=(",", ":"))
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # the main venv's must not leak in
      env.pop(var, None)
    start = time.time()
    with open(log_path, "w") as log:
      proc = subprocess.Popen([py, WORKER, "--request", req_path, "--out", out_path], cwd=tmp, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
      try:
        rc = proc.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and the engine processes it spawned
        proc.wait()
        raise VLLMError(f"vLLM worker timed out after {timeout} s; log tail:\n{_tail(log_path)}") from None
    if rc != 0 or not os.path.exists(out_path):
      raise VLLMError(f"vLLM worker failed (exit {rc}, {time.time() - start:.0f} s, python {py}); "
                      f"log tail:\n{_tail(log_path)}")
    with open(out_path) as f:
      result = json.load(f)
  outputs = [rows_to_output(j["rows"]) for j in result["jobs"]]
  if return_info:
    info = {k: v for k, v in result.items() if k != "jobs"}
    info["wall_s"] = round(time.time() - start, 2)
    return outputs, info
  return outputs
