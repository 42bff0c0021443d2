"""Tiny random HuggingFace models for parity tests (built in-process, never downloaded)."""

from __future__ import annotations

import torch
import transformers

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

VARIANTS = {
    "qwen2_untied": ("qwen2", dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True, num_hidden_layers=3,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3": ("qwen3", dict(head_dim=32, tie_word_embeddings=False, attention_bias=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "llama": ("llama", dict(rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "llama3_rope": ("llama", dict(rms_norm_eps=1e-5, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
}


def make_hf_model(variant: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
  """A tiny fp32 HF causal LM with *every* parameter random (norms around 1, biases non-zero)."""
  model_type, extra = VARIANTS[variant]
  config = transformers.AutoConfig.for_model(model_type, **{**TINY, **extra, **overrides})
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.08 * torch.randn(p.shape, generator=gen))
  if config.tie_word_embeddings:
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  return model


def save_hf_model_dir(model, path, **kw) -> str:
  model.save_pretrained(path, safe_serialization=True, **kw)
  return str(path)
