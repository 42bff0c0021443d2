"""The `lora:` config section (SPEC §10): which projections get adapters, rank, alpha, QLoRA."""

from __future__ import annotations

import dataclasses
import re

from jaxreason.yamlconfig import choice, positive, require

# Our projection -> (PEFT module name, module in a Block, parameter name, number of input axes).
# Input axes come first in our layouts: q/k/v [D, heads, H], o [N, H, D], gate/up [D, F], down [F, D].
PROJECTIONS = {
    "q": ("q_proj", "attn", "q_proj", 1),
    "k": ("k_proj", "attn", "k_proj", 1),
    "v": ("v_proj", "attn", "v_proj", 1),
    "o": ("o_proj", "attn", "o_proj", 2),
    "gate": ("gate_proj", "mlp", "gate", 1),
    "up": ("up_proj", "mlp", "up", 1),
    "down": ("down_proj", "mlp", "down", 1),
}
PEFT_NAMES = {v[0]: k for k, v in PROJECTIONS.items()}
QUANTIZE = ("int8",)


def resolve_targets(targets) -> tuple[str, ...]:
  """Entries are our names (q, k, ..., down), PEFT names (q_proj, ..., down_proj) or a regular
  expression matched in full against either name; -> our names, in PROJECTIONS order."""
  chosen = set()
  for t in targets:
    if t in PROJECTIONS:
      chosen.add(t)
    elif t in PEFT_NAMES:
      chosen.add(PEFT_NAMES[t])
    else:
      try:
        rx = re.compile(t)
      except re.error as e:
        raise ValueError(f"target {t!r} is neither a projection name nor a valid regular expression ({e})") from e
      hits = {k for k, v in PROJECTIONS.items() if rx.fullmatch(k) or rx.fullmatch(v[0])}
      if not hits:
        raise ValueError(f"target {t!r} matches no projection; choose among {', '.join(PROJECTIONS)} "
                         f"(or {', '.join(PEFT_NAMES)}), or a regular expression over those names")
      chosen |= hits
  return tuple(k for k in PROJECTIONS if k in chosen)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters W + (alpha / r) A B on the chosen projections; the base is frozen.

  Only the adapters (and, for the reward model, its score head) train and are checkpointed; the
  checkpoint points at the base (`init_from`). QLoRA: `quantize: int8` stores the frozen
  projections int8 with per-output-channel absmax scales, dequantised in the step.
  """

  targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")  # names or regexes (see resolve_targets)
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
  dropout: float = 0.0  # on the adapter's input in training (> 0: the step runs the adapters unmerged)
  quantize: str | None = None  # null | int8 (QLoRA: the frozen projections stored int8)
  base_dtype: str | None = None  # cast the frozen base to this dtype (e.g. bfloat16); null: as loaded

  def __post_init__(self):
    positive(self, "rank")
    require(self.alpha > 0, "alpha", f"must be > 0; got {self.alpha}")
    require(len(self.targets) > 0, "targets", "must list at least one projection (q, k, v, o, gate, up, down)")
    try:
      resolve_targets(self.targets)
    except ValueError as e:
      require(False, "targets", str(e))
    require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1); got {self.dropout}")
    if self.quantize is not None:
      choice(self, "quantize", QUANTIZE)
    if self.base_dtype is not None:
      choice(self, "base_dtype", ("float32", "bfloat16", "float16"))

  @property
  def projections(self) -> tuple[str, ...]:
    return resolve_targets(self.targets)

  @property
  def scale(self) -> float:
    return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)
