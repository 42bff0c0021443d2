"""SFT training throughput: jaxreason's jitted step vs HF transformers + PyTorch on CPU.

Same Qwen2-shaped model (~22M params by default: hidden 384, 6 layers, 6 heads, 2 KV heads, MLP
1536, vocab 32768, tied), same batch (8 x 512 tokens, all trained), AdamW. Prints tokens/s, MFU
(6 x params x tokens/s + attention, over the jitted-matmul peak measured here) and the ratios
against HF fp32 and HF bf16 autocast.

  python tools/bench_train.py [--batch 8 --seq 512 --steps 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

SHAPE = dict(vocab_size=32768, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
             num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=4096)


def hf_model():
  import torch
  import transformers
  cfg = transformers.AutoConfig.for_model("qwen2", **SHAPE)
  torch.manual_seed(0)
  return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().train()


def bench_hf(tokens, steps, autocast: bool) -> float:
  import torch
  model = hf_model()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  ids = torch.tensor(tokens)

  def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  step()
  t = time.perf_counter()
  for _ in range(steps):
    step()
  return ids.numel() * steps / (time.perf_counter() - t)


def bench_jax(tokens, steps, dtype: str, remat: str) -> tuple[float, object]:
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from jaxreason.models import ModelConfig
  from jaxreason.models.build import init_model
  from jaxreason.train.state import TrainState
  from jaxreason.algorithms.sft.loss import make_sft_step
  cfg = ModelConfig(model_type="qwen2", vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["hidden_size"],
                    intermediate_size=SHAPE["intermediate_size"], num_layers=SHAPE["num_hidden_layers"],
                    num_heads=SHAPE["num_attention_heads"], num_kv_heads=SHAPE["num_key_value_heads"],
                    tie_word_embeddings=True, dtype=dtype, remat=remat)
  graphdef, st = nnx.split(init_model(cfg))
  params = nnx.to_pure_dict(st)
  tx = optax.adamw(1e-4)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  step = jax.jit(make_sft_step(graphdef, tx, optax.constant_schedule(1e-4)), donate_argnums=0)
  arr = np.asarray(tokens, np.int32)
  b, t = arr.shape
  batch = {"inputs": arr[None], "targets": np.roll(arr, -1, axis=1)[None], "weights": np.ones((1, b, t), np.float32),
           "positions": np.tile(np.arange(t, dtype=np.int32), (1, b, 1)), "segments": np.ones((1, b, t), np.int32)}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  state, m = step(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return arr.size * steps / (time.perf_counter() - t0), cfg


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--remat", default="none")
  args = ap.parse_args()
  from jaxreason.train.metrics_log import flops_per_token, peak_flops_per_device
  tokens = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], size=(args.batch, args.seq)).tolist()
  results = {}
  results["hf_fp32"] = bench_hf(tokens, args.steps, autocast=False)
  results["hf_bf16_autocast"] = bench_hf(tokens, args.steps, autocast=True)
  for dtype in ("float32", "bfloat16"):
    results[f"jax_{dtype}"], cfg = bench_jax(tokens, args.steps, dtype, args.remat)
  fpt = flops_per_token(cfg, args.seq)
  peaks = {d: peak_flops_per_device(d) for d in ("float32", "bfloat16")}
  print(f"model: {cfg.num_params() / 1e6:.1f}M params, batch {args.batch} x {args.seq}, {args.steps} timed steps")
  print("matmul peak GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()))
  for name, tps in results.items():
    peak = peaks["bfloat16" if "bf16" in name or "bfloat16" in name else "float32"]
    print(f"  {name:<18} {tps:8.0f} tok/s  MFU {100 * tps * fpt / peak:5.1f}%  "
          f"x{tps / results['hf_fp32']:.2f} vs HF fp32  x{tps / results['hf_bf16_autocast']:.2f} vs HF bf16-autocast")


if __name__ == "__main__":
  main()
