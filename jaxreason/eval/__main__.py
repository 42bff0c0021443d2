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
import dataclasses
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
  _validate({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) is not None})
  return cfg


_POSITIVE = ("n", "batch_size", "max_new_tokens", "max_answer_tokens")
_NON_NEGATIVE = ("limit", "num_waits", "min_thinking_tokens", "top_k", "seed")


def _validate(settings: dict) -> None:
  """One-line errors for settings that would otherwise fail deep inside the evaluation."""
  import os

  def fail(msg):
    raise SystemExit(f"error: {msg}")

  def as_int(k):
    v = settings[k]
    if isinstance(v, bool) or not isinstance(v, int):
      try:
        v = int(str(v))
      except ValueError:
        fail(f"--{k.replace('_', '-')} must be an integer, got {settings[k]!r}")
      settings[k] = v
    return v

  model = str(settings["model"])
  if not os.path.exists(model):
    fail(f"--model {model}: no such directory (a HuggingFace model directory, or an Orbax run / "
         "checkpoints / step directory)")
  data = str(settings["data"])
  if not data.startswith(("task:", "tfds:")) and not os.path.exists(data):
    fail(f"--data {data}: no such file or directory (a .jsonl/.json/.parquet file, a datasets directory, "
         "or task:NAME)")
  if settings.get("tokenizer") and not os.path.isdir(str(settings["tokenizer"])):
    fail(f"--tokenizer {settings['tokenizer']}: no such directory")
  for k in _POSITIVE:
    if settings.get(k) is not None and as_int(k) < 1:
      fail(f"--{k.replace('_', '-')} must be a positive integer, got {settings[k]}")
  for k in _NON_NEGATIVE:
    if settings.get(k) is not None and as_int(k) < 0:
      fail(f"--{k.replace('_', '-')} must be >= 0, got {settings[k]}")
  for k, lo, hi in (("temperature", 0.0, None), ("top_p", 0.0, 1.0)):
    if settings.get(k) is None:
      continue
    try:
      v = float(settings[k])
    except (TypeError, ValueError):
      fail(f"--{k.replace('_', '-')} must be a number, got {settings[k]!r}")
    if v < lo or (hi is not None and v > hi) or (k == "top_p" and v == 0.0):
      fail(f"--{k.replace('_', '-')} must be " + ("in (0, 1]" if k == "top_p" else ">= 0") + f", got {v}")
  ks = settings.get("ks")
  if isinstance(ks, str):
    try:
      ks = tuple(int(k) for k in ks.split(","))
    except ValueError:
      fail(f"--ks must be comma-separated positive integers, got {settings['ks']!r}")
    settings["ks"] = ks
  if ks is not None and any(int(k) < 1 for k in ks):
    fail(f"--ks must be positive integers, got {ks}")


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  cfg = resolve(args)
  from jaxreason.eval.run import run_eval
  try:
    run_eval(cfg)
  except (FileNotFoundError, ValueError, KeyError) as e:
    from jaxreason.errors import exit_code, one_line
    print(f"error: {one_line(e)}", file=sys.stderr)
    return exit_code(e)
  return 0


if __name__ == "__main__":
  from jaxreason.errors import cli_main
  sys.exit(cli_main(main))  # known errors: one line; a traceback with --debug or JAXREASON_DEBUG=1
