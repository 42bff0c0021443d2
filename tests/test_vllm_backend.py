"""The vLLM evaluation backend against the jax sampler, on real vLLM (CPU) reading OUR export.

Slow tests: one worker invocation (one vLLM engine start, ~30-60 s) runs every job; each test then
compares one job with `Sampler.generate` token for token. They need `.venv-vllm`
(tools/setup_vllm_venv.sh): skipped without it, unless JAXREASON_REQUIRE_VLLM=1 (then they fail).
Fast tests run the worker's multi-call procedure with HF generate standing in for vLLM.
"""

import os
import pickle
import types

import jax
import numpy as np
import pytest
import torch

from hf_models import make_hf_model, save_hf_model_dir
from jaxreason.eval import vllm_worker
from jaxreason.eval.vllm_backend import (VLLMError, generate_vllm, job_from_config, rows_to_output, vllm_available,
                                         vllm_python)
from jaxreason.models.hf import load_hf_model, save_hf_model
from jaxreason.sampling import BudgetForcing, Sampler, SamplingConfig

NEWLINE, EOS, TRIGGER = 10, 2, 77  # token 10 plays "\n", 2 end of turn, 77 the delimiter's first token
PLAIN_PROMPTS = [[5, 17, 3, 99, 42, 7, 8], [200, 1, 64], [31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 12]]
BF_PROMPTS = [[5, 17, 3, 99, 42, 7, 8], [13, 14, 15], [120, 121, 122, 123], [200, 1, 64, 9, 33]]


def _bf(**kw):
  base = dict(trigger_id=TRIGGER, end_ids=(TRIGGER, 78, NEWLINE), wait_ids=(90, 91),
              forced_suffix_ids=(NEWLINE, 60, 61), newline_ids=(NEWLINE,), max_answer_tokens=8)
  return BudgetForcing(**{**base, **kw})


BF_STOP = SamplingConfig(max_new_tokens=48, stop_token_ids=(EOS,))
# name -> (prompts, sampling config, budget forcing or None)
CASES = {
    "plain_greedy": (PLAIN_PROMPTS, SamplingConfig(max_new_tokens=16), None),
    "plain_greedy_eos": (BF_PROMPTS, SamplingConfig(max_new_tokens=24, stop_token_ids=(EOS, TRIGGER)), None),
    "bf_no_forcing": (BF_PROMPTS, BF_STOP, _bf()),
    "bf_cap_cuts_thinking": (BF_PROMPTS, BF_STOP, _bf(max_thinking_tokens=3)),
    "bf_one_wait": (BF_PROMPTS, BF_STOP, _bf(num_waits=1)),
    "bf_two_waits": (BF_PROMPTS, BF_STOP, _bf(num_waits=2)),
    "bf_two_waits_with_cap": (BF_PROMPTS, BF_STOP, _bf(num_waits=2, max_thinking_tokens=9)),
    "bf_min_thinking": (BF_PROMPTS, BF_STOP, _bf(min_thinking_tokens=6)),
    # max_new_tokens cuts the output inside the injected forced delimiter / a "Wait"
    "bf_total_cap": (BF_PROMPTS, SamplingConfig(max_new_tokens=6, stop_token_ids=(EOS,)),
                     _bf(max_thinking_tokens=3, num_waits=1)),
}
SAMPLED = (PLAIN_PROMPTS, SamplingConfig(max_new_tokens=10, temperature=1.0, n=3, stop_token_ids=(EOS,)))
BF_SAMPLED = (BF_PROMPTS, SamplingConfig(max_new_tokens=40, temperature=1.0, n=2, stop_token_ids=(EOS,)),
              _bf(num_waits=1, max_thinking_tokens=8))


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
  """Tiny Qwen2 (head_dim 64: vLLM's CPU attention refuses 16) whose lm_head favours the trigger and
  EOS (biases found by search so that waits, forced and natural ends all happen), loaded into our
  model and exported by OUR `save_hf_model`."""
  hf = make_hf_model("qwen2_untied", seed=7, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
  with torch.no_grad():
    hf.lm_head.weight[TRIGGER] += 0.9 * hf.model.norm.weight.sign() * 0.3
    hf.lm_head.weight[EOS] += 0.2 * hf.model.norm.weight.sign() * 0.3
  model = load_hf_model(save_hf_model_dir(hf, tmp_path_factory.mktemp("hf")))
  assert model.cfg.resolved_head_dim == 64
  export = str(tmp_path_factory.mktemp("export"))
  save_hf_model(model, export, dtype="float32")
  newline_mask = np.zeros((model.cfg.vocab_size,), bool)
  newline_mask[NEWLINE] = True
  return hf, model, Sampler(model, newline_mask=newline_mask), export, newline_mask


def _run_vllm(biased):
  _, _, _, export, newline_mask = biased
  names = sorted(CASES)
  jobs = [job_from_config(CASES[k][0], CASES[k][1], CASES[k][2], newline_mask=newline_mask) for k in names]
  jobs += [job_from_config(*SAMPLED, seed=11), job_from_config(*SAMPLED, seed=11), job_from_config(*SAMPLED, seed=12)]
  jobs += [job_from_config(*BF_SAMPLED, newline_mask=newline_mask, seed=5)] * 2
  outs, info = generate_vllm(export, jobs, max_model_len=512, dtype="float32", timeout=900, return_info=True)
  print("vLLM worker:", info)
  return dict(zip(names, outs)), outs[len(names):]


@pytest.fixture(scope="module")
def setup(biased, tmp_path_factory):
  """Runs every job on real vLLM in ONE worker invocation (one engine start), also under
  pytest-xdist: the first xdist worker runs it, the others read its results."""
  if not vllm_available():
    msg = f"no vLLM venv ({vllm_python()}): run tools/setup_vllm_venv.sh"
    if os.environ.get("JAXREASON_REQUIRE_VLLM") == "1":
      pytest.fail(f"JAXREASON_REQUIRE_VLLM=1 but {msg}")
    pytest.skip(msg)
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    results, sampled = _run_vllm(biased)
  else:
    from filelock import FileLock
    cache = tmp_path_factory.getbasetemp().parent / "vllm_backend_results.pkl"  # this session's
    with FileLock(str(cache) + ".lock"):
      if cache.exists():
        results, sampled = pickle.loads(cache.read_bytes())
      else:
        results, sampled = _run_vllm(biased)
        cache.write_bytes(pickle.dumps((results, sampled)))
  _, model, sampler, _, _ = biased
  return model, sampler, results, sampled


def _kind(out, i):
  toks, think = out.tokens[i], int(out.thinking_tokens[i])
  if out.forced_end[i]:
    return "forced"
  if len(toks) > think and toks[think] == TRIGGER:
    return "natural"
  if out.finish_reason[i] == "stop":
    return "eos_while_thinking"
  return "cut_while_thinking"


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_vllm_greedy_matches_jax_sampler(setup, case):
  _, sampler, results, _ = setup
  prompts, cfg, bf = CASES[case]
  ours = sampler.generate(prompts, cfg, bf)
  theirs = results[case]
  assert theirs.tokens == ours.tokens, case
  assert theirs.finish_reason == ours.finish_reason
  np.testing.assert_array_equal(theirs.thinking_tokens, ours.thinking_tokens)
  np.testing.assert_array_equal(theirs.answer_tokens, ours.answer_tokens)
  np.testing.assert_array_equal(theirs.waits, ours.waits)
  np.testing.assert_array_equal(theirs.forced_end, ours.forced_end)
  np.testing.assert_array_equal(theirs.truncated, ours.truncated)
  np.testing.assert_array_equal(theirs.prompt_index, ours.prompt_index)
  for a, b, la, lb in zip(theirs.injected, ours.injected, theirs.logprobs, ours.logprobs):
    np.testing.assert_array_equal(a, b)
    # vLLM's raw log-probs of model tokens equal ours (greedy: log-softmax of the raw logits)
    np.testing.assert_allclose(la[~a], lb[~b], atol=1e-4)

  if bf is None:
    return
  kinds = {_kind(ours, i) for i in range(len(prompts))}
  waits = set(np.asarray(ours.waits).tolist())
  if case == "bf_cap_cuts_thinking":
    assert "forced" in kinds, kinds
  if case == "bf_one_wait":
    assert 1 in waits, waits
  if case == "bf_two_waits":
    assert 2 in waits, waits
  if case in ("bf_no_forcing", "bf_one_wait", "bf_two_waits"):
    assert "natural" in kinds, kinds
  if case == "bf_two_waits_with_cap":
    assert {"forced", "natural"} <= kinds and 2 in waits, (kinds, waits)
  if case == "bf_min_thinking":
    assert waits - {0}, waits
  if case == "bf_total_cap":
    assert all(len(t) == 6 or f == "stop" for t, f in zip(ours.tokens, ours.finish_reason))
    assert any(np.asarray(i)[-1] for i in ours.injected), "no row was cut inside an injection"


@pytest.mark.slow
def test_vllm_sampled_n_and_logprobs_and_seeds(setup):
  """temperature 1, n=3 (one request per prompt): vLLM's tokens differ from jax's generator, but the
  layout matches, seeds reproduce, and its log-probs are the model's own (checked with our full forward)."""
  model, _, _, (out, same_seed, other_seed, _, _) = setup
  prompts, cfg = SAMPLED
  assert same_seed.tokens == out.tokens  # a seed makes vLLM's sampling reproducible
  assert other_seed.tokens != out.tokens
  assert list(out.prompt_index) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert len({tuple(t) for t in out.tokens[:3]}) > 1  # the samples of one prompt differ
  for i, (toks, lps) in enumerate(zip(out.tokens, out.logprobs)):
    assert 1 <= len(toks) <= cfg.max_new_tokens
    assert (out.finish_reason[i] == "stop") == (toks[-1] == EOS)
    prompt = prompts[out.prompt_index[i]]
    logits = np.asarray(model(jax.numpy.asarray([prompt + toks], jax.numpy.int32)))[0, len(prompt) - 1:-1]
    ref = jax.nn.log_softmax(logits, axis=-1)[np.arange(len(toks)), toks]
    np.testing.assert_allclose(lps, ref, atol=1e-4)


# ------------------------------------------------------------------------------ without vLLM
class _HFStandIn:
  """`vllm.LLM.generate` on HF transformers, greedy, one request at a time: lets the worker's
  multi-call procedure run where vLLM is not installed (CI)."""

  def __init__(self, hf):
    self.hf, self.calls = hf, 0

  def generate(self, requests, params, use_tqdm=False):
    outs = []
    for req, p in zip(requests, params):
      assert p.temperature == 0 and p.n == 1 and p.ignore_eos and p.max_tokens >= 1
      ids = torch.tensor([req["prompt_token_ids"]])
      gen = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_tokens,
                             do_sample=False, eos_token_id=list(p.stop_token_ids) or None, pad_token_id=0)
      toks = gen[0, ids.shape[1]:].tolist()
      outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(index=0, token_ids=toks, logprobs=None)]))
      self.calls += 1
    return outs


@pytest.mark.parametrize("case", sorted(CASES))
def test_worker_procedure_with_hf_stand_in(biased, case):
  """The worker's batch multi-call procedure (HF generate in vLLM's place) == the jax sampler."""
  hf, _, sampler, _, newline_mask = biased
  prompts, cfg, bf = CASES[case]
  llm = _HFStandIn(hf)
  runner = vllm_worker.Runner(llm, 512, sampling_params_cls=types.SimpleNamespace,
                              tokens_prompt_cls=lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids})
  [result] = vllm_worker.run_jobs(runner, [job_from_config(prompts, cfg, bf, newline_mask=newline_mask)])
  theirs, ours = rows_to_output(result["rows"]), sampler.generate(prompts, cfg, bf)
  assert theirs.tokens == ours.tokens
  assert theirs.finish_reason == ours.finish_reason
  for field in ("thinking_tokens", "answer_tokens", "waits", "forced_end", "truncated", "prompt_index"):
    np.testing.assert_array_equal(getattr(theirs, field), getattr(ours, field), err_msg=field)
  for a, b in zip(theirs.injected, ours.injected):
    np.testing.assert_array_equal(a, b)
  assert runner.calls == (1 if bf is None else runner.rounds)


def test_job_from_config_and_missing_venv(tmp_path):
  bf = _bf(max_thinking_tokens=5, num_waits=1)
  mask = np.zeros((256,), bool)
  mask[[10, 42]] = True
  job = job_from_config([[1, 2, 3]], SamplingConfig(max_new_tokens=7, stop_token_ids=(2,), n=2), bf,
                        newline_mask=mask, seed=3)
  assert job["sampling"]["n"] == 2 and job["sampling"]["stop_token_ids"] == [2] and job["sampling"]["seed"] == 3
  assert job["budget"]["newline_token_ids"] == [10, 42] and job["budget"]["max_thinking_tokens"] == 5
  assert job_from_config([[1]], SamplingConfig())["budget"] is None
  with pytest.raises(ValueError):
    job_from_config([[]], SamplingConfig())
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(VLLMError, match="setup_vllm_venv.sh"):
    generate_vllm(str(tmp_path), [job], python=str(tmp_path / "no-such-python"))


@pytest.mark.slow
def test_vllm_sampled_budget_forcing(setup):
  """temperature 1 with budget forcing, n=2: per-row seeds reproduce; the counters are consistent."""
  _, _, _, (*_, a, b) = setup
  prompts, cfg, bf = BF_SAMPLED
  assert a.tokens == b.tokens
  assert list(a.prompt_index) == [0, 0, 1, 1, 2, 2, 3, 3]
  for i, toks in enumerate(a.tokens):
    think, inj = int(a.thinking_tokens[i]), a.injected[i]
    assert a.waits[i] <= bf.num_waits and int(inj[:think].sum()) == a.waits[i] * len(bf.wait_ids)
    if a.forced_end[i]:  # the budget counts model tokens only
      assert think - int(inj[:think].sum()) == bf.max_thinking_tokens
    if a.finish_reason[i] in ("stop", "answer_length") and len(toks) > think:  # reached the answer
      assert len(toks) - think - int(inj[think:].sum()) - a.answer_tokens[i] == (0 if a.forced_end[i] else 1)
