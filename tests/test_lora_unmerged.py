"""Unmerged LoRA (`adapters.unmerged`: x W + scale (x A) B inside each projection) computes the
merged model's function: logits (fp32, scanned and unscanned, int8 base) and greedy decoding
through the sampler's KV cache; against a numpy reference of one projection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreason.lora import adapters as la
from jaxreason.lora.config import LoraConfig
from jaxreason.models.build import init_model
from jaxreason.models.config import ModelConfig
from jaxreason.nn.layers import project

CFG = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=64)


def _random_b(trainable, seed=0):
  rng = np.random.default_rng(seed)
  flat = la.flatten(trainable["lora"])
  return {"lora": la.unflatten({p: (jnp.asarray(rng.normal(0, 0.1, v.shape), v.dtype) if p[-1] == "b" else v)
                                for p, v in flat.items()})}


def test_project_matches_numpy_for_head_shaped_weights():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)  # [B, T, N, H] into o [N, H, D]
  w = rng.normal(size=(4, 5, 6)).astype(np.float32)
  a, b = rng.normal(size=(20, 3)).astype(np.float32), rng.normal(size=(3, 6)).astype(np.float32)
  lw = la.LoraWeight(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), jnp.float32(0.5), n_in=2)
  want = np.einsum("btnh,nhd->btd", x, w) + 0.5 * (x.reshape(2, 3, 20) @ a @ b)
  np.testing.assert_allclose(np.asarray(project("BTNH,NHD->BTD", jnp.asarray(x), lw, jnp.float32)), want,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(  # W + scale A B merged gives the same
      np.einsum("btnh,nhd->btd", x, w + 0.5 * (a @ b).reshape(4, 5, 6)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan,quantize", [(True, None), (False, None), (True, "int8")])
def test_unmerged_logits_equal_merged(scan, quantize):
  graphdef, state = nnx.split(init_model(CFG.replace(scan_layers=scan), seed=1))
  spec = LoraConfig(rank=4, alpha=8.0, quantize=quantize)
  trainable, frozen = la.split(nnx.to_pure_dict(state), spec, seed=0)
  trainable = _random_b(trainable)
  toks = jnp.asarray(np.random.default_rng(1).integers(1, CFG.vocab_size, (2, 12)), jnp.int32)
  merged = np.asarray(nnx.merge(graphdef, la.merge(frozen, trainable))(toks))
  unmerged_params = la.unmerged(frozen, trainable)
  assert isinstance(unmerged_params["layers"]["attn"]["q_proj"] if scan else
                    unmerged_params["layers"][0]["attn"]["q_proj"], la.LoraWeight)
  out = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(unmerged_params, toks))
  np.testing.assert_allclose(out, merged, rtol=1e-5, atol=1e-5)
  base = np.asarray(nnx.merge(graphdef, la.merge(frozen, {}))(toks))
  assert np.abs(out - base).max() > 1e-3  # the adapters do change the function


def test_sampler_decodes_the_same_tokens_unmerged():
  from jaxreason.sampling.config import SamplingConfig
  from jaxreason.sampling.sampler import Sampler
  graphdef, state = nnx.split(init_model(CFG, seed=1))
  trainable, frozen = la.split(nnx.to_pure_dict(state), LoraConfig(rank=4, alpha=8.0), seed=0)
  trainable = _random_b(trainable, seed=2)
  cfg = SamplingConfig(max_new_tokens=8, temperature=0.0, n=1)
  prompts = [[3, 4, 5], [7, 8, 9, 10, 11]]
  outs = []
  for params in (la.merge(frozen, trainable), la.unmerged(frozen, trainable)):
    sampler = Sampler.for_graph(graphdef, CFG)
    sampler.set_state(params)
    outs.append(sampler.generate(prompts, cfg, seed=0, engine="dense"))
  for x, y in zip(outs[0].tokens, outs[1].tokens):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for x, y in zip(outs[0].logprobs, outs[1].logprobs):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4)
