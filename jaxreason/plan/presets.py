"""Model shapes by name, copied from the models' HF `config.json` (values only, no weights)."""

from __future__ import annotations

from jaxreason.models.config import ModelConfig

_QWEN25 = dict(model_type="qwen2", vocab_size=151936, rope_theta=1e6, max_position_embeddings=32768,
               rms_norm_eps=1e-6, hidden_act="silu", eos_token_id=151643)
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, rope_theta=1e6, max_position_embeddings=40960,
              rms_norm_eps=1e-6, head_dim=128, hidden_act="silu", eos_token_id=151645)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, hidden_act="silu",
               max_position_embeddings=131072, eos_token_id=128001,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
               rope_theta=500000.0)


def _shape(base, d, f, layers, heads, kv, tie, **kw):
  return {**base, "hidden_size": d, "intermediate_size": f, "num_hidden_layers": layers,
          "num_attention_heads": heads, "num_key_value_heads": kv, "tie_word_embeddings": tie, **kw}


PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": _shape(_QWEN25, 896, 4864, 24, 14, 2, True),
    "qwen2.5-1.5b": _shape(_QWEN25, 1536, 8960, 28, 12, 2, True),
    "qwen2.5-3b": _shape(_QWEN25, 2048, 11008, 36, 16, 2, True),
    "qwen2.5-7b": _shape(_QWEN25, 3584, 18944, 28, 28, 4, False, vocab_size=152064),
    "qwen2.5-14b": _shape(_QWEN25, 5120, 13824, 48, 40, 8, False, vocab_size=152064, rms_norm_eps=1e-5),
    "qwen2.5-32b": _shape(_QWEN25, 5120, 27648, 64, 40, 8, False, vocab_size=152064, rms_norm_eps=1e-5),
    "qwen2.5-math-1.5b": _shape(_QWEN25, 1536, 8960, 28, 12, 2, True, rope_theta=10000.0,
                                max_position_embeddings=4096),
    "qwen2.5-math-7b": _shape(_QWEN25, 3584, 18944, 28, 28, 4, False, vocab_size=152064, rope_theta=10000.0,
                              max_position_embeddings=4096),
    "qwen3-0.6b": _shape(_QWEN3, 1024, 3072, 28, 16, 8, True),
    "qwen3-1.7b": _shape(_QWEN3, 2048, 6144, 28, 16, 8, True),
    "qwen3-4b": _shape(_QWEN3, 2560, 9728, 36, 32, 8, True),
    "qwen3-8b": _shape(_QWEN3, 4096, 12288, 36, 32, 8, False),
    "qwen3-14b": _shape(_QWEN3, 5120, 17408, 40, 40, 8, False),
    "qwen3-32b": _shape(_QWEN3, 5120, 25600, 64, 64, 8, False),
    "llama3.2-1b": _shape(_LLAMA3, 2048, 8192, 16, 32, 8, True, head_dim=64,
                          rope_scaling={**_LLAMA3["rope_scaling"], "factor": 32.0}),
    "llama3.2-3b": _shape(_LLAMA3, 3072, 8192, 28, 24, 8, True, head_dim=128,
                          rope_scaling={**_LLAMA3["rope_scaling"], "factor": 32.0}),
    "llama3.1-8b": _shape(_LLAMA3, 4096, 14336, 32, 32, 8, False),
}
# The -instruct models share their base model's shapes.
PRESETS.update({f"{k}-instruct": v for k, v in list(PRESETS.items()) if "math" not in k and "qwen3" not in k})


def preset(name: str, **overrides) -> ModelConfig:
  key = name.strip().lower()
  if key not in PRESETS:
    raise ValueError(f"--model {name!r}: unknown preset; known: {', '.join(sorted(PRESETS))}")
  return ModelConfig.from_hf(PRESETS[key], **overrides)


def guess_preset(init_from: str | None) -> str | None:
  """A preset named by the last path component of `init_from` (e.g. /data/Qwen2.5-Math-7B)."""
  if not init_from:
    return None
  key = init_from.rstrip("/").split("/")[-1].lower()
  return key if key in PRESETS else None
