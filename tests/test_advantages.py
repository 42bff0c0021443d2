"""Advantage estimators, whitening, the value loss and the TIS/MIS mismatch weights against plain
Python references written from SPEC §9 (token by token over each row's completion tokens; ragged
masks with a hole; gamma and lambda not 1)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxreason.algorithms import advantages as A
from jaxreason.algorithms.grpo import loss as grpo_loss

GAMMA, LAM = 0.9, 0.8


def _ragged(seed=0, n=5, t=9):
  rng = np.random.default_rng(seed)
  mask = np.zeros((n, t), np.float32)
  starts, ends = [0, 2, 3, 1, 4], [9, 7, 5, 8, 4]  # the last row has no completion tokens
  for i in range(n):
    mask[i, starts[i]:ends[i]] = 1
  mask[0, 4] = 0  # a budget-forcing injection inside a completion
  return mask, rng.normal(size=(n, t)).astype(np.float32), rng.normal(size=(n, t)).astype(np.float32)


def _tokens(row_mask):
  return [j for j in range(len(row_mask)) if row_mask[j]]


def ref_token_rewards(score, mask, kl, beta):
  """SPEC: r_t = -beta * kl_t on completion tokens, + R at the last one."""
  out = np.zeros(mask.shape)
  for i in range(mask.shape[0]):
    idx = _tokens(mask[i])
    for j in idx:
      out[i, j] = -beta * kl[i, j]
    if idx:
      out[i, idx[-1]] += score[i]
  return out


def ref_gae(r, v, mask, gamma, lam):
  """SPEC: delta_t = r_t + gamma V_{t+1} - V_t (V_T = 0); A_t = delta_t + gamma lambda A_{t+1}; G = A + V."""
  adv, ret = np.zeros(mask.shape), np.zeros(mask.shape)
  for i in range(mask.shape[0]):
    idx = _tokens(mask[i])
    a_next = 0.0
    for k in reversed(range(len(idx))):
      j = idx[k]
      v_next = v[i, idx[k + 1]] if k + 1 < len(idx) else 0.0
      a_next = r[i, j] + gamma * v_next - v[i, j] + gamma * lam * a_next
      adv[i, j], ret[i, j] = a_next, a_next + v[i, j]
  return adv, ret


def ref_returns(r, mask, gamma):
  out = np.zeros(mask.shape)
  for i in range(mask.shape[0]):
    idx = _tokens(mask[i])
    for k, j in enumerate(idx):
      out[i, j] = sum(gamma ** (m - k) * r[i, idx[m]] for m in range(k, len(idx)))
  return out


def ref_whiten(x, mask):
  vals = [x[i, j] for i in range(mask.shape[0]) for j in _tokens(mask[i])]
  mean = sum(vals) / len(vals)
  std = math.sqrt(sum((u - mean) ** 2 for u in vals) / (len(vals) - 1))
  return np.where(mask > 0, (x - mean) / (std + 1e-8), 0.0)


def test_token_rewards_gae_returns_whitening():
  mask, v, kl = _ragged()
  score = np.array([1.0, -0.5, 0.25, 2.0, 3.0], np.float32)
  r = A.token_rewards(score, mask, kl=kl, kl_coef=0.05)
  want_r = ref_token_rewards(score, mask, kl, 0.05)
  np.testing.assert_allclose(r, want_r, atol=1e-6)
  adv, ret = A.gae(r, v, mask, GAMMA, LAM)
  want_a, want_g = ref_gae(want_r, v, mask, GAMMA, LAM)
  np.testing.assert_allclose(adv, want_a, atol=1e-5)
  np.testing.assert_allclose(ret, want_g, atol=1e-5)
  assert np.all(adv[mask == 0] == 0) and np.all(ret[mask == 0] == 0)
  np.testing.assert_allclose(A.discounted_returns(r, mask, GAMMA), ref_returns(want_r, mask, GAMMA), atol=1e-5)
  np.testing.assert_allclose(A.whiten(adv, mask), ref_whiten(want_a, mask), atol=1e-5)
  # gae end to end (whitened) and lambda = 1, gamma = 1: A_t = G_t - V_t with G_t the plain return.
  got, _ = A.token_advantages("gae", score, mask, kl=kl, kl_coef=0.05, values=v, gamma=GAMMA, lam=LAM)
  np.testing.assert_allclose(got, ref_whiten(want_a, mask), atol=1e-5)
  a1, g1 = A.gae(r, v, mask, 1.0, 1.0)
  np.testing.assert_allclose(g1, ref_returns(want_r, mask, 1.0), atol=1e-5)
  np.testing.assert_allclose(a1, np.where(mask > 0, g1 - v, 0), atol=1e-5)


def test_rloo_and_reinforce_pp():
  g = 4
  rng = np.random.default_rng(1)
  rewards = rng.normal(size=(3 * g,)).astype(np.float32)
  want = np.array([rewards[i] - np.mean([rewards[j] for j in range((i // g) * g, (i // g + 1) * g) if j != i])
                   for i in range(len(rewards))])
  np.testing.assert_allclose(A.sequence_scores("rloo", rewards, g), want, atol=1e-6)
  grp = rewards.reshape(-1, g)
  np.testing.assert_allclose(A.sequence_scores("rloo", rewards, g),
                             (g / (g - 1) * (grp - grp.mean(1, keepdims=True))).reshape(-1), atol=1e-6)
  # grpo is GRPO's group advantage, unchanged.
  np.testing.assert_array_equal(A.sequence_scores("grpo", rewards, g),
                                grpo_loss.group_advantages(rewards, g, scale_rewards="group"))
  # REINFORCE++: k1 token rewards, return with gamma, whitened over the batch's tokens.
  n, t = 3 * g, 7
  mask = np.zeros((n, t), np.float32)
  for i in range(n):
    mask[i, i % 3:t - (i % 2)] = 1
  kl = rng.normal(size=(n, t)).astype(np.float32)
  for est, score in (("reinforce_pp", rewards),
                     ("reinforce_pp_baseline", (grp - grp.mean(1, keepdims=True)).reshape(-1))):
    s = A.sequence_scores(est, rewards, g)
    np.testing.assert_allclose(s, score, atol=1e-6)
    adv, ret = A.token_advantages(est, s, mask, kl=kl, kl_coef=0.1, gamma=GAMMA)
    want_ret = ref_returns(ref_token_rewards(score, mask, kl, 0.1), mask, GAMMA)
    np.testing.assert_allclose(ret, want_ret, atol=1e-5)
    np.testing.assert_allclose(adv, ref_whiten(want_ret, mask), atol=1e-5)
  with pytest.raises(ValueError, match="critic"):
    A.token_advantages("gae", rewards, mask)


def test_value_loss_and_explained_variance():
  from jaxreason.algorithms.ppo.loss import value_loss
  mask, v_old, g = _ragged(2)
  v = v_old + np.random.default_rng(3).normal(0, 0.3, v_old.shape).astype(np.float32)
  clip = 0.2
  per, clipped = np.zeros(mask.shape), 0
  for i in range(mask.shape[0]):
    for j in _tokens(mask[i]):
      vc = min(max(v[i, j], v_old[i, j] - clip), v_old[i, j] + clip)
      a, b = (v[i, j] - g[i, j]) ** 2, (vc - g[i, j]) ** 2
      per[i, j] = 0.5 * max(a, b)
      clipped += b > a
  want = per.sum() / mask.sum()
  loss, m = value_loss(jnp.asarray(v), jnp.asarray(v_old), jnp.asarray(g), jnp.asarray(mask), clip)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(m["value_clip_frac"]), clipped / mask.sum(), rtol=1e-6)
  sel = mask > 0
  want_ev = 1 - np.var(g[sel] - v[sel]) / np.var(g[sel])
  np.testing.assert_allclose(A.explained_variance(v, g, mask), want_ev, rtol=1e-5)


@pytest.mark.parametrize("kind", ["tis", "mis"])
def test_mismatch_weights_formula(kind):
  mask, a, b = _ragged(4)
  trainer, sampler = a * 0.5 - 2, a * 0.5 - 2 + b * 0.6  # some exp(t - s) above the cap
  cap = 1.5
  w, sums = grpo_loss.mismatch_weights(jnp.asarray(trainer), jnp.asarray(sampler), jnp.asarray(mask), kind, cap)
  raw = np.exp(trainer.astype(np.float64) - sampler)
  want = np.minimum(raw, cap) if kind == "tis" else np.where(raw > cap, 0.0, raw)
  np.testing.assert_allclose(np.asarray(w), want * mask, rtol=1e-5)
  over = ((raw > cap) * mask).sum()
  assert 0 < over < mask.sum()
  np.testing.assert_allclose(float(sums["is_truncated_frac"]), over)
  np.testing.assert_allclose(float(sums["token_mult_prob_error"]), (np.exp(np.abs(sampler - trainer)) * mask).sum(),
                             rtol=1e-5)


def test_mismatch_weights_change_nothing_when_sampler_equals_trainer():
  """policy_loss with TIS/MIS weights from identical log-probs = without: loss and gradient."""
  import jax
  mask, a, b = _ragged(5)
  old = a * 0.3 - 2
  logp = old + b * 0.1
  adv = jnp.asarray(np.linspace(-1, 1, mask.shape[0]), jnp.float32)

  def f(lp, weights):
    return grpo_loss.policy_loss(lp, jnp.asarray(old), adv, jnp.asarray(mask), loss_type="bnpo", is_weights=weights)[0]

  base, g0 = jax.value_and_grad(f)(jnp.asarray(logp), None)
  for kind in ("tis", "mis"):
    w, sums = grpo_loss.mismatch_weights(jnp.asarray(old), jnp.asarray(old), jnp.asarray(mask), kind, 2.0)
    val, g1 = jax.value_and_grad(f)(jnp.asarray(logp), w)
    assert float(val) == float(base)
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g0))
    assert float(sums["is_truncated_frac"]) == 0.0
    assert float(sums["token_mult_prob_error"]) == float(mask.sum())
