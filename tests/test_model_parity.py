"""Logits of jaxreason models vs HuggingFace transformers (PyTorch, fp32, eager attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_models import VARIANTS, make_hf_model, save_hf_model_dir
from jaxreason.models import KVCache
from jaxreason.models.hf import load_hf_model

TOL = 1e-5


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
  hf = make_hf_model(request.param, seed=sorted(VARIANTS).index(request.param))
  path = save_hf_model_dir(hf, tmp_path_factory.mktemp(request.param))
  return request.param, hf, load_hf_model(path)


@nnx.jit
def _forward(model, tokens, positions, segments):
  return model(tokens, positions, segments)


def _hf_logits(hf, tokens, mask=None, positions=None):
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(np.asarray(tokens)),
             attention_mask=None if mask is None else torch.tensor(np.asarray(mask)),
             position_ids=None if positions is None else torch.tensor(np.asarray(positions)))
  return out.logits.float().numpy()


def test_logits_match_hf(pair):
  name, hf, model = pair
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, size=(2, 40), dtype=np.int64)
  ref = _hf_logits(hf, tokens)
  ours = _forward(model, jnp.asarray(tokens, jnp.int32), None, None)
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)
  assert np.abs(ref).max() > 0.1  # the comparison is not between near-zero numbers


def test_left_padded_batch_matches_hf(pair):
  name, hf, model = pair
  rng = np.random.default_rng(1)
  lengths = [12, 7, 3]
  t = max(lengths)
  tokens = np.zeros((3, t), np.int64)
  mask = np.zeros((3, t), np.int64)
  for i, n in enumerate(lengths):
    tokens[i, t - n:] = rng.integers(1, 256, size=n)
    mask[i, t - n:] = 1
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  ref = _hf_logits(hf, tokens, mask, positions)
  ours = np.asarray(_forward(model, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
                             jnp.asarray(mask, jnp.int32)))
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=TOL, rtol=0)


def test_packed_batch_matches_each_document_alone(pair):
  name, hf, model = pair
  rng = np.random.default_rng(2)
  docs = [rng.integers(1, 256, size=n) for n in (9, 5, 11)]
  total = 32
  tokens = np.zeros((1, total), np.int64)
  segments = np.zeros((1, total), np.int64)
  positions = np.zeros((1, total), np.int64)
  start = 0
  for s, doc in enumerate(docs, start=1):
    tokens[0, start:start + len(doc)] = doc
    segments[0, start:start + len(doc)] = s
    positions[0, start:start + len(doc)] = np.arange(len(doc))
    start += len(doc)
  ours = np.asarray(_forward(model, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
                             jnp.asarray(segments, jnp.int32)))
  start = 0
  for doc in docs:
    alone = _hf_logits(hf, doc[None])[0]
    np.testing.assert_allclose(ours[0, start:start + len(doc)], alone, atol=TOL, rtol=0)
    start += len(doc)


def test_cached_decode_matches_full_forward(pair):
  """Prefill a left-padded batch into a KV cache, then decode token by token."""
  name, hf, model = pair
  rng = np.random.default_rng(3)
  b, prompt_len, steps = 2, 6, 5
  tokens = rng.integers(1, 256, size=(b, prompt_len + steps)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, :2] = 0  # row 1 is left-padded by two
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)
  full = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))

  @nnx.jit
  def step(model, tok, pos, seg, cache):
    return model(tok, pos, seg, cache=cache)

  cache = KVCache.init(model.cfg, b, prompt_len + steps + 3)
  logits, cache = step(model, jnp.asarray(tokens[:, :prompt_len]), jnp.asarray(positions[:, :prompt_len]),
                       jnp.asarray(mask[:, :prompt_len]), cache)
  got = [np.asarray(logits)]
  for i in range(prompt_len, prompt_len + steps):
    logits, cache = step(model, jnp.asarray(tokens[:, i:i + 1]), jnp.asarray(positions[:, i:i + 1]),
                         jnp.asarray(mask[:, i:i + 1]), cache)
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], full[real], atol=TOL, rtol=0)


def test_bf16_compute_is_close_and_logits_are_fp32(tmp_path):
  hf = make_hf_model("qwen2_untied", seed=5)
  path = save_hf_model_dir(hf, tmp_path)
  model = load_hf_model(path, dtype="bfloat16")
  assert model.embed.embedding[...].dtype == jnp.float32  # fp32 master weights
  tokens = np.random.default_rng(0).integers(0, 256, size=(2, 16))
  ours = _forward(model, jnp.asarray(tokens, jnp.int32), None, None)
  assert ours.dtype == jnp.float32
  ref = _hf_logits(hf, tokens)
  err = np.abs(np.asarray(ours) - ref).max()
  assert err < 0.1 * np.abs(ref).max(), err


def test_remat_gives_same_logits_and_grads(tmp_path):
  hf = make_hf_model("llama", seed=6)
  path = save_hf_model_dir(hf, tmp_path)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(2, 16)), jnp.int32)

  def loss_and_grad(model):
    def loss(m):
      return jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])
    return nnx.jit(nnx.value_and_grad(loss))(model)

  base_l, base_g = loss_and_grad(load_hf_model(path))
  for policy in ("full", "dots"):
    l, g = loss_and_grad(load_hf_model(path, remat=policy))
    np.testing.assert_allclose(l, base_l, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g, base_g)
