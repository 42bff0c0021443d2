"""Attention backends against the XLA einsum path (which the HF parity tests cover)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreason.models import ModelConfig
from jaxreason.models.build import init_model
from jaxreason.ops import attention as attn_ops
from jaxreason.ops import masks


def _inputs(t=128, n=4, k=2, h=128, seed=0):
  r = np.random.default_rng(seed)
  q, kk, v = (jnp.asarray(r.normal(size=(2, t, heads, h)), jnp.float32) for heads in (n, k, k))
  # Row 0: two packed documents (positions restart); row 1: 30 left pads then one document.
  seg = np.ones((2, t), np.int32)
  seg[0, 50:] = 2
  seg[1, :30] = 0
  pos = np.stack([np.r_[np.arange(50), np.arange(t - 50)], np.r_[np.zeros(30), np.arange(t - 30)]]).astype(np.int32)
  return q, kk, v, jnp.asarray(pos), jnp.asarray(seg)


def test_mask_semantics_by_hand():
  pos = jnp.asarray([[0, 1, 0, 1]])
  seg = jnp.asarray([[1, 1, 2, 0]])
  m = np.asarray(masks.attention_mask(pos, seg, pos, seg))[0]
  expected = np.array([[1, 0, 0, 0],
                       [1, 1, 0, 0],
                       [0, 0, 1, 0],
                       [0, 0, 0, 0]], bool)  # a pad attends nowhere (its output is ignored)
  np.testing.assert_array_equal(m, expected)


def test_dot_product_attention_call_matches_einsum():
  """The exact call the cuDNN backend makes (GQA layout, bool mask), run with the XLA implementation."""
  q, k, v, pos, seg = _inputs(t=64, h=32)
  m = masks.attention_mask(pos, seg, pos, seg)
  ref = attn_ops.xla_attention(q, k, v, m, 32 ** -0.5)
  out = attn_ops.cudnn_attention(q, k, v, m, 32 ** -0.5, implementation="xla")
  real = np.asarray(seg) != 0
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-6)


def test_splash_kernel_matches_einsum_in_interpret_mode():
  """The TPU splash kernel, run by Pallas' interpreter on CPU, with packing and padding."""
  q, k, v, pos, seg = _inputs()
  m = masks.attention_mask(pos, seg, pos, seg)
  ref = attn_ops.xla_attention(q, k, v, m, 128 ** -0.5)
  out = attn_ops.attention(q, k, v, mask=m, scale=128 ** -0.5, backend="splash", q_segments=seg,
                           kv_segments=seg, self_attention=True)
  real = np.asarray(seg) != 0
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5)


@pytest.mark.parametrize("backend", ["splash"])
def test_model_forward_with_backend_matches_xla(backend, monkeypatch):
  cfg = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=128, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=128)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(1, 128)), jnp.int32)
  ref = init_model(cfg, seed=1)(tokens)
  calls = []  # `attention()` falls back to xla silently: check that the kernel path was really taken
  kernel = getattr(attn_ops, f"{backend}_attention")
  monkeypatch.setattr(attn_ops, f"{backend}_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
  out = nnx.jit(lambda m, t: m(t))(init_model(cfg.replace(attention_backend=backend), seed=1), tokens)
  assert calls, f"the {backend} path did not run"
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_auto_backend_is_xla_on_cpu():
  assert attn_ops.resolve_backend("auto") == "xla"
