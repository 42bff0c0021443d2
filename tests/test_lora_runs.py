"""LoRA end to end: SFT and GRPO runs (the toy setup of test_grpo_trainer) learn and resume exactly;
their checkpoints hold the adapters only and load merged onto the base they point at."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from test_grpo_trainer import TINY_GRPO, TINY_SFT, _metrics, _train, tiny_sft  # noqa: F401  (fixture)

LORA = "lora={rank: 4, alpha: 8.0, targets: [q, k, v, o, gate, up, down]}"
LORA_SFT = """
output_dir: {out}
init_from: {init}
data: {{train: ["task:addition:n=200,seed=0,min_digits=2,max_digits=3"], format: s1, seq_len: 128}}
optimizer: {{lr: 5.0e-3}}
schedule: {{warmup_steps: 0, decay: constant}}
train: {{global_batch_size: 8, max_steps: 6, log_every: 1}}
checkpoint: {{every_steps: 3, keep_last: 5}}
logging: {{progress_bar: false}}
"""


def _params(run):
  from jaxreason.checkpoint import load_model
  return nnx.to_pure_dict(nnx.state(load_model(str(run))))


def _same(pa, pb):
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _resume_from(tmp_path, a, b, step, template, init, *sets):
  (tmp_path / f"{b.name}.yaml").write_text(template.format(out=b, init=init))
  os.makedirs(b / "checkpoints")
  shutil.copytree(a / "checkpoints" / str(step), b / "checkpoints" / str(step))
  _train(tmp_path / f"{b.name}.yaml", *sets)


@pytest.mark.slow
def test_lora_sft_learns_resumes_exactly_and_checkpoints_adapters_only(tmp_path, tiny_sft):
  a, b = tmp_path / "a", tmp_path / "b"
  (tmp_path / "a.yaml").write_text(LORA_SFT.format(out=a, init=tiny_sft))
  _train(tmp_path / "a.yaml", LORA)
  ma = _metrics(a)
  assert ma[6]["loss"] < ma[1]["loss"] - 0.015, (ma[1]["loss"], ma[6]["loss"])
  # The step holds adapters (+ optimizer state over them) and a pointer to the base.
  from jaxreason.checkpoint import read_json_item
  pointer = read_json_item(str(a / "checkpoints"), 6, "lora")
  assert pointer["base"] == str(tiny_sft) and pointer["config"]["rank"] == 4
  size = lambda d: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)  # noqa: E731
  assert size(a / "checkpoints" / "6" / "params") < 0.8 * size(tiny_sft / "checkpoints" / "4" / "params")
  _resume_from(tmp_path, a, b, 3, LORA_SFT, tiny_sft, LORA)
  mb = _metrics(b)
  for s in (4, 5, 6):
    for key in ("loss", "grad_norm"):
      assert ma[s][key] == mb[s][key], (s, key)
  pa = _params(a)
  _same(pa, _params(b))
  # Merged weights differ from the base's only in the targeted projections.
  base = _params(tiny_sft)
  assert not np.array_equal(pa["layers"]["attn"]["q_proj"], base["layers"]["attn"]["q_proj"])
  np.testing.assert_array_equal(pa["embed"]["embedding"], base["embed"]["embedding"])


@pytest.mark.slow
def test_lora_grpo_runs_and_resumes_exactly(tmp_path, tiny_sft):
  """Also is_correction with num_iterations > 1: the rollout is re-scored with the trainer's own (merged) weights."""
  a, b = tmp_path / "a", tmp_path / "b"
  (tmp_path / "a.yaml").write_text(TINY_GRPO.format(out=a, init=tiny_sft))
  sets = (LORA, "train.max_steps=4", "optimizer.lr=1e-2", "grpo.is_correction=tis")
  _train(tmp_path / "a.yaml", *sets)
  ma = _metrics(a)
  assert sorted(ma) == [1, 2, 3, 4] and all(np.isfinite(ma[s]["loss"]) for s in ma)
  _resume_from(tmp_path, a, b, 2, TINY_GRPO, tiny_sft, *sets)
  mb = _metrics(b)
  for s in (3, 4):
    for key in ("loss", "reward_mean", "grad_norm", "kl"):
      assert ma[s][key] == mb[s][key], (s, key, ma[s][key], mb[s][key])
  _same(_params(a), _params(b))


# ------------------------------------------------------------------ DPO and the reward model (in process)
from test_preference import _cfg, _sums, _write, tiny_init  # noqa: E402,F401  (fixture)
from test_preference import _metrics as _pref_metrics  # noqa: E402


def test_lora_dpo_starts_at_the_reference_and_learns(tmp_path, tiny_init):
  from jaxreason.algorithms.registry import run
  data = _write(tmp_path / "toy.jsonl", _sums(64, seed=0))
  cfg = _cfg(tmp_path, tiny_init, "dpo", data, "train.max_steps=60", "dpo.beta=0.5", "lora={rank: 8, alpha: 64.0}", "schedule.decay=constant",
             "optimizer.lr=3e-2")
  run(cfg)
  rows = _pref_metrics(cfg.output_dir)
  assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # B = 0: the policy is the reference
  # Adapters on a random tiny base learn slowly (full DPO: test_preference); below log 2 with a positive margin.
  assert np.mean([r["loss"] for r in rows[-10:]]) < np.log(2) - 0.005
  assert np.mean([r["rewards/margin"] for r in rows[-10:]]) > 0


def test_lora_reward_model_trains_head_and_adapters_and_scores(tmp_path, tiny_init):
  from jaxreason.algorithms.registry import run
  from jaxreason.algorithms.reward_model.loss import load_scorer
  rows = _sums(64, seed=0)
  data = _write(tmp_path / "toy.jsonl", rows)
  cfg = _cfg(tmp_path, tiny_init, "reward_model", data, "train.max_steps=100", "lora={rank: 8, alpha: 16.0}", "schedule.decay=constant",
             "optimizer.lr=1e-2")
  run(cfg)
  m = _pref_metrics(cfg.output_dir)
  assert np.mean([r["accuracy"] for r in m[-10:]]) >= 0.7
  score = load_scorer(cfg.output_dir)  # adapters + score head on the base they point at
  prompts = [r["prompt"] for r in rows]
  assert np.mean(score(prompts, [r["chosen"] for r in rows]) > score(prompts, [r["rejected"] for r in rows])) >= 0.7


def test_lora_expert_iteration_every_checkpoint_points_at_its_base(tmp_path):
  """Expert iteration saves between rounds outside `fit`: those steps carry the pointer too, and
  the run loads merged (eval/export)."""
  import test_expert_iteration as tei
  from jaxreason import checkpoint
  from jaxreason.algorithms.registry import run
  from jaxreason.models.build import init_model
  init = tmp_path / "init"
  checkpoint.save_model(init_model(tei.TINY, seed=0), str(init / "checkpoints"), 0)
  cfg = tei._ei_cfg(tmp_path / "ei", str(init), "expert_iteration.rounds=2", "lora={rank: 4, alpha: 8.0}")
  run(cfg)
  steps = sorted(int(s) for s in os.listdir(tmp_path / "ei" / "checkpoints") if s.isdigit())
  assert steps
  for s in steps:
    assert checkpoint.read_json_item(str(tmp_path / "ei" / "checkpoints"), s, "lora")["base"] == str(init)
  merged = _params(tmp_path / "ei")
  base = _params(init)
  assert not np.array_equal(merged["layers"]["attn"]["v_proj"], base["layers"]["attn"]["v_proj"])
