"""Scanned layers (stacked [L, ...] parameters, one lax.scan) against the unscanned list of blocks."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from hf_models import make_hf_model, save_hf_model_dir
from jaxreason import checkpoint, sharding
from jaxreason.models import ModelConfig
from jaxreason.models.build import init_model
from jaxreason.models.hf import load_hf_model, save_hf_model
from jaxreason.models.layout import with_scan_layers
from jaxreason.sampling import SamplingConfig
from jaxreason.sampling.sampler import Sampler

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                  num_kv_heads=2, tie_word_embeddings=False)


def _tokens(b=2, t=9, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)), jnp.int32)


def test_same_seed_same_values_and_the_stacked_layout():
  a, b = init_model(CFG.replace(scan_layers=False), seed=1), init_model(CFG, seed=1)
  q = b.layers.attn.q_proj
  assert q[...].shape == (3, 32, 4, 8)
  assert q.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(a.layers[i].mlp.up[...]), np.asarray(b.layers.mlp.up[...][i]))


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_logits_and_gradients_match_unscanned(remat):
  cfg = CFG.replace(remat=remat)
  a, b = init_model(cfg.replace(scan_layers=False), seed=2), init_model(cfg, seed=2)
  tokens = _tokens()
  seg = jnp.asarray([[1] * 9, [0, 0, 0] + [1] * 6], jnp.int32)
  pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
  np.testing.assert_allclose(np.asarray(a(tokens, pos, seg)), np.asarray(b(tokens, pos, seg)), atol=2e-6)

  def loss(m):
    logp = jax.nn.log_softmax(m(tokens, pos, seg)[:, :-1])
    return -(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0] * seg[:, 1:]).mean()
  ga, gb = nnx.jit(nnx.grad(loss))(a), nnx.jit(nnx.grad(loss))(b)
  flat_a = dict(nnx.to_flat_state(ga))
  for path, g in nnx.to_flat_state(gb):
    if path[0] == "layers":
      for i in range(cfg.num_layers):
        np.testing.assert_allclose(np.asarray(g[...][i]), np.asarray(flat_a[("layers", i) + path[1:]][...]),
                                   atol=1e-6, err_msg=str(path))
    else:
      np.testing.assert_allclose(np.asarray(g[...]), np.asarray(flat_a[path][...]), atol=1e-6, err_msg=str(path))


def test_greedy_tokens_match_unscanned():
  a, b = init_model(CFG.replace(scan_layers=False), seed=3), init_model(CFG, seed=3)
  prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
  cfg = SamplingConfig(max_new_tokens=10)
  out_a, out_b = Sampler(a).generate(prompts, cfg), Sampler(b).generate(prompts, cfg)
  assert out_a.tokens == out_b.tokens
  np.testing.assert_allclose(np.asarray(out_a.logprobs, dtype=np.float64),
                             np.asarray(out_b.logprobs, dtype=np.float64), atol=1e-5)


def test_sharded_stacked_params_keep_the_layer_axis_whole():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
  m = init_model(CFG, seed=0, mesh=mesh)
  assert m.layers.mlp.up[...].sharding.spec == P(None, "fsdp", "tensor")
  assert m.layers.attn.q_proj[...].sharding.spec == P(None, "fsdp", "tensor", None)
  u = with_scan_layers(m, False)
  assert u.layers[1].mlp.up[...].sharding.spec == P("fsdp", "tensor")
  np.testing.assert_array_equal(np.asarray(u.layers[1].mlp.up[...]), np.asarray(m.layers.mlp.up[...][1]))


def _all_bytes(d):
  return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d)) if f.endswith(".safetensors")}


@pytest.mark.parametrize("variant", ["qwen2_untied", "qwen3"])
def test_hf_round_trip_byte_identical_scanned_on_a_mesh(variant, tmp_path):
  hf = make_hf_model(variant, seed=5)
  src = save_hf_model_dir(hf, tmp_path / "src", max_shard_size="60KB")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
  scanned = load_hf_model(src, mesh=mesh, scan_layers=True)
  unscanned = load_hf_model(src, scan_layers=False)
  assert scanned.layers.mlp.up[...].ndim == 3
  save_hf_model(scanned, str(tmp_path / "a"), max_shard_size="60KB")
  save_hf_model(unscanned, str(tmp_path / "b"), max_shard_size="60KB")
  a, b = _all_bytes(tmp_path / "a"), _all_bytes(tmp_path / "b")
  assert len(a) > 2 and a == b
  assert json.load(open(tmp_path / "a" / "model.safetensors.index.json")) == \
      json.load(open(tmp_path / "b" / "model.safetensors.index.json"))
  # Against the source written by transformers: the same tensors (file layout is safetensors').
  from test_hf_interop import _all_tensors
  ta, ts = _all_tensors(str(tmp_path / "a")), _all_tensors(src)
  assert sorted(ta) == sorted(ts)
  assert all(ta[k].numpy().tobytes() == ts[k].numpy().tobytes() for k in ts)


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_checkpoint_restores_in_either_layout(saved_scanned, tmp_path):
  src = init_model(CFG.replace(scan_layers=saved_scanned), seed=7)
  checkpoint.save_model(src, str(tmp_path / "ckpt"), step=1)
  tokens = _tokens(seed=4)
  for scan in (False, True):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8, tensor=1))
    m = checkpoint.load_model(str(tmp_path / "ckpt"), mesh=mesh, scan_layers=scan)
    assert m.cfg.scan_layers == scan and isinstance(m.layers, nnx.List) != scan
    np.testing.assert_allclose(np.asarray(m(tokens)), np.asarray(src(tokens)), atol=2e-6)


def test_checkpoint_without_the_field_is_read_as_unscanned():
  d = checkpoint.config_to_json(CFG)
  del d["scan_layers"]
  assert checkpoint.config_from_json(d).scan_layers is False
