"""PPO with a critic: the joint step against a numpy PPO loss on the models' own log-probs and
values (loss and gradients, with accumulation), exact on-policy first mini-batch, a toy run that
raises a toy reward, and exact resume from a checkpoint (what a SIGKILL after a save leaves)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxreason.algorithms.ppo import loss as ppo_loss
from jaxreason.config import PPOConfig
from jaxreason.models.build import init_model
from jaxreason.train.state import TrainState
from test_grpo_trainer import CFG, TEMP, TINY_GRPO, _logp, _metrics, _rows, _train, sevens, tiny_sft  # noqa: F401

EPS_LOW, EPS_HIGH, CLIP_V, VF = 0.2, 0.28, 0.2, 0.3


def P(**kw) -> PPOConfig:
  return PPOConfig(**{"eps_low": EPS_LOW, "eps_high": EPS_HIGH, "cliprange_value": CLIP_V, "vf_coef": VF, **kw})


@pytest.fixture(scope="module")
def models():
  graphdef, policy = nnx.split(init_model(CFG, seed=1))
  critic_def, critic = nnx.split(init_model(CFG, seed=2))
  critic = {**nnx.to_pure_dict(critic), ppo_loss.VALUE_HEAD: ppo_loss.init_value_head(CFG.hidden_size, 0.5, 3)}
  return graphdef, critic_def, {"policy": nnx.to_pure_dict(policy), "critic": critic}


def _values(critic_def, critic, rows):
  mb = {k: jnp.asarray(rows[k]) for k in ("inputs", "positions", "segments")}
  return np.asarray(ppo_loss.token_values(critic_def, critic, mb), np.float64)


def _ppo_rows(graphdef, critic_def, params, seed=0):
  rows = _rows(seed)
  rng = np.random.default_rng(seed + 10)
  logp = _logp(params["policy"], rows, graphdef)
  values = _values(critic_def, params["critic"], rows)
  rows["old_logp"] = (logp + rng.normal(0, 0.3, logp.shape)).astype(np.float32)
  rows["old_values"] = (values + rng.normal(0, 0.3, values.shape)).astype(np.float32)
  rows["returns"] = (values + rng.normal(0, 1.0, values.shape)).astype(np.float32)
  rows["adv"] = rng.normal(size=logp.shape).astype(np.float32) * rows["mask"]
  rows["fresh"] = np.zeros((len(logp),), np.float32)
  return rows


def np_ppo_loss(logp, values, rows):
  """SPEC §9 token by token in float64: clipped surrogate + vf_coef * clipped value loss, token means."""
  m = rows["mask"]
  pg = vf = 0.0
  for i in range(m.shape[0]):
    for j in range(m.shape[1]):
      if not m[i, j]:
        continue
      rho = np.exp(logp[i, j] - rows["old_logp"][i, j])
      a = rows["adv"][i, j]
      pg += -min(rho * a, min(max(rho, 1 - EPS_LOW), 1 + EPS_HIGH) * a)
      v, vo, g = values[i, j], rows["old_values"][i, j], rows["returns"][i, j]
      vc = min(max(v, vo - CLIP_V), vo + CLIP_V)
      vf += 0.5 * max((v - g) ** 2, (vc - g) ** 2)
  return (pg + VF * vf) / m.sum()


def _run(graphdef, critic_def, params, rows, pcfg, accum, lr=0.0):
  def one():
    return optax.sgd(lr) if lr else optax.set_to_zero()
  tx = ppo_loss.split_tx({"policy": one(), "critic": one()})
  step = jax.jit(ppo_loss.make_ppo_step(graphdef, critic_def, tx, optax.constant_schedule(lr), pcfg, temperature=TEMP))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  n = rows["inputs"].shape[0]
  batch = {k: jnp.asarray(v).reshape((accum, n // accum) + v.shape[1:]) for k, v in rows.items()}
  return step(state, batch)


def test_ppo_step_loss_and_gradient_match_numpy(models):
  graphdef, critic_def, params = models
  rows = _ppo_rows(graphdef, critic_def, params)
  logp = _logp(params["policy"], rows, graphdef)
  values = _values(critic_def, params["critic"], rows)
  want = np_ppo_loss(logp, values, rows)
  for accum in (1, 2):
    _, m = _run(graphdef, critic_def, params, rows, P(), accum)
    np.testing.assert_allclose(float(m["loss"]), want, rtol=2e-5, atol=1e-6)
    assert 0 < float(m["value_clip_frac"]) < 1 and 0 < float(m["clip_frac"]) < 1
  # Gradients: one SGD step (lr 1) = the central difference of the numpy loss, for the largest
  # gradient entry of the policy's and of the critic's biggest leaf; accumulation changes nothing.
  (s1, _), (s2, _) = (_run(graphdef, critic_def, params, rows, P(), a, lr=1.0) for a in (1, 2))
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6)
  h = 1e-3
  for model in ("policy", "critic"):
    flat = dict(jax.tree_util.tree_flatten_with_path(params[model])[0])
    key = max(flat, key=lambda p: np.asarray(flat[p]).size)
    new = dict(jax.tree_util.tree_flatten_with_path(s1.params[model])[0])[key]
    grad = np.asarray(flat[key], np.float64) - np.asarray(new, np.float64)
    idx = np.unravel_index(np.argmax(np.abs(grad)), grad.shape)

    def spec(delta):
      p = {**params, model: jax.tree_util.tree_map_with_path(
          lambda q, v: v.at[idx].add(delta) if q == key else v, params[model])}
      return np_ppo_loss(_logp(p["policy"], rows, graphdef), _values(critic_def, p["critic"], rows), rows)

    fd = (spec(h) - spec(-h)) / (2 * h)
    np.testing.assert_allclose(grad[idx], fd, rtol=2e-2, err_msg=model)


def test_first_minibatch_is_exactly_on_policy(models):
  """fresh rows: old log-probs and values are the models' own -> ratio exactly 1, nothing clipped."""
  graphdef, critic_def, params = models
  rows = _ppo_rows(graphdef, critic_def, params, seed=1)
  rows["fresh"][:] = 1.0
  rows["old_logp"][:] = 0.0  # ignored for fresh rows
  rows["old_values"][:] = 100.0
  _, m = _run(graphdef, critic_def, params, rows, P(), 2)
  assert float(m["ratio_mean"]) == 1.0
  assert float(m["clip_frac"]) == 0.0 and float(m["value_clip_frac"]) == 0.0
  # The loss is then -mean(A) over tokens + vf_coef * 0.5 * mean((V - G)^2).
  values = _values(critic_def, params["critic"], rows)
  mask = rows["mask"]
  want = (-(rows["adv"] * mask).sum() + VF * 0.5 * (((values - rows["returns"]) ** 2) * mask).sum()) / mask.sum()
  np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5, atol=1e-6)


def test_ppo_targets_use_k1_kl_and_gae():
  """The run's targets: k1 KL token rewards + R at the end, GAE, whitened (vs the numpy references)."""
  from jaxreason.algorithms.ppo.run import ppo_targets
  from test_advantages import _ragged, ref_gae, ref_token_rewards, ref_whiten
  mask, v, x = _ragged(7)
  old = -1.0 + 0.1 * x
  ref = old - 0.2 * v
  score = np.array([1.0, 0.0, -1.0, 0.5, 2.0], np.float32)
  pc = PPOConfig(beta=0.1, gamma=0.95, lam=0.9)
  rows = {"mask": mask, "old_values": (v * mask).astype(np.float32), "old_logp": (old * mask).astype(np.float32)}
  adv, ret, m = ppo_targets(pc, rows, score, ref.astype(np.float32), 1)
  r = ref_token_rewards(score, mask, (old - ref) * mask, 0.1)
  a, g = ref_gae(r, v * mask, mask, 0.95, 0.9)
  np.testing.assert_allclose(ret, g, atol=1e-5)
  np.testing.assert_allclose(adv, ref_whiten(a, mask), atol=1e-5)
  np.testing.assert_allclose(m["kl"], ((old - ref) * mask).sum() / mask.sum(), rtol=1e-5)


def test_ppo_config_and_quickstart_config():
  from jaxreason.config import ConfigError, load_config
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = load_config(os.path.join(repo, "configs", "quickstart_ppo.yaml"))
  assert cfg.algorithm == "ppo" and cfg.ppo.advantage_estimator == "gae" and cfg.ppo.critic_init == "policy"
  with pytest.raises(ConfigError, match="critic_init"):
    PPOConfig(critic_init="rm")
  with pytest.raises(ConfigError, match="advantage_estimator"):
    PPOConfig(advantage_estimator="ppo")


# -------------------------------------------------------------------------------- end to end
TINY_PPO = """
output_dir: {out}
algorithm: ppo
init_from: {init}
data: {{train: ["task:addition:n=100,seed=4,min_digits=2,max_digits=3"]}}
rollout: {{format: s1, prompts_per_step: 8, num_generations: 2, max_new_tokens: 16, temperature: 1.0}}
ppo: {{beta: 0.02, ppo_epochs: 2, vf_coef: 0.5, critic_lr: 3.0e-3, log_samples_every: 2}}
optimizer: {{lr: 3.0e-3}}
train: {{global_batch_size: 8, micro_batch_size: 4, max_steps: 4, log_every: 1}}
checkpoint: {{every_steps: 2, keep_last: 5}}
logging: {{progress_bar: false}}
"""


def _saved_step(run, step: int) -> tuple:
  """(params, opt_state) of a run's checkpoint step as saved (no model structure applied)."""
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(str(run / "checkpoints")) as mngr:
    r = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                   opt_state=ocp.args.StandardRestore()))
  return r.params, r.opt_state


@pytest.mark.slow  # a subprocess run (~1-2 min on 2 cores)
def test_ppo_raises_a_toy_reward(tmp_path, tiny_sft):
  out = tmp_path / "toy"
  (tmp_path / "toy.yaml").write_text(TINY_PPO.format(out=out, init=tiny_sft))
  _train(tmp_path / "toy.yaml", f"ppo.rewards={{{__name__}:sevens: 1.0}}", "ppo.beta=0.0",
         "rollout.prompts_per_step=16", "train.global_batch_size=16", "train.max_steps=16", "checkpoint.every_steps=100")
  m = _metrics(out)
  first, last = m[1]["reward_mean"], np.mean([m[s]["reward_mean"] for s in (14, 15, 16)])
  assert last > 0.02 and last > 5 * first, (first, last)
  for key in ("value_loss", "policy_loss", "explained_variance", "value_clip_frac", "entropy", "clip_frac"):
    assert key in m[16] and m[16][key] is not None, key
  assert os.path.exists(out / "rewards.png")


@pytest.mark.slow  # a subprocess run (~1-2 min on 2 cores)
def test_ppo_resumes_exactly_after_sigkill(tmp_path, tiny_sft):
  """b is SIGKILLed while its step-4 checkpoint is being written (JAXREASON_TEST_KILL_IN_SAVE),
  reruns from step 2 and reproduces a's steps 3-4 exactly: policy, critic and both optimizers
  are in the checkpoint."""
  import signal
  import subprocess
  import sys
  a, b = tmp_path / "a", tmp_path / "b"
  for out in (a, b):
    (tmp_path / f"{out.name}.yaml").write_text(TINY_PPO.format(out=out, init=tiny_sft))
  _train(tmp_path / "a.yaml")
  ma = _metrics(a)
  assert sorted(ma) == [1, 2, 3, 4]
  for key in ("kl", "non_score_reward", "value_loss", "explained_variance", "entropy"):
    assert key in ma[1], key
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", JAXREASON_TEST_KILL_IN_SAVE="4",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
  r = subprocess.run([sys.executable, "-m", "jaxreason.train", "--config", str(tmp_path / "b.yaml")],
                     capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
                     timeout=600)
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  r = _train(tmp_path / "b.yaml")
  assert "resumed at step 2" in r.stdout + r.stderr
  mb = _metrics(b)
  for s in (3, 4):
    for key in ("loss", "reward_mean", "grad_norm", "kl", "value_loss", "values_mean_rollout"):
      assert ma[s][key] == mb[s][key], (s, key, ma[s][key], mb[s][key])
  trees = [_saved_step(d, 4) for d in (a, b)]
  assert ppo_loss.VALUE_HEAD in trees[0][1]["critic"]
  for x, y in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(trees[1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The run reads as a policy (eval / export).
  from jaxreason.checkpoint import load_model
  load_model(str(a / "checkpoints" / "4"))


@pytest.mark.slow  # a subprocess run (~1-2 min on 2 cores)
def test_ppo_critic_and_reward_from_a_reward_model(tmp_path, tiny_sft):
  """critic_init reward_model:RUN: the critic starts as the reward model (score head -> value head),
  which also gives the reward (`reward_model:RUN`)."""
  import json
  import orbax.checkpoint as ocp
  rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(4) for b in range(4)]
  (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  rm = tmp_path / "rm"
  (tmp_path / "rm.yaml").write_text(
      f"output_dir: {rm}\nalgorithm: reward_model\ninit_from: {tiny_sft}\n"
      f"data: {{train: [{tmp_path / 'pairs.jsonl'}], format: preference, seq_len: 16}}\n"
      "train: {global_batch_size: 8, max_steps: 2, log_every: 1}\nlogging: {progress_bar: false}\n")
  _train(tmp_path / "rm.yaml")
  out = tmp_path / "ppo"
  (tmp_path / "ppo.yaml").write_text(TINY_PPO.format(out=out, init=tiny_sft))
  _train(tmp_path / "ppo.yaml", "train.max_steps=1", f"ppo.critic_init=reward_model:{rm}", "ppo.critic_lr=1e-30",
         f"ppo.rewards={{reward_model:{rm}: 1.0}}", "ppo.ppo_epochs=1")
  m = _metrics(out)
  assert np.isfinite(m[1]["value_loss"]) and m[1]["reward_std"] > 0
  with ocp.CheckpointManager(str(rm / "checkpoints")) as mngr:
    rm_params = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(params=ocp.args.StandardRestore())).params
  with ocp.CheckpointManager(str(out / "checkpoints")) as mngr:
    critic = mngr.restore(1, args=ocp.args.Composite(opt_state=ocp.args.StandardRestore())).opt_state["critic"]
  rm_params = dict(rm_params)
  rm_params[ppo_loss.VALUE_HEAD] = rm_params.pop("score_head")
  for x, y in zip(jax.tree.leaves(rm_params), jax.tree.leaves(critic)):  # lr 1e-30: unchanged by the update
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-20)
