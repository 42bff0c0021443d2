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
  # GRPO and DPO from the SFT run, both run before anything is asserted.
  grpo = tmp_path / "quickstart_grpo"
  _train("configs/quickstart_grpo.yaml", grpo, f"init_from={sft}")
  dpo = tmp_path / "quickstart_dpo"
  _train("configs/quickstart_dpo.yaml", dpo, f"init_from={sft}")
  check_quickstart_runs(sft, grpo, dpo)


def check_quickstart_runs(sft, grpo, dpo):
  """The assertions, on the three run directories (also run on stored runs to check them across seeds)."""
  summary = json.load(open(sft / "eval" / "summary.json"))
  acc = {b["budget"]: b["accuracy"] for b in summary["budgets"]}
  print(f"SEED {SEED} SFT quickstart accuracy per budget:", acc)
  smallest = min(b for b in acc if b is not None)
  # Chance for a 3-6 digit sum is ~0; "clearly above" it and above the smallest budget:
  assert acc[None] >= 0.3, acc
  assert acc[None] >= acc[smallest] + 0.2, acc
  assert os.path.getsize(sft / "eval" / "scaling.png") > 5000
  rows = [json.loads(l) for l in open(sft / "metrics.jsonl")]
  assert rows[-1]["loss"] < rows[0]["loss"] / 3
  assert (sft / "checkpoints").is_dir() and (sft / "tokenizer").is_dir()
  assert (sft / "data" / "train0.jsonl").exists() and (sft / "data" / "eval.jsonl").exists()

  # Each held-out set also drops the run's own training questions, so each run is compared with SFT on
  # the questions it evaluated, question by question (greedy, no thinking cap).
  gains = {name: _paired(sft, run) for name, run in (("grpo", grpo), ("dpo", dpo))}
  for name, g in gains.items():
    print(f"SEED {SEED} SFT -> {name.upper()} on {g['n']} questions: {g['before']:.3f} -> {g['after']:.3f}, "
          f"{g['fixed']} fixed, {g['broken']} broken, sign-test p = {g['p']:.4f}")
    assert g["n"] >= 280, (name, g)
    # Never significantly worse than SFT (one-sided sign test for harm; measured p >= 0.5 everywhere).
    assert _sign_test_p(g["broken"], g["fixed"]) > 0.05, (name, g)

  m = [json.loads(l) for l in open(grpo / "metrics.jsonl")]
  for key in ("reward_mean", "accuracy", "completion_length", "clip_frac", "entropy", "time_rollout",
              "token_mult_prob_error", "rollout/slot_occupancy"):
    assert all(key in row for row in m), key
  assert (grpo / "rollouts.jsonl").exists() and (grpo / "eval" / "summary.json").exists()
  assert os.path.getsize(grpo / "rewards.png") > 5000
  # GRPO: never more questions broken than fixed (measured: 0/0, 6/1, 24/16 over seeds 0-2 here), and its
  # sampled reward does not fall (last fifth of the logged steps vs the first fifth; measured +0.015, +0.05,
  # +0.135; per-step noise ~0.03-0.04).
  g = gains["grpo"]
  assert g["fixed"] >= g["broken"], g
  r = [row["reward_mean"] for row in m]
  k = max(1, len(r) // 5)
  print(f"SEED {SEED} GRPO sampled reward, first vs last fifth: {np.mean(r[:k]):.3f} -> {np.mean(r[-k:]):.3f}")
  assert np.mean(r[-k:]) >= np.mean(r[:k]) - 0.03, r
  # Sampler vs trainer log-probs (NeMo-RL's gate 1.05; 0 on a step whose batch kept no completion tokens).
  tmpe = [row["token_mult_prob_error"] for row in m if row["token_mult_prob_error"] > 0]
  assert len(tmpe) >= len(m) // 2 and all(abs(e - 1) < 0.05 for e in tmpe), tmpe
  # DPO: its implicit rewards separate (margin up, final accuracy measured 0.625 / 0.78 / 0.81); its effect on
  # greedy accuracy is not reliable here (0/0, 4/1, 20/19 fixed/broken), so none is asserted beyond no harm.
  m = [json.loads(l) for l in open(dpo / "metrics.jsonl")]
  assert m[-1]["rewards/accuracy"] > 0.55 and m[-1]["rewards/margin"] > m[0]["rewards/margin"], m


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


# Measured with `JAXREASON_QUICKSTART_SEED=S pytest tests/test_quickstart.py -s` on a 2-core AMD EPYC (this
# release, before the rollout-engine/PPO/LoRA merge; the assertions above were then checked on those runs' outputs):
#   seed 0: SFT 0.0/0.0/3.7/58.5/99.7 % at budgets 4/8/16/32/none; GRPO 0 fixed/0 broken, reward 0.90 -> 0.92;
#           DPO 0/0, implicit accuracy 0.44 -> 0.63
#   seed 1: SFT 0.0/0.0/5.4/53.7/82.7 %;  GRPO 82.9 -> 84.6 % (6/1, p = 0.06), reward 0.74 -> 0.79;
#           DPO 82.7 -> 83.7 % (4/1, p = 0.19), implicit accuracy 0.56 -> 0.78
#   seed 2: SFT 0.0/0.0/3.4/49.0/69.7 %;  GRPO 69.9 -> 72.6 % (24/16, p = 0.13), reward 0.47 -> 0.61;
#           DPO 69.7 -> 70.1 % (20/19, p = 0.50), implicit accuracy 0.81 -> 0.81 (0.53 at step 10)
# Earlier, seed 0: Intel Xeon SFT 61.3 % -> GRPO +5.5 points (25 fixed / 9 broken, p = 0.004), DPO +5.7 (26 / 9);
# AMD EPYC before scanned layers SFT 73.8 % -> GRPO +3.6 points (p ~ 0.05).
