"""Continue text prompts with a trained model (a pre-training run, checkpoint or HF dir).

  python tools/continue_text.py --model runs/quickstart_pretrain --prompt "def read_file(" \
      --prompt "The function returns" [--max-new-tokens 64] [--temperature 0.0]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
  from jaxreason import checkpoint
  from jaxreason.data.tokenizer import load_tokenizer
  from jaxreason.eval.run import load_any_model
  from jaxreason.sampling import SamplingConfig
  from jaxreason.sampling.sampler import Sampler, newline_mask_for
  p = argparse.ArgumentParser()
  p.add_argument("--model", required=True)
  p.add_argument("--prompt", action="append", required=True)
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  tok = load_tokenizer(checkpoint.tokenizer_dir_for(a.model))
  model = load_any_model(a.model, dtype="float32")
  sampler = Sampler(model, newline_mask=newline_mask_for(tok, model.cfg.vocab_size))
  cfg = SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                       stop_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id or 0)
  out = sampler.generate([tok.encode(t, add_special_tokens=False) for t in a.prompt], cfg, seed=a.seed)
  for prompt, ids in zip(a.prompt, out.tokens):
    print(f"--- {prompt!r}\n{prompt}{tok.decode(ids, skip_special_tokens=True)}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
