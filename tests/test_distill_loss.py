"""KD losses (SPEC §11) and their gradients against float64 numpy references, chunked over the
sequence (chunk smaller than T, with padding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreason.algorithms.distill.loss import chunked_kd, kd_loss

B, T, D, V = 2, 7, 5, 11


def np_div(zs, zt, kind, beta, tau):
  """SPEC §11 on one position's logits, float64."""
  def logsm(z):
    z = z / tau
    z = z - z.max()
    return z - np.log(np.exp(z).sum())
  ls, lt = logsm(zs), logsm(zt)
  ps, pt = np.exp(ls), np.exp(lt)
  if kind == "forward_kl":
    d = (pt * (lt - ls)).sum()
  elif kind == "reverse_kl":
    d = (ps * (ls - lt)).sum()
  else:
    m = beta * pt + (1 - beta) * ps
    d = beta * (pt * (lt - np.log(m))).sum() + (1 - beta) * (ps * (ls - np.log(m))).sum()
  return d * tau ** 2


def _data(seed=0):
  r = np.random.default_rng(seed)
  return (r.normal(size=(B, T, D)), r.normal(size=(V, D)), r.normal(size=(B, T, 3)), r.normal(size=(V, 3)),
          r.integers(0, V, (B, T)), (r.random((B, T)) > 0.3).astype(np.float64))


@pytest.mark.parametrize("kind,beta,tau", [("forward_kl", 0.5, 1.0), ("forward_kl", 0.5, 2.0), ("reverse_kl", 0.5, 1.0),
                                           ("reverse_kl", 0.5, 0.7), ("jsd", 0.5, 1.0), ("jsd", 0.2, 1.5)])
def test_kd_values_and_gradients_match_numpy(kind, beta, tau):
  hs, ws, ht, wt, tg, mask = _data()
  zs, zt = hs @ ws.T, ht @ wt.T  # [B, T, V]
  ref = np.array([[np_div(zs[i, j], zt[i, j], kind, beta, tau) for j in range(T)] for i in range(B)])
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  d, lp = chunked_kd(f32(hs), f32(ws), f32(ht), f32(wt), jnp.asarray(tg), kind=kind, beta=beta, temperature=tau, chunk=3)
  np.testing.assert_allclose(np.asarray(d), ref, rtol=1e-5, atol=1e-6)
  ls = zs - zs.max(-1, keepdims=True)
  ls = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
  np.testing.assert_allclose(np.asarray(lp), np.take_along_axis(ls, tg[..., None], -1)[..., 0], rtol=1e-5, atol=1e-6)

  # d/d(student hidden) of the masked sum: numpy finite differences on the logits, chained through the table.
  eps, g_z = 1e-6, np.zeros_like(zs)
  for i in range(B):
    for j in range(T):
      for v in range(V):
        e = np.zeros(V)
        e[v] = eps
        g_z[i, j, v] = mask[i, j] * (np_div(zs[i, j] + e, zt[i, j], kind, beta, tau)
                                     - np_div(zs[i, j] - e, zt[i, j], kind, beta, tau)) / (2 * eps)
  want_h, want_w = g_z @ ws, np.einsum("btv,btd->vd", g_z, hs)

  def total(hs_, ws_, ht_, wt_):
    d, _ = chunked_kd(hs_, ws_, ht_, wt_, jnp.asarray(tg), kind=kind, beta=beta, temperature=tau, chunk=3)
    return jnp.sum(d * f32(mask))

  gh, gw, ght, gwt = jax.grad(total, argnums=(0, 1, 2, 3))(f32(hs), f32(ws), f32(ht), f32(wt))
  np.testing.assert_allclose(np.asarray(gh), want_h, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gw), want_w, rtol=1e-4, atol=1e-5)
  assert not np.any(np.asarray(ght)) and not np.any(np.asarray(gwt))  # the teacher gets no gradient


def test_kd_ce_mix_is_token_mean_over_the_mask():
  hs, ws, ht, wt, tg, mask = _data(1)
  d, lp = chunked_kd(*(jnp.asarray(x, jnp.float32) for x in (hs, ws, ht, wt)), jnp.asarray(tg), kind="forward_kl")
  n = mask.sum()
  loss, sums = kd_loss(d, lp, jnp.asarray(mask), 0.7, jnp.asarray(n))
  kd, ce = (np.asarray(d) * mask).sum() / n, (-np.asarray(lp) * mask).sum() / n
  np.testing.assert_allclose(float(loss), 0.3 * ce + 0.7 * kd, rtol=1e-6)


def test_quickstart_distill_config_is_valid():
  import os
  from jaxreason.config import load_config
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = load_config(os.path.join(repo, "configs", "quickstart_distill.yaml"))
  teacher = load_config(os.path.join(repo, "configs", "quickstart.yaml"))
  assert cfg.algorithm == "distill" and cfg.distill.teacher == teacher.output_dir
  assert cfg.model.num_layers * 2 == teacher.model.num_layers and cfg.model.hidden_size == teacher.model.hidden_size
  # The teacher's column-by-column traces (not its extra direct-answer rows) and its steps; the SFT baseline
  # is this file with algorithm=sft, so the same data and steps by construction.
  assert cfg.data.train[0] == teacher.data.train[0] and cfg.train == teacher.train
  assert [s.path for s in cfg.data.train] == ["task:addition:n=40000,seed=0,min_digits=2,max_digits=5"]
  sft = load_config(os.path.join(repo, "configs", "quickstart_distill.yaml"), ["algorithm=sft"])
  assert sft.model == cfg.model
