"""`python -m jaxreason.train --config FILE [--set key=value ...] [--print-config]`.

Multi-host: run the same command on every host with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID set (or on Cloud TPU VMs, where they are discovered); see the README.
"""

from __future__ import annotations

import argparse
import os
import sys


def maybe_initialize_distributed() -> None:
  import jax
  coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator:
    if os.environ.get("JAX_PLATFORMS", "") == "cpu" or jax.default_backend() == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif os.environ.get("JAXREASON_TPU_POD") == "1":
    jax.distributed.initialize()


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxreason.train", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="YAML config (see configs/)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set optimizer.lr=3e-4 (repeatable)")
  p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  p.add_argument("--allow-config-change", action="store_true",
                 help="resume even though the architecture, data or batch size changed (inexact)")
  p.add_argument("--debug", action="store_true", help="show Python tracebacks (also JAXREASON_DEBUG=1)")
  args = p.parse_args(argv)
  if args.allow_config_change:
    args.overrides.append("allow_config_change=true")

  from jaxreason.config import ConfigError, dump_yaml, load_config
  try:
    cfg = load_config(args.config, args.overrides)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    print(dump_yaml(cfg), end="")
    return 0
  maybe_initialize_distributed()
  from jaxreason.data.sources import DataError
  from jaxreason.algorithms.registry import run
  from jaxreason.train.loop import Preempted
  try:
    run(cfg)
  except Preempted:
    return 143
  except (DataError, FileNotFoundError, ValueError) as e:
    from jaxreason.errors import exit_code, one_line
    print(f"error: {one_line(e)}", file=sys.stderr)
    return exit_code(e)
  return 0


if __name__ == "__main__":
  from jaxreason.errors import cli_main
  sys.exit(cli_main(main))  # known errors: one line; a traceback with --debug or JAXREASON_DEBUG=1
