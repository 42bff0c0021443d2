"""Expert iteration: only verified-correct completions are kept and trained on, round by round."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def even_length(response: str, answer) -> float:
  """Test verifier: a completion is "correct" when its text has even length."""
  return float(len(response) % 2 == 0)


SFT = """
output_dir: {out}
tokenizer: builtin:char
model: {{model_type: qwen2, vocab_size: 128, hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 4,
        num_kv_heads: 2, max_position_embeddings: 256}}
data: {{train: ["task:addition:n=100,seed=0,min_digits=2,max_digits=3"], format: s1, seq_len: 128}}
train: {{global_batch_size: 8, max_steps: 2}}
logging: {{progress_bar: false}}
"""
EI = """
output_dir: {out}
algorithm: expert_iteration
init_from: {init}
data: {{train: ["task:addition:n=100,seed=4,min_digits=2,max_digits=3"], seq_len: 128}}
rollout: {{format: s1, num_generations: 4, max_new_tokens: 24, temperature: 1.0}}
expert_iteration: {{rounds: 2, questions_per_round: 6, reward: "test_expert_iteration:even_length"}}
optimizer: {{lr: 1.0e-3}}
train: {{global_batch_size: 4}}
logging: {{progress_bar: false}}
"""


def _train(path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
  r = subprocess.run([sys.executable, "-m", "jaxreason.train", "--config", str(path)], capture_output=True, text=True,
                     env=env, cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]


def test_expert_iteration_keeps_only_verified(tmp_path):
  (tmp_path / "sft.yaml").write_text(SFT.format(out=tmp_path / "sft"))
  _train(tmp_path / "sft.yaml")
  out = tmp_path / "ei"
  (tmp_path / "ei.yaml").write_text(EI.format(out=out, init=tmp_path / "sft"))
  _train(tmp_path / "ei.yaml")
  logs = [json.loads(line) for line in open(out / "metrics.jsonl")]
  assert [row["round"] for row in logs] == [1, 2]
  step = 0
  for r, row in enumerate(logs):
    kept = [json.loads(line) for line in open(out / "data" / f"ei_round{r}.jsonl")]
    assert kept and len(kept) == row["kept"]
    assert all(even_length(k["response"], None) == 1.0 for k in kept)
    assert all(k["prompt"].endswith("<|im_start|>think\n") for k in kept)
    assert 0 < row["kept_fraction"] < 1  # some completions were dropped
    assert row["kept"] <= round(row["kept_fraction"] * 24)  # distinct completions only
    step += row["sft_steps"]
    assert row["step"] == step and row["sft_steps"] >= 1 and row["sft_loss"] > 0
  assert sorted(os.listdir(out / "checkpoints")) == sorted({str(int(logs[0]["step"])), str(int(logs[1]["step"]))})
