"""SFT loss and gradients against PyTorch; accumulation and packing equivalences; optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from hf_models import make_hf_model, save_hf_model_dir
from jaxreason.models.hf import load_hf_model, param_map
from jaxreason.algorithms.sft import loss as sft
from jaxreason.train import optim
from jaxreason.train.state import TrainState
from jaxreason.algorithms.sft.loss import make_sft_step


def _batch(rng, b=3, t=12, vocab=256):
  inputs = rng.integers(0, vocab, size=(b, t)).astype(np.int32)
  targets = rng.integers(0, vocab, size=(b, t)).astype(np.int32)
  lengths = [12, 9, 5]
  segments = np.zeros((b, t), np.int32)
  weights = np.zeros((b, t), np.float32)
  for i, n in enumerate(lengths):
    segments[i, :n] = 1
    weights[i, n // 3:n] = 1.0  # response part
    weights[i, n - 2] = 10.0    # an up-weighted tag token
  positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  return dict(inputs=inputs, targets=targets, weights=weights, positions=positions, segments=segments)


def _torch_loss(hf, batch, normalization):
  inputs = torch.tensor(batch["inputs"], dtype=torch.long)
  mask = torch.tensor(batch["segments"] > 0, dtype=torch.long)
  logits = hf(input_ids=inputs, attention_mask=mask).logits.float()
  logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(batch["targets"], dtype=torch.long)[..., None])[..., 0]
  w = torch.tensor(batch["weights"])
  ce = -logp * w
  trained = (w > 0).float()
  if normalization == "token":  # SPEC §2: sum(ce * w) / number of response tokens
    return ce.sum() / trained.sum()
  per_seq = ce.sum(-1) / trained.sum(-1)
  return per_seq.mean()


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_loss_and_grads_match_pytorch(tmp_path, normalization):
  hf = make_hf_model("qwen2_untied", seed=31)
  model = load_hf_model(save_hf_model_dir(hf, tmp_path))
  batch = _batch(np.random.default_rng(0))
  ref = _torch_loss(hf, batch, normalization)
  ref.backward()
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  norms = sft.normalizers(jb["weights"], jb["segments"])

  def loss_fn(p):
    return sft.sft_loss_terms(nnx.merge(graphdef, p), jb, normalization=normalization, norms=norms, chunk=5)[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-6, atol=1e-6)
  torch_grads = {n: p.grad.numpy() for n, p in hf.named_parameters()}
  from jaxreason.models.layout import stacked_path
  for e in param_map(model.cfg):
    path, layer = stacked_path(e.path)  # the model is scanned: layer i of the stacked gradient
    ours = grads
    for k in path:
      ours = ours[k]
    ours = ours if layer is None else ours[layer]
    np.testing.assert_allclose(np.asarray(ours), e.to_ours(torch_grads[e.hf_name]), atol=2e-6, rtol=1e-4,
                               err_msg=e.hf_name)


def _state(model, tx):
  graphdef, st = nnx.split(model)
  params = nnx.to_pure_dict(st)
  return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def test_gradient_accumulation_equals_big_batch(tmp_path):
  hf = make_hf_model("llama", seed=2)
  model = load_hf_model(save_hf_model_dir(hf, tmp_path))
  rng = np.random.default_rng(1)
  b1, b2 = _batch(rng), _batch(rng)
  big = {k: np.concatenate([b1[k], b2[k]])[None] for k in b1}                  # [1, 6, T]
  acc = {k: np.stack([np.concatenate([b1[k], b2[k]])[:3], np.concatenate([b1[k], b2[k]])[3:]]) for k in b1}  # [2, 3, T]
  tx = optax.sgd(1.0)
  sched = optax.constant_schedule(1.0)
  for norm in ("token", "sequence"):
    graphdef, state = _state(model, tx)
    step = jax.jit(make_sft_step(graphdef, tx, sched, normalization=norm))
    s_big, m_big = step(state, {k: jnp.asarray(v) for k, v in big.items()})
    graphdef, state = _state(model, tx)
    s_acc, m_acc = step(state, {k: jnp.asarray(v) for k, v in acc.items()})
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5),
                 s_acc.params, s_big.params)


def test_packed_and_padded_give_the_same_loss(tmp_path):
  hf = make_hf_model("qwen3", seed=4)
  model = load_hf_model(save_hf_model_dir(hf, tmp_path))
  rng = np.random.default_rng(2)
  docs = [(rng.integers(1, 256, size=n).astype(np.int32), n) for n in (7, 4, 9)]
  t = 12
  padded = {k: np.zeros((3, t), np.float32 if k == "weights" else np.int32)
            for k in ("inputs", "targets", "weights", "positions", "segments")}
  packed = {k: np.zeros((2, t), v.dtype) for k, v in padded.items()}
  row_fill = [0, 0]
  placement = [0, 0, 1]  # docs 0 and 1 share packed row 0
  for i, (ids, n) in enumerate(docs):
    tgt = np.roll(ids, -1)
    w = (np.arange(n) >= n // 2).astype(np.float32)
    for target, r, off, seg in ((padded, i, 0, 1), (packed, placement[i], row_fill[placement[i]], None)):
      seg = seg if seg is not None else (1 + sum(1 for j in range(i) if placement[j] == r))
      target["inputs"][r, off:off + n] = ids
      target["targets"][r, off:off + n] = tgt
      target["weights"][r, off:off + n] = w
      target["positions"][r, off:off + n] = np.arange(n)
      target["segments"][r, off:off + n] = seg
    row_fill[placement[i]] += n
  graphdef, st = nnx.split(model)
  params = nnx.to_pure_dict(st)
  for norm in ("token", "sequence"):
    losses = []
    for b in (padded, packed):
      jb = {k: jnp.asarray(v) for k, v in b.items()}
      norms = sft.normalizers(jb["weights"], jb["segments"])
      losses.append(float(sft.sft_loss_terms(nnx.merge(graphdef, params), jb, normalization=norm, norms=norms)[0]))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def test_schedule_matches_hand_computed_values():
  s = optim.make_schedule(1e-3, total_steps=100, warmup=10, decay="cosine", min_lr_ratio=0.1)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), 0.5e-3, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
  # halfway through the 90 decay steps: min + (peak - min) * (1 + cos(pi/2)) / 2
  np.testing.assert_allclose(float(s(55)), 1e-4 + 0.9e-3 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(float(s(100)), 1e-4, rtol=1e-5)
  s0 = optim.make_schedule(2.0, total_steps=21, warmup=1, decay="linear")  # 20 decay steps
  np.testing.assert_allclose(float(s0(1)), 2.0)
  np.testing.assert_allclose(float(s0(11)), 1.0, rtol=1e-6)
  assert optim.warmup_steps(1000, None, 0.05) == 50


def test_weight_decay_mask_and_update_by_hand():
  params = {"embed": {"embedding": jnp.ones((4, 2))}, "lm_head": jnp.ones((4, 2)),
            "layers": {0: {"attn": {"q_proj": jnp.ones((2, 1, 2)), "q_bias": jnp.ones((1, 2))},
                           "attn_norm": {"scale": jnp.ones((2,))}}}}
  mask = optim.decay_mask(params)
  assert mask["embed"]["embedding"] is False and mask["lm_head"] is False
  assert mask["layers"][0]["attn"]["q_proj"] is True
  assert mask["layers"][0]["attn"]["q_bias"] is False  # a bias, though stored 2-D as [N, H]
  assert mask["layers"][0]["attn_norm"]["scale"] is False
  tx, _ = optim.make_optimizer(params, lr=0.1, total_steps=10, warmup=0, decay="constant", weight_decay=0.5,
                               max_grad_norm=None)
  zero = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zero, tx.init(params), params)
  # Zero gradient: Adam's term is 0, so the update is -lr * wd * p where decayed, else 0.
  assert float(upd["layers"][0]["attn"]["q_proj"][0, 0, 0]) == pytest.approx(-0.1 * 0.5)
  assert float(upd["layers"][0]["attn_norm"]["scale"][0]) == 0.0
  assert float(upd["embed"]["embedding"][0, 0]) == 0.0
