"""The quickstart (the README's main job) end to end, exactly as configured: ~9 minutes on 2 cores."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_learns_and_scales_with_thinking(tmp_path):
  out = tmp_path / "quickstart"
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
  r = subprocess.run([sys.executable, "-m", "jaxreason.train", "--config", "configs/quickstart.yaml",
                      "--set", f"output_dir={out}", "--set", "logging.progress_bar=false"],
                     capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
  assert r.returncode == 0, r.stderr[-4000:]
  summary = json.load(open(out / "eval" / "summary.json"))
  acc = {b["budget"]: b["accuracy"] for b in summary["budgets"]}
  print("quickstart accuracy per budget:", acc)
  smallest = min(b for b in acc if b is not None)
  # Chance for a 3-6 digit sum is ~0; "clearly above" it and above the smallest budget:
  assert acc[None] >= 0.3, acc
  assert acc[None] >= acc[smallest] + 0.2, acc
  assert os.path.getsize(out / "eval" / "scaling.png") > 5000
  rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
  assert rows[-1]["loss"] < rows[0]["loss"] / 3
  assert (out / "checkpoints").is_dir() and (out / "tokenizer").is_dir()
  assert (out / "data" / "train0.jsonl").exists() and (out / "data" / "eval.jsonl").exists()
