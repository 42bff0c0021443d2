"""Meshes and sharding rules on 8 fake CPU devices (set in conftest)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hf_models import make_hf_model, save_hf_model_dir
from jaxreason import sharding
from jaxreason.models import ModelConfig
from jaxreason.models.build import init_model, reshard_model
from jaxreason.models.hf import load_hf_model


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
  return save_hf_model_dir(make_hf_model("qwen2_untied", seed=7), tmp_path_factory.mktemp("q"))


def _logits(model, tokens, mesh=None, rules=sharding.TRAIN_RULES):
  @nnx.jit
  def f(model, tokens):
    return model(tokens)
  if mesh is None:
    return np.asarray(f(model, tokens))
  with sharding.use_mesh(mesh, rules):
    tokens = jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"))))
    return np.asarray(f(model, tokens))


def test_eight_devices_available():
  assert jax.device_count() == 8


@pytest.mark.parametrize("mesh_cfg", [sharding.MeshConfig(data=1, fsdp=4, tensor=2),
                                      sharding.MeshConfig(data=2, fsdp=4, tensor=1)],
                         ids=["fsdp4_tensor2", "data2_fsdp4"])
def test_sharded_logits_equal_single_device(qwen_dir, mesh_cfg):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(8, 16)), jnp.int32)
  single = _logits(load_hf_model(qwen_dir), tokens)
  mesh = sharding.make_mesh(mesh_cfg)
  model = load_hf_model(qwen_dir, mesh=mesh)
  np.testing.assert_allclose(_logits(model, tokens, mesh), single, atol=1e-5, rtol=0)


def test_parameters_carry_the_rule_shardings(qwen_dir):
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
  model = load_hf_model(qwen_dir, mesh=mesh, scan_layers=False)  # per-layer specs (scanned: test_scan_layers)
  attn, mlp = model.layers[0].attn, model.layers[0].mlp
  # Expected specs written from TRAIN_RULES by hand: embed->fsdp, heads/kv_heads/mlp/vocab->tensor.
  expected = {
      "embedding [V, D]": (model.embed.embedding, P("tensor", "fsdp")),
      "lm_head [V, D]": (model.lm_head, P("tensor", "fsdp")),
      "q_proj [D, N, H]": (attn.q_proj, P("fsdp", "tensor", None)),
      "k_proj [D, K, H]": (attn.k_proj, P("fsdp", "tensor", None)),
      "o_proj [N, H, D]": (attn.o_proj, P("tensor", None, "fsdp")),
      "q_bias [N, H]": (attn.q_bias, P("tensor", None)),
      "gate [D, F]": (mlp.gate, P("fsdp", "tensor")),
      "down [F, D]": (mlp.down, P("tensor", "fsdp")),
      "norm [D]": (model.final_norm.scale, P(None)),
  }
  for name, (var, spec) in expected.items():
    arr = var[...]
    assert isinstance(arr.sharding, NamedSharding), name
    assert arr.sharding.spec == spec, (name, arr.sharding.spec)
    assert arr.sharding.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}
  # Each device holds 1/8 of q_proj.
  shard = attn.q_proj[...].addressable_shards[0].data
  assert shard.shape == (64 // 4, 4 // 2, 16)


def test_sampling_preset_drops_fsdp_from_weights(qwen_dir):
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
  model = load_hf_model(qwen_dir, mesh=mesh, scan_layers=False)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, size=(4, 8)), jnp.int32)
  before = _logits(model, tokens, mesh)
  sampler_model = reshard_model(model, mesh, sharding.SAMPLING_RULES)
  assert sampler_model.layers[0].attn.q_proj[...].sharding.spec == P(None, "tensor", None)
  assert sampler_model.embed.embedding[...].sharding.spec == P("tensor", None)
  np.testing.assert_allclose(_logits(sampler_model, tokens, mesh, sharding.SAMPLING_RULES), before,
                             atol=1e-5, rtol=0)


def test_indivisible_dimension_stays_replicated():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=4))
  # 2 KV heads cannot be split 4 ways: replicated along tensor; embed 64 splits over fsdp=2.
  spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), sharding.TRAIN_RULES, mesh, (64, 2, 16))
  assert spec == P("fsdp", None, None)
  # No mesh axis is used twice.
  rules = (("a", ("fsdp", "tensor")), ("b", "tensor"))
  assert sharding.logical_to_spec(("a", "b"), rules, mesh, (8, 8)) == P(("fsdp", "tensor"), None)


def test_init_model_sharded_matches_unsharded():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, tie_word_embeddings=False, scan_layers=False)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  a, b = init_model(cfg, seed=3), init_model(cfg, seed=3, mesh=mesh)
  assert b.layers[1].mlp.up[...].sharding.spec == P("fsdp", "tensor")
  for (pa, va), (pb, vb) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
    assert pa == pb
    np.testing.assert_array_equal(np.asarray(va[...]), np.asarray(vb[...]))


def test_init_follows_llama_conventions():
  """SPEC §2 (seed 003): N(0, 0.02); residual output projections N(0, 0.02/sqrt(2L)); norms 1."""
  cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_layers=8, num_heads=4,
                    num_kv_heads=2, qkv_bias=True, scan_layers=False)
  m = init_model(cfg, seed=0)
  std = lambda v: float(np.std(np.asarray(v[...])))
  assert abs(std(m.embed.embedding) - 0.02) < 0.001
  assert abs(std(m.layers[0].attn.q_proj) - 0.02) < 0.001
  assert abs(std(m.layers[0].mlp.down) - 0.02 / 4.0) < 0.0003
  assert abs(std(m.layers[3].attn.o_proj) - 0.02 / 4.0) < 0.0003
  assert np.all(np.asarray(m.final_norm.scale[...]) == 1.0)
  assert np.all(np.asarray(m.layers[0].attn.q_bias[...]) == 0.0)


def test_bad_mesh_config_is_a_clear_error():
  with pytest.raises(ValueError, match="multiply to the device count"):
    sharding.MeshConfig(data=3, fsdp=1, tensor=1).shape(8)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.MeshConfig(data=-1, fsdp=-1).shape(8)
