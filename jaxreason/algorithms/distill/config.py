"""The `distill:` config section (SPEC §11)."""

from __future__ import annotations

import dataclasses

from jaxreason.yamlconfig import choice, positive, require

KINDS = ("forward_kl", "reverse_kl", "jsd")
MODES = ("offline", "on_policy")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  teacher: str | None = None  # HF model dir or Orbax run/checkpoint dir; same tokenizer as the student
  loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd
  beta: float = 0.5  # jsd's mixture weight, 0 < beta < 1
  temperature: float = 1.0  # both models' logits are divided by it (the KD is scaled by its square)
  kd_weight: float = 1.0  # a in (1 - a) CE + a KD (offline: CE on the data's response tokens)
  mode: str = "offline"  # offline: data sequences | on_policy: the student's samples, scored by the teacher
  chunk: int = 256  # sequence positions per chunk of logits

  def __post_init__(self):
    choice(self, "loss", KINDS)
    choice(self, "mode", MODES)
    require(0 < self.beta < 1, "beta", f"must be in (0, 1) (at 0 and 1 use forward_kl / reverse_kl); got {self.beta}")
    require(self.temperature > 0, "temperature", f"must be > 0; got {self.temperature}")
    require(0 <= self.kd_weight <= 1, "kd_weight", f"must be in [0, 1]; got {self.kd_weight}")
    positive(self, "chunk")
