"""GRPO with the other advantage estimators and the TIS/MIS correction: the jitted step against
numpy (per-token advantages, trainer vs sampler log-probs), config errors, and a short run that
takes every new path (reinforce_pp_baseline with k1 KL in the reward, num_iterations 2, tis)."""

import math

import numpy as np
import pytest

from jaxreason.config import ConfigError, GRPOConfig
from test_grpo_trainer import (G, TINY_GRPO, _logp, _metrics, _rows, _run_step, _train, model_params,  # noqa: F401
                               tiny_sft)

EPS_LOW, EPS_HIGH, CAP = 0.2, 0.28, 1.3


def np_loss(logp, trainer, sampler, adv, mask, kind):
  """SPEC §5/§9 token by token: dapo aggregation, rho against the trainer's old log-probs, the
  surrogate times w = exp(trainer - sampler) capped (tis) or dropped above the cap (mis)."""
  total = 0.0
  for i in range(logp.shape[0]):
    for j in range(logp.shape[1]):
      if not mask[i, j]:
        continue
      rho = math.exp(logp[i, j] - trainer[i, j])
      a = adv[i, j]
      w = math.exp(trainer[i, j] - sampler[i, j])
      w = min(w, CAP) if kind == "tis" else (0.0 if w > CAP else w)
      total += -min(rho * a, min(max(rho, 1 - EPS_LOW), 1 + EPS_HIGH) * a) * w
  return total / mask.sum()


@pytest.mark.parametrize("kind", ["tis", "mis"])
def test_grpo_step_token_advantages_and_mismatch_correction(model_params, kind):
  graphdef, params = model_params
  rows = _rows(6)
  logp = _logp(params, rows, graphdef)
  rng = np.random.default_rng(8)
  rows["trainer_logp"] = (logp + rng.normal(0, 0.2, logp.shape)).astype(np.float32)
  rows["old_logp"] = (rows["trainer_logp"] + rng.normal(0, 0.4, logp.shape)).astype(np.float32)  # the sampler's
  rows["adv"] = (rng.normal(size=logp.shape) * rows["mask"]).astype(np.float32)
  gcfg = G(loss_type="dapo", num_iterations=2, is_correction=kind, is_cap=CAP)
  want = np_loss(logp, rows["trainer_logp"], rows["old_logp"], rows["adv"], rows["mask"], kind)
  w = np.exp(rows["trainer_logp"].astype(np.float64) - rows["old_logp"])
  over = ((w > CAP) * rows["mask"]).sum() / rows["mask"].sum()
  assert 0 < over < 1
  for accum in (1, 2):
    _, m = _run_step(graphdef, params, rows, gcfg, accum)
    np.testing.assert_allclose(float(m["loss"]), want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["is_truncated_frac"]), over, rtol=1e-5)
    want_err = (np.exp(np.abs(rows["old_logp"] - rows["trainer_logp"])) * rows["mask"]).sum() / rows["mask"].sum()
    np.testing.assert_allclose(float(m["token_mult_prob_error"]), want_err, rtol=1e-5)
  # Without a correction the same rows train on the sampler's log-probs as the old policy, as before.
  del rows["trainer_logp"]
  _, m0 = _run_step(graphdef, params, rows, G(loss_type="dapo", num_iterations=2), 1)
  r = np.exp(logp - rows["old_logp"])
  a = rows["adv"]
  per = -np.minimum(r * a, np.clip(r, 1 - EPS_LOW, 1 + EPS_HIGH) * a)
  np.testing.assert_allclose(float(m0["loss"]), (per * rows["mask"]).sum() / rows["mask"].sum(), rtol=2e-5)


def test_estimator_config_errors():
  with pytest.raises(ConfigError, match="gae needs a critic"):
    GRPOConfig(advantage_estimator="gae")
  with pytest.raises(ConfigError, match="rloo"):
    GRPOConfig(advantage_estimator="rlo")
  with pytest.raises(ConfigError, match="is_correction"):
    GRPOConfig(is_correction="icepop")


@pytest.mark.slow  # a subprocess run (~1-2 min on 2 cores)
def test_grpo_run_with_reinforce_pp_baseline_kl_reward_and_tis(tmp_path, tiny_sft):
  out = tmp_path / "rpp"
  (tmp_path / "rpp.yaml").write_text(TINY_GRPO.format(out=out, init=tiny_sft))
  _train(tmp_path / "rpp.yaml", "train.max_steps=2", "grpo.advantage_estimator=reinforce_pp_baseline",
         "grpo.reward_kl_coef=0.05", "grpo.beta=0.0", "grpo.is_correction=tis", "grpo.gamma=0.99")
  m = _metrics(out)
  assert sorted(m) == [1, 2]
  for s in (1, 2):
    assert np.isfinite(m[s]["loss"]) and 1.0 <= m[s]["token_mult_prob_error"] < 1.5
    assert 0.0 <= m[s]["is_truncated_frac"] < 0.5 and "kl" not in m[s]  # no k3 KL in the loss at beta 0
  assert (out / "rewards.png").exists()
