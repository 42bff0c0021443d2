"""LoRA rollouts: the cost of the merged sampling copy (jaxreason.lora.merged_params, once per
rollout) against the rollout it serves, on the quickstart-sized model (4 layers, hidden 128).

  JAX_PLATFORMS=cpu python tools/bench_lora_sampling.py [--prompts 16] [--gens 4] [--tokens 64]

The sampler runs on the merged weights, so per decoded token it costs what the base model costs
(ratio 1.00 by construction); the only LoRA overhead is the merge. Unmerged adapters in the
sampler would add two small matmuls per projection per decode step and are not implemented.
Prints median seconds and the merge / rollout ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--prompts", type=int, default=16)
  p.add_argument("--gens", type=int, default=4)
  p.add_argument("--tokens", type=int, default=64)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  from jaxreason import sharding
  from jaxreason.config import load_config
  from jaxreason.data.char_tokenizer import build_char_tokenizer
  from jaxreason.lora import adapters as la
  from jaxreason.lora.config import LoraConfig
  from jaxreason.models.build import init_model
  from jaxreason.models.config import ModelConfig
  from jaxreason.rollout import RolloutSampler, load_questions
  from jaxreason.train.state import TrainState
  tok = build_char_tokenizer()
  tmp = tempfile.mkdtemp()
  cfg = load_config(None, base={"output_dir": tmp, "algorithm": "grpo", "init_from": "x",
                                "rollout": {"prompts_per_step": a.prompts, "num_generations": a.gens,
                                            "max_new_tokens": a.tokens, "temperature": 1.0}})
  mcfg = ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=128, intermediate_size=512, num_layers=4,
                     num_heads=4, num_kv_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
  graphdef, state = nnx.split(init_model(mcfg, seed=0))
  params = nnx.to_pure_dict(state)
  trainable, frozen = la.split(params, LoraConfig(rank=a.rank, alpha=2.0 * a.rank), seed=0)
  st = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=None, frozen=frozen)
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  questions = load_questions(["task:addition:n=64,seed=3,min_digits=2,max_digits=5"], tmp, "s1", tok)[:a.prompts]
  roller = RolloutSampler(graphdef, state, mcfg, mesh, tok, cfg.rollout)

  def timed(fn):
    out = []
    for _ in range(a.repeats + 1):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      out.append(time.perf_counter() - t0)
    return float(np.median(out[1:]))  # the first call compiles

  merge_s = timed(lambda: la.merged_params(st))
  merged = la.merged_params(st)

  def rollout(p):
    roller.set_params(p)
    return roller.sample(questions, seed=0).output.tokens[0]

  lora_s = timed(lambda: rollout(merged))
  base_s = timed(lambda: rollout(params))
  print(f"{a.prompts} prompts x {a.gens} x {a.tokens} tokens, rank {a.rank}: merge {merge_s * 1e3:.1f} ms, "
        f"rollout on the merged copy {lora_s:.3f} s, on the base {base_s:.3f} s; merge / rollout "
        f"{merge_s / lora_s:.4f}, merged / base rollout {lora_s / base_s:.2f}")


if __name__ == "__main__":
  main()
