"""The quickstarts end to end, exactly as configured: the README's main job (SFT, ~12 minutes on 2
cores), then GRPO, PPO (~8 minutes each) and DPO (~4) from its checkpoint. The four tests share one
SFT run per session (xdist workers too: a file lock); each RL run is read by its own test."""

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


def _run_once(root, name, config, *sets):
  """One run per test session, shared by the xdist workers: the first to take the lock trains it,
  the others wait for it and read it. A failed run is not retried by the next test."""
  import fcntl
  out, failed = root / name, root / f"{name}.failed"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if failed.exists():
      pytest.fail(f"{name} failed in another test of this session:\n{failed.read_text()}")
    if not (out / "done").exists():
      try:
        _train(config, out, *sets)
      except Exception as e:  # a failed assertion on the return code, or a timeout
        failed.write_text(str(e))
        raise
      (out / "done").write_text("")
  return out


@pytest.fixture(scope="session")
def root(tmp_path_factory):
  # One directory per session: with xdist, the base temp dir's parent is the session's and is shared
  # by its workers; without, the base temp dir itself.
  base = tmp_path_factory.getbasetemp()
  path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"quickstart-seed{SEED}"
  path.mkdir(exist_ok=True)
  return path


@pytest.fixture(scope="session")
def sft_run(root):
  return _run_once(root, "quickstart", "configs/quickstart.yaml")


@pytest.mark.slow
def test_quickstart_sft(sft_run):
  """The README's main command: accuracy rises with the thinking budget."""
  check_sft(sft_run)


@pytest.mark.slow
def test_quickstart_grpo_learns(root, sft_run):
  grpo = _run_once(root, "quickstart_grpo", "configs/quickstart_grpo.yaml", f"init_from={sft_run}")
  check_rl(sft_run, grpo, "grpo")


@pytest.mark.slow
def test_quickstart_ppo_learns(root, sft_run):
  ppo = _run_once(root, "quickstart_ppo", "configs/quickstart_ppo.yaml", f"init_from={sft_run}")
  check_rl(sft_run, ppo, "ppo")


@pytest.mark.slow
def test_quickstart_dpo(root, sft_run):
  dpo = _run_once(root, "quickstart_dpo", "configs/quickstart_dpo.yaml", f"init_from={sft_run}")
  check_dpo(sft_run, dpo)


def check_sft(sft):
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


# The learning criteria of the RL quickstarts (#13), set well inside the spread measured over seeds 0-2
# (figures at the end of this file): the held-out greedy error rate (no thinking cap, the same questions
# before and after) is cut by at least MIN_ERROR_CUT, and the sampled reward of the last fifth of the run
# beats the first fifth by at least MIN_REWARD_RISE (per-step noise ~0.03-0.05).
MIN_ERROR_CUT = 0.25
MIN_REWARD_RISE = 0.05


def check_rl(sft, run, name):
  m = [json.loads(l) for l in open(run / "metrics.jsonl")]
  # Sampler vs trainer log-probs: GRPO's update compares them token by token; PPO re-scores each
  # rollout with the trainer (its old log-probs) and logs the mismatch at that point.
  tmpe_key = "token_mult_prob_error" if name == "grpo" else "token_mult_prob_error_rollout"
  for key in ("reward_mean", "accuracy", "completion_length", "clip_frac", "entropy", "time_rollout",
              tmpe_key, "rollout/slot_occupancy"):
    assert all(key in row for row in m), key
  assert (run / "rollouts.jsonl").exists() and (run / "eval" / "summary.json").exists()
  assert os.path.getsize(run / "rewards.png") > 5000
  g = _paired(sft, run)
  cut = 1 - (1 - g["after"]) / max(1 - g["before"], 1e-9)
  r = [row["reward_mean"] for row in m]
  k = max(1, len(r) // 5)
  print(f"SEED {SEED} SFT -> {name.upper()} on {g['n']} questions: {g['before']:.3f} -> {g['after']:.3f} "
        f"(error cut {cut:.0%}), {g['fixed']} fixed, {g['broken']} broken, sign-test p = {g['p']:.2g}; "
        f"sampled reward, first vs last fifth: {np.mean(r[:k]):.3f} -> {np.mean(r[-k:]):.3f}")
  assert g["n"] >= 280, g
  assert cut >= MIN_ERROR_CUT, g
  assert g["p"] < 0.01, g  # the gain is not chance (paired, one-sided sign test)
  assert np.mean(r[-k:]) >= np.mean(r[:k]) + MIN_REWARD_RISE, r
  # Sampler vs trainer log-probs (NeMo-RL's gate 1.05; 0 on a step whose batch kept no completion tokens).
  tmpe = [row[tmpe_key] for row in m if row[tmpe_key] > 0]
  assert len(tmpe) >= len(m) // 2 and all(abs(e - 1) < 0.05 for e in tmpe), tmpe


def check_dpo(sft, dpo):
  g = _paired(sft, dpo)
  print(f"SEED {SEED} SFT -> DPO on {g['n']} questions: {g['before']:.3f} -> {g['after']:.3f}, "
        f"{g['fixed']} fixed, {g['broken']} broken, sign-test p = {g['p']:.4f}")
  assert g["n"] >= 280, g
  # Never significantly worse than SFT (one-sided sign test for harm), and more fixed than broken
  # (measured 30 / 2, 50 / 10, 12 / 2 over seeds 0-2: it too learns to think on the small sums).
  assert _sign_test_p(g["broken"], g["fixed"]) > 0.05, g
  assert g["fixed"] > g["broken"], g
  # Its implicit rewards separate: margin up, final implicit accuracy above chance.
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


# Measured with `JAXREASON_QUICKSTART_SEED=S pytest tests/test_quickstart.py -s` on a 2-core AMD EPYC (greedy
# no-cap accuracy on the same held-out questions, fixed / broken, error-rate cut; sampled reward, first vs last fifth):
#   seed 0: SFT 1.0/0.7/1.4/44.1/79.0 % at budgets 4/8/16/32/none (13 % of the answers given with no thinking);
#           GRPO 79.6 -> 95.4 % (46/1, -78 %), reward 0.65 -> 0.81; PPO 79.6 -> 94.7 % (45/2, -74 %; 40 steps: -71 %),
#           reward 0.67 -> 0.78; DPO 79.0 -> 88.8 % (30/2), implicit accuracy 0.88 -> 0.84, margin 0.016 -> 0.079
#   seed 1: SFT 0.7/0.7/0.7/33.9/49.7 % (14 %); GRPO 50.0 -> 66.9 % (60/12, -34 %), reward 0.40 -> 0.48;
#           PPO 50.0 -> 64.8 % (53/11, -30 %; 40 steps: -27 %), reward 0.39 -> 0.51; DPO 49.7 -> 63.6 % (50/10)
#   seed 2: SFT 0.0/0.0/1.0/40.9/82.2 % (17 %); GRPO 82.4 -> 98.9 % (49/2, -94 %), reward 0.81 -> 0.93;
#           PPO (40 steps) 82.4 -> 99.3 % (49/1, -96 %), reward 0.79 -> 0.93; DPO 82.2 -> 85.7 % (12/2)
# After the sampler moved to inverse-CDF draws (a seed draws other samples), seeds 1 and 2 again, alone on the machine:
#   seed 1: GRPO 50.0 -> 66.2 % (58/12, -32 %), reward 0.41 -> 0.47; PPO 50.0 -> 64.4 % (51/10, -29 %), reward
#           0.36 -> 0.50; DPO 49.7 -> 59.4 % (36/8)
#   seed 2: GRPO 82.4 -> 99.3 % (49/1, -96 %), reward 0.79 -> 0.93; PPO 82.4 -> 98.9 % (49/2, -94 %), reward
#           0.81 -> 0.94; DPO 82.2 -> 85.3 % (10/1)
# The RL error-cut bound (25 %) sits below seed 1's PPO (29 %), the smallest; the reward-rise bound (0.05) below
# its smallest rise (+0.06, GRPO seed 1: a thin margin on this seed; CI runs seed 0). Before the SFT data had direct answers, no RL recipe cut the error by
# more than 10 % on any seed (configs/quickstart_grpo.yaml).
