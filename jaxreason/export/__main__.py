"""`python -m jaxreason.export --checkpoint PATH --out DIR [--dtype float32|bfloat16] [--format hf|peft] [--adapter PEFT_DIR]`.

`--format hf` (default) writes a HuggingFace directory (sharded safetensors + index, config.json, generation_config.json,
tokenizer files and chat template) that `transformers` and vLLM load. PATH is an Orbax checkpoint
(a run directory, its `checkpoints/` folder or one step; see `jaxreason.checkpoint`) or a
HuggingFace model directory (re-export, e.g. to change dtype or shard size). A LoRA run's
checkpoint (adapters + a pointer to its base, `jaxreason.lora`) is exported merged
(W + scale * A B). `--adapter PEFT_DIR` merges a PEFT LoRA adapter onto PATH first (PEFT import).

`--format peft` writes the LoRA run's adapters as a PEFT directory (`adapter_config.json` +
`adapter_model.safetensors`, SPEC §10 keys) that `peft.PeftModel.from_pretrained(hf_base, DIR)` loads
onto the base model exported as HF (`--format hf` of the base); with `--adapter`, the PEFT adapter is
re-written as it was imported.

The export is written to a temporary directory beside DIR and renamed into place when complete,
so DIR never holds a half-written or mixed export. A non-empty DIR is refused unless
`--overwrite` (then it is replaced as a whole: no stale weight files stay behind). Weights with
NaN or inf values are refused.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxreason.export", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True,
                 help="an Orbax run/checkpoints/step directory, or a HuggingFace model directory")
  p.add_argument("--out", required=True, help="output directory (created; see --overwrite)")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out as a whole")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                 help="tensor dtype in the export (default: the parameters' dtype)")
  p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
  p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
  p.add_argument("--format", choices=["hf", "peft"], default="hf",
                 help="hf: the (merged) model as a HuggingFace dir; peft: a LoRA run's adapters as a PEFT dir")
  p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to apply to --checkpoint")
  args = p.parse_args(argv)

  src = args.checkpoint
  if not os.path.isdir(src):
    p.error(f"--checkpoint {src}: no such directory")
  if os.path.abspath(src) == os.path.abspath(args.out):
    p.error("--out must differ from --checkpoint")
  if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
    p.error(f"--out {args.out} is not empty; pass --overwrite to replace it (its old files are removed)")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    p.error(f"--out {args.out} exists and is not a directory")

  from flax import nnx

  from jaxreason import checkpoint
  from jaxreason.data.tokenizer import load_tokenizer
  from jaxreason.io_utils import atomic_dir
  from jaxreason.models.hf import load_hf_model, save_hf_model

  if args.adapter is not None and not os.path.isdir(args.adapter):
    p.error(f"--adapter {args.adapter}: no such directory")
  if args.format == "peft":
    from jaxreason.lora.export import export_peft
    try:
      export_peft(src, args.out, adapter=args.adapter, dtype=args.dtype)
    except ValueError as e:
      p.error(str(e))
    print(f"wrote {args.out}: PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors)")
    return 0
  if checkpoint.is_checkpoint(src):
    model = checkpoint.load_model(src)
    tok_dir = args.tokenizer or checkpoint.find_tokenizer_dir(src)
  elif os.path.exists(os.path.join(src, "config.json")):
    model = load_hf_model(src)
    checkpoint.check_integrity(src, {"params": nnx.to_pure_dict(nnx.state(model))}, None)
    tok_dir = args.tokenizer or src
  else:
    p.error(f"--checkpoint {src}: neither an Orbax checkpoint (STEP/params under it or its checkpoints/) "
            "nor a HuggingFace model directory (config.json)")
  if args.adapter is not None:
    from jaxreason.lora.peft import load_with_peft_adapter
    model = load_with_peft_adapter(model, args.adapter)
  tokenizer = None
  try:
    tokenizer = load_tokenizer(tok_dir) if tok_dir else None
  except FileNotFoundError as e:
    if args.tokenizer:
      p.error(str(e))
  if tokenizer is None:
    print(f"note: no tokenizer found for {src}; the export has none (pass --tokenizer DIR)", file=sys.stderr)
  with atomic_dir(args.out) as tmp:
    files = save_hf_model(model, tmp, dtype=args.dtype, tokenizer=tokenizer, max_shard_size=args.max_shard_size)
  print(f"wrote {args.out}: {len(files)} safetensors file(s), dtype {args.dtype or model.cfg.param_dtype}")
  return 0


if __name__ == "__main__":
  from jaxreason.errors import cli_main
  sys.exit(cli_main(main))  # known errors: one line; a traceback with --debug or JAXREASON_DEBUG=1
