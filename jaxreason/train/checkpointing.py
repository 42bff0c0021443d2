"""Training checkpoints: async Orbax CheckpointManager with everything needed to resume exactly.

Each step directory holds `params` and `model_config` (the layout `jaxreason.checkpoint` and the
export/eval CLIs read), plus `opt_state`, and `train_meta` (step, data-iterator state, RNG seed
state, run info). Orbax writes each step to a temporary directory and renames it when complete,
so a crash or SIGKILL during a save leaves the previous step restorable; leftovers are cleaned up
on the next start.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxreason.checkpoint import config_from_json, config_to_json
from jaxreason.models.config import ModelConfig
from jaxreason.train.state import TrainState


class TrainCheckpointer:

  def __init__(self, directory: str, *, keep_last: int = 3, keep_steps: tuple[int, ...] = (),
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
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
    """`extra`: more JSON items of the step (e.g. the reward model's marker), by item name."""
    items = {name: ocp.args.JsonSave(value) for name, value in (extra or {}).items()}
    saved = self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        model_config=ocp.args.JsonSave(config_to_json(model_cfg)),
        train_meta=ocp.args.JsonSave(meta), **items), force=force)
    if os.environ.get("JAXREASON_TEST_KILL_IN_SAVE") == str(step):  # tests: die mid-save (async write running)
      import signal
      os.kill(os.getpid(), signal.SIGKILL)
    return saved

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict, ModelConfig]:
    """Restores onto the shardings carried by `abstract_state` (any mesh)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state.params),
        opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
        model_config=ocp.args.JsonRestore(),
        train_meta=ocp.args.JsonRestore()))
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
