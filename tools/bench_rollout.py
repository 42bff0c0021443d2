"""Rollout engine benchmarks: long-tailed rollouts (dense vs continuous batching vs HF generate) and
per-step decode time against the live context (length-aware attention vs the whole cache).

Long tail: a random Qwen2-shaped model whose output layer is scaled down so the next-token
distribution is near uniform; `--stop-tokens` ids are stop tokens, so each step ends a row with
probability ~ stop_tokens / vocab (geometric lengths, capped at --max-new). Temperature 1 sampling,
same distribution for every engine (HF draws other random numbers: same length distribution, not
the same lengths). Useful tokens/s = emitted tokens / wall time (compile excluded: each engine runs
once before timing).

Context scaling: prompts of --contexts tokens, cache sized for --cap new tokens, per-step time of
the dense sampler's decode step with bucketed attention against attention over the whole cache.

  python tools/bench_rollout.py                   # both, scaled to a few minutes on 2 CPU cores
  python tools/bench_rollout.py --skip-context --shape 0.5b --prompts 256 --n 4 --max-new 512 --slots 256 \
      --stop-tokens 1780   # the issue's sizes (Qwen2.5-0.5B shape; stop ids share of the vocab as by default)
  python tools/bench_rollout.py --skip-long-tail --skip-context --hlo   # cache-sized ops in the compiled loops
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# CPU unless asked otherwise: with libtpu installed (the dev extra) JAX would first try, and fail, to open a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6})
# Qwen2.5-0.5B's shape (the benchmark model), random weights.
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
SHAPES = {"small": SMALL, "0.5b": QWEN25_05B}


def make_model_dir(path: str, shape: dict) -> None:
  import torch
  import transformers
  cfg = transformers.AutoConfig.for_model("qwen2", **shape)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cfg).float()
  with torch.no_grad():
    model.lm_head.weight.mul_(0.01)  # near-uniform next-token distribution (tied: the embedding too)
  model.save_pretrained(path)


LABELS = {"dense": "dense, whole-cache attention (before)", "cont_whole": "continuous, whole-cache, fixed slots",
          "cont_fixed": "continuous, bucketed, fixed slots", "continuous": "continuous, bucketed, shrinking tail",
          "hf_generate": "HF generate (batched)",
          "vllm": "vLLM-CPU (generate time)"}


def long_tail(model_dir, args) -> None:
  import jax
  from jaxreason.models.hf import load_hf_model
  from jaxreason.sampling import Sampler, SamplingConfig
  rng = np.random.default_rng(0)
  shape = SHAPES[args.shape]
  vocab = shape["vocab_size"]
  stops = tuple(range(vocab - args.stop_tokens, vocab))
  prompts = [rng.integers(100, vocab - args.stop_tokens, size=int(rng.integers(8, 33))).tolist()
             for _ in range(args.prompts)]
  cfg = SamplingConfig(max_new_tokens=args.max_new, temperature=1.0, n=args.n, stop_token_ids=stops)
  sampler = Sampler(load_hf_model(model_dir, dtype="float32"))
  from jaxreason.ops import attention as attention_ops
  default = attention_ops.BUCKETED_DECODE
  rows = {}
  # "dense" with attention over the whole cache is the sampler before the engine work.
  # "fixed slots": the tail runs in all the slots (min_slots = slots); the default halves them as rows end.
  for name, engine, bucketed, min_slots in (("dense", "dense", False, None),
                                            ("cont_whole", "continuous", False, args.slots),
                                            ("cont_fixed", "continuous", True, args.slots),
                                            ("continuous", "continuous", True, None)):
    if args.only and name not in args.only.split(",") + ["dense"]:
      continue
    attention_ops.BUCKETED_DECODE = bucketed
    jax.clear_caches()  # the switch is read when tracing; the sampler's jit would reuse an old trace
    kw = dict(engine=engine, slots=args.slots, min_slots=min_slots)
    sampler.generate_padded(prompts, cfg, **kw)  # compile
    t = time.perf_counter()
    b = sampler.generate_padded(prompts, cfg, seed=1, **kw)
    dt = time.perf_counter() - t
    rows[name] = dict(tokens=int(b.length.sum()), s=dt, occ=b.metrics["slot_occupancy"],
                      steps=b.metrics["decode_steps"], levels=b.metrics["slot_levels"], lengths=b.length)
  attention_ops.BUCKETED_DECODE = default
  if not args.skip_hf:
    import torch
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    t, total = time.perf_counter(), 0
    with torch.no_grad():
      for i in range(0, len(prompts), args.hf_batch):  # batched, left-padded
        part = [p for p in prompts[i:i + args.hf_batch] for _ in range(args.n)]
        width = max(map(len, part))
        ids = torch.zeros((len(part), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(part):
          ids[j, width - len(p):], mask[j, width - len(p):] = torch.tensor(p), 1
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=args.max_new, do_sample=True, temperature=1.0,
                          top_k=0, top_p=1.0, eos_token_id=list(stops), pad_token_id=0)[:, width:]
        done = np.isin(out.numpy(), stops)
        lens = np.where(done.any(1), done.argmax(1) + 1, out.shape[1])
        total += int(lens.sum())
    rows["hf_generate"] = dict(tokens=total, s=time.perf_counter() - t, occ=float("nan"), steps=0, lengths=None,
                               levels=None)
  if not args.skip_vllm:
    from jaxreason.eval import vllm_backend
    if vllm_backend.vllm_available(args.vllm_python):  # continuous batching too; generation time only
      # Unseeded: seeded temperature sampling fails in vLLM-CPU 0.32 here ("CPU Generator does not use offset").
      job = vllm_backend.job_from_config(prompts, cfg, seed=None, logprobs=False)
      (out,), info = vllm_backend.generate_vllm(model_dir, [job], python=args.vllm_python, dtype="float32",
                                                max_model_len=64 + args.max_new, return_info=True)
      rows["vllm"] = dict(tokens=sum(len(t) for t in out.tokens), s=info["timing"]["generate_s"], occ=float("nan"),
                          steps=0, lengths=None, levels=None)
    else:
      print("vLLM-CPU skipped: no .venv-vllm (tools/setup_vllm_venv.sh) and no --vllm-python")
  lens = next(r["lengths"] for r in reversed(list(rows.values())) if r["lengths"] is not None)
  print(f"\nlong-tail rollouts: {args.prompts} prompts x n={args.n}, cap {args.max_new}, {args.slots} slots, "
        f"lengths p10/p50/p90/max {np.percentile(lens, 10):.0f}/{np.percentile(lens, 50):.0f}/"
        f"{np.percentile(lens, 90):.0f}/{lens.max()} (jax {jax.__version__}, model {shape['hidden_size']}x"
        f"{shape['num_hidden_layers']}, vocab {vocab})")
  base = rows["dense"]["tokens"] / rows["dense"]["s"]
  for name, r in rows.items():
    tps = r["tokens"] / r["s"]
    occ = "" if name in ("hf_generate", "vllm") else (f"  slot occupancy {100 * r['occ']:5.1f}%  decode steps "
                                                      f"{r['steps']}  slots {'/'.join(map(str, r['levels']))}")
    print(f"  {LABELS[name]:<36} {tps:9.1f} useful tokens/s  x{tps / base:.2f} vs dense{occ}")


def context_scaling(model_dir, args) -> None:
  import jax
  import jax.numpy as jnp
  from jaxreason.models.hf import load_hf_model
  from jaxreason.models.transformer import KVCache
  from jaxreason.ops import attention as attention_ops
  from flax import nnx
  model = load_hf_model(model_dir, dtype="float32")
  graphdef, state = nnx.split(model)
  b, steps = args.context_batch, 16

  def decode(state, cache, token):
    m = nnx.merge(graphdef, state)

    def body(i, carry):
      cache, token = carry
      pos = jnp.full((b, 1), cache.index, jnp.int32)
      logits, cache = m(token, pos, jnp.ones((b, 1), jnp.int32), cache=cache)
      return cache, jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.lax.fori_loop(0, steps, body, (cache, token))

  default = attention_ops.BUCKETED_DECODE
  print(f"\ncontext scaling: per-step decode time, batch {b}, cache = context + cap {args.cap}")
  for ctx in [int(c) for c in args.contexts.split(",")]:
    times = {}
    for mode in ("bucketed", "whole cache"):
      attention_ops.BUCKETED_DECODE = mode == "bucketed"
      # A fresh function per mode: jit caches traces by function, and the switch is read when tracing.
      decode_fn = jax.jit(lambda *a: decode(*a))
      cache = KVCache.init(model.cfg, b, ctx + args.cap)
      seg = jnp.zeros_like(cache.segments).at[:, :ctx].set(1)
      pos = jnp.broadcast_to(jnp.arange(ctx + args.cap, dtype=jnp.int32), seg.shape)
      cache = KVCache(k=cache.k, v=cache.v, positions=pos, segments=seg, index=jnp.asarray(ctx, jnp.int32))
      tok = jnp.ones((b, 1), jnp.int32)
      jax.block_until_ready(decode_fn(state, cache, tok))
      t = time.perf_counter()
      jax.block_until_ready(decode_fn(state, cache, tok))
      times[mode] = (time.perf_counter() - t) / steps * 1e3
    attention_ops.BUCKETED_DECODE = default
    print(f"  context {ctx:5d}: bucketed {times['bucketed']:7.2f} ms/step, whole cache {times['whole cache']:7.2f} "
          f"ms/step  (x{times['whole cache'] / times['bucketed']:.2f})")


def hlo_copies(model_dir, args) -> None:
  """Counts the ops of the compiled sampler (both engines) that produce an array of the KV cache's
  shape: dynamic-update-slice / scatter (the per-step write, in place when no copy accompanies it)
  and copy (a full copy of the cache). Compiles only; runs nothing."""
  import re

  import jax
  import jax.numpy as jnp
  from jaxreason.models.hf import load_hf_model
  from jaxreason.sampling import sampler as sampler_lib
  from jaxreason.sampling import SamplingConfig
  from flax import nnx
  model = load_hf_model(model_dir, dtype="float32")
  graphdef, state = nnx.split(model)
  c = model.cfg
  slots, p, cap = 8, 32, 256
  cfg = SamplingConfig(max_new_tokens=cap, temperature=1.0, n=1, stop_token_ids=(0,))
  tokens, mask = jnp.ones((2 * slots, p), jnp.int32), jnp.ones((2 * slots, p), jnp.int32)
  nl, off, rng = jnp.zeros((c.vocab_size,), bool), jnp.zeros((), jnp.int32), jax.random.key(0)
  print(f"\nKV-cache-sized ops in the compiled decode loop (keys [L, S, K, H, C], values [L, S, K, C, H], "
        f"L={c.num_layers} S={slots} K={c.num_kv_heads} H={c.resolved_head_dim} C={p + cap}, per engine)")
  for engine in ("dense", "continuous"):
    kw = dict(graphdef=graphdef, cfg=cfg, bf=None, cache_len=p + cap)
    if engine == "dense":
      fn, a = sampler_lib._generate, (tokens[:slots], mask[:slots])
    else:
      fn, a = sampler_lib._generate_continuous, (tokens, mask)
      kw["slots"] = slots
    text = fn.lower(state, *a, rng, nl, off, **kw).compile().as_text()
    lead = f"{c.num_layers},{slots},{c.num_kv_heads}"
    dims = f"(?:{lead},{c.resolved_head_dim},{p + cap}|{lead},{p + cap},{c.resolved_head_dim})"  # keys | values
    ops = {}
    for line in text.splitlines():
      m = re.search(r"= f32\[" + dims + r"\]\{[^}]*\} ([a-z-]+)\(", line)
      if m:
        ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    print(f"  {engine:<10} " + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--prompts", type=int, default=64)
  ap.add_argument("--n", type=int, default=4)
  ap.add_argument("--max-new", type=int, default=512)
  ap.add_argument("--stop-tokens", type=int, default=48, help="stop ids: per-step stop probability ~ this / vocab")
  ap.add_argument("--slots", type=int, default=64)
  ap.add_argument("--hf-batch", type=int, default=16, help="prompts per HF generate call (x n rows)")
  ap.add_argument("--skip-hf", action="store_true")
  ap.add_argument("--skip-vllm", action="store_true")
  ap.add_argument("--vllm-python", default=None, help="python of a venv with vllm (default: .venv-vllm)")
  ap.add_argument("--only", default="", help="comma-separated sampler rows to run besides dense (default: all): "
                  "cont_whole, cont_fixed, continuous")
  ap.add_argument("--skip-long-tail", action="store_true")
  ap.add_argument("--skip-context", action="store_true")
  ap.add_argument("--contexts", default="128,512,2048")
  ap.add_argument("--cap", type=int, default=4096)
  ap.add_argument("--context-batch", type=int, default=8)
  ap.add_argument("--shape", choices=sorted(SHAPES), default="small", help="model shape (random weights)")
  ap.add_argument("--hlo", action="store_true", help="also list KV-cache-sized copies in the compiled decode loops")
  args = ap.parse_args()
  if args.vllm_python:  # the vLLM job runs in another directory
    args.vllm_python = os.path.abspath(args.vllm_python)
  with tempfile.TemporaryDirectory() as d:
    make_model_dir(d, SHAPES[args.shape])
    if not args.skip_long_tail:
      long_tail(d, args)
    if not args.skip_context:
      context_scaling(d, args)
    if args.hlo:
      hlo_copies(d, args)


if __name__ == "__main__":
  main()
