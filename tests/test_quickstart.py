"""The quickstarts (the README's main job and its GRPO continuation) end to end, exactly as
configured: SFT ~9 minutes, then GRPO and DPO from its checkpoint (~3-4 minutes each), on 2 cores."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SEED = int(os.environ.get("JAXREASON_QUICKSTART_SEED", "0"))  # the spread below was measured over seeds 0-2


def _train(config, out, *sets):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
  cmd = [sys.executable, "-m", "jaxreason.train", "--config", config, "--set", f"output_dir={out}",
         "--set", "logging.progress_bar=false", "--set", f"seed={SEED}"]
  for s in sets:
    cmd += ["--set", s]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=3600)
  assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.slow
def test_quickstart_sft_then_grpo_and_dpo(tmp_path):
  sft = tmp_path / "quickstart"
  _train("configs/quickstart.yaml", sft)
  summary = json.load(open(sft / "eval" / "summary.json"))
  acc = {b["budget"]: b["accuracy"] for b in summary["budgets"]}
  print("SFT quickstart accuracy per budget:", acc)
  smallest = min(b for b in acc if b is not None)
  # Chance for a 3-6 digit sum is ~0; "clearly above" it and above the smallest budget:
  assert acc[None] >= 0.3, acc
  assert acc[None] >= acc[smallest] + 0.2, acc
  assert os.path.getsize(sft / "eval" / "scaling.png") > 5000
  rows = [json.loads(l) for l in open(sft / "metrics.jsonl")]
  assert rows[-1]["loss"] < rows[0]["loss"] / 3
  assert (sft / "checkpoints").is_dir() and (sft / "tokenizer").is_dir()
  assert (sft / "data" / "train0.jsonl").exists() and (sft / "data" / "eval.jsonl").exists()

  # GRPO and DPO from the SFT run. Each held-out set also drops the run's own training questions, so
  # each is compared with SFT on the questions it evaluated, question by question (no thinking cap).
  grpo = tmp_path / "quickstart_grpo"
  _train("configs/quickstart_grpo.yaml", grpo, f"init_from={sft}")
  dpo = tmp_path / "quickstart_dpo"
  _train("configs/quickstart_dpo.yaml", dpo, f"init_from={sft}")
  gains = {name: _paired(sft, run) for name, run in (("grpo", grpo), ("dpo", dpo))}
  for name, g in gains.items():
    print(f"SEED {SEED} SFT -> {name.upper()} on {g['n']} questions: {g['before']:.3f} -> {g['after']:.3f}, "
          f"{g['fixed']} fixed, {g['broken']} broken, sign-test p = {g['p']:.4f}")

  m = [json.loads(l) for l in open(grpo / "metrics.jsonl")]
  for key in ("reward_mean", "accuracy", "completion_length", "clip_frac", "entropy", "time_rollout"):
    assert all(key in row for row in m), key
  assert (grpo / "rollouts.jsonl").exists() and (grpo / "eval" / "summary.json").exists()
  m = [json.loads(l) for l in open(dpo / "metrics.jsonl")]
  assert m[-1]["rewards/accuracy"] > 0.6 and m[-1]["rewards/margin"] > m[0]["rewards/margin"]
  for name, g in gains.items():
    assert g["n"] >= 280, (name, g)
    # Never significantly worse than SFT (one-sided sign test for harm).
    assert _sign_test_p(g["broken"], g["fixed"]) > 0.05, (name, g)
    # Where SFT leaves room, more questions fixed than broken with a significant net gain. The SFT
    # model's no-cap accuracy varies from ~60 % to ~100 % across CPUs and seeds (see below), and
    # at ~100 % there is nothing left to fix.
    if 1 - g["before"] >= HEADROOM:
      assert g["fixed"] > g["broken"] and g["p"] <= SIGN_TEST_P, (name, g)


def _paired(sft, run):
  """Greedy no-cap answers of SFT and of `run` on `run`'s held-out questions, question by question."""
  after = {r["id"]: r["correct"] for r in map(json.loads, open(run / "eval" / "samples.jsonl"))
           if r["budget"] is None}
  before = {r["id"]: r["correct"] for r in map(json.loads, open(sft / "eval" / "samples.jsonl"))
            if r["budget"] is None and r["id"] in after}
  fixed = sum(after[i] and not before[i] for i in before)
  broken = sum(before[i] and not after[i] for i in before)
  return {"n": len(before), "before": float(np.mean(list(before.values()))),
          "after": float(np.mean([after[i] for i in before])), "fixed": fixed, "broken": broken,
          "p": _sign_test_p(fixed, broken)}


def _sign_test_p(wins, losses):
  """One-sided exact sign test: P(X >= wins) for X ~ Binomial(wins + losses, 1/2)."""
  n = wins + losses
  return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n if n else 1.0


# Measured, seed 0: Intel Xeon, SFT 61.3 % -> GRPO +5.5 points (25 fixed / 9 broken, p = 0.004) and
# 61.6 % -> DPO +5.7 (26 / 9, p = 0.003); AMD EPYC, SFT 73.8 % -> GRPO +3.6 points (p ~ 0.05); AMD EPYC after
# the scanned-layer release, SFT 99.7 % (one wrong question: no headroom; GRPO/DPO figures in the issue note).
SIGN_TEST_P = 0.2
HEADROOM = 0.15  # SFT error rate from which a gain is asserted
