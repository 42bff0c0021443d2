"""LoRA / QLoRA adapters for every algorithm (SPEC §10); see `adapters` for the design."""

from jaxreason.lora.adapters import ADAPTERS, QTensor, merge, merged_params, split  # noqa: F401
from jaxreason.lora.config import LoraConfig  # noqa: F401
