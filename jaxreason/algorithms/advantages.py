"""Advantage estimators as one choice (SPEC §9): grpo, rloo, reinforce_pp, reinforce_pp_baseline, gae.

All of them feed the same clipped policy loss and loss aggregations (`algorithms.grpo.loss.policy_loss`):
the sequence-level ones (grpo, rloo) give one advantage per completion [N]; the token-level ones
(REINFORCE++, GAE) one per completion token [N, T] on the rows' completion mask.

Host-side numpy float32 (like GRPO's group advantages): rewards come from Python reward functions
and the per-token inputs (log-probs, values) are fetched once per rollout.
- grpo: r_i - mean_group(r), scaled by the unbiased group / batch std + eps, or not (SPEC §5).
- rloo: r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_group r) (Ahmadian et al. 2024).
- reinforce_pp: token rewards r_t = -kl_coef * (logp_t - ref_t) (k1) with R added at the last
  completion token; return G_t = sum_{s >= t} gamma^(s-t) r_s; whitened over the batch's tokens.
- reinforce_pp_baseline: the same with R - mean_group(R) in place of R.
- gae: delta_t = r_t + gamma V_{t+1} - V_t (V_T = 0), A_t = delta_t + gamma lambda A_{t+1},
  returns G_t = A_t + V_t (InstructGPT / OpenRLHF / TRL PPO); whitened over the batch.
Ragged masks: the recursions run over each row's masked positions in order; a position with mask 0
inside a completion (a budget-forcing injection) is skipped: it neither receives nor breaks the
recursion (the next masked token's value is the "next" value). Whitening uses the masked mean and
the unbiased masked variance (TRL's / verl's `masked_whiten`), eps 1e-8.
"""

from __future__ import annotations

import numpy as np

from jaxreason.algorithms.grpo.loss import group_advantages

ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae")
SEQUENCE_ESTIMATORS = ("grpo", "rloo")  # one advantage per completion
TOKEN_ESTIMATORS = ("reinforce_pp", "reinforce_pp_baseline", "gae")  # one per completion token


def rloo_advantages(rewards: np.ndarray, group_size: int) -> np.ndarray:
  """Leave-one-out baseline: r_i minus the mean of the group's other rewards ([N], groups contiguous)."""
  if group_size < 2:
    raise ValueError("rloo needs rollout.num_generations >= 2 (the baseline is the group's other completions)")
  r = np.asarray(rewards, np.float32).reshape(-1, group_size)
  others = (r.sum(axis=1, keepdims=True) - r) / (group_size - 1)
  return (r - others).astype(np.float32).reshape(-1)


def group_centered(rewards: np.ndarray, group_size: int) -> np.ndarray:
  """R - mean_group(R) (REINFORCE++-baseline's first step)."""
  r = np.asarray(rewards, np.float32).reshape(-1, group_size)
  return (r - r.mean(axis=1, keepdims=True)).astype(np.float32).reshape(-1)


def sequence_scores(estimator: str, rewards: np.ndarray, group_size: int, *, scale_rewards: str = "group",
                    eps: float = 1e-4) -> np.ndarray:
  """Per-completion values [N] from the rewards: the advantages of grpo / rloo, the score the
  token-level estimators place at the last token (R; R - group mean for reinforce_pp_baseline)."""
  if estimator == "grpo":
    return group_advantages(rewards, group_size, scale_rewards=scale_rewards, eps=eps)
  if estimator == "rloo":
    return rloo_advantages(rewards, group_size)
  if estimator == "reinforce_pp_baseline":
    return group_centered(rewards, group_size)
  if estimator in ("reinforce_pp", "gae"):
    return np.asarray(rewards, np.float32)
  raise ValueError(f"advantage_estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")


def token_rewards(score: np.ndarray, mask: np.ndarray, *, kl: np.ndarray | None = None,
                  kl_coef: float = 0.0) -> np.ndarray:
  """r_t = -kl_coef * kl_t on completion tokens, plus the sequence score at each row's last one ([N, T]).

  `kl`: logp_old - ref per token (the k1 estimate); None or kl_coef 0: no KL term. A row without
  completion tokens gets nothing."""
  m = np.asarray(mask, np.float32)
  r = np.zeros(m.shape, np.float32)
  if kl is not None and kl_coef:
    r -= np.float32(kl_coef) * np.asarray(kl, np.float32) * m
  t = m.shape[1]
  has = m.sum(axis=1) > 0
  last = t - 1 - np.argmax(m[:, ::-1] > 0, axis=1)  # [N] last masked position
  rows = np.flatnonzero(has)
  r[rows, last[rows]] += np.asarray(score, np.float32)[rows]
  return r


def discounted_returns(rewards: np.ndarray, mask: np.ndarray, gamma: float = 1.0) -> np.ndarray:
  """G_t = r_t + gamma G_{t+1} over each row's masked positions (0 elsewhere) ([N, T])."""
  r, m = np.asarray(rewards, np.float64), np.asarray(mask) > 0
  out = np.zeros(r.shape, np.float64)
  nxt = np.zeros(r.shape[0], np.float64)
  for t in range(r.shape[1] - 1, -1, -1):
    cur = r[:, t] + gamma * nxt
    nxt = np.where(m[:, t], cur, nxt)
    out[:, t] = np.where(m[:, t], cur, 0.0)
  return out.astype(np.float32)


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  """Generalised advantage estimation over each row's masked positions -> (advantages, returns) [N, T].

  V after the last completion token is 0; values and rewards at mask-0 positions are ignored."""
  r, v, m = np.asarray(rewards, np.float64), np.asarray(values, np.float64), np.asarray(mask) > 0
  n, t = r.shape
  adv = np.zeros((n, t), np.float64)
  next_v, next_a = np.zeros(n), np.zeros(n)
  for j in range(t - 1, -1, -1):
    delta = r[:, j] + gamma * next_v - v[:, j]
    a = delta + gamma * lam * next_a
    adv[:, j] = np.where(m[:, j], a, 0.0)
    next_a = np.where(m[:, j], a, next_a)
    next_v = np.where(m[:, j], v[:, j], next_v)
  returns = np.where(m, adv + v, 0.0)
  return adv.astype(np.float32), returns.astype(np.float32)


def whiten(x: np.ndarray, mask: np.ndarray, eps: float = 1e-8, shift_mean: bool = True) -> np.ndarray:
  """(x - masked mean) / (unbiased masked std + eps) on masked entries, 0 elsewhere."""
  x64, m = np.asarray(x, np.float64), np.asarray(mask, np.float64)
  n = m.sum()
  if n == 0:
    return np.zeros(x64.shape, np.float32)
  mean = (x64 * m).sum() / n
  var = (((x64 - mean) ** 2) * m).sum() / max(n - 1, 1)
  out = (x64 - mean) / (np.sqrt(var) + eps) if shift_mean else x64 / (np.sqrt(var) + eps)
  return (out * m).astype(np.float32)


def token_advantages(estimator: str, score: np.ndarray, mask: np.ndarray, *, kl: np.ndarray | None = None,
                     kl_coef: float = 0.0, values: np.ndarray | None = None, gamma: float = 1.0,
                     lam: float = 0.95, whiten_advantages: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(advantages, returns) [N, T] of a token-level estimator from `sequence_scores(...)`.

  reinforce_pp(_baseline): returns of the token rewards, whitened (advantages), and the returns
  themselves; gae: needs `values` (the rollout critic's, detached)."""
  r = token_rewards(score, mask, kl=kl, kl_coef=kl_coef)
  if estimator in ("reinforce_pp", "reinforce_pp_baseline"):
    ret = discounted_returns(r, mask, gamma)
    adv = ret
  elif estimator == "gae":
    if values is None:
      raise ValueError("advantage_estimator gae needs a critic's values: use algorithm: ppo")
    adv, ret = gae(r, values, mask, gamma, lam)
  else:
    raise ValueError(f"{estimator!r} is not a token-level estimator ({', '.join(TOKEN_ESTIMATORS)})")
  if whiten_advantages:
    adv = whiten(adv, mask)
  return adv.astype(np.float32), ret.astype(np.float32)


def explained_variance(values: np.ndarray, returns: np.ndarray, mask: np.ndarray) -> float:
  """1 - Var(G - V) / Var(G) over masked tokens (nan when the returns do not vary)."""
  m = np.asarray(mask) > 0
  g, v = np.asarray(returns, np.float64)[m], np.asarray(values, np.float64)[m]
  var = g.var() if g.size else 0.0
  return float(1.0 - (g - v).var() / var) if var > 0 else float("nan")
