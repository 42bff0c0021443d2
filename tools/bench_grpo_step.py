"""GRPO step breakdown, before and after the rollout engine: rollout vs reference vs update seconds
per training step with `rollout.engine: dense` (every completion in its own row until the longest
ends: the sampler before #12) and `continuous` (continuous batching, the default), run one after the
other in this process on the same model, questions and seeds.

The trainer's own per-step metrics are read back (`time_rollout`: sampling, rewards and rows;
`time_reference`: the frozen reference's log-probs; `time_update`: the optimizer steps). Step 1
compiles and is left out; the table is the mean over the later steps.

  python tools/bench_grpo_step.py --init runs/quickstart          # the GRPO quickstart (its config), on its SFT run
  python tools/bench_grpo_step.py --shape 0.5b                     # a random Qwen2.5-0.5B-shaped model (see below)

With `--shape`, the policy is a random Qwen2-shaped model (HF transformers init, output layer scaled down
so the next-token distribution is near uniform) with the real Qwen2.5 tokenizer, and the rollouts stop at
any of `--stop-tokens` ids (as tools/bench_rollout.py; the bench patches the trainer's stop ids), so
lengths are geometric with a long tail up to `--max-new`. Rewards are all 0 on such a model, so
dynamic sampling is off; the update still runs every row (its cost does not depend on the advantages).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from bench_rollout import SHAPES, make_model_dir  # noqa: E402  (tools/ is on sys.path when run as a script)

KEYS = ("time_rollout", "time_reference", "time_update")


def make_policy_dir(path: str, shape: dict) -> None:
  """bench_rollout's random near-uniform model, with the Qwen2.5 tokenizer beside it (an HF init_from)."""
  from jaxreason.data.tokenizer import build_qwen25_tokenizer
  make_model_dir(path, shape)
  build_qwen25_tokenizer().save_pretrained(path)


def random_policy_config(args, init: str) -> dict:
  return {
      "algorithm": "grpo", "seed": 0, "init_from": init, "model": {"dtype": args.dtype},
      "data": {"train": ["task:addition:n=2000,seed=2,min_digits=2,max_digits=5"]},
      "rollout": {"format": "s1", "prompts_per_step": args.prompts, "num_generations": args.n, "temperature": 1.0,
                  "max_new_tokens": args.max_new},
      "grpo": {"rewards": {"s1_answer": 1.0}, "loss_type": "dapo", "beta": args.beta, "dynamic_sampling": False,
               "log_samples_every": 0},
      "optimizer": {"lr": 1e-6, "weight_decay": 0.0},
      "schedule": {"warmup_steps": 0, "decay": "constant"},
      "train": {"global_batch_size": args.prompts * args.n, "micro_batch_size": args.micro},
  }


def run(base: dict, engine: str, args, out: str) -> list[dict]:
  from jaxreason.algorithms.grpo.run import run_grpo
  from jaxreason.config import load_config
  cfg = load_config(None, base=base, overrides=[
      f"output_dir={out}", f"rollout.engine={engine}", f"train.max_steps={args.steps}", "train.log_every=1",
      f"checkpoint.every_steps={args.steps}", "checkpoint.keep_last=1", "eval=null", "logging.progress_bar=false",
      "logging.tensorboard=false", *args.set])
  run_grpo(cfg)
  return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--init", default=None, help="an SFT run (or HF dir) to start from, with --config")
  ap.add_argument("--config", default="configs/quickstart_grpo.yaml", help="the GRPO config used with --init")
  ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                  help="a random model of this shape (with Qwen's vocabulary) instead")
  ap.add_argument("--steps", type=int, default=4, help="training steps per engine (step 1, which compiles, is left out)")
  ap.add_argument("--engines", default="dense,continuous")
  ap.add_argument("--set", action="append", default=[], help="extra config overrides (a.b=value)")
  g = ap.add_argument_group("with --shape")
  g.add_argument("--prompts", type=int, default=4, help="questions per step")
  g.add_argument("--n", type=int, default=4, help="completions per question")
  g.add_argument("--max-new", type=int, default=128)
  g.add_argument("--stop-tokens", type=int, default=1780, help="stop ids: per-step stop probability ~ this / vocab")
  g.add_argument("--micro", type=int, default=4, help="micro-batch (completions)")
  g.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0 keeps a reference model to score)")
  g.add_argument("--dtype", default="float32")
  args = ap.parse_args()
  if (args.init is None) == (args.shape is None):
    ap.error("give --init RUN (a quickstart-style run) or --shape (a random model)")

  import jax
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} x {jax.device_count()}; {os.cpu_count()} CPU cores")
  with tempfile.TemporaryDirectory() as tmp:
    if args.shape:
      from jaxreason import generation
      shape = dict(SHAPES[args.shape], vocab_size=151936)  # the Qwen2.5 tokenizer's ids (Qwen's padded vocab)
      policy = os.path.join(tmp, "policy")
      make_policy_dir(policy, shape)
      base = random_policy_config(args, policy)
      vocab = shape["vocab_size"]
      stops = tuple(range(vocab - args.stop_tokens, vocab))
      eos_only = generation.stop_token_ids
      generation.stop_token_ids = lambda tok: tuple(sorted(set(eos_only(tok)) | set(stops)))
      what = (f"random {args.shape}-shaped Qwen2 ({args.dtype}), {args.prompts} questions x {args.n}, cap "
              f"{args.max_new}, {args.stop_tokens} stop ids, beta {args.beta}")
    else:
      import yaml
      base = yaml.safe_load(open(args.config))
      base["init_from"] = args.init
      what = f"{args.config} on {args.init}"
    print(f"GRPO step breakdown: {what}; {args.steps} steps per engine, step 1 left out")
    results = {}
    for engine in args.engines.split(","):
      rows = run(base, engine, args, os.path.join(tmp, engine))
      later = [r for r in rows if r["step"] > 1] or rows
      mean = {k: float(np.mean([r.get(k, 0.0) for r in later])) for k in
              (*KEYS, "completion_length", "rollout/slot_occupancy", "rollout/tokens")}
      mean["step"] = sum(mean[k] for k in KEYS)
      results[engine] = mean
      print(f"  {engine}: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()), flush=True)

  print(f"\n| engine | rollout s | reference s | update s | step s | rollout share | slot occupancy | "
        f"tokens/step | mean length |")
  print("|---|---|---|---|---|---|---|---|---|")
  for engine, m in results.items():
    print(f"| {engine} | {m['time_rollout']:.2f} | {m['time_reference']:.2f} | {m['time_update']:.2f} | "
          f"{m['step']:.2f} | {m['time_rollout'] / m['step']:.1%} | {m['rollout/slot_occupancy']:.1%} | "
          f"{m['rollout/tokens']:.0f} | {m['completion_length']:.1f} |")
  if "dense" in results and "continuous" in results:
    d, c = results["dense"], results["continuous"]
    print(f"\ncontinuous vs dense: rollout x{d['time_rollout'] / c['time_rollout']:.2f} faster, "
          f"step x{d['step'] / c['step']:.2f} faster")


if __name__ == "__main__":
  main()
