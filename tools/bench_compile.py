"""Compile time against depth, scanned vs unscanned layers, and the step time of each.

An SFT-shaped train step (forward + backward of the LM loss, remat full, AdamW update) of a small
Qwen2-shaped model (hidden 256, MLP 1024, 4 heads, 2 KV heads, vocab 4096) at 4, 8, 16 and 32
layers, compiled on this host's CPU (no persistent cache), then run a few steps. Scanned layers
hold one layer body in the program, so their compile time should stay flat with depth; unrolled
layers grow linearly. Prints the table and the unscanned/scanned ratios; compile cost as CPU
seconds of this process (robust when other jobs share the host) and wall seconds.

  python tools/bench_compile.py [--depths 4,8,16,32 --batch 4 --seq 256 --steps 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def bench(layers: int, scan: bool, batch: int, seq: int, steps: int) -> tuple[float, float]:
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from jaxreason.models import ModelConfig
  from jaxreason.models.build import init_model

  cfg = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_layers=layers, num_heads=4,
                    num_kv_heads=2, remat="full", scan_layers=scan, attention_backend="xla")
  model = init_model(cfg, seed=0)
  graphdef, params = nnx.split(model)
  tx = optax.adamw(1e-4)
  opt = tx.init(params)

  def step(params, opt, tokens):
    def loss(p):
      logits = nnx.merge(graphdef, p)(tokens[:, :-1])
      logp = jax.nn.log_softmax(logits)
      return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value

  tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)
  jitted = jax.jit(step, donate_argnums=(0, 1))
  t0, c0 = time.perf_counter(), time.process_time()
  compiled = jitted.lower(params, opt, tokens).compile()
  compile_s, compile_cpu = time.perf_counter() - t0, time.process_time() - c0
  params, opt, v = compiled(params, opt, tokens)
  jax.block_until_ready(v)
  t0 = time.perf_counter()
  for _ in range(steps):
    params, opt, v = compiled(params, opt, tokens)
  jax.block_until_ready(v)
  return compile_s, compile_cpu, (time.perf_counter() - t0) / steps


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--depths", default="4,8,16,32")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--steps", type=int, default=3)
  args = ap.parse_args()
  import jax
  jax.config.update("jax_enable_compilation_cache", False)
  # CPU seconds of the compile (process time) are robust to a shared host; wall seconds are not.
  print("| layers | compile CPU s unscanned | compile CPU s scanned | ratio | compile wall s unscanned / scanned |"
        " step s unscanned | step s scanned | ratio |")
  print("|---|---|---|---|---|---|---|---|")
  for depth in [int(d) for d in args.depths.split(",")]:
    wu, cu, su = bench(depth, False, args.batch, args.seq, args.steps)
    ws, cs, ss = bench(depth, True, args.batch, args.seq, args.steps)
    print(f"| {depth} | {cu:.1f} | {cs:.1f} | {cu / cs:.2f} | {wu:.1f} / {ws:.1f} | {su:.3f} | {ss:.3f} | "
          f"{su / ss:.2f} |", flush=True)


if __name__ == "__main__":
  main()
