"""LoRA rollouts, merged vs unmerged adapters: which decodes a rollout faster.

  JAX_PLATFORMS=cpu python tools/bench_lora_sampling.py [--shape mid] [--prompts 8] [--n 4]
      [--prompt-len 32] [--max-new 48] [--rank 16] [--quantize int8] [--repeats 2]

One rollout = prefill + `max-new` decode steps for prompts x n rows (the continuous-batching
engine, no stop token, so every variant decodes the same number of tokens), LoRA rank r on
q, k, v, o, gate, up, down of a random model of `--shape`:
- base:     the sampler on the base weights (the baseline; no adapters);
- merged:   `merged_params` (W + scale A B, one jitted merge) then decoding the merged copy, as
            the trainers do (`algorithms.grpo.run`); its time is merge + decode;
- unmerged: decoding with `adapters.unmerged` (W, A, B apart; each projection computes
            x W + scale (x A) B, `nn.layers.project`): no copy, two thin matmuls more per
            projection per step (and, with --quantize int8, W dequantised in every step).
Prints the median seconds of each over interleaved rounds (after a compiling round), the ratios to the base rollout, and
the merged copy's size against the adapters'.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "small": (128, 512, 4, 4, 2, 128),  # the quickstart's model
    "mid": (512, 1408, 8, 8, 2, 8192),
    "0.5b": (896, 4864, 24, 14, 2, 151936),  # Qwen2.5-0.5B
}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", choices=sorted(SHAPES), default="mid")
  p.add_argument("--prompts", type=int, default=8)
  p.add_argument("--n", type=int, default=4)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--max-new", type=int, default=48)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--quantize", choices=["int8"], default=None)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=2)
  a = p.parse_args()
  from jaxreason.lora import adapters as la
  from jaxreason.lora.config import LoraConfig
  from jaxreason.models.build import init_model
  from jaxreason.models.config import ModelConfig
  from jaxreason.sampling.config import SamplingConfig
  from jaxreason.sampling.sampler import Sampler

  d, f, layers, heads, kv, vocab = SHAPES[a.shape]
  mcfg = ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=d, intermediate_size=f, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv, max_position_embeddings=a.prompt_len + a.max_new + 64,
                     tie_word_embeddings=True, dtype=a.dtype)
  graphdef, state = nnx.split(init_model(mcfg, seed=0))
  params = nnx.to_pure_dict(state)
  spec = LoraConfig(rank=a.rank, alpha=2.0 * a.rank, quantize=a.quantize)
  trainable, frozen = la.split(params, spec, seed=0)
  rng = np.random.default_rng(0)  # trained-looking adapters (B != 0); the cost does not depend on the values
  trainable = {la.ADAPTERS: la.unflatten({k: jnp.asarray(rng.normal(0, 0.01, v.shape), v.dtype) if k[-1] == "b" else v
                                          for k, v in la.flatten(trainable[la.ADAPTERS]).items()})}
  base = la.merge(frozen, {})  # what the adapters sit on (the int8 base dequantised, for the baseline)
  prompts = [list(rng.integers(1, vocab, a.prompt_len)) for _ in range(a.prompts)]
  cfg = SamplingConfig(max_new_tokens=a.max_new, temperature=1.0, n=a.n)  # no stop token: every row runs max_new
  sampler = Sampler.for_graph(graphdef, mcfg)
  merge = jax.jit(la.merge)

  def rollout(weights):
    sampler.set_state(weights)
    out = sampler.generate_padded(prompts, cfg, seed=0)
    assert int(out.length.sum()) == a.prompts * a.n * a.max_new
    return out

  unmerged = la.unmerged(frozen, trainable)
  variants = {"base": lambda: rollout(base).tokens, "merge": lambda: merge(frozen, trainable),
              "merged_decode": lambda: rollout(merged).tokens, "unmerged": lambda: rollout(unmerged).tokens}
  merged = merge(frozen, trainable)
  times = {k: [] for k in variants}
  for r in range(a.repeats + 1):  # interleaved rounds (the machine's load drifts); round 0 compiles
    for k, fn in variants.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      if r:
        times[k].append(time.perf_counter() - t0)
  base_s, merge_s, merged_decode_s, unmerged_s = (float(np.median(times[k])) for k in variants)

  rows, toks = a.prompts * a.n, a.prompts * a.n * a.max_new
  merged_s = merge_s + merged_decode_s
  print(f"shape {a.shape} (hidden {d}, {layers} layers, vocab {vocab}, {mcfg.num_params() / 1e6:.1f}M params), "
        f"{a.dtype}, LoRA r {a.rank} on q,k,v,o,gate,up,down" + (f", base {a.quantize}" if a.quantize else "")
        + f"; {rows} rows x {a.max_new} new tokens ({a.prompt_len}-token prompts), {jax.devices()[0].platform}, "
        f"median of {a.repeats}")
  print(f"  base rollout      {base_s:8.3f} s  {toks / base_s:8.1f} tok/s  1.000")
  print(f"  merged            {merged_s:8.3f} s  {toks / merged_s:8.1f} tok/s  {merged_s / base_s:.3f}  "
        f"(merge {merge_s * 1e3:.1f} ms = {merge_s / merged_s:.2%} + decode {merged_decode_s:.3f} s)")
  print(f"  unmerged          {unmerged_s:8.3f} s  {toks / unmerged_s:8.1f} tok/s  {unmerged_s / base_s:.3f}")
  print(f"  unmerged / merged {unmerged_s / merged_s:.3f}; merged copy {la.tree_bytes(base) / 2**20:.1f} MiB "
        f"vs adapters {la.tree_bytes(trainable) / 2**20:.2f} MiB")


if __name__ == "__main__":
  main()
