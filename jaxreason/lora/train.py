"""LoRA in the shared train-state path: the optimizer over the trainable tree, the frozen base
beside it in `TrainState.frozen`, and the checkpoint's pointer to the base.

`make_tx` (train/loop.py) wraps the optimizer in `LoraTransformation` when the config has a
`lora:` section; `params_state_shardings`, `restore_or_init` and `fit` recognise it, so every
algorithm that builds its state through them trains adapters without code of its own.
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

from jaxreason.lora.config import LoraConfig

LORA_ITEM = "lora"  # checkpoint JSON item: the LoRA config and the base it applies to


class LoraTransformation(NamedTuple):
  """An optax GradientTransformation over the trainable (adapter) tree, carrying its LoRA spec."""

  init: Callable
  update: Callable
  lora: LoraConfig


def spec_of(tx) -> LoraConfig | None:
  return getattr(tx, "lora", None) if isinstance(tx, LoraTransformation) else None


def base_pointer(cfg) -> dict[str, Any]:
  """What a LoRA checkpoint records about its base: init_from (absolute), or the seed of a
  from-scratch base (tests), and the LoRA config."""
  import dataclasses
  base = cfg.init_from
  if base is not None and os.path.exists(base):
    base = os.path.abspath(base)
  return {"config": {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in dataclasses.asdict(cfg.lora).items()},
          "base": base, "seed": cfg.seed}


def spec_from_pointer(pointer: dict) -> LoraConfig:
  c = dict(pointer["config"])
  c["targets"] = tuple(c["targets"])
  return LoraConfig(**c)
