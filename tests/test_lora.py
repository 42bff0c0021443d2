"""LoRA / QLoRA (SPEC §10): adapters on a frozen base, through the shared train step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreason.lora import adapters as la
from jaxreason.lora.config import LoraConfig, resolve_targets
from jaxreason.models.build import init_model
from jaxreason.models.config import ModelConfig
from jaxreason.train.optim import make_optimizer
from jaxreason.train.state import TrainState

CFG = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=64)


def _tokens(b=2, t=12, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(1, CFG.vocab_size, (b, t)), jnp.int32)


def _logits(graphdef, params, tokens):
  return np.asarray(nnx.merge(graphdef, params)(tokens))


def test_targets_by_name_peft_name_and_regex():
  assert resolve_targets(["q", "v_proj"]) == ("q", "v")
  assert resolve_targets([".*_proj"]) == ("q", "k", "v", "o", "gate", "up", "down")
  assert resolve_targets(["(gate|up)"]) == ("gate", "up")
  with pytest.raises(ValueError, match="matches no projection"):
    resolve_targets(["qkv"])


@pytest.mark.parametrize("scan", [True, False])
def test_b_zero_gives_exactly_the_base_logits(scan):
  model = init_model(CFG.replace(scan_layers=scan), seed=1)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  spec = LoraConfig(rank=4, alpha=8.0)
  trainable, frozen = la.split(params, spec, seed=0)
  # every projection of every layer got A [.., in, r] (random) and B [.., r, out] = 0
  flat = la.flatten(trainable["lora"])
  assert len(flat) == 2 * 7 * (1 if scan else CFG.num_layers)
  assert all(np.all(np.asarray(v) == 0) for p, v in flat.items() if p[-1] == "b")
  assert all(np.std(np.asarray(v)) > 0 for p, v in flat.items() if p[-1] == "a")
  toks = _tokens()
  np.testing.assert_array_equal(_logits(graphdef, la.merge(frozen, trainable), toks), _logits(graphdef, params, toks))


def test_merge_is_w_plus_scaled_ab_in_hf_layout():
  """W' = W + (alpha / r) A B, A/B in the flattened HF order (q: [D, N*H]); rsLoRA alpha / sqrt(r)."""
  params = nnx.to_pure_dict(nnx.state(init_model(CFG.replace(scan_layers=False), seed=1)))
  for rs, scale in ((False, 8.0 / 4), (True, 8.0 / 2)):
    spec = LoraConfig(rank=4, alpha=8.0, targets=("q", "o"), rslora=rs)
    trainable, frozen = la.split(params, spec, seed=0)
    rng = np.random.default_rng(0)
    trainable = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), trainable)
    merged = la.merge(frozen, trainable)
    a, b = (np.asarray(trainable["lora"]["layers"][1]["attn"]["q_proj"][k], np.float64) for k in "ab")
    w = np.asarray(params["layers"][1]["attn"]["q_proj"], np.float64)
    want = w.reshape(32, 32) + scale * a @ b
    np.testing.assert_allclose(np.asarray(merged["layers"][1]["attn"]["q_proj"]).reshape(32, 32), want, rtol=1e-5, atol=1e-6)
    a, b = (np.asarray(trainable["lora"]["layers"][0]["attn"]["o_proj"][k], np.float64) for k in "ab")
    w = np.asarray(params["layers"][0]["attn"]["o_proj"], np.float64)  # [N, H, D] -> [N*H, D]
    np.testing.assert_allclose(np.asarray(merged["layers"][0]["attn"]["o_proj"]).reshape(32, 32),
                               w.reshape(32, 32) + scale * a @ b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merged["layers"][0]["mlp"]["up"], params["layers"][0]["mlp"]["up"])


def test_a_lora_step_changes_only_the_adapters():
  from jaxreason.algorithms.sft.loss import make_sft_step
  model = init_model(CFG, seed=1)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  spec = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
  trainable, frozen = la.split(params, spec, seed=0)
  tx, schedule = make_optimizer(trainable, lr=1e-2, total_steps=10, warmup=0)
  st = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable), frozen=frozen)
  # the optimizer state is adapter-sized
  assert la.tree_bytes(st.opt_state) <= 2 * la.tree_bytes(trainable) + 64
  step = jax.jit(make_sft_step(graphdef, tx, schedule))
  t = _tokens(4, 12)
  batch = {"inputs": t, "targets": jnp.roll(t, -1, 1), "weights": jnp.ones_like(t, jnp.float32),
           "positions": jnp.broadcast_to(jnp.arange(12), t.shape), "segments": jnp.ones_like(t)}
  batch = jax.tree.map(lambda x: x[None], batch)
  losses = []
  for _ in range(3):
    st, m = step(st, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0]
  for path, x in la.flatten(st.frozen["base"]).items():  # the base is untouched
    np.testing.assert_array_equal(np.asarray(x), np.asarray(la.flatten(frozen["base"])[path]))
  for path, x in la.flatten(st.params["lora"]).items():  # every adapter moved (B from 0, A through B)
    assert not np.array_equal(np.asarray(x), np.asarray(la.flatten(trainable["lora"])[path])), path
  assert set(st.params) == {"lora"}


def test_qlora_int8_logits_near_the_fp32_base_and_smaller():
  model = init_model(CFG, seed=1)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  spec = LoraConfig(rank=4, alpha=8.0, quantize="int8")
  trainable, frozen = la.split(params, spec, seed=0)
  qs = [x for x in jax.tree.leaves(frozen["base"], is_leaf=lambda x: isinstance(x, la.QTensor))
        if isinstance(x, la.QTensor)]
  assert len(qs) == 7 and all(q.q.dtype == jnp.int8 for q in qs)
  toks = _tokens(4, 16)
  base, q = _logits(graphdef, params, toks), _logits(graphdef, la.merge(frozen, trainable), toks)
  # Stated tolerance: int8 per-channel absmax keeps the logits within 2% of their spread.
  err = np.max(np.abs(q - base)) / np.ptp(base)
  assert 0 < err < 0.02, err
  proj = lambda tree: la.tree_bytes([v for p, v in la.flatten(tree).items() if la.projection_of(p)])  # noqa: E731
  assert proj(frozen["base"]) < 0.3 * proj({k: v for k, v in params.items() if k in la.MODEL_KEYS})


def test_base_dtype_keeps_the_frozen_base_in_bf16_and_the_state_shardings_cover_it():
  from jaxreason import sharding
  from jaxreason.lora.train import LoraTransformation
  from jaxreason.models.build import abstract_model
  from jaxreason.train.state import state_shardings
  model = init_model(CFG, seed=1)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  spec = LoraConfig(rank=4, alpha=8.0, base_dtype="bfloat16", quantize="int8", targets=("q",))
  trainable, frozen = la.split(params, spec, seed=0)
  assert frozen["base"]["embed"]["embedding"].dtype == jnp.bfloat16
  assert trainable["lora"]["layers"]["attn"]["q_proj"]["a"].dtype == jnp.float32  # adapters stay fp32
  tx, _ = make_optimizer(trainable, lr=1e-3, total_steps=10, warmup=0)
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  sh = state_shardings(nnx.state(abstract_model(CFG)), LoraTransformation(tx.init, tx.update, spec), mesh)
  assert jax.tree.structure(sh.params) == jax.tree.structure(trainable)
  assert jax.tree.structure(sh.frozen) == jax.tree.structure(frozen)


def test_sharded_qlora_step_equals_one_device():
  """A LoRA (int8 base) SFT step on 8 devices (data 2 x fsdp 2 x tensor 2; base sharded by the
  rules, adapters replicated) = the same step on one device."""
  from jaxreason import sharding
  from jaxreason.algorithms.sft.loss import make_sft_step
  from jaxreason.lora.train import LoraTransformation
  from jaxreason.models.build import abstract_model
  from jaxreason.train.loop import global_batch
  from jaxreason.train.state import state_shardings
  from jaxreason.train.step import jit_step
  from jax.sharding import NamedSharding, PartitionSpec
  import optax
  graphdef, state = nnx.split(init_model(CFG, seed=1))
  spec = LoraConfig(rank=4, alpha=8.0, quantize="int8")
  trainable, frozen = la.split(nnx.to_pure_dict(state), spec, seed=0)
  trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # B != 0: the adapters matter
  tx = LoraTransformation(optax.sgd(1.0).init, optax.sgd(1.0).update, spec)
  step = make_sft_step(graphdef, tx, optax.constant_schedule(1.0))
  t = np.asarray(_tokens(8, 12, seed=3))
  rows = {"inputs": t, "targets": np.roll(t, -1, 1), "weights": np.ones(t.shape, np.float32),
          "positions": np.broadcast_to(np.arange(12, dtype=np.int32), t.shape), "segments": np.ones_like(t)}
  st = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable), frozen=frozen)
  want_state, want = jax.jit(step)(st, {k: jnp.asarray(v).reshape((2, 4) + v.shape[1:]) for k, v in rows.items()})
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2), jax.devices()[:8])
  shard = state_shardings(nnx.state(abstract_model(CFG)), tx, mesh, sharding.TRAIN_RULES)
  bs = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None))
  with sharding.use_mesh(mesh, sharding.TRAIN_RULES):
    got_state, got = jit_step(step, shard, bs)(jax.device_put(st, shard), global_batch(rows, 2, 8, bs))
  np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=2e-5)
  for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
