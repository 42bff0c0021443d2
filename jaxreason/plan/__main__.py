"""python -m jaxreason.plan --config FILE [--set k=v ...] --topology NAME [--model PRESET] [--save-compiled DIR]

Compiles every jitted function the config runs for TOPOLOGY (compile-only TPU devices via libtpu on any
host; `cpu:N` on fake CPU devices) and prints per-device memory against HBM, FLOPs, a step-time lower
bound, the MFU ceiling and compile times. Exits 1 when something does not fit, with what to change.
GPU topologies (h100:8, ...) cannot be compiled without GPUs: figures are analytic estimates (est.).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser():
  p = argparse.ArgumentParser(prog="python -m jaxreason.plan", description=__doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="training config YAML")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
  p.add_argument("--topology", required=True, help="v5e-8, v5p-64, v4-8, v6e-256, h100:8, cpu:8, ...")
  p.add_argument("--model", help="model preset (e.g. qwen2.5-7b); default: init_from's config.json, or a preset "
                 "named like init_from's last path component")
  p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens for rollouts (GRPO); default 512")
  p.add_argument("--only", action="append", default=[], help="plan only functions whose name contains this")
  p.add_argument("--estimate", action="store_true", help="skip compiling; analytic figures only")
  p.add_argument("--save-compiled", metavar="DIR", help="serialise the compiled executables into DIR")
  p.add_argument("--suggest", action="store_true", help="when something does not fit, say what to change")
  return p


def resolve_model(cfg, preset_name: str | None):
  from jaxreason import checkpoint
  from jaxreason.models.hf import load_hf_config
  from jaxreason.plan.presets import guess_preset, preset
  from jaxreason.train.loop import EXECUTION_FIELDS
  execution = {k: getattr(cfg.model, k) for k in EXECUTION_FIELDS}
  src = cfg.init_from
  if preset_name:
    return preset(preset_name, **execution), f"preset {preset_name}"
  if src and os.path.exists(os.path.join(src, "config.json")):
    return load_hf_config(src, **execution), f"{src}/config.json"
  if src and checkpoint.is_checkpoint(src):
    return checkpoint.load_model_config(src).replace(**execution), f"checkpoint {src}"
  guess = guess_preset(src)
  if guess:
    return preset(guess, **execution), f"preset {guess} (named by init_from; {src} is not on this machine)"
  if src:
    raise SystemExit(f"plan: init_from {src!r} has no config.json here and names no preset; pass --model "
                     "(e.g. --model qwen2.5-7b)")
  return cfg.model, "the config's model section"


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  from jaxreason.plan.topology import parse_topology
  topo = parse_topology(args.topology)
  # Fake CPU devices for cpu:N, and for laying out GPU estimates; must precede importing jax.
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={max(topo.num_chips, 1)}")
  if topo.platform != "gpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from jaxreason.config import load_config
  from jaxreason.plan import run
  cfg = load_config(args.config, args.set)
  model_cfg, source = resolve_model(cfg, args.model)
  compile_ = not args.estimate
  print(f"plan: {args.config} ({cfg.algorithm}) on {topo.name}: {topo.num_chips} x {topo.chip.name}, "
        f"{topo.chip.budget_bytes / run.GIB:.2f} GiB HBM usable each; model {source}: "
        f"{model_cfg.num_params() / 1e9:.2f}B parameters, {model_cfg.num_layers} layers "
        f"({'scanned' if model_cfg.scan_layers else 'unrolled'}), remat {model_cfg.remat}, {model_cfg.dtype} compute")
  if topo.platform == "gpu" and compile_:
    import jax
    if not any(d.platform == "gpu" for d in jax.devices()):
      print("plan: GPU topologies cannot be compiled without GPUs (JAX has no deviceless GPU compile); "
            "the figures below are ANALYTIC ESTIMATES (est.), laid out on fake CPU devices")
  reports = run.plan(cfg, model_cfg, topo, prompt_len=args.prompt_len, compile=compile_,
                     save_dir=args.save_compiled, only=tuple(args.only))
  print(run.table(reports, topo))
  print("GiB per device. params/opt state: shard sizes from the rules; grads*/KV cache*: analytic (inside temps "
        "when compiled); temps: XLA temporaries (~: analytic activations); total: args + outputs - aliased + temps; "
        "TFLOPs: analytic per call (all chips); step >=: max(FLOPs/peak, bytes/HBM bandwidth).")
  for r in reports:
    if r.notes:
      print(f"  {r.name}: {r.notes}" + (f"; compiled FLOPs (loop bodies once) {r.xla_flops / 1e12:.1f} T/device"
                                        if r.compiled else ""))
  bad = [r for r in reports if not r.fits]
  if bad:
    for line in run.advice(bad, cfg, model_cfg, topo):
      print("DOES NOT FIT: " + line)
    if args.suggest:
      for line in run.suggest(cfg, model_cfg, topo, bad, prompt_len=args.prompt_len, compile=compile_):
        print("SUGGEST: " + line)
    return 1
  if args.save_compiled:
    print(f"plan: compiled executables written to {args.save_compiled} (jax.experimental.serialize_executable)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
