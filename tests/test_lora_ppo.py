"""LoRA PPO: the policy trains adapters over a frozen base, the critic trains in full.

In process: one joint step against the full-model step on the same batch (B = 0: the same loss;
the critic gets the same update; each B gets the chain rule of the full gradient, scale * A^T dW;
A, the base and every untargeted weight stay bitwise). End to end (slow): a LoRA PPO run whose
checkpoints hold adapters + critic, loads merged (only the targeted projections differ from the
base) and resumes exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxreason.algorithms.ppo import loss as ppo_loss
from jaxreason.lora import adapters as la
from jaxreason.lora.config import LoraConfig
from jaxreason.train.state import TrainState
from test_grpo_trainer import TEMP, _metrics, _train, tiny_sft  # noqa: F401  (fixture)
from test_lora_runs import _params, _resume_from, _same
from test_ppo import TINY_PPO, P, _ppo_rows, _saved_step, models  # noqa: F401  (fixture)

LR = 0.5


def _step(graphdef, critic_def, params, rows, frozen=None):
  tx = ppo_loss.split_tx({"policy": optax.sgd(LR), "critic": optax.sgd(LR)})
  step = jax.jit(ppo_loss.make_ppo_step(graphdef, critic_def, tx, optax.constant_schedule(LR), P(), temperature=TEMP))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), frozen=frozen)
  n = rows["inputs"].shape[0]
  batch = {k: jnp.asarray(v).reshape((2, n // 2) + v.shape[1:]) for k, v in rows.items()}
  return step(state, batch)


def test_lora_ppo_step_trains_adapters_and_the_full_critic(models):
  graphdef, critic_def, params = models
  rows = _ppo_rows(graphdef, critic_def, params)
  spec = LoraConfig(rank=4, alpha=8.0, targets=("q", "o", "down"))
  trainable, frozen = la.split(params["policy"], spec, seed=0)
  full, mf = _step(graphdef, critic_def, params, rows)
  lora, ml = _step(graphdef, critic_def, {"policy": trainable, "critic": params["critic"]}, rows, frozen)
  for key in ("loss", "policy_loss", "value_loss", "entropy"):
    np.testing.assert_allclose(float(ml[key]), float(mf[key]), rtol=1e-6, err_msg=key)
  assert set(lora.params["policy"]) == {"lora"}  # adapters only: no model weight is trainable
  for x, y in zip(jax.tree.leaves(lora.params["critic"]), jax.tree.leaves(full.params["critic"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)  # the critic: a full update
  _same(lora.frozen, frozen)  # the base is bitwise unchanged
  base, new_full = la.flatten(params["policy"]), la.flatten(full.params["policy"])
  adapters, new = la.flatten(trainable["lora"]), la.flatten(lora.params["policy"]["lora"])
  for path, w in base.items():
    if path + ("a",) not in adapters:
      continue
    a = np.asarray(adapters[path + ("a",)], np.float64)
    np.testing.assert_array_equal(np.asarray(new[path + ("a",)]), a)  # dL/dA = 0 while B = 0
    lead, fan_in, fan_out = la._in_out(path, w.shape)
    dw = (np.asarray(new_full[path], np.float64) - np.asarray(w, np.float64)).reshape(w.shape[:lead] + (fan_in, fan_out))
    # SGD: B_1 = -lr dL/dB = -lr * scale * A^T dL/dW = scale * A^T (W_1 - W_0) of the full step
    want = spec.scale * np.einsum("...ir,...io->...ro", a, dw)
    got = np.asarray(new[path + ("b",)], np.float64)
    assert np.abs(got).max() > 0, path
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_lora_ppo_config_is_accepted():
  from jaxreason.config import load_config
  cfg = load_config(None, base={"output_dir": "/tmp/x", "algorithm": "ppo", "init_from": "x",
                                "lora": {"rank": 4, "alpha": 8.0}})
  assert cfg.algorithm == "ppo" and cfg.lora.rank == 4


LORA_PPO = "lora={rank: 4, alpha: 8.0, targets: [q, v, up]}"


@pytest.mark.slow  # two subprocess runs (~1-2 min on 2 cores)
def test_lora_ppo_checkpoints_adapters_and_resumes_exactly(tmp_path, tiny_sft):
  """a runs 4 steps (beta > 0: the reference is the frozen base); b resumes from a's step 2 and
  reproduces steps 3-4 exactly: adapters, critic and both optimizer states are in the step."""
  from jaxreason.checkpoint import read_json_item
  a, b = tmp_path / "a", tmp_path / "b"
  (tmp_path / "a.yaml").write_text(TINY_PPO.format(out=a, init=tiny_sft))
  sets = (LORA_PPO, "optimizer.lr=2e-2")
  _train(tmp_path / "a.yaml", *sets)
  ma = _metrics(a)
  assert sorted(ma) == [1, 2, 3, 4] and abs(ma[1]["kl"]) < 1e-6  # B = 0: the first rollout's policy is the base
  assert all(np.isfinite(ma[s]["loss"]) for s in ma) and ma[4]["kl"] != 0.0
  assert read_json_item(str(a / "checkpoints"), 4, "lora")["base"] == str(tiny_sft)
  _resume_from(tmp_path, a, b, 2, TINY_PPO, tiny_sft, *sets)
  mb = _metrics(b)
  for s in (3, 4):
    for key in ("loss", "reward_mean", "grad_norm", "kl", "value_loss", "values_mean_rollout"):
      assert ma[s][key] == mb[s][key], (s, key, ma[s][key], mb[s][key])
  trees = [_saved_step(d, 4) for d in (a, b)]
  assert set(trees[0][0]) == {"lora"} and ppo_loss.VALUE_HEAD in trees[0][1]["critic"]
  _same(trees[0], trees[1])
  # The run reads as a policy: the adapters merged onto the base; untargeted weights are the base's.
  merged, base = _params(a), _params(tiny_sft)
  for proj in ("q_proj", "v_proj"):
    assert not np.array_equal(merged["layers"]["attn"][proj], base["layers"]["attn"][proj]), proj
  assert not np.array_equal(merged["layers"]["mlp"]["up"], base["layers"]["mlp"]["up"])
  for path in (("layers", "attn", "k_proj"), ("layers", "attn", "o_proj"), ("layers", "mlp", "down"),
               ("embed", "embedding")):
    x, y = merged, base
    for k in path:
      x, y = x[k], y[k]
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
