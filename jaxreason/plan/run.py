"""Plan a config on a topology: AOT-compile its jitted functions, report memory, FLOPs, time.

For each function (see `plan.functions`): per-device memory from XLA's `memory_analysis()` of the
program compiled for the topology (arguments = parameters + optimizer state + batch; temporaries =
activations, gradients, KV cache; outputs not aliased to donated inputs), next to the analytic
figures of `plan.estimate`; FLOPs per call (analytic: `cost_analysis()` counts loop bodies once);
a lower bound on its time, max(FLOPs / peak, bytes / HBM bandwidth) over all chips, and the MFU
ceiling that bound implies; the compile time. GPU topologies are estimated only (labelled).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxreason import sharding
from jaxreason.plan import estimate as est
from jaxreason.plan.functions import Planned, functions_for
from jaxreason.plan.topology import GIB, Topology


@dataclasses.dataclass
class Report:
  name: str
  notes: str
  mesh: tuple
  compiled: bool
  params: int
  opt_state: int
  grads: int
  kv_cache: int
  activations: int  # analytic rough
  argument: int = 0
  output: int = 0
  temp: int = 0
  total: int = 0
  flops: float = 0.0  # analytic, whole call, all devices
  hw_flops: float = 0.0
  xla_flops: float = 0.0  # cost_analysis, per device (loop bodies once)
  bytes_moved: float = 0.0  # analytic, per device
  compile_s: float = 0.0
  error: str | None = None
  budget: int = 0

  @property
  def fits(self) -> bool:
    return self.error is None and self.total <= self.budget


def _split_state(p: Planned):
  state = p.args[0]
  params = getattr(state, "params", state)
  opt = getattr(state, "opt_state", None)
  return params, opt


def analytic(p: Planned, model_cfg, topo: Topology) -> Report:
  mesh = p.mesh
  params, opt = _split_state(p)
  pb, ob = est.shard_bytes(params), est.shard_bytes(opt) if opt is not None else 0
  dt = np.dtype(model_cfg.dtype).itemsize
  batch_shards = est.axis_size(mesh, ("data", "fsdp"))
  tensor = mesh.shape["tensor"]
  n = math.prod(mesh.devices.shape)
  grads = kv = act = 0
  if p.kind == "train":
    grads = 2 * est.shard_bytes(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding),
                                             params))
    micro = jax.tree.leaves(p.args[1])[0].shape[1]
    act = est.activation_bytes(model_cfg, math.ceil(micro / batch_shards), p.seq_len, tensor, dt)
    accum = jax.tree.leaves(p.args[1])[0].shape[0]
    fwd = est.forward_flops(model_cfg, p.rows, p.seq_len, p.seq_len / 2)
    flops, hw = 3 * fwd, (4 if model_cfg.remat != "none" else 3) * fwd
    # Weights read (compute dtype) by forward, backward and remat per micro-batch; the update reads
    # and writes parameters and moments once.
    moved = accum * 3 * pb * dt / np.dtype(model_cfg.param_dtype).itemsize + 3 * (pb + ob)
  elif p.kind == "score":
    micro = jax.tree.leaves(p.args[1])[0].shape[1]
    act = est.activation_bytes(model_cfg.replace(remat="full"), math.ceil(micro / batch_shards), p.seq_len, tensor, dt) // 2
    flops = hw = est.forward_flops(model_cfg, p.rows, p.seq_len, p.seq_len / 2)
    moved = jax.tree.leaves(p.args[1])[0].shape[0] * pb
  else:
    kv = est.kv_cache_bytes(model_cfg, p.rows, p.seq_len, mesh, p.rules, dt)
    prompt = p.seq_len - p.new_tokens
    flops = hw = (est.forward_flops(model_cfg, p.rows, prompt, prompt / 2)
                  + est.forward_flops(model_cfg, p.rows, p.new_tokens, prompt + p.new_tokens / 2))
    # Each decode step reads every weight shard and, on average, half the cache.
    moved = p.new_tokens * (pb + kv / 2)
  rep = Report(p.name, "; ".join(p.notes), tuple(mesh.shape.values()), False, pb, ob, grads, kv, act,
               flops=flops, hw_flops=hw, bytes_moved=moved, budget=topo.chip.budget_bytes)
  rep.total = pb + ob + grads + kv + act
  del n
  return rep


def compile_one(p: Planned, rep: Report, save_dir: str | None = None) -> Report:
  t0 = time.perf_counter()
  try:
    with sharding.use_mesh(p.mesh, p.rules):
      compiled = p.fn.lower(*p.args).compile()
  except Exception as e:  # noqa: BLE001 -- XLA reports RESOURCE_EXHAUSTED etc. as plain errors
    rep.compile_s = time.perf_counter() - t0
    msg = str(e).strip().splitlines()
    rep.error = next((m for m in msg if "RESOURCE_EXHAUSTED" in m or "exceed" in m.lower()), msg[0] if msg else repr(e))[:400]
    return rep
  rep.compile_s = time.perf_counter() - t0
  m = compiled.memory_analysis()
  rep.compiled = True
  rep.argument, rep.output, rep.temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
  rep.total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  rep.xla_flops = float((cost or {}).get("flops", 0.0))
  if save_dir:
    from jax.experimental import serialize_executable
    os.makedirs(save_dir, exist_ok=True)
    blob, _, _ = serialize_executable.serialize(compiled)
    with open(os.path.join(save_dir, rep.name.replace(" ", "_") + ".xla"), "wb") as f:
      f.write(blob)
  return rep


def plan(cfg, model_cfg, topo: Topology, *, prompt_len: int = 512, compile: bool = True,
         save_dir: str | None = None, only: tuple[str, ...] = ()) -> list[Report]:
  devices = topo.devices() if compile else None
  estimated = devices is None
  if estimated:  # shardings on fake CPU devices (or a stand-in mesh), memory by formula
    cpu = jax.devices("cpu")
    devices = cpu[: topo.num_chips] if len(cpu) >= topo.num_chips else None
    if devices is None:
      devices = _virtual_devices(topo.num_chips)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  planned = functions_for(cfg, model_cfg, mesh, prompt_len=prompt_len)
  reports = []
  for p in planned:
    if only and not any(o in p.name for o in only):
      continue
    rep = analytic(p, model_cfg, topo)
    if not estimated:
      rep = compile_one(p, rep, save_dir)
    reports.append(rep)
  return reports


def _virtual_devices(n):
  raise RuntimeError(f"no devices to lay out a {n}-device mesh on; set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={n} (python -m jaxreason.plan does)")


def _g(b):
  return f"{b / GIB:.2f}"


def lower_bound_s(rep: Report, topo: Topology) -> float:
  n = topo.num_chips
  return max(rep.hw_flops / (topo.chip.peak_flops * n), rep.bytes_moved / topo.chip.hbm_bandwidth)


def table(reports: list[Report], topo: Topology) -> str:
  head = ("| function | mesh d,f,t | params | opt state | grads* | KV cache* | temps | args | total | HBM | fits |"
          " TFLOPs/call | step >= s | MFU ceiling | compile s |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in reports:
    lb = lower_bound_s(r, topo)
    mfu = r.flops / (topo.chip.peak_flops * topo.num_chips * lb) if lb else 0.0
    fits = ("yes" if r.fits else "NO") + ("" if r.compiled else " (error)" if r.error else " (est.)")
    temps = _g(r.temp) if r.compiled else f"~{_g(r.activations)}"
    lines.append(
        f"| {r.name} | {','.join(map(str, r.mesh))} | {_g(r.params)} | {_g(r.opt_state)} | {_g(r.grads)} | "
        f"{_g(r.kv_cache)} | {temps} | {_g(r.argument) if r.compiled else '-'} | {_g(r.total)} | "
        f"{_g(r.budget)} | {fits} | {r.flops / 1e12:.1f} | {lb:.3g} | {mfu:.0%} | "
        f"{r.compile_s:.0f} |" if r.compiled else
        f"| {r.name} | {','.join(map(str, r.mesh))} | {_g(r.params)} | {_g(r.opt_state)} | {_g(r.grads)} | "
        f"{_g(r.kv_cache)} | {temps} | - | {_g(r.total)} | {_g(r.budget)} | {fits} | {r.flops / 1e12:.1f} | "
        f"{lb:.3g} | {mfu:.0%} | - |")
  return "\n".join(lines)


def advice(reports: list[Report], cfg, model_cfg, topo: Topology) -> list[str]:
  out = []
  for r in reports:
    if r.fits:
      continue
    why = r.error or f"needs {_g(r.total)} GiB of {_g(r.budget)} GiB per device"
    tips = []
    if r.error and "evenly divide" in r.error:
      shards = est.axis_size_cfg(cfg.mesh, topo.num_chips)
      tips.append(f"the rows of each call must split evenly over data x fsdp = {shards} devices: raise "
                  "mesh.tensor (fewer fsdp devices) or make the micro-batch / rollout batch a multiple of it")
    if r.name.endswith("step"):
      if model_cfg.remat == "none":
        tips.append("model.remat=full")
      tips.append("a smaller train.micro_batch_size (activations scale with it)")
      if cfg.mesh.fsdp != -1 or cfg.mesh.data > 1:
        tips.append("mesh.fsdp=-1 with mesh.data=1 (shard weights and optimizer over every device)")
      tips.append("mesh.tensor=2..8 (splits activations and weights across heads/MLP)")
      tips.append("a topology with more chips or more HBM")
    elif r.name == "sampler":
      tips.append("mesh.tensor=2..8 (the sampling rules keep a full weight copy per fsdp device; tensor splits it)")
      tips.append("a smaller rollout.batch_size (KV cache scales with prompts x samples)")
    else:
      tips.append("a smaller train.micro_batch_size (the scorer runs at the micro-batch)")
    out.append(f"{r.name}: does not fit ({why}). Try: " + "; ".join(tips) + ".")
  return out


def suggest(cfg, model_cfg, topo: Topology, reports: list[Report], *, prompt_len: int = 512,
            compile: bool = True) -> list[str]:
  """Settings that make the failing functions fit: for the sampler, the smallest `rollout.mesh`
  tensor size whose program fits (checked by compiling it, or analytically with `compile=False`);
  for train steps, the largest micro-batch (halving) that fits."""
  import dataclasses as dc
  from jaxreason.sharding import MeshConfig
  out = []
  n = topo.num_chips
  for r in reports:
    if r.fits:
      continue
    if r.name == "sampler":
      t = 2
      while t <= n:
        if model_cfg.num_heads % t == 0:
          mesh = MeshConfig(data=1, fsdp=n // t, tensor=t)
          trial = dc.replace(cfg, rollout=dc.replace(cfg.rollout, mesh=mesh))
          got = plan(trial, model_cfg, topo, prompt_len=prompt_len, compile=compile, only=("sampler",))[0]
          if got.fits:
            out.append(f"sampler fits with --set rollout.mesh.data=1 --set rollout.mesh.fsdp={n // t} "
                       f"--set rollout.mesh.tensor={t} ({_g(got.total)} GiB per device"
                       f"{'' if got.compiled else ', estimated'})")
            break
        t *= 2
      else:
        out.append("sampler: no rollout.mesh tensor size fits; lower rollout.batch_size")
    elif r.name.endswith("step"):
      micro = cfg.train.micro_batch_size or cfg.train.global_batch_size
      while micro > 1:
        micro //= 2
        trial = dc.replace(cfg, train=dc.replace(cfg.train, micro_batch_size=micro))
        got = plan(trial, model_cfg, topo, prompt_len=prompt_len, compile=compile, only=(r.name,))[0]
        if got.fits:
          out.append(f"{r.name} fits with --set train.micro_batch_size={micro} ({_g(got.total)} GiB per device"
                     f"{'' if got.compiled else ', estimated'})")
          break
      else:
        out.append(f"{r.name}: no micro-batch fits; raise mesh.tensor or use more chips")
  return out
