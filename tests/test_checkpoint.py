"""Orbax model checkpoints: restore onto another mesh, export to HF from a checkpoint."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hf_models import make_hf_model, save_hf_model_dir
from jaxreason import checkpoint, sharding
from jaxreason.models import ModelConfig
from jaxreason.models.build import init_model
from jaxreason.models.hf import load_hf_model


def _assert_same_params(a, b):
  fa, fb = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (_, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]))


def test_saved_on_8_devices_restores_on_1_and_on_another_mesh(tmp_path):
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, tie_word_embeddings=False, eos_token_id=(1, 2), scan_layers=False)
  mesh8 = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  model = init_model(cfg, seed=4, mesh=mesh8)
  checkpoint.save_model(model, str(tmp_path / "checkpoints"), step=3)
  one = checkpoint.load_model(str(tmp_path))  # run dir -> latest step, one device
  assert one.cfg == cfg
  assert len(one.layers[0].mlp.up[...].sharding.device_set) == 1
  _assert_same_params(model, one)
  other = checkpoint.load_model(str(tmp_path / "checkpoints" / "3"),
                                mesh=sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2)))
  assert other.layers[0].mlp.up[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  _assert_same_params(model, other)


def test_latest_step_and_clear_errors(tmp_path):
  cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
  checkpoint.save_model(init_model(cfg, seed=0), str(tmp_path / "checkpoints"), step=1)
  checkpoint.save_model(init_model(cfg, seed=1), str(tmp_path / "checkpoints"), step=5)
  assert checkpoint.resolve_checkpoint(str(tmp_path)) == (str(tmp_path / "checkpoints"), 5)
  _assert_same_params(checkpoint.load_model(str(tmp_path)), init_model(cfg, seed=1))
  with pytest.raises(FileNotFoundError, match="no Orbax checkpoint found"):
    checkpoint.load_model(str(tmp_path / "nothing"))


def test_export_cli_from_checkpoint_loads_in_transformers(tmp_path, qwen_tokenizer):
  hf = make_hf_model("qwen3", seed=12)
  model = load_hf_model(save_hf_model_dir(hf, tmp_path / "hf"))
  run = tmp_path / "run"
  checkpoint.save_model(model, str(run / "checkpoints"), step=10)
  qwen_tokenizer.save_pretrained(run / "tokenizer")
  out = tmp_path / "export"
  r = subprocess.run([sys.executable, "-m", "jaxreason.export", "--checkpoint", str(run), "--out", str(out)],
                     capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(tokens).logits.numpy(), hf(tokens).logits.numpy())
  assert transformers.AutoTokenizer.from_pretrained(out).encode("Hi there") == qwen_tokenizer.encode("Hi there")
