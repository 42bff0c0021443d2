"""Fault injection (issue 16): adversarial grading, corrupt checkpoints, bad files, NaN, two runs.

Each case asserts the outcome a user sees: the exit code or exception, one clear line naming the
file / step / holder, and that the last good state is intact. Tiny models; a few minutes in all.
"""

import random
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
