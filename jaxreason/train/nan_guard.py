"""Non-finite training guard: a NaN/inf loss or gradient norm never reaches the train state.

In the jitted step (`guard_step`): when the step's loss or gradient norm is not finite, the new
params and optimizer state are replaced by the old ones with `jnp.where` (the update is skipped,
no host round trip) and the metrics carry `nonfinite` = 1.0. On the host (`NanGuard`): the loop
hands each step's metrics to `observe` (kept on device, no sync) and calls `check` where it
syncs anyway, at log and checkpoint points; `check` counts consecutive non-finite steps and, with
`train.nan_policy: stop` (default), raises `NonFiniteError` naming the first step of the run of
`train.nan_max_consecutive` bad steps. With `nan_policy: skip` bad steps are only skipped and
counted. Checkpoints never hold non-finite state (the state is kept finite here, and
`TrainCheckpointer.save` refuses non-finite parameters); a stop saves nothing, so the last finite
checkpoint is not rotated away by `keep_last`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxreason.errors import NonFiniteError

__all__ = ["guard_step", "is_finite_step", "NanGuard"]


def is_finite_step(metrics: dict) -> jax.Array:
  """True when the step's loss and gradient norm (where present) are finite."""
  ok = jnp.asarray(True)
  for key in ("loss", "grad_norm"):
    if key in metrics:
      ok = ok & jnp.all(jnp.isfinite(metrics[key]))
  return ok


def guard_step(step_fn: Callable) -> Callable:
  """Wraps `step_fn(state, *args) -> (state, metrics)` (before jit): a non-finite step keeps the
  old params and opt_state (the step counter advances) and reports `metrics["nonfinite"]`."""

  def guarded(state, *args, **kwargs):
    new_state, metrics = step_fn(state, *args, **kwargs)
    ok = is_finite_step(metrics)
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    new_state = dataclasses.replace(new_state, params=jax.tree.map(keep, new_state.params, state.params),
                                    opt_state=jax.tree.map(keep, new_state.opt_state, state.opt_state))
    return new_state, {**metrics, "nonfinite": 1.0 - ok.astype(jnp.float32)}

  return guarded


class NanGuard:
  """Host side: counts consecutive non-finite steps at the loop's sync points and stops the run."""

  def __init__(self, policy: str = "stop", max_consecutive: int = 3):
    if policy not in ("stop", "skip"):
      raise ValueError(f"nan_policy must be 'stop' or 'skip', got {policy!r}")
    self.policy, self.max_consecutive = policy, int(max_consecutive)
    self.pending: list[tuple[int, Any]] = []
    self.consecutive = 0
    self.first_bad: int | None = None  # first step of the current run of non-finite steps
    self.skipped = 0

  @classmethod
  def from_config(cls, cfg) -> NanGuard:
    return cls(getattr(cfg.train, "nan_policy", "stop"), getattr(cfg.train, "nan_max_consecutive", 3))

  def observe(self, step: int, metrics: dict) -> None:
    """Records the step's flag (a device scalar; no host sync here)."""
    if "nonfinite" in metrics:
      self.pending.append((step, metrics["nonfinite"]))

  def check(self) -> None:
    """Syncs the pending flags; raises NonFiniteError when the policy says stop."""
    if not self.pending:
      return
    steps, flags = zip(*self.pending)
    self.pending = []
    for step, flag in zip(steps, jax.device_get(list(flags))):
      if float(flag) > 0:
        self.skipped += 1
        self.consecutive += 1
        if self.first_bad is None:
          self.first_bad = step
        if self.policy == "stop" and self.consecutive >= self.max_consecutive:
          raise NonFiniteError(
              f"training diverged: non-finite loss or gradient norm at step {self.first_bad}"
              + (f" and the {self.consecutive - 1} step(s) after it" if self.consecutive > 1 else "")
              + " (updates skipped, nothing saved); lower optimizer.lr or check the data, then resume "
              "from the last checkpoint, or set train.nan_policy: skip")
      else:
        self.consecutive, self.first_bad = 0, None
