"""End-to-end training runs in subprocesses: exact resume after SIGKILL, kill during a save,
bad configs and data, sharded and multi-process runs against one device."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = """
output_dir: {out}
seed: 0
tokenizer: builtin:char
model: {{model_type: qwen2, vocab_size: 128, hidden_size: 32, intermediate_size: 64, num_layers: 2,
        num_heads: 4, num_kv_heads: 2, max_position_embeddings: 256}}
data:
  train: ["task:addition:n=400,seed=0,min_digits=2,max_digits=4"]
  format: s1
  seq_len: 128
  num_epochs: 2
optimizer: {{lr: 3.0e-3}}
train: {{global_batch_size: 8, max_steps: 20, log_every: 1}}
checkpoint: {{every_steps: 5, keep_last: 10, async_save: true}}
logging: {{progress_bar: false, tensorboard: true}}
"""


def _env(devices=1, **extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_cpu_collective_timeout_seconds=900")
  env.update(extra)
  return env


def _config(tmp_path, name, extra=""):
  out = tmp_path / name
  path = tmp_path / f"{name}.yaml"
  path.write_text(TINY.format(out=out) + extra)
  return str(path), out


def _train(cfg, *sets, env=None, check=True, timeout=600):
  cmd = [sys.executable, "-m", "jaxreason.train", "--config", cfg]
  for s in sets:
    cmd += ["--set", s]
  r = subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), cwd=REPO, timeout=timeout)
  if check:
    assert r.returncode == 0, r.stderr[-3000:]
  return r


def _losses(out):
  rows = {}
  for line in open(out / "metrics.jsonl"):
    row = json.loads(line)
    rows[row["step"]] = row["loss"]  # a resumed run re-logs steps after its checkpoint: keep the last
  return rows


def _final_params(out, step=20):
  from jaxreason.checkpoint import load_model
  from flax import nnx
  return {"/".join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(load_model(str(out / "checkpoints" / str(step)))))}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("straight")
  cfg, out = _config(tmp, "a")
  _train(cfg)
  return out


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(straight, tmp_path):
  cfg, out = _config(tmp_path, "b")
  proc = subprocess.Popen([sys.executable, "-m", "jaxreason.train", "--config", cfg], env=_env(), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while not (out / "checkpoints" / "10" / "commit_success.txt").exists() and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "checkpoints" / "20").exists()
  _train(cfg)
  a, b = _losses(straight), _losses(out)
  assert sorted(a) == list(range(1, 21)) and sorted(b) == list(range(1, 21))
  assert [a[s] for s in range(1, 21)] == [b[s] for s in range(1, 21)]
  pa, pb = _final_params(straight), _final_params(out)
  assert pa.keys() == pb.keys()
  assert all(np.array_equal(pa[k], pb[k]) for k in pa)


@pytest.mark.slow
def test_kill_during_save_leaves_previous_checkpoint(straight, tmp_path):
  cfg, out = _config(tmp_path, "c")
  r = _train(cfg, env=_env(JAXREASON_TEST_KILL_IN_SAVE="15"), check=False)
  assert r.returncode == -signal.SIGKILL
  assert (out / "checkpoints" / "10" / "commit_success.txt").exists()
  assert not (out / "checkpoints" / "15" / "commit_success.txt").exists()
  _train(cfg)  # resumes from 10 (cleaning up the partial 15)
  a, b = _losses(straight), _losses(out)
  assert [a[s] for s in range(1, 21)] == [b[s] for s in range(1, 21)]
  pa, pb = _final_params(straight), _final_params(out)
  assert all(np.array_equal(pa[k], pb[k]) for k in pa)


@pytest.mark.slow
def test_sigterm_saves_and_exits(tmp_path):
  cfg, out = _config(tmp_path, "d")
  proc = subprocess.Popen([sys.executable, "-m", "jaxreason.train", "--config", cfg, "--set",
                           "checkpoint.every_steps=1000"], env=_env(), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while not (out / "metrics.jsonl").exists() or not open(out / "metrics.jsonl").read().strip():
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 143
  steps = [int(n) for n in os.listdir(out / "checkpoints") if n.isdigit()]
  assert len(steps) == 1 and 1 <= steps[0] < 20  # saved where it stopped, not at a scheduled step


@pytest.mark.slow
def test_sharded_and_multiprocess_match_one_device(tmp_path):
  cfg, out1 = _config(tmp_path, "one")
  _train(cfg, "train.max_steps=6")  # the schedule depends on max_steps: same for all three runs
  a = _losses(out1)
  cfg, out8 = _config(tmp_path, "e")
  _train(cfg, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.max_steps=6", env=_env(devices=8))
  l8 = _losses(out8)
  np.testing.assert_allclose([l8[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=2e-5)

  cfg, out2 = _config(tmp_path, "f")
  port = 20000 + os.getpid() % 10000
  procs = []
  for pid in range(2):
    env = _env(devices=4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, "-m", "jaxreason.train", "--config", cfg, "--set",
                                   "mesh.data=2", "--set", "mesh.fsdp=4", "--set", "train.max_steps=6"],
                                  env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
  for p in procs:
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-3000:]
  l2 = _losses(out2)
  np.testing.assert_allclose([l2[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=2e-5)


def test_bad_config_errors(tmp_path):
  cfg, _ = _config(tmp_path, "g", extra="optimiser: {lr: 1.0}\n")
  r = _train(cfg, check=False)
  assert r.returncode == 2
  assert "unknown key 'optimiser'" in r.stderr and "did you mean 'optimizer'" in r.stderr
  assert "Traceback" not in r.stderr
  cfg, _ = _config(tmp_path, "h")
  r = _train(cfg, "train.global_batch_size=abc", check=False)
  assert r.returncode == 2 and "global_batch_size must be an int" in r.stderr


def test_bad_data_row_errors_name_file_and_line(tmp_path):
  data = tmp_path / "bad.jsonl"
  data.write_text('{"question": "1+1", "thinking": "1+1=2", "attempt": "2"}\n{"question": "2+2"}\n')
  cfg, out = _config(tmp_path, "i")
  r = _train(cfg, f"data.train=[{data}]", check=False)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "bad.jsonl line 2" in r.stderr and "Traceback" not in r.stderr
  r = _train(cfg, f"data.train=[{data}]", "data.on_bad_row=skip", "train.max_steps=1", check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  log = open(out / "metrics.jsonl").read()
  assert log.strip()


def test_print_config(tmp_path):
  cfg, out = _config(tmp_path, "j")
  r = subprocess.run([sys.executable, "-m", "jaxreason.train", "--config", cfg, "--set", "optimizer.lr=0.5",
                      "--print-config"], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
  assert r.returncode == 0
  assert "lr: 0.5" in r.stdout and "global_batch_size: 8" in r.stdout


@pytest.mark.slow
def test_resume_on_a_different_mesh(straight, tmp_path):
  """Train to step 10 on 8 devices (data 2 x fsdp 2 x tensor 2), resume to 20 on 1 device."""
  cfg, out = _config(tmp_path, "k")
  _train(cfg, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "checkpoint.keep_steps=[10]",
         env=_env(devices=8, JAXREASON_TEST_KILL_IN_SAVE="15"), check=False)
  assert (out / "checkpoints" / "10" / "commit_success.txt").exists()
  assert not (out / "checkpoints" / "20").exists()
  _train(cfg)  # one device, default mesh
  a, b = _losses(straight), _losses(out)
  np.testing.assert_allclose([b[s] for s in range(1, 21)], [a[s] for s in range(1, 21)], rtol=1e-4)
  pa, pb = _final_params(straight), _final_params(out)
  for k in pa:
    np.testing.assert_allclose(pb[k], pa[k], atol=1e-4, rtol=1e-3)


def test_pretrain_trains_every_token(tmp_path):
  """algorithm: pretrain runs the SFT loop on pretrain_text rows: every token is a target."""
  data = tmp_path / "text.jsonl"
  data.write_text("".join(json.dumps({"text": f"the number {i} plus {i} is {2 * i}."}) + "\n" for i in range(64)))
  cfg, out = _config(tmp_path, "pt")
  _train(cfg, "algorithm=pretrain", f"data.train=['{data}']", "data.format=pretrain_text", "data.seq_len=64",
         "train.max_steps=4", "checkpoint.every_steps=4")
  rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
  assert rows and all(r["trained_tokens"] == r["tokens"] > 0 for r in rows)
  assert (out / "checkpoints" / "4").is_dir()
