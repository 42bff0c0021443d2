"""AdamW with a weight-decay mask, warm-up + decay schedule and global-norm clipping (Optax).

Weight decay applies to >= 2-D weights only (norm scales and biases are never decayed, seed 003);
embeddings (the token embedding and an untied lm_head) are decayed only with `decay_embeddings`.
Schedule: linear warm-up from 0 to `lr`, then cosine (or linear, or constant) to `min_lr_ratio * lr`
at the last step (s1: 5% warm-up, cosine to 0; seed 003: min_lr = 0.1 x peak).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

_EMBEDDING_KEYS = ("embed", "lm_head")


def warmup_steps(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
  if warmup_steps is not None:
    return warmup_steps
  return int(math.ceil(warmup_ratio * total_steps))


def make_schedule(lr: float, total_steps: int, warmup: int, decay: str = "cosine",
                  min_lr_ratio: float = 0.0) -> optax.Schedule:
  end = lr * min_lr_ratio
  warm = optax.linear_schedule(0.0, lr, max(warmup, 1)) if warmup > 0 else optax.constant_schedule(lr)
  rest = max(total_steps - warmup, 1)
  if decay == "cosine":
    tail = optax.cosine_decay_schedule(lr, rest, alpha=min_lr_ratio)
  elif decay == "linear":
    tail = optax.linear_schedule(lr, end, rest)
  elif decay == "constant":
    tail = optax.constant_schedule(lr)
  else:
    raise ValueError(f"schedule decay must be cosine, linear or constant, got {decay!r}")
  if warmup <= 0:
    return tail
  return optax.join_schedules([warm, tail], [warmup])


def decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
  """True where weight decay applies: weights that are >= 2-D in the HF layout (matrices), i.e. not
  norm scales and not biases (ours keep head axes, e.g. q_bias [N, H], so go by name), and not
  the embeddings unless asked."""
  def keep(path, x):
    names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    if not decay_embeddings and names and names[0] in _EMBEDDING_KEYS:
      return False
    if names and (names[-1] == "scale" or names[-1].endswith("bias")):
      return False
    return x.ndim >= 2
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(params: Any, *, lr: float, total_steps: int, warmup: int, decay: str = "cosine",
                   min_lr_ratio: float = 0.0, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.0, decay_embeddings: bool = False,
                   max_grad_norm: float | None = 1.0, mu_dtype: str | None = None):
  """(optax transformation, schedule)."""
  schedule = make_schedule(lr, total_steps, warmup, decay, min_lr_ratio)
  parts = []
  if max_grad_norm is not None and max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(max_grad_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask(params, decay_embeddings),
                           mu_dtype=jnp.dtype(mu_dtype) if mu_dtype else None))
  return optax.chain(*parts), schedule
