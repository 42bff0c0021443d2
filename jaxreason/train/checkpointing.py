"""Training checkpoints: async Orbax CheckpointManager with everything needed to resume exactly.

Each step directory holds `params` and `model_config` (the layout `jaxreason.checkpoint` and the
export/eval CLIs read), plus `opt_state`, and `train_meta` (step, data-iterator state, RNG seed
state, run info). Orbax writes each step to a temporary directory and renames it when complete,
so a crash or SIGKILL during a save leaves the previous step restorable; leftovers are cleaned up
on the next start.

Integrity (see `jaxreason.checkpoint`): every save adds the `integrity` item (checksums and
non-finite counts of params and opt_state) and refuses non-finite parameters (`NonFiniteError`:
nothing non-finite is ever written, so `keep_last` only rotates finite steps). `restore` verifies
the step; a step that cannot be read, fails its checksums or holds non-finite parameters is moved
to `<run>/corrupt_checkpoints/<step>` with a warning naming it, and the previous kept step is
restored instead (`train_meta["step"]` says which).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jaxreason.checkpoint import (INTEGRITY_ITEM, check_integrity, config_from_json, config_to_json, fingerprint,
                                  short_error)
from jaxreason.errors import CheckpointError, ConfigChangeError, NonFiniteError
from jaxreason.models.config import ModelConfig
from jaxreason.train.state import TrainState


def _by_path(tree) -> dict[str, Any]:
  """{"a/0/b": leaf}: Orbax metadata names list indices as strings, nnx state as ints."""
  def name(k):
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  return {"/".join(name(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class TrainCheckpointer:

  def __init__(self, directory: str, *, keep_last: int = 3, keep_steps: tuple[int, ...] = (),
               async_save: bool = True, items: dict[str, dict] | None = None):
    """`items`: JSON items written with every step (e.g. a LoRA run's pointer to its base)."""
    self.directory = os.path.abspath(directory)
    self.items = dict(items or {})
    from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
    policies = [pp.LatestN(keep_last)]
    if keep_steps:
      policies.append(pp.CustomSteps(list(keep_steps)))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=pp.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, model_cfg: ModelConfig, meta: dict[str, Any],
           force: bool = False, extra: dict[str, dict] | None = None) -> bool:
    """`extra`: more JSON items of the step (e.g. the reward model's marker), by item name.

    Raises NonFiniteError (nothing written) when the parameters hold NaN or inf."""
    if self.manager.latest_step() == step:
      return False  # already saved (e.g. the last step, then again on SIGTERM)
    sums = {"params": fingerprint(state.params), "opt_state": fingerprint(state.opt_state)}
    bad = sum(b for _, b in sums["params"].values())
    if bad:
      good = self.manager.latest_step()
      raise NonFiniteError(f"step {step}: the parameters hold {bad} NaN/inf values; not saved"
                           + (f" (last good checkpoint: step {good} in {self.directory})" if good is not None else ""))
    items = {name: ocp.args.JsonSave(value) for name, value in {**self.items, **(extra or {})}.items()}
    items[INTEGRITY_ITEM] = ocp.args.JsonSave(sums)
    saved = self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        model_config=ocp.args.JsonSave(config_to_json(model_cfg)),
        train_meta=ocp.args.JsonSave(meta), **items), force=force)
    if os.environ.get("JAXREASON_TEST_KILL_IN_SAVE") == str(step):  # tests: die mid-save (async write running)
      import signal
      os.kill(os.getpid(), signal.SIGKILL)
    return saved

  def restore(self, step: int, abstract_state: TrainState,
              warn: Callable[[str], None] | None = None) -> tuple[TrainState, dict, ModelConfig]:
    """Restores `step` onto the shardings carried by `abstract_state` (any mesh), verified; an
    unusable step is set aside with a warning and the previous kept one restored instead."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
    steps = [s for s in sorted(self.manager.all_steps(), reverse=True) if s <= step]
    for i, s in enumerate(steps):
      try:
        return self._restore_verified(s, abstract_state)
      except CheckpointError as e:
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        moved = self._set_aside(s)
        warn(f"{e}" + (f"; moved to {moved}" if moved else "")
             + (f"; falling back to step {nxt}" if nxt is not None else "; no earlier step is kept"))
    raise CheckpointError(f"{self.directory}: no usable checkpoint (all kept steps are damaged); "
                          "remove the directory to start over")

  def _set_aside(self, step: int) -> str | None:
    """Moves a damaged step out of the checkpoints directory (main process) so it is neither
    restored again nor in the way of the step's next save."""
    import jax
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints", str(step))
    if jax.process_index() == 0 and os.path.isdir(src):
      try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(src, dst)
      except OSError:
        return None
    self.manager.reload()
    return dst

  def _check_shapes(self, step: int, where: str, abstract_params) -> None:
    """ConfigChangeError (no fallback: every step has it) when the saved parameters' shapes are
    not this config's; CheckpointError when the step's metadata cannot be read."""
    import logging
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "_CHECKPOINT_METADATA does not exist" for an item directory
    try:
      meta = ocp.StandardCheckpointer().metadata(os.path.join(where, "params"))
      saved = _by_path(getattr(meta, "item_metadata", meta))
    except Exception as e:
      raise CheckpointError(f"checkpoint step {step} ({where}) cannot be read ({short_error(e)})") from e
    finally:
      absl.setLevel(level)
    want = _by_path(abstract_params)
    for path in sorted(set(saved) | set(want)):
      a, b = saved.get(path), want.get(path)
      sa, sb = getattr(a, "shape", None), getattr(b, "shape", None)
      if sa is None or sb is None or tuple(sa) != tuple(sb):
        name = "params/" + path
        raise ConfigChangeError(
            f"checkpoint step {step} in {self.directory} has another architecture: {name} is "
            f"{'absent' if sa is None else tuple(sa)} there and {'absent' if sb is None else tuple(sb)} "
            "in this config; resume with the saved model settings or train into a new output_dir")

  def _restore_verified(self, step: int, abstract_state: TrainState):
    where = os.path.join(self.directory, str(step))
    self._check_shapes(step, where, abstract_state.params)
    try:
      saved = None
      if os.path.isdir(os.path.join(where, INTEGRITY_ITEM)):
        saved = self.manager.restore(step, args=ocp.args.Composite(
            **{INTEGRITY_ITEM: ocp.args.JsonRestore()}))[INTEGRITY_ITEM]
      restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state.params),
        opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
        model_config=ocp.args.JsonRestore(),
        train_meta=ocp.args.JsonRestore()))
    except Exception as e:  # TensorStore / Orbax errors of a truncated or damaged step
      raise CheckpointError(f"checkpoint step {step} ({where}) cannot be read ({short_error(e)})") from e
    check_integrity(f"checkpoint step {step} ({where})",
                    {"params": restored.params, "opt_state": restored.opt_state}, saved)
    import jax.numpy as jnp
    step_arr = jax.device_put(jnp.asarray(restored.train_meta["step"], jnp.int32),
                              abstract_state.step.sharding)
    state = TrainState(step=step_arr, params=restored.params, opt_state=restored.opt_state)
    return state, dict(restored.train_meta), config_from_json(restored.model_config)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
