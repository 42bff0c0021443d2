"""vLLM worker: runs generation jobs, with s1 budget forcing as several vLLM calls (SPEC §3).

A standalone script for the separate vLLM venv (`tools/setup_vllm_venv.sh`); it imports only the
standard library and vllm, never jax or jaxreason. The jax side calls it through
`jaxreason.eval.vllm_backend.generate_vllm`:

    .venv-vllm/bin/python jaxreason/eval/vllm_worker.py --request REQ.json --out OUT.json

Request (JSON):
  {"model": DIR, "max_model_len": 512, "dtype": "float32", "seed": 0, "llm_kwargs": {...},
   "jobs": [{"prompts": [[ids...], ...],
             "sampling": {"temperature", "top_p", "top_k", "min_p", "max_new_tokens",
                          "stop_token_ids", "stop_sequences", "n", "seed"},
             "budget": null | {"trigger_id", "end_ids", "wait_ids", "forced_suffix_ids",
                               "newline_ids", "newline_token_ids", "max_thinking_tokens",
                               "min_thinking_tokens", "num_waits", "max_answer_tokens"},
             "logprobs": true}, ...]}
Output (compact JSON): {"vllm_version", "timing": {...}, "jobs": [{"rows": [
  {"tokens", "logprobs", "injected" (positions of injected tokens), "finish", "thinking_tokens",
   "answer_tokens", "waits", "forced_end", "truncated", "prompt_index"}, ...]}, ...]}

Everything is token ids (`TokensPrompt`): injected strings ("Wait", the end delimiter) are never
re-tokenised, and one `vllm.LLM` serves every job. Rows are prompt-major (prompt i -> rows
i*n .. i*n+n-1), like `Sampler.generate`.

Budget forcing reproduces `BudgetForcing` (jaxreason/sampling/config.py) and the multi-call
reference in tests/test_sampler.py, in batch form: each round submits every row that is still
thinking (prompt + its output so far) with max_tokens = min(remaining thinking budget, remaining
max_new_tokens) and stop tokens [trigger] + stop ids; then per row
  * a stop token ends the row (finish "stop", no answer);
  * the trigger is dropped; while fewer than `num_waits` extensions were used (or fewer than
    `min_thinking_tokens` model thinking tokens exist) `wait_ids` are appended and the row thinks
    on; otherwise the trigger is kept (natural end; the model writes the rest of the delimiter);
  * an exhausted budget appends [newline_ids unless the last token's text ends with "\\n"] +
    end_ids + forced_suffix_ids (forced end). The last token is the prompt's when nothing was
    generated yet (max_thinking_tokens 0), as in the HF reference and the jax sampler;
  * otherwise max_new_tokens was reached (finish "length").
Then one answer round: max_tokens = min(max_answer_tokens, remaining), stop ids only.
Stop tokens are part of the output (vLLM keeps a stop token id in `token_ids`), as in HF generate.

vLLM settings: prefix caching off (every round re-submits a growing prompt; a cached prefix could
be computed differently from a fresh one), `ignore_eos=True` with explicit `stop_token_ids` (so the
checkpoint's eos stops a row only when the caller asks), `generation_config="vllm"` (no sampling
defaults from generation_config.json), no tokenizer (`skip_tokenizer_init`, `detokenize=False`).
Log-probs are vLLM's default `raw_logprobs`: log-softmax of the raw logits at the emitted token
(equal to the jax sampler's for greedy and temperature 1); injected tokens get 0.0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _row_seed(seed, row: int, round_: int):
  if seed is None:
    return None
  return (int(seed) * 1_000_003 + row * 7_919 + round_ * 104_729) % (2**31 - 1)


def _stop_at_sequence(window: list[int], new: list[int], seqs: list[list[int]]) -> int | None:
  """Index in `new` of the token completing a stop sequence (window = tokens emitted before)."""
  if not seqs:
    return None
  buf = list(window)
  for i, tok in enumerate(new):
    buf.append(tok)
    for s in seqs:
      if len(buf) >= len(s) and buf[-len(s):] == s:
        return i
  return None


class Row:
  __slots__ = ("prompt", "prompt_index", "out", "injected", "logprobs", "think_gen", "think_len",
               "waits", "forced", "phase", "finish", "answer")

  def __init__(self, prompt, prompt_index):
    self.prompt = prompt
    self.prompt_index = prompt_index
    self.out: list[int] = []
    self.injected: list[int] = []  # positions in out
    self.logprobs: list[float] = []
    self.think_gen = 0        # model-generated thinking tokens (the budget)
    self.think_len = None     # thinking-phase tokens (set when thinking ends)
    self.waits = 0
    self.forced = False
    self.phase = "think"      # think | answer | done
    self.finish = "running"
    self.answer = 0

  def emit(self, toks, lps=None, injected=False):
    start = len(self.out)
    self.out.extend(toks)
    self.logprobs.extend(lps if lps is not None else [0.0] * len(toks))
    if injected:
      self.injected.extend(range(start, start + len(toks)))

  def result(self, max_total: int, budget: bool) -> dict:
    out = self.out[:max_total]
    think = 0
    if budget:
      think = len(self.out) if self.think_len is None else self.think_len
      think = min(think, len(out))
    finish = self.finish
    return {
        "tokens": out, "logprobs": [round(x, 6) for x in self.logprobs[:max_total]],
        "injected": [i for i in self.injected if i < max_total], "finish": finish,
        "thinking_tokens": think, "answer_tokens": self.answer, "waits": self.waits,
        "forced_end": self.forced, "truncated": finish in ("length", "answer_length"),
        "prompt_index": self.prompt_index,
    }


def _completion(out, want_logprobs: bool):
  toks = list(out.token_ids)
  lps = None
  if want_logprobs and out.logprobs:
    lps = [float(d[t].logprob) if t in d else 0.0 for t, d in zip(toks, out.logprobs)]
  return toks, lps


class Runner:
  """Runs jobs on `llm` (a `vllm.LLM`; tests pass a stand-in with the same `generate`, and
  stand-ins for `SamplingParams` / `TokensPrompt`)."""

  def __init__(self, llm, max_model_len: int, sampling_params_cls=None, tokens_prompt_cls=None):
    self.llm = llm
    self.max_model_len = max_model_len
    if sampling_params_cls is None or tokens_prompt_cls is None:
      from vllm import SamplingParams
      from vllm.inputs import TokensPrompt
      sampling_params_cls, tokens_prompt_cls = SamplingParams, TokensPrompt
    self.SamplingParams = sampling_params_cls
    self.TokensPrompt = tokens_prompt_cls
    self.calls = 0
    self.rounds = 0

  def params(self, s: dict, max_tokens: int, stop_ids, seed, n: int = 1, logprobs: bool = True):
    return self.SamplingParams(
        n=n, temperature=float(s.get("temperature", 0.0)), top_p=float(s.get("top_p", 1.0)),
        top_k=int(s.get("top_k", 0)), min_p=float(s.get("min_p", 0.0)), seed=seed,
        max_tokens=max_tokens, stop_token_ids=list(stop_ids), ignore_eos=True, detokenize=False,
        skip_special_tokens=False, logprobs=0 if logprobs else None)

  def generate(self, prompts, params):
    self.calls += 1
    reqs = [self.TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    return self.llm.generate(reqs, params, use_tqdm=False)

  def room(self, row: Row) -> int:
    """Tokens the context still has for this row."""
    return self.max_model_len - len(row.prompt) - len(row.out)

  # ---------------------------------------------------------------- plain generation
  def plain(self, job: dict) -> list[dict]:
    s = job["sampling"]
    n = int(s.get("n", 1))
    max_total = int(s["max_new_tokens"])
    stop_ids = [int(t) for t in s.get("stop_token_ids", ())]
    seqs = [list(q) for q in s.get("stop_sequences", ()) if q]
    want_lp = bool(job.get("logprobs", True))
    prompts = job["prompts"]
    mt = [min(max_total, self.max_model_len - len(p)) for p in prompts]
    if min(mt) <= 0:
      raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens leaves no room in max_model_len "
                       f"{self.max_model_len}")
    seed = s.get("seed")
    params = [self.params(s, m, stop_ids, None if seed is None else int(seed) + i * n, n=n, logprobs=want_lp)
              for i, m in enumerate(mt)]
    outs = self.generate(prompts, params)
    rows = []
    for i, req in enumerate(outs):
      comps = sorted(req.outputs, key=lambda c: c.index)
      for c in comps:
        row = Row(prompts[i], i)
        row.phase = "answer"
        toks, lps = _completion(c, want_lp)
        cut = _stop_at_sequence([], toks, seqs)
        if cut is not None:
          toks, lps = toks[:cut + 1], (lps[:cut + 1] if lps else lps)
        row.emit(toks, lps)
        row.answer = len(toks)
        if cut is not None or (toks and toks[-1] in stop_ids):
          row.finish = "stop"
        else:
          row.finish = "length"
        rows.append(row.result(max_total, budget=False))
    return rows

  # ---------------------------------------------------------------- budget forcing
  def budget_forcing(self, job: dict) -> list[dict]:
    s, bf = job["sampling"], job["budget"]
    n = int(s.get("n", 1))
    max_total = int(s["max_new_tokens"])
    stop_ids = [int(t) for t in s.get("stop_token_ids", ())]
    stop_set = set(stop_ids)
    seqs = [list(q) for q in s.get("stop_sequences", ()) if q]
    want_lp = bool(job.get("logprobs", True))
    trigger = int(bf["trigger_id"])
    end_ids, wait_ids = list(bf["end_ids"]), list(bf["wait_ids"])
    suffix, nl_ids = list(bf.get("forced_suffix_ids", ())), list(bf.get("newline_ids", ()))
    nl_tokens = set(int(t) for t in bf.get("newline_token_ids", ()))
    budget = bf.get("max_thinking_tokens")
    budget = 10**9 if budget is None else int(budget)
    min_think = int(bf.get("min_thinking_tokens", 0))
    num_waits = int(bf.get("num_waits", 0))
    max_answer = bf.get("max_answer_tokens")
    max_answer = 10**9 if max_answer is None else int(max_answer)
    seed = s.get("seed")
    rows = [Row(p, i) for i, p in enumerate(job["prompts"]) for _ in range(n)]

    def finish(row, reason):
      row.phase, row.finish = "done", reason

    def start_answer(row):
      row.phase = "answer"
      if len(row.out) >= max_total:
        finish(row, "length")

    round_ = 0
    while True:  # thinking rounds
      batch, params = [], []
      for r, row in enumerate(rows):
        if row.phase != "think":
          continue
        remaining = max_total - len(row.out)
        if remaining <= 0:
          finish(row, "length")
          continue
        mt = min(budget - row.think_gen, remaining)
        if mt <= 0:  # budget already spent: force the end without calling the model
          self._after_thinking(row, [], None, trigger, stop_set, seqs, budget, min_think, num_waits,
                               wait_ids, end_ids, suffix, nl_ids, nl_tokens, finish, start_answer)
          continue
        room = self.room(row)
        if room <= 0:
          finish(row, "length")
          continue
        batch.append(row)
        params.append(self.params(s, min(mt, room), [trigger] + stop_ids, _row_seed(seed, r, round_),
                                  logprobs=want_lp))
      if not batch:
        break
      self.rounds += 1
      outs = self.generate([row.prompt + row.out for row in batch], params)
      for row, req in zip(batch, outs):
        toks, lps = _completion(req.outputs[0], want_lp)
        self._after_thinking(row, toks, lps, trigger, stop_set, seqs, budget, min_think, num_waits,
                             wait_ids, end_ids, suffix, nl_ids, nl_tokens, finish, start_answer)
      round_ += 1

    # the answer round
    batch, params = [], []
    for r, row in enumerate(rows):
      if row.phase != "answer":
        continue
      mt = min(max_answer, max_total - len(row.out), self.room(row))
      if mt <= 0:
        finish(row, "answer_length" if max_answer <= 0 else "length")
        continue
      batch.append(row)
      params.append(self.params(s, mt, stop_ids, _row_seed(seed, r, round_), logprobs=want_lp))
    if batch:
      self.rounds += 1
      outs = self.generate([row.prompt + row.out for row in batch], params)
      for row, req in zip(batch, outs):
        toks, lps = _completion(req.outputs[0], want_lp)
        cut = _stop_at_sequence(row.out, toks, seqs)
        if cut is not None:
          toks, lps = toks[:cut + 1], (lps[:cut + 1] if lps else lps)
        row.emit(toks, lps)
        row.answer = len(toks)
        if cut is not None or (toks and toks[-1] in stop_set):
          finish(row, "stop")
        elif len(toks) >= max_answer:
          finish(row, "answer_length")
        else:
          finish(row, "length")
    return [row.result(max_total, budget=True) for row in rows]

  @staticmethod
  def _after_thinking(row, toks, lps, trigger, stop_set, seqs, budget, min_think, num_waits, wait_ids,
                      end_ids, suffix, nl_ids, nl_tokens, finish, start_answer):
    """Applies one thinking round's output to a row (the multi-call procedure)."""
    hit_trigger = bool(toks) and toks[-1] == trigger
    body = toks[:-1] if hit_trigger else toks
    body_lps = (lps[:len(body)] if lps else None)
    cut = _stop_at_sequence(row.out, body, seqs)
    if cut is not None:  # a multi-token stop sequence completed while thinking
      row.emit(body[:cut + 1], body_lps[:cut + 1] if body_lps else None)
      row.think_gen += cut + 1
      finish(row, "stop")
      return
    if body and body[-1] in stop_set:  # end of turn while thinking: no answer
      row.emit(body, body_lps)
      row.think_gen += len(body)
      finish(row, "stop")
      return
    row.emit(body, body_lps)
    row.think_gen += len(body)
    if hit_trigger:
      if row.waits < num_waits or row.think_gen < min_think:
        row.emit(wait_ids, injected=True)
        row.waits += 1
        return
      row.think_len = len(row.out)
      row.emit([trigger], [lps[len(body)]] if lps else None)  # natural end: the model's own token
      if trigger in stop_set or (seqs and _stop_at_sequence(row.out[:-1], [trigger], seqs) is not None):
        finish(row, "stop")
        return
      start_answer(row)
      return
    if row.think_gen < budget:  # cut by max_new_tokens (or the context), not by the budget
      finish(row, "length")
      return
    last = row.out[-1] if row.out else (row.prompt[-1] if row.prompt else None)
    nl = [] if last in nl_tokens else nl_ids
    row.think_len = len(row.out)
    row.emit(nl + end_ids + suffix, injected=True)
    row.forced = True
    start_answer(row)


def run_jobs(runner: Runner, jobs: list[dict]) -> list[dict]:
  """Each job -> {"rows": [...]} (budget forcing when the job has a "budget")."""
  return [{"rows": runner.budget_forcing(job) if job.get("budget") else runner.plain(job)} for job in jobs]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description="vLLM worker for jaxreason (runs in .venv-vllm)")
  ap.add_argument("--request", required=True)
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  with open(args.request) as f:
    req = json.load(f)

  t0 = time.time()
  llm_kwargs = req.get("llm_kwargs") or {}
  if "kv_cache_memory_bytes" not in llm_kwargs:
    # vLLM-CPU otherwise sizes its KV cache as a fraction of all RAM; 1 GiB holds ~18k tokens of
    # Qwen2.5-1.5B in fp32. (Ignored on GPUs; the environment variable or llm_kwargs override it.)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
  import vllm

  max_model_len = int(req.get("max_model_len", 2048))
  kwargs = dict(model=req["model"], dtype=req.get("dtype", "auto"), max_model_len=max_model_len,
                seed=int(req.get("seed", 0)), enable_prefix_caching=False, skip_tokenizer_init=True,
                generation_config="vllm", disable_log_stats=True)
  kwargs.update(llm_kwargs)
  llm = vllm.LLM(**kwargs)
  t1 = time.time()
  runner = Runner(llm, max_model_len)
  results = run_jobs(runner, req["jobs"])
  t2 = time.time()
  out = {"vllm_version": getattr(vllm, "__version__", "?"), "jobs": results,
         "timing": {"startup_s": round(t1 - t0, 2), "generate_s": round(t2 - t1, 2),
                    "calls": runner.calls, "rounds": runner.rounds}}
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(out, f, separators=(",", ":"))
  os.replace(tmp, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
