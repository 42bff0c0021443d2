"""The jitted sampler against HF transformers: greedy tokens, log-probs, budget forcing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import make_hf_model, save_hf_model_dir
from jaxreason.models.hf import load_hf_model
from jaxreason.sampling import BudgetForcing, Sampler, SamplingConfig

PROMPTS = [[5, 17, 3, 99, 42, 7, 8], [200, 1, 64], [31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 12]]


@pytest.fixture(scope="module", params=["qwen2_untied", "qwen3", "llama"])
def pair(request, tmp_path_factory):
  hf = make_hf_model(request.param, seed=21)
  model = load_hf_model(save_hf_model_dir(hf, tmp_path_factory.mktemp(request.param)))
  return hf, model


def hf_greedy(hf, prompt, max_new_tokens, stop_ids=None):
  """HF generate, greedy, one prompt; returns the new tokens (stop token included if hit)."""
  if max_new_tokens <= 0:
    return []
  ids = torch.tensor([prompt])
  out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                    do_sample=False, eos_token_id=stop_ids, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def test_greedy_matches_hf_generate_left_padded_batch(pair):
  hf, model = pair
  cfg = SamplingConfig(max_new_tokens=12)
  ours = Sampler(model).generate(PROMPTS, cfg)
  ids = torch.zeros((3, 12), dtype=torch.long)
  mask = torch.zeros((3, 12), dtype=torch.long)
  for i, p in enumerate(PROMPTS):
    ids[i, 12 - len(p):] = torch.tensor(p)
    mask[i, 12 - len(p):] = 1
  ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                    pad_token_id=0)[:, 12:].tolist()
  assert ours.tokens == ref
  assert ours.finish_reason == ["length"] * 3


def _full_logits(model, prompt, completion):
  tokens = jnp.asarray([prompt + completion], jnp.int32)
  return np.asarray(model(tokens))[0, len(prompt) - 1:-1]


def test_sampled_logprobs_equal_full_forward_and_seed_is_deterministic(pair):
  hf, model = pair
  cfg = SamplingConfig(max_new_tokens=10, temperature=0.7, top_p=0.95, top_k=50)
  sampler = Sampler(model)
  a = sampler.generate(PROMPTS, cfg, seed=3)
  b = sampler.generate(PROMPTS, cfg, seed=3)
  c = sampler.generate(PROMPTS, cfg, seed=4)
  assert a.tokens == b.tokens
  assert a.tokens != c.tokens
  for prompt, toks, lps in zip(PROMPTS, a.tokens, a.logprobs):
    logits = _full_logits(model, prompt, toks) / 0.7
    ref = jax.nn.log_softmax(logits, axis=-1)[np.arange(len(toks)), toks]
    np.testing.assert_allclose(lps, ref, atol=2e-5)


def test_n_samples_share_prefill(pair):
  hf, model = pair
  sampler = Sampler(model)
  cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, n=3)
  shared = sampler.generate(PROMPTS, cfg, seed=9)
  repeated = sampler.generate([p for p in PROMPTS for _ in range(3)], SamplingConfig(max_new_tokens=6, temperature=1.0), seed=9)
  assert shared.tokens == repeated.tokens
  assert list(shared.prompt_index) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert len({tuple(t) for t in shared.tokens[:3]}) > 1  # the samples of one prompt differ


def test_stop_token_and_stop_sequence(pair):
  hf, model = pair
  sampler = Sampler(model)
  free = sampler.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=12)).tokens[0]
  k = next(i for i in range(2, 12) if free[i] not in free[:i])  # first new token from index 2
  out = sampler.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=12, stop_token_ids=(free[k],)))
  assert out.tokens[0] == free[:k + 1] and out.finish_reason == ["stop"] and not out.truncated[0]
  seq = tuple(free[k:k + 2])
  out = sampler.generate(PROMPTS[:1], SamplingConfig(max_new_tokens=12, stop_sequences=(seq,)))
  first = next(i for i in range(1, 12) if tuple(free[i - 1:i + 1]) == seq)
  assert out.tokens[0] == free[:first + 1] and out.finish_reason == ["stop"]


# ------------------------------------------------------------------------------ budget forcing
NEWLINE = 10  # in these tests token 10 plays "\n"
EOS = 2


def reference_budget_forcing(hf, prompt, bf: BudgetForcing, max_total: int):
  """s1's multi-call procedure (SPEC §3) with HF generate, on token ids (nothing re-tokenised).

  `max_total` is the sampler's max_new_tokens: the whole output is cut there. info["injected"]
  marks the tokens the procedure wrote itself (waits, the forced newline + end + suffix), not
  the model: what GRPO must not train on.
  """
  out, inj, think_gen, waits, forced = [], [], 0, 0, False
  budget = bf.max_thinking_tokens if bf.max_thinking_tokens is not None else 10**6

  def done(tokens, flags, **info):
    return tokens[:max_total], dict(info, injected=flags[:max_total])

  while True:
    if len(out) >= max_total:
      return done(out, inj, waits=waits, forced=forced, answer=0, end="cap")
    gen = hf_greedy(hf, prompt + out, min(budget - think_gen, max_total - len(out)),
                    stop_ids=[bf.trigger_id, EOS])
    if gen and gen[-1] == EOS:  # end of turn while thinking: the row ends without an answer
      return done(out + gen, inj + [False] * len(gen), waits=waits, forced=forced, answer=0, end="eos")
    hit_trigger = bool(gen) and gen[-1] == bf.trigger_id
    if hit_trigger:
      gen = gen[:-1]
    out += gen
    inj += [False] * len(gen)
    think_gen += len(gen)
    if not hit_trigger and think_gen < budget:  # cut by max_total, not by the budget
      return done(out, inj, waits=waits, forced=forced, answer=0, end="cap")
    if hit_trigger:
      if waits < bf.num_waits or think_gen < bf.min_thinking_tokens:
        out += list(bf.wait_ids)
        inj += [True] * len(bf.wait_ids)
        waits += 1
        continue
      out += [bf.trigger_id]  # natural end: the model goes on writing the delimiter itself
      inj += [False]
      end = "natural"
      break
    nl = [] if (out and out[-1] == NEWLINE) or not out and prompt[-1] == NEWLINE else list(bf.newline_ids)
    forced_ids = nl + list(bf.end_ids) + list(bf.forced_suffix_ids)
    out += forced_ids
    inj += [True] * len(forced_ids)
    forced, end = True, "forced"
    break
  if len(out) >= max_total:
    return done(out, inj, waits=waits, forced=forced, answer=0, end=end)
  answer = hf_greedy(hf, prompt + out, min(bf.max_answer_tokens, max_total - len(out)), stop_ids=[EOS])
  return done(out + answer, inj + [False] * len(answer), waits=waits, forced=forced, answer=len(answer), end=end)


@pytest.fixture(scope="module")
def bf_model(tmp_path_factory):
  """A tiny Qwen2 whose logits favour a 'trigger' token so the end delimiter really is emitted."""
  hf = make_hf_model("qwen2_untied", seed=5)
  with torch.no_grad():
    hf.lm_head.weight[77] += 1.2 * hf.model.norm.weight.sign() * 0.3  # token 77: the trigger
    hf.lm_head.weight[EOS] += 0.1 * hf.model.norm.weight.sign() * 0.3
  model = load_hf_model(save_hf_model_dir(hf, tmp_path_factory.mktemp("bf")))
  mask = np.zeros((256,), bool)
  mask[NEWLINE] = True
  return hf, Sampler(model, newline_mask=mask)


def _bf(**kw):
  base = dict(trigger_id=77, end_ids=(77, 78, NEWLINE), wait_ids=(90, 91), forced_suffix_ids=(NEWLINE, 60, 61),
              newline_ids=(NEWLINE,), max_answer_tokens=8)
  return BudgetForcing(**{**base, **kw})


BF_CASES = {
    "no_forcing": dict(),
    "cap_cuts_thinking": dict(max_thinking_tokens=3),
    "one_wait": dict(num_waits=1),
    "two_waits": dict(num_waits=2),
    "two_waits_with_cap": dict(num_waits=2, max_thinking_tokens=9),
    "min_thinking": dict(min_thinking_tokens=6),
    "zero_budget": dict(max_thinking_tokens=0),  # forced at once; "\n" first unless the prompt ends in one
}


@pytest.mark.parametrize("case", sorted(BF_CASES))
def test_budget_forcing_matches_multi_call_reference(bf_model, case):
  hf, sampler = bf_model
  bf = _bf(**BF_CASES[case])
  prompts = [[5, 17, 3, 99, 42, 7, 8], [13, 14, 15], [120, 121, 122, 123], [9, 8, NEWLINE]]
  out = sampler.generate(prompts, SamplingConfig(max_new_tokens=64, stop_token_ids=(EOS,)), bf)
  exercised = set()
  for i, p in enumerate(prompts):
    ref, info = reference_budget_forcing(hf, p, bf, max_total=64)
    assert out.tokens[i] == ref, (case, i)
    assert out.waits[i] == info["waits"]
    assert bool(out.forced_end[i]) == info["forced"]
    assert out.answer_tokens[i] == info["answer"]  # model-generated answer tokens
    assert [bool(x) for x in out.injected[i]] == info["injected"], (case, i)  # what GRPO trains on
    exercised.add("injected" if any(info["injected"]) else "all sampled")
    exercised.add(info["end"])
    exercised.add(f"waits={info['waits']}")
  if case == "cap_cuts_thinking":
    assert "forced" in exercised
  if case in ("one_wait", "two_waits"):
    assert f"waits={BF_CASES[case]['num_waits']}" in exercised, exercised
  if case == "no_forcing":
    assert "natural" in exercised
  if case != "no_forcing":
    assert "injected" in exercised, exercised
  if case == "min_thinking":
    assert any(e.startswith("waits=") and e != "waits=0" for e in exercised), exercised


def test_inverse_cdf_is_inverse_transform_sampling():
  """`inverse_cdf` returns the token i with F(i-1) <= u < F(i) (F: the cumulative distribution of
  weights / sum). On a grid of n uniforms, token i is therefore drawn n * p_i times, +-1: checked
  against numpy's cumulative sum, for a vocabulary that is not a multiple of the block, with
  zero-weight tokens (which must never be drawn)."""
  from jaxreason.sampling.strategies import inverse_cdf
  rng = np.random.default_rng(0)
  v, n = 300, 20_000
  w = rng.exponential(size=v).astype(np.float32)
  w[rng.choice(v, 60, replace=False)] = 0
  w[-7:] = 0  # the last block ends in zeros
  u = (np.arange(n) + 0.5) / n
  got = np.asarray(jax.jit(lambda w, u: inverse_cdf(w, u, block=128))(np.broadcast_to(w, (n, v)), u))
  counts = np.bincount(got, minlength=v)
  p = w.astype(np.float64) / w.sum()
  np.testing.assert_array_less(np.abs(counts - n * p), 1.01)
  assert counts[w == 0].sum() == 0
  # u at the ends of [0, 1): the first and the last positive token, never a zero-weight one.
  ends = np.asarray(inverse_cdf(jnp.asarray(np.stack([w, w])), jnp.asarray([0.0, 1 - 2.0 ** -24], jnp.float32)))
  assert ends.tolist() == [np.flatnonzero(w)[0], np.flatnonzero(w)[-1]]


def test_temperature_top_k_draws_follow_the_filtered_distribution():
  """choose_rows with temperature and top-k: only top-k tokens, at frequencies within 5 sigma of
  softmax(logits / T) renormalised over the top k (SPEC §3's sampling), over 20,000 row keys."""
  from jaxreason.sampling import strategies
  rng = np.random.default_rng(1)
  v, n, k, t = 500, 20_000, 8, 0.8
  logits = rng.normal(size=v).astype(np.float32) * 2
  cfg = SamplingConfig(max_new_tokens=1, temperature=t, top_k=k)
  keys = jax.random.split(jax.random.key(3), n)
  tok, _ = jax.jit(lambda l, ks: strategies.choose_rows(l, ks, cfg))(np.broadcast_to(logits, (n, v)), keys)
  counts = np.bincount(np.asarray(tok), minlength=v)
  top = np.argsort(logits)[::-1][:k]
  p = np.zeros(v)
  p[top] = np.exp(logits[top] / t - (logits[top] / t).max())
  p /= p.sum()
  assert counts[p == 0].sum() == 0
  sigma = np.sqrt(n * p * (1 - p))
  np.testing.assert_array_less(np.abs(counts - n * p)[top], 5 * sigma[top] + 1)
