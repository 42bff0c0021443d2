"""PEFT adapter directories (SPEC §10): `adapter_config.json` + `adapter_model.safetensors`.

Keys `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r] (mlp: `mlp.gate_proj` etc.), torch layout: lora_A = A^T, lora_B = B^T
of our adapters (their flattened axes are already HF's order, see `adapters`). PEFT's scaling is
lora_alpha / r (use_rslora: / sqrt(r)), ours too, so `peft.PeftModel.from_pretrained(hf_base, DIR)`
computes the same function as the jaxreason model.

Import accepts what this format can say about our adapters: peft_type LORA, bias none, no
fan_in_fan_out, no per-layer rank/alpha patterns, no modules_to_save, every layer adapted for the
targeted projections; anything else is refused with the key at fault.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from jaxreason.lora import adapters as la
from jaxreason.lora.config import PEFT_NAMES, PROJECTIONS, LoraConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _module(proj: str, layer: int) -> str:
  peft_name, module = PROJECTIONS[proj][0], PROJECTIONS[proj][1]
  return f"base_model.model.model.layers.{layer}.{'self_attn' if module == 'attn' else 'mlp'}.{peft_name}"


def _layer_adapters(trainable: dict, num_layers: int):
  """Yields (projection, layer, A [in, r], B [r, out]) as host arrays, scanned or unscanned."""
  for path, v in la.flatten(trainable.get(la.ADAPTERS, {})).items():
    if path[-1] != "a":
      continue
    wpath = path[:-1]
    proj = la.projection_of(wpath)
    a = np.asarray(v)
    b = np.asarray(la.flatten(trainable[la.ADAPTERS])[wpath + ("b",)])
    if isinstance(wpath[1], int):
      yield proj, wpath[1], a, b
    else:
      for i in range(num_layers):
        yield proj, i, a[i], b[i]


def save_peft_adapter(trainable: dict, spec: LoraConfig, model_cfg, out_dir: str, *, base: str | None = None,
                      dtype: str | None = None) -> None:
  """Writes the adapters of `trainable` ({"lora": ...}) as a PEFT LoRA directory."""
  from safetensors.numpy import save_file
  extras = [k for k in trainable if k != la.ADAPTERS]
  if extras:
    raise ValueError(f"these trained parameters have no place in a PEFT LoRA adapter: {', '.join(extras)} "
                     "(a reward model's score head); export the merged model instead")
  out_dt = {"bfloat16": jnp.bfloat16, "float16": np.float16}.get(dtype or "", np.float32)
  tensors = {}
  for proj, i, a, b in _layer_adapters(trainable, model_cfg.num_layers):
    tensors[f"{_module(proj, i)}.lora_A.weight"] = np.ascontiguousarray(a.T).astype(out_dt)
    tensors[f"{_module(proj, i)}.lora_B.weight"] = np.ascontiguousarray(b.T).astype(out_dt)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
      "target_modules": [PROJECTIONS[p][0] for p in spec.projections], "lora_dropout": spec.dropout,
      "bias": "none", "use_rslora": spec.rslora, "fan_in_fan_out": False, "modules_to_save": None,
      "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base,
  }
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)


def read_peft_config(adapter_dir: str) -> dict:
  path = os.path.join(adapter_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{adapter_dir}: no {CONFIG_FILE}; not a PEFT adapter directory")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e


def load_peft_adapter(adapter_dir: str, base_params: dict) -> tuple[LoraConfig, dict]:
  """A PEFT LoRA directory -> (our LoraConfig, trainable {"lora": adapters}) for `base_params`
  (a model's pure parameter dict, scanned or unscanned: the adapters take its layout)."""
  from safetensors.numpy import load_file
  c = read_peft_config(adapter_dir)
  where = os.path.join(adapter_dir, CONFIG_FILE)
  checks = [("peft_type", c.get("peft_type") == "LORA", "only LORA adapters are supported"),
            ("bias", c.get("bias", "none") == "none", "trained biases are not supported"),
            ("fan_in_fan_out", not c.get("fan_in_fan_out"), "fan_in_fan_out (Conv1D) layouts are not supported"),
            ("rank_pattern", not c.get("rank_pattern"), "per-module ranks are not supported"),
            ("alpha_pattern", not c.get("alpha_pattern"), "per-module alphas are not supported"),
            ("modules_to_save", not c.get("modules_to_save"), "fully trained extra modules are not supported"),
            ("use_dora", not c.get("use_dora"), "DoRA is not supported")]
  for key, ok, why in checks:
    if not ok:
      raise ValueError(f"{where}: {key} = {c.get(key)!r}: {why}")
  tensors = load_file(os.path.join(adapter_dir, WEIGHTS_FILE))
  per_layer: dict[tuple[str, int], dict[str, np.ndarray]] = {}
  for name, t in tensors.items():
    parts = name.split(".")
    try:
      i = parts.index("layers")
      layer, peft_name, kind = int(parts[i + 1]), parts[i + 3], parts[i + 4]
    except (ValueError, IndexError):
      raise ValueError(f"{adapter_dir}/{WEIGHTS_FILE}: tensor {name} is not a LoRA weight of a decoder layer") from None
    if peft_name not in PEFT_NAMES or kind not in ("lora_A", "lora_B"):
      raise ValueError(f"{adapter_dir}/{WEIGHTS_FILE}: tensor {name}: unknown module {peft_name}.{kind}")
    per_layer.setdefault((PEFT_NAMES[peft_name], layer), {})["a" if kind == "lora_A" else "b"] = np.asarray(t, np.float32)
  projs = tuple(p for p in PROJECTIONS if any(k[0] == p for k in per_layer))
  spec = LoraConfig(targets=projs, rank=int(c["r"]), alpha=float(c["lora_alpha"]), rslora=bool(c.get("use_rslora")),
                    dropout=float(c.get("lora_dropout") or 0.0))
  out = {}
  for path, w in la.flatten({k: v for k, v in base_params.items() if k in la.MODEL_KEYS}).items():
    proj = la.projection_of(path)
    if proj not in projs:
      continue
    layers = [path[1]] if isinstance(path[1], int) else list(range(w.shape[0]))
    a_list, b_list = [], []
    for i in layers:
      ab = per_layer.get((proj, i))
      if ab is None or set(ab) != {"a", "b"}:
        raise ValueError(f"{adapter_dir}: layer {i} has no complete {PROJECTIONS[proj][0]} adapter "
                         "(layers_to_transform is not supported: every layer must be adapted)")
      a_list.append(ab["a"].T)
      b_list.append(ab["b"].T)
    a, b = (np.stack(a_list), np.stack(b_list)) if not isinstance(path[1], int) else (a_list[0], b_list[0])
    sa, sb = la.adapter_shapes(path, w.shape, spec.rank)
    if a.shape != sa or b.shape != sb:
      raise ValueError(f"{adapter_dir}: {PROJECTIONS[proj][0]} adapter shapes {a.shape[-2:]}, {b.shape[-2:]} "
                       f"do not fit the base ({sa[-2:]}, {sb[-2:]}): a different base model?")
    out[path + ("a",)], out[path + ("b",)] = jnp.asarray(a), jnp.asarray(b)
  return spec, {la.ADAPTERS: la.unflatten(out)}


def load_with_peft_adapter(model, adapter_dir: str):
  """`model` (a jaxreason Transformer) with a PEFT adapter merged in -> a Transformer."""
  from flax import nnx
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  spec, trainable = load_peft_adapter(adapter_dir, params)
  frozen = {"base": {k: v for k, v in params.items() if k in la.MODEL_KEYS}, "scale": np.float32(spec.scale)}
  return nnx.merge(graphdef, la.merge(frozen, trainable))
