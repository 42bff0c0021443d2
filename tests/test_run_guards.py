"""Unit tests of the standalone fault guards (issue 16): NaN guard, run lock, config history,
atomic writes and JSONL repair, one-line CLI errors."""

import dataclasses
import errno
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreason import errors, io_utils
from jaxreason.train import config_history, nan_guard, run_lock


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _State:
  step: jax.Array
  params: dict
  opt_state: dict


def _toy_step(state, x):
  params = {"w": state.params["w"] - x}
  return _State(state.step + 1, params, {"m": state.opt_state["m"] + x}), {"loss": jnp.sum(params["w"]),
                                                                          "grad_norm": jnp.abs(x)}


def test_guard_step_skips_nonfinite_updates_in_jit():
  step = jax.jit(nan_guard.guard_step(_toy_step))
  s = _State(jnp.int32(0), {"w": jnp.ones(3)}, {"m": jnp.zeros(())})
  s, m = step(s, jnp.float32(1.0))
  assert float(m["nonfinite"]) == 0.0 and np.allclose(s.params["w"], 0.0)
  s2, m = step(s, jnp.float32(jnp.nan))
  assert float(m["nonfinite"]) == 1.0
  assert np.allclose(s2.params["w"], 0.0) and float(s2.opt_state["m"]) == 1.0  # unchanged
  assert int(s2.step) == 2  # the step counter still advances


def test_nan_guard_stops_after_consecutive_bad_steps():
  g = nan_guard.NanGuard("stop", max_consecutive=3)
  for step, bad in [(1, 0.0), (2, 1.0), (3, 1.0), (4, 0.0), (5, 1.0), (6, 1.0)]:
    g.observe(step, {"nonfinite": jnp.float32(bad)})
  g.check()  # runs of 2 and 2: no stop
  g.observe(7, {"nonfinite": jnp.float32(1.0)})
  with pytest.raises(errors.NonFiniteError, match="at step 5 and the 2 step"):
    g.check()
  g = nan_guard.NanGuard("skip", max_consecutive=1)
  for step in range(1, 5):
    g.observe(step, {"nonfinite": jnp.float32(1.0)})
  g.check()
  assert g.skipped == 4


_HOLD = """
import sys, time
from jaxreason.train import run_lock
run_lock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def test_run_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(errors.RunLockedError, match=f"PID {proc.pid} on host"):
      run_lock.acquire(str(tmp_path))
  finally:
    proc.kill()
    proc.wait()
  lock = run_lock.acquire(str(tmp_path))  # the killed holder's lock is stale: taken over
  assert lock.previous and lock.previous["pid"] == proc.pid
  assert run_lock.acquire(str(tmp_path)) is lock  # idempotent within a process
  lock.release()


@dataclasses.dataclass(frozen=True)
class _Cfg:
  output_dir: str
  seed: int = 0
  lr: float = 1e-3
  hidden: int = 32
  allow_config_change: bool = False


def _dump(cfg):
  return f"output_dir: {cfg.output_dir}\nseed: {cfg.seed}\noptimizer: {{lr: {cfg.lr}}}\nmodel: {{hidden_size: {cfg.hidden}}}\n"


def test_config_history_records_and_refuses_inexact_resumes(tmp_path, monkeypatch):
  import jaxreason.config
  monkeypatch.setattr(jaxreason.config, "dump_yaml", _dump)
  out = str(tmp_path)
  assert config_history.record(_Cfg(out)) == []
  assert os.path.exists(tmp_path / "config.0.yaml")
  os.makedirs(tmp_path / "checkpoints" / "10")
  changes = config_history.record(_Cfg(out, lr=5e-4))  # allowed, recorded
  assert [c[0] for c in changes] == ["optimizer.lr"]
  assert "lr: 0.0005" in open(tmp_path / "config.10.yaml").read()
  with pytest.raises(errors.ConfigChangeError, match=r"architecture differs.*model.hidden_size: 32 -> 64"):
    config_history.record(_Cfg(out, lr=5e-4, hidden=64))
  with pytest.raises(errors.ConfigChangeError, match="seed: 0 -> 1"):
    config_history.record(_Cfg(out, lr=5e-4, seed=1))
  assert config_history.record(_Cfg(out, lr=5e-4, seed=1, allow_config_change=True))


def test_atomic_writes_and_jsonl_repair(tmp_path):
  p = str(tmp_path / "a" / "f.json")
  io_utils.atomic_write_json(p, {"x": float("nan"), "y": [float("inf")]})
  assert json.load(open(p)) == {"x": "nan", "y": ["inf"]}
  assert not [n for n in os.listdir(tmp_path / "a") if "tmp" in n]
  d = str(tmp_path / "dir")
  os.makedirs(d)
  open(os.path.join(d, "stale.safetensors"), "w").write("old")
  with io_utils.atomic_dir(d) as tmp:
    open(os.path.join(tmp, "new"), "w").write("new")
  assert os.listdir(d) == ["new"]
  with pytest.raises(RuntimeError):
    with io_utils.atomic_dir(d) as tmp:
      open(os.path.join(tmp, "half"), "w").write("x")
      raise RuntimeError("crash")
  assert os.listdir(d) == ["new"]
  log = tmp_path / "m.jsonl"
  log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
  assert io_utils.repair_jsonl(str(log), max_step=2) == 2
  assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_one_line_errors():
  inner = OSError(errno.ENOSPC, "No space left on device", "/ckpt/10/params")
  try:
    try:
      raise inner
    except OSError as e:
      raise RuntimeError("async save failed\n  many lines of details") from e
  except RuntimeError as e:
    assert errors.one_line(e) == "disk full: /ckpt/10/params"
  assert errors.one_line(ValueError("first\nsecond")) == "first"
  assert errors.cli_main(lambda argv: (_ for _ in ()).throw(errors.NonFiniteError("diverged")), []) == 3
