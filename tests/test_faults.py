"""Fault injection (issue 16): adversarial grading, corrupt checkpoints, bad files, NaN, two runs.

Each case asserts the outcome a user sees: the exit code or exception, one clear line naming the
file / step / holder, and that the last good state is intact. Tiny models; a few minutes in all.
"""

import random
import subprocess  # noqa: F401 (used below)
import threading
import time

import pytest

from jaxreason import rewards as R
from jaxreason.rewards import extract, math_equal

# ----------------------------------------------------------------------------------------------
# 5. Grading: linear-time extraction, a deadline for the whole call


@pytest.mark.parametrize("tail", ["", ",", "0", ",00", ".5"])
def test_extraction_is_linear_on_digit_groups(tail):
  # Today's regex rescans the run of groups from every group when it ends badly: ~10 s here.
  text = "1" + ",000" * 10_000 + tail
  t = time.monotonic()
  for mode in R.EXTRACT_MODES:
    R.extract_answer(text, mode)
    R.extract_answer("#### " + text, mode)
  assert time.monotonic() - t < 1.0


def test_extraction_scanner_equals_the_regex():
  # The linear scanner must find exactly the numbers the regex finds (random strings of number parts).
  rng = random.Random(0)
  alphabet = list("0123456789,,,.-a )_\u0663")
  for _ in range(20_000):
    s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    for _ in range(rng.randint(0, 2)):
      i = rng.randint(0, len(s))
      s = (s[:i] + rng.choice(["", "-", "1", "12", "1234"]) + ",000" * rng.randint(3, 6)
           + rng.choice(["", ",", "0", ".5", "a", ",00"]) + s[i:])
    assert list(extract._number_spans(s)) == [m.span() for m in extract._NUMBER.finditer(s)], s
  assert R.extract_answer("so 1" + ",000" * 5 + " apples", "last_number") == "1" + "000" * 5
  assert R.extract_answer("so 1" + ",000" * 5 + ",0 apples", "last_number") == "0"


def test_grading_call_deadline_covers_queueing(monkeypatch):
  # One worker, held by a slow item in another thread: a second call must not wait for it.
  with math_equal.Grader(num_workers=1, timeout=6.0) as g:
    assert g.grade_many([("x+1", "1+x")]) == [True]  # workers started
    monkeypatch.setattr(math_equal, "_SOFT_FRACTION", 10.0)  # the slow item runs to the hard limit
    slow = threading.Thread(target=g.grade_many, args=([(r"\boxed{99999999999^{999999999}}", "1")],))
    slow.start()
    time.sleep(0.3)
    t = time.monotonic()
    assert g.grade_many([("y+1", "1+y")], call_timeout=0.5) == [False]
    assert time.monotonic() - t < 1.5
    slow.join()


# ----------------------------------------------------------------------------------------------
# Helpers: the tiny run of test_train_e2e (char tokenizer, 2 layers, hidden 32)

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from test_train_e2e import REPO, _config, _env, _train  # noqa: E402


def _cli(module, *args, env=None, timeout=300):
  return subprocess.run([sys.executable, "-m", f"jaxreason.{module}", *map(str, args)], capture_output=True,
                        text=True, env=env or _env(), cwd=REPO, timeout=timeout)


def _one_error_line(r, *needles):
  """The run printed no traceback and exactly one `error:` line containing every needle."""
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
  assert len(errors) == 1, r.stderr[-3000:]
  for n in needles:
    assert n in errors[0], errors[0]
  return errors[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A 10-step run with checkpoints at 5 and 10 (copied by each test that damages it)."""
  tmp = tmp_path_factory.mktemp("base")
  cfg, out = _config(tmp, "base")
  _train(cfg, "train.max_steps=10")
  return out


def _copy_run(base, tmp_path, name):
  out = tmp_path / name
  shutil.copytree(base, out)
  cfg = tmp_path / f"{name}.yaml"
  text = open(base / "config.yaml").read().replace(str(base), str(out))
  cfg.write_text(text)
  return str(cfg), out


def _largest_array_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "params") for f in fs if os.sep + "d" in d]
  return max(files, key=os.path.getsize)


def _metrics(out):
  return [json.loads(line) for line in open(out / "metrics.jsonl")]


# ----------------------------------------------------------------------------------------------
# 4. Checkpoint integrity


def test_bit_flipped_checkpoint_is_refused_and_resume_falls_back(base_run, tmp_path):
  cfg, out = _copy_run(base_run, tmp_path, "flip")
  path = _largest_array_file(out / "checkpoints" / "10")
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 2, len(data) // 2 + 64):
    data[i] ^= 0xFF
  open(path, "wb").write(data)
  r = _cli("export", "--checkpoint", out, "--out", tmp_path / "hf")
  assert r.returncode == 2
  _one_error_line(r, "checkpoints/10", "checksum")
  assert not (tmp_path / "hf").exists()
  r = _train(cfg, "train.max_steps=15")  # exit 0: resumed from step 5
  warn = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:") and "step 10" in ln]
  assert len(warn) == 1 and "falling back to step 5" in warn[0], r.stderr[-3000:]
  assert (out / "corrupt_checkpoints" / "10").is_dir()
  assert sorted(int(n) for n in os.listdir(out / "checkpoints") if n.isdigit()) == [5, 10, 15]
  steps = [row["step"] for row in _metrics(out)]
  assert steps == list(range(1, 16))  # rows 6-10 of the bad run were dropped on resume, not duplicated


def test_truncated_latest_step_gives_one_line_and_falls_back(base_run, tmp_path):
  cfg, out = _copy_run(base_run, tmp_path, "trunc")
  os.truncate(_largest_array_file(out / "checkpoints" / "10"), 1000)
  r = _cli("export", "--checkpoint", out, "--out", tmp_path / "hf")
  assert r.returncode == 2
  _one_error_line(r, "checkpoints/10", "truncated or damaged")
  r = _train(cfg, "train.max_steps=15")
  assert "Traceback" not in r.stderr
  warn = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:") and "step 10" in ln]
  assert len(warn) == 1 and "cannot be read" in warn[0] and "falling back to step 5" in warn[0]


def test_export_and_eval_refuse_nonfinite_weights(base_run, tmp_path):
  import jax.numpy as jnp
  from flax import nnx
  from jaxreason import checkpoint
  _, out = _copy_run(base_run, tmp_path, "nan")
  model = checkpoint.load_model(str(out))
  model.final_norm.scale[...] = jnp.full_like(model.final_norm.scale[...], jnp.nan)
  shutil.rmtree(out / "checkpoints")
  checkpoint.save_model(model, str(out / "checkpoints"), 10)
  with pytest.raises(Exception, match="not finite"):
    checkpoint.load_model(str(out))
  r = _cli("export", "--checkpoint", out, "--out", tmp_path / "hf")
  assert r.returncode == 2
  _one_error_line(r, "not finite", "final_norm")
  r = _cli("eval", "--model", out, "--data", "task:addition:n=4", "--format", "s1", "--out", tmp_path / "ev",
           "--budgets", "none", "--max-new-tokens", "8")
  assert r.returncode == 2
  _one_error_line(r, "not finite")
  del nnx


# ----------------------------------------------------------------------------------------------
# 1-3. Non-finite training, two runs on one directory, changed configs on resume


def test_nonfinite_training_stops_and_keeps_the_last_good_checkpoint(base_run, tmp_path):
  from jaxreason import checkpoint
  cfg, out = _copy_run(base_run, tmp_path, "nan")
  # Resume the good run with an absurd learning rate (an allowed change): it diverges.
  r = _train(cfg, "optimizer.lr=1e6", "train.max_steps=25", "checkpoint.keep_last=1", check=False)
  assert r.returncode == 3, r.stderr[-3000:]
  line = _one_error_line(r, "non-finite loss or gradient norm at step")
  bad_step = int(line.split("at step ")[1].split()[0])
  assert 11 <= bad_step <= 22
  steps = sorted(int(n) for n in os.listdir(out / "checkpoints") if n.isdigit())
  assert steps and max(steps) <= bad_step + 2  # nothing saved after the divergence was detected
  model = checkpoint.load_model(str(out))  # verified: finite, checksums match
  assert model.cfg.hidden_size == 32
  rows = _metrics(out)
  assert any(row.get("nonfinite") == 1.0 for row in rows)
  assert all(isinstance(row["loss"], (float, int, str)) for row in rows)  # valid JSON lines throughout


def test_second_run_on_one_output_dir_is_refused(base_run, tmp_path):
  import signal
  cfg, out = _copy_run(base_run, tmp_path, "twice")
  first = subprocess.Popen([sys.executable, "-m", "jaxreason.train", "--config", cfg, "--set", "train.max_steps=40"],
                           env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 300
    lock = out / ".lock.p0"
    while not (lock.exists() and str(first.pid) in lock.read_text()):  # the first run holds the directory
      assert time.time() < deadline and first.poll() is None, first.stderr.read().decode()[-2000:]
      time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # keep it holding the lock for as long as the second run needs
    r = _train(cfg, "train.max_steps=15", check=False)
    assert r.returncode == 2
    _one_error_line(r, "is in use by another run", f"PID {first.pid}")
  finally:
    first.kill()
    first.wait()
  r = _train(cfg, "train.max_steps=12")  # the killed run's lock is stale: taken over
  assert "took over the lock" in r.stderr
  assert [row["step"] for row in _metrics(out)] == list(range(1, 13))


def test_resume_with_a_changed_config_is_refused_in_one_line(base_run, tmp_path):
  cfg, out = _copy_run(base_run, tmp_path, "changed")
  before = open(out / "config.yaml").read()
  r = _train(cfg, "train.max_steps=15", "train.global_batch_size=4", check=False)
  assert r.returncode == 2
  _one_error_line(r, "train.global_batch_size: 8 -> 4", "--allow-config-change")
  r = _train(cfg, "train.max_steps=15", "model.hidden_size=64", check=False)
  assert r.returncode == 2
  _one_error_line(r, "architecture differs", "model.hidden_size: 32 -> 64")
  assert open(out / "config.yaml").read() == before  # nothing overwritten
  r = _train(cfg, "train.max_steps=15", "optimizer.lr=1e-3")  # allowed, and recorded
  assert "optimizer.lr" in r.stderr
  assert "lr: 0.001" in open(out / "config.10.yaml").read()


# ----------------------------------------------------------------------------------------------
# 6-7. Export directory, file-system faults and bad files: one line, the last good state intact


@pytest.fixture(scope="module")
def hf_export(base_run, tmp_path_factory):
  out = tmp_path_factory.mktemp("hf") / "model"
  r = _cli("export", "--checkpoint", base_run, "--out", out)
  assert r.returncode == 0, r.stderr[-3000:]
  return out


def test_export_into_a_non_empty_dir_refuses_or_replaces_it_whole(base_run, hf_export, tmp_path):
  out = tmp_path / "exp"
  out.mkdir()
  (out / "model-00001-of-00002.safetensors").write_text("stale")
  r = _cli("export", "--checkpoint", base_run, "--out", out)
  assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
  r = _cli("export", "--checkpoint", base_run, "--out", out, "--overwrite")
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(out)) == sorted(os.listdir(hf_export))  # the stale shard is gone
  assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]


def test_truncated_safetensors_and_corrupt_json_name_the_file(hf_export, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(hf_export, bad)
  weights = bad / "model.safetensors"
  os.truncate(weights, os.path.getsize(weights) - 100)
  r = _cli("export", "--checkpoint", bad, "--out", tmp_path / "o1")
  assert r.returncode == 2
  _one_error_line(r, "model.safetensors", "tensor", "truncated")
  shutil.copy(hf_export / "model.safetensors", weights)
  (bad / "config.json").write_text('{"model_type": "qwen2", ')
  r = _cli("export", "--checkpoint", bad, "--out", tmp_path / "o2")
  assert r.returncode == 2
  _one_error_line(r, "config.json", "not valid JSON")


def test_missing_model_paths_are_named(tmp_path):
  r = _cli("eval", "--model", tmp_path / "nope", "--data", "task:addition:n=4", "--out", tmp_path / "e")
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert "nope: no such directory" in r.stderr and "tokenizer" not in r.stderr
  r = _cli("eval", "--model", tmp_path, "--data", "task:addition:n=4", "--out", tmp_path / "e", "--n", "0")
  assert r.returncode != 0 and "--n must be a positive integer" in r.stderr and "Traceback" not in r.stderr
  cfg = tmp_path / "init.yaml"
  cfg.write_text(f"output_dir: {tmp_path / 'run'}\ninit_from: {tmp_path / 'missing'}\n"
                 "data: {train: ['task:addition:n=40'], format: s1}\n")
  r = _train(str(cfg), check=False)
  assert r.returncode == 2
  _one_error_line(r, "missing: no such model directory")


def test_non_utf8_data_names_file_and_line_and_can_be_skipped(tmp_path):
  data = tmp_path / "bad.jsonl"
  good = b'{"question": "1+1", "thinking": "1+1=2", "attempt": "2"}\n'
  data.write_bytes(good * 20 + b'{"question": "\xff\xfe", "thinking": "x", "attempt": "2"}\n' + good * 20)
  cfg, out = _config(tmp_path, "utf")
  r = _train(cfg, f"data.train=[{data}]", "train.max_steps=1", check=False)
  assert r.returncode == 2
  _one_error_line(r, "bad.jsonl line 21", "UTF-8")
  r = _train(cfg, f"data.train=[{data}]", "data.on_bad_row=skip", "train.max_steps=1")
  assert (out / "metrics.jsonl").read_text().strip()


def _can_mount_tmpfs(path):
  path.mkdir(exist_ok=True)
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(path)], capture_output=True)
  return r.returncode == 0


def test_disk_full_during_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
  disk = tmp_path / "disk"
  if not _can_mount_tmpfs(disk):
    pytest.skip("cannot mount a small tmpfs here (needs root); the injected-error case still runs")
  try:
    cfg, out = _config(disk, "full")
    r = _train(cfg, "checkpoint.keep_last=100", "logging.tensorboard=false", "train.max_steps=40", check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    _one_error_line(r, "disk full")
    done = sorted(int(n) for n in os.listdir(out / "checkpoints") if n.isdigit()
                  and (out / "checkpoints" / n / "commit_success.txt").exists())
    assert done
    from jaxreason import checkpoint
    checkpoint.load_model(str(out / "checkpoints" / str(done[-1])))  # verified and finite
    for row in _metrics(out):  # every line valid JSON
      assert "step" in row
  finally:
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_injected_write_error_is_one_line(tmp_path):
  # An OSError from deep inside (here: the metrics writer) reaches the user as one line.
  code = ("import errno, sys\n"
          "import jaxreason.io_utils as io\n"
          "def full(f, row):\n"
          "  if row.get('step', 0) >= 3:\n"
          "    raise OSError(errno.ENOSPC, 'No space left on device', f.name)\n"
          "  f.write(io.dumps_row(row)); f.flush()\n"
          "import jaxreason.train.metrics_log as ml\n"
          "ml.append_jsonl = full\n"
          "from jaxreason.errors import cli_main\n"
          "from jaxreason.train.__main__ import main\n"
          "sys.exit(cli_main(main, sys.argv[1:]))\n")
  cfg, out = _config(tmp_path, "inj")
  r = subprocess.run([sys.executable, "-c", code, "--config", cfg, "--set", "train.max_steps=6"],
                     capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
  assert r.returncode == 1
  _one_error_line(r, "disk full", "metrics.jsonl")
  assert [row["step"] for row in _metrics(out)] == [1, 2]


# ----------------------------------------------------------------------------------------------
# 8. Kill at a random point while checkpoints are being written


def test_kill_at_a_random_point_of_saving_then_resume(tmp_path):
  import signal
  from jaxreason import checkpoint
  cfg, out = _config(tmp_path, "kill")
  sets = ["train.max_steps=16", "checkpoint.every_steps=1", "checkpoint.keep_last=3"]  # a save after every step
  cmd = [sys.executable, "-m", "jaxreason.train", "--config", cfg] + [a for s in sets for a in ("--set", s)]
  proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while not (out / "checkpoints" / "3" / "commit_success.txt").exists():
    assert time.time() < deadline and proc.poll() is None, proc.stderr.read().decode()[-2000:]
    time.sleep(0.01)
  time.sleep(random.Random(os.getpid()).uniform(0.0, 0.3))  # somewhere in the following saves
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  r = _train(cfg, *sets)
  assert "Traceback" not in r.stderr
  assert [row["step"] for row in _metrics(out)] == list(range(1, 17))  # no duplicates, no half lines
  assert checkpoint.load_model(str(out)).cfg.hidden_size == 32  # the final step verifies
