"""`python -m jaxreason.export --format peft`: a LoRA run's adapters (or an imported PEFT adapter)
written as a PEFT directory."""

from __future__ import annotations

import os

from jaxreason.io_utils import atomic_dir


def export_peft(src: str, out: str, *, adapter: str | None = None, dtype: str | None = None) -> None:
  from jaxreason import checkpoint
  from jaxreason.lora.checkpoint import load_trainable, lora_pointer
  from jaxreason.lora.peft import load_peft_adapter, save_peft_adapter
  from jaxreason.lora.train import spec_from_pointer
  from jaxreason.models.hf import load_hf_config
  if adapter is not None:  # re-write an imported PEFT adapter for the base at src
    from flax import nnx
    from jaxreason.models.build import abstract_model
    cfg = checkpoint.load_model_config(src) if checkpoint.is_checkpoint(src) else load_hf_config(src)
    abs_params = nnx.to_pure_dict(nnx.state(abstract_model(cfg)))
    spec, trainable = load_peft_adapter(adapter, abs_params)
    base = os.path.abspath(src)
  else:
    if not checkpoint.is_checkpoint(src):
      raise ValueError(f"--checkpoint {src}: --format peft needs a LoRA run's checkpoint (or --adapter)")
    directory, step = checkpoint.resolve_checkpoint(src)
    pointer = lora_pointer(directory, step)
    if pointer is None:
      raise ValueError(f"--checkpoint {src}: step {step} is not a LoRA run's (no `lora` item): it holds full "
                       "weights; export it with --format hf")
    cfg = checkpoint.load_model_config(src)
    spec = spec_from_pointer(pointer)
    trainable = load_trainable(directory, step, checkpoint.abstract_params(cfg)[1], spec)
    base = pointer.get("base")
  with atomic_dir(out) as tmp:
    save_peft_adapter(trainable, spec, cfg, tmp, base=base, dtype=dtype)
