"""`python -m jaxreason.eval`: accuracy against thinking budget (the s1 test-time scaling figure).

  python -m jaxreason.eval --model DIR --data FILE --format s1 --out OUTDIR \\
      --budgets 256,512,1024,none --num-waits 0 --n 1 --max-new-tokens 2048

--data: a .jsonl/.json/.parquet file, a local HF `datasets` directory, or `task:NAME[:k=v,...]`
(built-in procedural tasks, e.g. `task:addition:n=200,max_digits=7`). Rows need `question` (or
`prompt`) and `answer`. Settings may also come from --config YAML (keys = the long option names
with underscores); options given on the command line win.
"""

from __future__ import annotations

import argparse
import sys

from jaxreason.formats import FORMATS


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m jaxreason.eval", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--config", help="YAML file with any of the settings below")
  p.add_argument("--model", help="HuggingFace model directory, or an Orbax run/checkpoints/step directory")
  p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
  p.add_argument("--data", help="dataset file/dir or task:NAME")
  p.add_argument("--out", help="output directory")
  p.add_argument("--format", choices=list(FORMATS))
  p.add_argument("--budgets", help="comma-separated max thinking tokens; 'none' = no cap")
  p.add_argument("--num-waits", type=int, help="'Wait' extensions when the model tries to stop thinking")
  p.add_argument("--wait", help="the injected string (default 'Wait')")
  p.add_argument("--min-thinking-tokens", type=int)
  p.add_argument("--max-answer-tokens", type=int)
  p.add_argument("--temperature", type=float)
  p.add_argument("--top-p", type=float)
  p.add_argument("--top-k", type=int)
  p.add_argument("--n", type=int, help="samples per question")
  p.add_argument("--max-new-tokens", type=int)
  p.add_argument("--backend", choices=["jax", "vllm"])
  p.add_argument("--seed", type=int)
  p.add_argument("--batch-size", type=int)
  p.add_argument("--reward", help="reward name or module:function (default: the format's)")
  p.add_argument("--split")
  p.add_argument("--limit", type=int)
  p.add_argument("--ks", help="comma-separated k for pass@k / maj@k")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (jax backend)")
  return p


def resolve(args: argparse.Namespace) -> "EvalConfig":
  """EvalConfig from --config YAML (the training configs' loader: file and line in errors, the
  nearest valid key for a typo) under the command-line options, which win."""
  from jaxreason.eval.run import EvalConfig, parse_budgets
  from jaxreason.yamlconfig import load
  settings = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
  try:
    if "budgets" in settings:
      settings["budgets"] = parse_budgets(settings["budgets"])
    if "ks" in settings:
      settings["ks"] = tuple(int(k) for k in settings["ks"].split(","))
  except ValueError as e:
    raise SystemExit(f"bad settings: {e}")
  try:
    cfg, _, _ = load(EvalConfig, args.config, settings=settings)
  except ValueError as e:  # ConfigError, or a value EvalConfig rejects
    message = str(e)
    missing = [f"--{k.replace('_', '-')}" for k in ("model", "data", "out") if f" {k} is required" in message]
    raise SystemExit("missing required settings: " + ", ".join(missing) if missing else f"bad settings: {message}")
  return cfg


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  cfg = resolve(args)
  from jaxreason.eval.run import run_eval
  try:
    run_eval(cfg)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
