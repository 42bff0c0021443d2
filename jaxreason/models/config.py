"""Model configuration: one decoder-only transformer, families as config deltas.

Qwen2/Qwen2.5: q/k/v bias, tied or untied embeddings, rope theta.
Qwen3 (dense): per-head RMSNorm on q and k, no q/k/v bias, explicit head_dim.
Llama 2/3/3.1+: no bias, optional `llama3` rope scaling.

`ModelConfig.from_hf` reads a HuggingFace `config.json` dict (transformers 4 style with
`rope_theta`/`rope_scaling`, or transformers 5 style with `rope_parameters`); `to_hf` writes one
back that `transformers.AutoConfig` understands.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
ATTENTION_BACKENDS = ("auto", "xla", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling. `default` means none."""

  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  model_type: str = "qwen2"
  vocab_size: int = 151936
  hidden_size: int = 896
  intermediate_size: int = 4864
  num_layers: int = 24
  num_heads: int = 14
  num_kv_heads: int = 2
  head_dim: int | None = None  # None: hidden_size // num_heads
  rope_theta: float = 1_000_000.0
  rope_scaling: RopeScaling = RopeScaling()
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = True
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 32768
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # Numerics and execution (not part of the HF checkpoint).
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of activations and matmuls
  attention_backend: str = "auto"
  remat: str = "none"
  # Decoder layers stacked ([L, ...] parameters) and run with one `jax.lax.scan`: compile time flat
  # in depth. False: a list of L blocks unrolled in the program (the layout HF names follow).
  scan_layers: bool = True

  def __post_init__(self):
    if isinstance(self.eos_token_id, list):  # keep the config hashable (it is static under jit)
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(
          f"rope_type {self.rope_scaling.rope_type!r} is not supported; supported: "
          f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    if self.attention_backend not in ATTENTION_BACKENDS:
      raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.resolved_head_dim
    n, k = self.num_heads, self.num_kv_heads
    attn = d * h * (n + 2 * k) + n * h * d
    if self.qkv_bias:
      attn += h * (n + 2 * k)
    if self.qk_norm:
      attn += 2 * h
    block = attn + 3 * d * f + 2 * d
    return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * block + d

  # ------------------------------------------------------------------ HF interop
  @classmethod
  def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
    """Builds a config from a HuggingFace `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"config.json has model_type {model_type!r}, which jaxreason does not support; "
          f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    if legacy:
      rope = {**legacy, **rope}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(
          f"config.json asks for rope_type {rope_type!r}; jaxreason supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    scaling = RopeScaling(
        rope_type=rope_type,
        factor=float(rope.get("factor", 1.0)),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
    )
    if model_type == "qwen2":
      qkv_bias, o_bias, qk_norm = True, False, False
    else:
      qkv_bias = o_bias = bool(hf.get("attention_bias", False))
      qk_norm = model_type == "qwen3"
    if hf.get("use_sliding_window"):
      raise ValueError("config.json enables use_sliding_window, which jaxreason does not implement")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"config.json has hidden_act {hf.get('hidden_act')!r}; only 'silu' is supported")
    tie_default = {"qwen2": False, "qwen3": False, "llama": False}[model_type]
    kw = dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=qk_norm,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", tie_default)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
    """A `config.json` dict (transformers 5 layout, also read by transformers 4.4x and vLLM)."""
    rope: dict[str, Any] = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
    if self.rope_scaling.rope_type == "llama3":
      rope.update(factor=self.rope_scaling.factor, low_freq_factor=self.rope_scaling.low_freq_factor,
                  high_freq_factor=self.rope_scaling.high_freq_factor,
                  original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings)
    elif self.rope_scaling.rope_type == "linear":
      rope.update(factor=self.rope_scaling.factor)
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
    out: dict[str, Any] = dict(
        architectures=[arch[self.model_type]],
        model_type=self.model_type,
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads,
        num_key_value_heads=self.num_kv_heads,
        head_dim=self.resolved_head_dim,
        hidden_act="silu",
        max_position_embeddings=self.max_position_embeddings,
        initializer_range=self.initializer_range,
        rms_norm_eps=self.rms_norm_eps,
        tie_word_embeddings=self.tie_word_embeddings,
        rope_theta=self.rope_theta,
        rope_parameters=rope,
        bos_token_id=self.bos_token_id,
        eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        pad_token_id=self.pad_token_id,
        use_cache=True,
        attention_dropout=0.0,
        dtype=torch_dtype,
        torch_dtype=torch_dtype,
    )
    if rope["rope_type"] != "default":
      out["rope_scaling"] = dict(rope, type=rope["rope_type"])
    if self.model_type == "qwen2":
      out.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers)
    else:
      out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
      if self.model_type == "qwen3":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers)
    return out
