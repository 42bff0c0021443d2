"""LoRA dropout (PEFT's train mode): y = x W + scale * dropout(x) A B, the adapters unmerged in the
step; masks drawn from the run's key per step and micro-batch, so runs resume exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxreason.lora import adapters as la
from jaxreason.lora.config import LoraConfig
from jaxreason.lora.train import LoraTransformation
from jaxreason.models.build import init_model
from jaxreason.models.config import ModelConfig
from jaxreason.nn.layers import project
from jaxreason.train.state import TrainState

CFG = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=64)


def test_dropout_projection_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 7, 16)).astype(np.float32)  # [B, T, D] into gate [D, F]
  w = rng.normal(size=(16, 24)).astype(np.float32)
  a, b = rng.normal(size=(16, 4)).astype(np.float32), rng.normal(size=(4, 24)).astype(np.float32)
  key = jax.random.key_data(jax.random.key(5))
  rate, scale = 0.3, 2.0
  lw = la.LoraWeight(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), jnp.float32(scale), key, n_in=1, rate=rate)
  got = np.asarray(project("BTD,DF->BTF", jnp.asarray(x), lw, jnp.float32))
  keep = np.asarray(la.dropout_keep(key, rate, x.shape))
  x_d = np.where(keep, x / (1 - rate), 0.0)
  want = np.einsum("btd,df->btf", x, w) + scale * (x_d @ a @ b)  # dropout on the adapter path only
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  big = np.asarray(la.dropout_keep(key, rate, (200_000,)))
  assert abs(big.mean() - (1 - rate)) < 0.005  # keeps 1 - rate of the inputs
  assert 0.0 < keep.mean() < 1.0


def _sft_step(spec):  # noqa: D103
  from jaxreason.algorithms.sft.loss import make_sft_step
  graphdef, state = nnx.split(init_model(CFG, seed=1))
  params = nnx.to_pure_dict(state)
  trainable, frozen = la.split(params, spec, seed=0)
  tx = LoraTransformation(optax.sgd(0.5).init, optax.sgd(0.5).update, spec)
  step = jax.jit(make_sft_step(graphdef, tx, optax.constant_schedule(0.5)))
  t = np.asarray(np.random.default_rng(3).integers(1, CFG.vocab_size, (4, 12)), np.int32)
  rows = {"inputs": t, "targets": np.roll(t, -1, 1), "weights": np.ones(t.shape, np.float32),
          "positions": np.broadcast_to(np.arange(12, dtype=np.int32), t.shape), "segments": np.ones_like(t)}
  batch = {k: jnp.asarray(v).reshape((2, 2) + v.shape[1:]) for k, v in rows.items()}  # 2 micro-batches

  def run(step_no=0, params=trainable):
    st = TrainState(step=jnp.asarray(step_no, jnp.int32), params=params, opt_state=tx.init(params), frozen=frozen)
    return step(st, batch)
  return run, trainable, frozen


def test_dropout_step_is_deterministic_per_step_and_leaves_the_base():
  targets = ("q", "v", "down")
  run0, trainable, _ = _sft_step(LoraConfig(rank=4, alpha=8.0, targets=targets))
  run, _, frozen = _sft_step(LoraConfig(rank=4, alpha=8.0, targets=targets, dropout=0.5))
  assert isinstance(frozen["dropout"], la.Dropout) and frozen["dropout"].rate == 0.5
  plain, mp = run0()
  s1, m1 = run()
  np.testing.assert_allclose(float(m1["loss"]), float(mp["loss"]), rtol=1e-6)  # B = 0: dropout changes nothing yet
  b = lambda st: np.asarray(st.params["lora"]["layers"]["attn"]["q_proj"]["b"])  # noqa: E731
  assert not np.allclose(b(s1), b(plain), rtol=1e-3)  # the gradient of B sees the dropped inputs
  s2, m2 = run()
  for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):  # same step: the same masks
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  s3, _ = run(step_no=1)
  assert not np.array_equal(b(s3), b(s1))  # another step: other masks
  for path, x in la.flatten(s1.frozen["base"]).items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(la.flatten(frozen["base"])[path]))
  # With B != 0 the dropout step's loss differs from the merged (eval-mode) loss; the sampler's
  # merged weights are unaffected by dropout.
  s4, m4 = run(params=s1.params)
  p4, mp4 = run0(params=s1.params)
  assert float(m4["loss"]) != pytest.approx(float(mp4["loss"]), rel=1e-7)
  merged = la.merged_params(TrainState(step=jnp.zeros((), jnp.int32), params=s1.params, opt_state=None, frozen=frozen))
  want = la.merge({"base": frozen["base"], "scale": frozen["scale"]}, s1.params)
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dropout_config_and_shardings():
  from jaxreason import sharding
  from jaxreason.config import ConfigError
  from jaxreason.models.build import abstract_model
  from jaxreason.train.state import state_shardings
  with pytest.raises(ConfigError, match="dropout"):
    LoraConfig(dropout=1.0)
  spec = LoraConfig(rank=4, alpha=8.0, dropout=0.1, quantize="int8")
  params = nnx.to_pure_dict(nnx.state(init_model(CFG, seed=1)))
  trainable, frozen = la.split(params, spec, seed=0)
  tx = optax.sgd(1.0)
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  sh = state_shardings(nnx.state(abstract_model(CFG)), LoraTransformation(tx.init, tx.update, spec), mesh)
  assert jax.tree.structure(sh.frozen) == jax.tree.structure(frozen)
  jax.device_put(frozen, sh.frozen)


def test_ppo_merges_its_policy_unmerged_with_dropout_and_leaves_the_critic():
  from jaxreason.algorithms.ppo.loss import merge_policy
  params = nnx.to_pure_dict(nnx.state(init_model(CFG, seed=1)))
  trainable, frozen = la.split(params, LoraConfig(rank=4, alpha=8.0, targets=("q",), dropout=0.1), seed=0)
  critic = {"w": jnp.ones((3,))}
  out = merge_policy(frozen, {"policy": trainable, "critic": critic}, jax.random.key(0))
  q = out["policy"]["layers"]["attn"]["q_proj"]
  assert isinstance(q, la.LoraWeight) and q.rate == 0.1 and q.key.shape == (CFG.num_layers, 2)
  assert out["critic"] is critic
  plain = merge_policy(frozen, {"policy": trainable, "critic": critic})  # no rng: merged (sampling, scoring)
  assert not isinstance(plain["policy"]["layers"]["attn"]["q_proj"], la.LoraWeight)


LORA_DROPOUT = "lora={rank: 4, alpha: 8.0, dropout: 0.2}"


@pytest.mark.slow  # two subprocess runs
def test_lora_dropout_sft_resumes_exactly(tmp_path):
  from test_grpo_trainer import _metrics, _train
  from test_lora_runs import LORA_SFT, _params, _resume_from, _same
  from jaxreason import checkpoint
  init = tmp_path / "init"
  checkpoint.save_model(init_model(CFG.replace(vocab_size=128, max_position_embeddings=256), seed=0),
                        str(init / "checkpoints"), 0)
  a, b = tmp_path / "a", tmp_path / "b"
  (tmp_path / "a.yaml").write_text(LORA_SFT.format(out=a, init=init) + "tokenizer: builtin:char\n")
  _train(tmp_path / "a.yaml", LORA_DROPOUT)
  assert checkpoint.read_json_item(str(a / "checkpoints"), 6, "lora")["config"]["dropout"] == 0.2
  ma = _metrics(a)
  _resume_from(tmp_path, a, b, 3, LORA_SFT + "tokenizer: builtin:char\n", init, LORA_DROPOUT)
  mb = _metrics(b)
  for s in (4, 5, 6):
    for key in ("loss", "grad_norm"):
      assert ma[s][key] == mb[s][key], (s, key)
  _same(_params(a), _params(b))
