"""`algorithm: distill` end to end on tiny models: on-policy distillation lowers the per-token reverse
KL to the teacher on prompts the student has not seen; offline KD (+ CE) lowers the KD."""

import numpy as np
import pytest

from test_grpo_trainer import _metrics, _train

TEACHER = """
output_dir: {out}
tokenizer: builtin:char
model: {{model_type: qwen2, vocab_size: 128, hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 4,
        num_kv_heads: 2, max_position_embeddings: 256}}
data: {{train: ["task:addition:n=200,seed=0,min_digits=2,max_digits=3"], format: s1, seq_len: 128, num_epochs: 3}}
optimizer: {{lr: 1.0e-2}}
train: {{global_batch_size: 8, max_steps: 20, log_every: 5}}
logging: {{progress_bar: false}}
"""
STUDENT = """
output_dir: {out}
algorithm: distill
tokenizer: builtin:char
model: {{model_type: qwen2, vocab_size: 128, hidden_size: 16, intermediate_size: 32, num_layers: 2, num_heads: 2,
        num_kv_heads: 1, max_position_embeddings: 256}}
data: {{train: ["task:addition:n=400,seed=5,min_digits=2,max_digits=3"], format: s1, seq_len: 128}}
rollout: {{format: s1, prompts_per_step: 8, num_generations: 2, max_new_tokens: 16, temperature: 1.0}}
distill: {{teacher: {teacher}, loss: reverse_kl, mode: on_policy}}
optimizer: {{lr: 1.0e-2}}
schedule: {{warmup_steps: 0, decay: constant}}
train: {{global_batch_size: 16, max_steps: 10, log_every: 1}}
logging: {{progress_bar: false}}
"""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("teacher")
  (tmp / "t.yaml").write_text(TEACHER.format(out=tmp / "t"))
  _train(tmp / "t.yaml")
  return tmp / "t"


@pytest.mark.slow
def test_on_policy_distillation_lowers_reverse_kl_on_new_prompts(tmp_path, teacher):
  (tmp_path / "s.yaml").write_text(STUDENT.format(out=tmp_path / "s", teacher=teacher))
  _train(tmp_path / "s.yaml")
  m = _metrics(tmp_path / "s")
  # Each step's prompts are new to the student (400 questions, 8 per step); kd_before_update is
  # the reverse KL on them before that step's update.
  first, last = m[1]["kd_before_update"], np.mean([m[s]["kd_before_update"] for s in (8, 9, 10)])
  assert last < 0.8 * first, (first, last)  # ~1.95 -> ~1.2 measured


@pytest.mark.slow
def test_offline_kd_with_ce_mix_learns(tmp_path, teacher):
  (tmp_path / "s.yaml").write_text(STUDENT.format(out=tmp_path / "s", teacher=teacher))
  _train(tmp_path / "s.yaml", "distill={teacher: %s, loss: jsd, beta: 0.5, temperature: 2.0, kd_weight: 0.5, "
         "mode: offline}" % teacher, "train.global_batch_size=8", "train.max_steps=8")
  m = _metrics(tmp_path / "s")
  assert m[8]["kd"] < m[1]["kd"] and m[8]["ce"] < m[1]["ce"], (m[1], m[8])
  assert abs(m[8]["loss"] - (0.5 * m[8]["ce"] + 0.5 * m[8]["kd"])) < 1e-4
