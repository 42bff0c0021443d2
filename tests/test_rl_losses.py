"""GRPO / DPO / reward-model losses against independent numpy references of SPEC §5 and §6."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreason.algorithms import cs336
from jaxreason.algorithms.dpo import loss as dpo
from jaxreason.algorithms.grpo import loss as grpo
from jaxreason.algorithms.reward_model import loss as reward_model

# ----------------------------------------------------------------------------------------------
# Fixed small inputs: B = 3, T = 4, ragged mask, asymmetric clip, KL on.

B, T = 3, 4
MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], np.float64)
ADV = np.array([1.0, -0.7, 0.4])
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.05
_rng = np.random.default_rng(0)
LOGP = -np.abs(_rng.normal(1.0, 0.5, (B, T)))
OLD = LOGP + _rng.normal(0.0, 0.3, (B, T))
REF = LOGP + _rng.normal(0.0, 0.2, (B, T))


def np_policy_loss(logp, old, ref, adv, mask, loss_type, level, max_len=None, num_items=None, beta=BETA):
  """SPEC §5 written token by token in float64."""
  b, t = logp.shape
  per_tok = np.zeros((b, t))
  for i in range(b):
    n_i = mask[i].sum()
    seq_ratio = math.exp(sum((logp[i, j] - old[i, j]) for j in range(t) if mask[i, j]) / n_i)
    for j in range(t):
      rho = math.exp(logp[i, j] - old[i, j]) if level == "token" else seq_ratio
      clipped = min(max(rho, 1 - EPS_LOW), 1 + EPS_HIGH)
      d = ref[i, j] - logp[i, j]
      per_tok[i, j] = -min(rho * adv[i], clipped * adv[i]) + beta * (math.exp(d) - d - 1)
  if loss_type == "grpo":
    return np.mean([(per_tok[i] * mask[i]).sum() / mask[i].sum() for i in range(b)])
  total = (per_tok * mask).sum()
  if loss_type == "bnpo":
    return total / mask.sum()
  if loss_type == "dr_grpo":
    return total / (b * (t if max_len is None else max_len))
  if loss_type == "dapo":
    return total / (mask.sum() if num_items is None else num_items)
  raise ValueError(loss_type)


def np_grad(f, x, h=1e-6):
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    g[idx] = (f(xp) - f(xm)) / (2 * h)
  return g


def jx(x):
  return jnp.asarray(x, jnp.float32)


CASES = [("grpo", {}), ("bnpo", {}), ("dr_grpo", {"max_completion_length": 6}), ("dr_grpo", {}),
         ("dapo", {"num_items_in_batch": 20.0}), ("dapo", {})]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type,kw", CASES)
def test_policy_loss_and_grad_match_numpy(loss_type, kw, level):
  def f(lp):
    return grpo.policy_loss(lp, jx(OLD), jx(ADV), jx(MASK), eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=BETA,
                            ref_logp=jx(REF), loss_type=loss_type, importance_sampling_level=level, **kw)

  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jx(LOGP))
  ref_f = lambda lp: np_policy_loss(lp, OLD, REF, ADV, MASK, loss_type, level, kw.get("max_completion_length"),
                                    kw.get("num_items_in_batch"))
  np.testing.assert_allclose(float(loss), ref_f(LOGP), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), np_grad(ref_f, LOGP), rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(grad)[MASK == 0] == 0)
  # Metrics over masked tokens.
  if level == "token":
    rho = np.exp(LOGP - OLD)
  else:
    rho = np.repeat((np.exp(((LOGP - OLD) * MASK).sum(1) / MASK.sum(1)))[:, None], T, axis=1)
  a = ADV[:, None]
  clip = ((rho < 1 - EPS_LOW) & (a < 0)) | ((rho > 1 + EPS_HIGH) & (a > 0))
  np.testing.assert_allclose(float(metrics["clip_frac"]), (clip * MASK).sum() / MASK.sum(), atol=1e-7)
  np.testing.assert_allclose(float(metrics["ratio_mean"]), (rho * MASK).sum() / MASK.sum(), rtol=1e-5)
  d = REF - LOGP
  np.testing.assert_allclose(float(metrics["kl"]), ((np.exp(d) - d - 1) * MASK).sum() / MASK.sum(), rtol=1e-5)


def test_fixture_exercises_clipping():
  rho = np.exp(LOGP - OLD)
  a = ADV[:, None]
  clip = (((rho < 1 - EPS_LOW) & (a < 0)) | ((rho > 1 + EPS_HIGH) & (a > 0))) & (MASK > 0)
  assert 0 < clip.sum() < MASK.sum()
  seq = np.exp(((LOGP - OLD) * MASK).sum(1) / MASK.sum(1))  # GSPO: row 0 clipped (1.46 > 1.28, A > 0)
  assert seq[0] > 1 + EPS_HIGH and ADV[0] > 0 and 1 - EPS_LOW < seq[1] < 1 + EPS_HIGH


def test_no_gradient_through_old_ref_advantages():
  def f(old, ref, adv):
    return grpo.policy_loss(jx(LOGP), old, adv, jx(MASK), beta=BETA, ref_logp=ref)[0]

  grads = jax.grad(f, argnums=(0, 1, 2))(jx(OLD), jx(REF), jx(ADV))
  for g in grads:
    assert np.all(np.asarray(g) == 0)


def test_clipped_tokens_get_zero_gradient():
  grad = jax.grad(lambda lp: grpo.policy_loss(lp, jx(OLD), jx(ADV), jx(MASK), eps_low=EPS_LOW,
                                              eps_high=EPS_HIGH)[0])(jx(LOGP))
  rho = np.exp(LOGP - OLD)
  a = ADV[:, None]
  clip = ((rho < 1 - EPS_LOW) & (a < 0)) | ((rho > 1 + EPS_HIGH) & (a > 0))
  g = np.asarray(grad)
  assert np.all(g[clip] == 0.0)
  assert np.all(g[~clip & (MASK > 0)] != 0.0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_on_policy_ratio_one_and_zero_kl(level):
  def f(lp):
    return grpo.policy_loss(lp, jax.lax.stop_gradient(lp), jx(ADV), jx(MASK), beta=BETA,
                            ref_logp=jax.lax.stop_gradient(lp), importance_sampling_level=level)

  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jx(LOGP))
  assert float(metrics["ratio_mean"]) == 1.0
  assert float(metrics["kl"]) == 0.0
  assert float(metrics["clip_frac"]) == 0.0
  np.testing.assert_allclose(float(loss), -ADV.mean(), rtol=1e-6)
  # d/dlogp of -A * exp(logp - sg(logp)) averaged per sequence = -A / n_i on each masked token
  # (the same for GSPO: d rho_seq / d logp_j = 1 / n_i).
  expected = -ADV[:, None] * MASK / MASK.sum(1, keepdims=True) / B
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6)


def test_entropy_metric_and_bonus():
  ent = np.abs(_rng.normal(2.0, 0.5, (B, T)))

  def f(lp, e):
    return grpo.policy_loss(lp, jx(OLD), jx(ADV), jx(MASK), loss_type="bnpo", entropy=e, entropy_coef=0.01,
                            eps_low=EPS_LOW, eps_high=EPS_HIGH)

  (loss, metrics), (_, g_ent) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jx(LOGP), jx(ent))
  base = np_policy_loss(LOGP, OLD, REF, ADV, MASK, "bnpo", "token", beta=0.0)
  np.testing.assert_allclose(float(loss), base - 0.01 * (ent * MASK).sum() / MASK.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["entropy"]), (ent * MASK).sum() / MASK.sum(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g_ent), -0.01 * MASK / MASK.sum(), rtol=1e-6)


def test_policy_loss_errors():
  with pytest.raises(ValueError, match="ref_logp"):
    grpo.policy_loss(jx(LOGP), jx(OLD), jx(ADV), jx(MASK), beta=0.1)
  with pytest.raises(ValueError, match="loss_type"):
    grpo.policy_loss(jx(LOGP), jx(OLD), jx(ADV), jx(MASK), loss_type="ppo")


# ----------------------------------------------------------------------------------------------
# Advantages, masks, DAPO shaping.


def test_group_advantages_unbiased_std():
  a = grpo.group_advantages(jnp.array([1.0, 0.0, 0.0, 1.0]), 4)
  s = math.sqrt(1 / 3)
  np.testing.assert_allclose(np.asarray(a), np.array([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4), rtol=1e-6)
  # [B, G] input, two groups; a constant group gives zeros.
  r = jnp.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
  a2 = grpo.group_advantages(r, 4, scale_rewards="group")
  np.testing.assert_allclose(np.asarray(a2[0]), np.asarray(a), rtol=1e-6)
  assert np.all(np.asarray(a2[1]) == 0)
  # none: centred only.
  np.testing.assert_allclose(np.asarray(grpo.group_advantages(r, 4, scale_rewards="none")),
                             [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]], atol=1e-7)
  # batch: per-group mean, std over all 8 rewards (ddof = 1).
  flat = np.array([1, 0, 0, 1, 2, 2, 2, 2], np.float64)
  bs = np.sqrt(((flat - flat.mean()) ** 2).sum() / 7)
  np.testing.assert_allclose(np.asarray(grpo.group_advantages(r, 4, scale_rewards="batch")),
                             np.array([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]]) / (bs + 1e-4), rtol=1e-6)


def test_cs336_group_normalized_rewards():
  fn = lambda resp, truth: {"reward": float(resp == truth)}
  adv, raw, meta = cs336.compute_group_normalized_rewards(fn, ["a", "b", "c", "a"], ["a"] * 4, 2, 1e-6, False)
  np.testing.assert_allclose(np.asarray(raw), [1, 0, 0, 1])
  np.testing.assert_allclose(np.asarray(adv), [0.5, -0.5, -0.5, 0.5])
  adv, _, _ = cs336.compute_group_normalized_rewards(fn, ["a", "b", "c", "a"], ["a"] * 4, 2, 1e-6, True)
  np.testing.assert_allclose(np.asarray(adv), np.array([0.5, -0.5, -0.5, 0.5]) / (math.sqrt(0.5) + 1e-6), rtol=1e-6)


def test_completion_mask():
  end = 9
  tokens = jnp.array([[5, 9, 7, 7], [5, 6, 7, 8], [9, 9, 0, 0], [4, 4, 0, 9]])
  m = grpo.completion_mask(tokens, end)
  np.testing.assert_array_equal(np.asarray(m), [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]])
  m = grpo.completion_mask(tokens, [end, 8], lengths=jnp.array([4, 4, 4, 2]), mask_truncated_completions=True)
  np.testing.assert_array_equal(np.asarray(m), [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
  m = grpo.completion_mask(tokens, end, lengths=jnp.array([4, 3, 4, 2]))
  np.testing.assert_array_equal(np.asarray(m), [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])


def test_dapo_overlong_penalty():
  p = grpo.dapo_overlong_penalty(jnp.array([10, 16, 17, 18, 20, 21]), max_len=20, cache_len=4)
  np.testing.assert_allclose(np.asarray(p), [0, 0, -0.25, -0.5, -1.0, -1.0], atol=1e-7)


def test_dynamic_sampling_filter():
  r = jnp.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.2]])
  np.testing.assert_array_equal(np.asarray(grpo.dynamic_sampling_filter(r)), [False, True, False, True])


# ----------------------------------------------------------------------------------------------
# CS336 helpers.


def test_masked_mean_and_normalize():
  x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
  m = jnp.array([[1, 1, 0], [0, 0, 0]])
  np.testing.assert_allclose(float(cs336.masked_mean(x, m)), 1.5)
  r = np.asarray(cs336.masked_mean(x, m, axis=-1))
  assert r[0] == 1.5 and np.isnan(r[1])
  np.testing.assert_allclose(np.asarray(cs336.masked_normalize(x, m, 2.0, axis=-1)), [1.5, 0.0])
  np.testing.assert_allclose(float(cs336.masked_normalize(x, m, 4.0)), 0.75)


def test_sft_microbatch_loss():
  lp = np.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]])
  m = np.array([[1, 1, 0], [0, 1, 1]], np.float64)
  loss, _ = cs336.sft_microbatch_loss(jx(lp), jx(m), grad_accum_steps=4, normalize_constant=2.0)
  expected = -np.mean((lp * m).sum(1) / 2.0) / 4
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["no_baseline", "reinforce_with_baseline", "grpo_clip"])
def test_grpo_microbatch_loss(loss_type):
  raw = np.array([[1.0], [0.0], [1.0]])
  adv = ADV[:, None]
  lp, old = LOGP, OLD
  if loss_type == "no_baseline":
    per = -raw * lp
  elif loss_type == "reinforce_with_baseline":
    per = -adv * lp
  else:
    rho = np.exp(lp - old)
    per = -np.minimum(rho * adv, np.clip(rho, 0.8, 1.2) * adv)
  expected = np.mean((per * MASK).sum(1) / MASK.sum(1)) / 2
  loss, _ = cs336.grpo_microbatch_loss(jx(lp), jx(MASK), 2, loss_type, raw_rewards=jx(raw), advantages=jx(adv),
                                      old_logp=jx(old), cliprange=0.2)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  per_j, _ = cs336.compute_policy_gradient_loss(jx(lp), loss_type, jx(raw), jx(adv), jx(old), 0.2)
  np.testing.assert_allclose(np.asarray(per_j), per, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# DPO and reward model.

PC, PR = np.array([-10.0, -12.0, -8.0]), np.array([-11.0, -9.0, -8.5])
RC, RR = np.array([-10.5, -11.0, -9.0]), np.array([-10.0, -10.0, -8.0])
LC, LR = np.array([5.0, 6.0, 4.0]), np.array([4.0, 7.0, 5.0])


def _logsig(x):
  return -np.log1p(np.exp(-x))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_dpo_loss_matches_spec(loss_type):
  beta, s = 0.2, 0.1
  pc, pr, rc, rr = PC, PR, RC, RR
  if loss_type == "ipo":
    pc, rc, pr, rr = PC / LC, RC / LC, PR / LR, RR / LR
  delta = (pc - rc) - (pr - rr)
  expected = {
      "sigmoid": -(1 - s) * _logsig(beta * delta) - s * _logsig(-beta * delta),
      "hinge": np.maximum(0.0, 1 - beta * delta),
      "ipo": (delta - 1 / (2 * beta)) ** 2,
      "robust": (-(1 - s) * _logsig(beta * delta) + s * _logsig(-beta * delta)) / (1 - 2 * s),
  }[loss_type].mean()
  loss, met = dpo.dpo_loss(jx(PC), jx(PR), jx(RC), jx(RR), beta=beta, loss_type=loss_type, label_smoothing=s,
                           chosen_lengths=jx(LC), rejected_lengths=jx(LR))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  cr, rj = beta * (pc - rc), beta * (pr - rr)
  np.testing.assert_allclose(float(met["rewards/chosen"]), cr.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(met["rewards/rejected"]), rj.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(met["rewards/margin"]), (cr - rj).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(met["rewards/accuracy"]), (cr > rj).mean())


def test_dpo_default_beta_and_sequence_logps():
  lp = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.25, -4.0]])
  m = jnp.array([[0, 1, 1], [1, 1, 0]])
  np.testing.assert_allclose(np.asarray(dpo.sequence_logps(lp, m)), [-5.0, -0.75])
  loss, _ = dpo.dpo_loss(jx(PC), jx(PR), jx(RC), jx(RR))
  delta = (PC - RC) - (PR - RR)
  np.testing.assert_allclose(float(loss), (-_logsig(0.1 * delta)).mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="lengths"):
    dpo.dpo_loss(jx(PC), jx(PR), jx(RC), jx(RR), loss_type="ipo")


def test_reward_model():
  mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(np.asarray(reward_model.last_token_index(mask)), [2, 0, 3])
  hidden = jnp.arange(3 * 4 * 2, dtype=jnp.float32).reshape(3, 4, 2)
  w, b = jnp.array([1.0, -2.0]), jnp.array(0.5)
  # Last hidden states: [4, 5], [8, 9], [22, 23] -> 4 - 10 + .5, 8 - 18 + .5, 22 - 46 + .5.
  np.testing.assert_allclose(np.asarray(reward_model.reward_scores(hidden, w, b, mask)), [-5.5, -9.5, -23.5])
  rc, rr = jnp.array([1.0, 0.0, 2.0]), jnp.array([0.0, 1.0, 1.0])
  loss, met = reward_model.pairwise_loss(rc, rr)
  expected = (math.log1p(math.exp(-1)) * 2 + math.log1p(math.exp(1))) / 3
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  np.testing.assert_allclose(float(met["accuracy"]), 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(float(met["reward_chosen"]), 1.0)
  np.testing.assert_allclose(float(met["reward_rejected"]), 2 / 3, rtol=1e-6)
