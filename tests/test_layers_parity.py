"""Each layer against its HuggingFace counterpart (PyTorch fp32, eager attention), levanter-style.

The full-model logits are checked in test_model_parity; these point at the layer at fault:
RMSNorm, RoPE (default and llama3 scaling), attention (GQA, q/k/v bias, Qwen3 q/k norm), the
SwiGLU MLP and one whole decoder block, each fed the same random input.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import VARIANTS, make_hf_model, save_hf_model_dir
from jaxreason.models.hf import load_hf_model
from jaxreason.ops import rope as rope_ops

TOL = 1e-5
B, T = 2, 24


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
  hf = make_hf_model(request.param, seed=sorted(VARIANTS).index(request.param))
  path = save_hf_model_dir(hf, tmp_path_factory.mktemp(request.param))
  return request.param, hf, load_hf_model(path, scan_layers=False)  # per-layer access: model.layers[i]


def _x(seed=0, d=64):
  return np.random.default_rng(seed).normal(size=(B, T, d)).astype(np.float32)


def _positions(offset=0):
  # Row 1 starts late, past llama3's original_max_position_embeddings (32): every frequency band matters.
  return np.stack([np.arange(T), np.arange(T) + 90 + offset]).astype(np.int64)


def _t(a):
  return torch.tensor(np.asarray(a))


def _first(out):
  return out[0] if isinstance(out, tuple) else out


def _hf_rope(hf, x, positions):
  with torch.no_grad():
    cos, sin = hf.model.rotary_emb(_t(x), _t(positions))
  return cos, sin


def _causal_mask():
  return torch.triu(torch.full((T, T), torch.finfo(torch.float32).min), diagonal=1)[None, None].expand(B, 1, T, T)


def _ours_rope(model, positions):
  return rope_ops.sin_cos(jnp.asarray(positions, jnp.int32), rope_ops.inverse_frequencies(model.cfg))


def test_rms_norm_matches_hf(pair):
  _, hf, model = pair
  x = _x(1) * 3.0
  with torch.no_grad():
    ref_final = hf.model.norm(_t(x)).numpy()
    ref_layer = hf.model.layers[0].post_attention_layernorm(_t(x)).numpy()
  np.testing.assert_allclose(np.asarray(model.final_norm(jnp.asarray(x))), ref_final, atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(model.layers[0].mlp_norm(jnp.asarray(x))), ref_layer, atol=TOL, rtol=0)


def test_rope_matches_hf(pair):
  name, hf, model = pair
  positions = _positions()
  cos_ref, sin_ref = _hf_rope(hf, _x(2), positions)
  sin, cos = _ours_rope(model, positions)
  np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=TOL, rtol=0)
  if name == "llama3_rope":  # the scaling is exercised: its frequencies are not the unscaled ones
    assert model.cfg.rope_scaling.rope_type == "llama3"
    plain = 1.0 / (model.cfg.rope_theta ** (np.arange(0, model.cfg.resolved_head_dim, 2) / model.cfg.resolved_head_dim))
    assert not np.allclose(rope_ops.inverse_frequencies(model.cfg), plain, rtol=1e-3)


def test_attention_matches_hf(pair):
  name, hf, model = pair
  x, positions = _x(3), _positions()
  cos_ref, sin_ref = _hf_rope(hf, x, positions)
  with torch.no_grad():
    ref = _first(hf.model.layers[0].self_attn(hidden_states=_t(x), position_embeddings=(cos_ref, sin_ref),
                                              attention_mask=_causal_mask())).numpy()
  sin, cos = _ours_rope(model, positions)
  segments = jnp.ones((B, T), jnp.int32)
  ours, _ = model.layers[0].attn(jnp.asarray(x), sin, cos, jnp.asarray(positions, jnp.int32), segments)
  assert model.cfg.num_kv_heads < model.cfg.num_heads  # GQA
  assert model.cfg.qk_norm == (name == "qwen3") and model.cfg.qkv_bias == name.startswith("qwen2")
  np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)
  assert np.abs(ref).max() > 0.01


def test_mlp_matches_hf(pair):
  _, hf, model = pair
  x = _x(4)
  with torch.no_grad():
    ref = hf.model.layers[1].mlp(_t(x)).numpy()
  np.testing.assert_allclose(np.asarray(model.layers[1].mlp(jnp.asarray(x))), ref, atol=TOL, rtol=0)
  assert np.abs(ref).max() > 0.01


def test_block_matches_hf(pair):
  _, hf, model = pair
  x, positions = _x(5), _positions()
  cos_ref, sin_ref = _hf_rope(hf, x, positions)
  with torch.no_grad():
    ref = _first(hf.model.layers[1](_t(x), attention_mask=_causal_mask(), position_ids=_t(positions),
                                     position_embeddings=(cos_ref, sin_ref))).numpy()
  sin, cos = _ours_rope(model, positions)
  ours, _ = model.layers[1](jnp.asarray(x), sin, cos, jnp.asarray(positions, jnp.int32), jnp.ones((B, T), jnp.int32))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)
  assert not np.allclose(ref, x, atol=1e-2)  # the block changed its input
