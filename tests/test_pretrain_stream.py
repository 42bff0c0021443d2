"""algorithm: pretrain on a prepared token stream (data.train: tokens:DIR) through the SFT loop."""

import json
import os
import subprocess
import sys

from jaxreason.data.prepare import prepare
from jaxreason.tokenizer import train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
output_dir: {out}
algorithm: pretrain
seed: 0
tokenizer: {tok}
model: {{model_type: llama, vocab_size: 320, hidden_size: 32, intermediate_size: 64, num_layers: 2,
        num_heads: 4, num_kv_heads: 2, max_position_embeddings: 64}}
data:
  train: ["tokens:{data}:eval_every=5,eval_batches=2"]
  format: pretrain_text
  seq_len: 32
optimizer: {{lr: 1.0e-2}}
train: {{global_batch_size: 8, max_steps: 12, log_every: 5}}
checkpoint: {{every_steps: 100}}
logging: {{progress_bar: false}}
"""


def test_pretrain_from_token_stream_logs_heldout_perplexity(tmp_path):
  docs = [f"item {i} costs {i % 7} coins and weighs {i % 5} grams." for i in range(600)]
  train_tokenizer(docs, 300, tmp_path / "tok")
  prepare(docs, str(tmp_path / "tok"), str(tmp_path / "data"), heldout_fraction=0.1, log=lambda *_: None)
  cfg = tmp_path / "c.yaml"
  cfg.write_text(CONFIG.format(out=tmp_path / "run", tok=tmp_path / "data" / "tokenizer", data=tmp_path / "data"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = subprocess.run([sys.executable, "-m", "jaxreason.train", "--config", str(cfg)], capture_output=True, text=True,
                     env=env, cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
  train = [x for x in rows if "loss" in x]
  held = [x for x in rows if "heldout_ppl" in x]
  assert [x["step"] for x in train] == [5, 10, 12]
  assert all(x["trained_tokens"] == x["tokens"] == 8 * 32 for x in train)  # every token of every window
  assert [x["step"] for x in held] == [5, 10, 12]
  assert held[-1]["heldout_ppl"] < held[0]["heldout_ppl"] < 320  # learns; starts below the uniform 320
  assert abs(held[0]["heldout_nll"] - __import__("math").log(held[0]["heldout_ppl"])) < 1e-6
