"""The `dpo:` config section."""

from __future__ import annotations

import dataclasses

from jaxreason.yamlconfig import choice, in_range, positive

# The DPO losses (`loss.dpo_loss`).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """DPO (SPEC §6). Data: rows with prompt/chosen/rejected (text or chat messages)."""

  beta: float = 0.1
  loss_type: str = "sigmoid"  # sigmoid | hinge | ipo | robust
  label_smoothing: float = 0.0
  precompute_ref: bool = True  # reference log-probs once before training; false: on the fly each step
  self_pairs: str | None = None  # question/answer data: build pairs from the initial model's right and wrong answers
  pairs_per_question: int = 1  # self_pairs: at most this many (right, wrong) pairs per question

  def __post_init__(self):
    positive(self, "beta", "pairs_per_question")
    choice(self, "loss_type", LOSS_TYPES)
    in_range(self, "label_smoothing", 0.0, 0.5, hi_open=True)
