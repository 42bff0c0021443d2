"""Decoder models and HuggingFace interop."""

from jaxreason.models.config import ModelConfig, RopeScaling
from jaxreason.models.transformer import KVCache, Transformer

__all__ = ["ModelConfig", "RopeScaling", "Transformer", "KVCache"]
