"""HF <-> jaxreason round trips: byte-identical tensors, transformers reloads, clear errors."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_models import VARIANTS, make_hf_model, save_hf_model_dir
from jaxreason.models.hf import load_hf_config, load_hf_model, save_hf_model


def _all_tensors(model_dir):
  """name -> torch tensor from a HF dir, read with the safetensors library (not our reader)."""
  index = os.path.join(model_dir, "model.safetensors.index.json")
  files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
           else ["model.safetensors"])
  out = {}
  for f in files:
    with safe_open(os.path.join(model_dir, f), framework="pt") as h:
      for k in h.keys():
        out[k] = h.get_tensor(k)
  return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_roundtrip_byte_identical_and_reloads_in_transformers(variant, tmp_path):
  hf = make_hf_model(variant, seed=11)
  src = save_hf_model_dir(hf, tmp_path / "src")
  model = load_hf_model(src)
  out = str(tmp_path / "out")
  save_hf_model(model, out)

  a, b = _all_tensors(src), _all_tensors(out)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k

  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  assert type(reloaded) is type(hf)
  tokens = torch.tensor(np.random.default_rng(0).integers(0, 256, size=(2, 24)))
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(tokens).logits.numpy(), hf(tokens).logits.numpy())
  assert reloaded.config.tie_word_embeddings == hf.config.tie_word_embeddings
  assert os.path.exists(os.path.join(out, "generation_config.json"))


def test_sharded_checkpoint_loads_and_exports_sharded(tmp_path):
  hf = make_hf_model("qwen2_untied", seed=3)
  src = save_hf_model_dir(hf, tmp_path / "src", max_shard_size="60KB")
  index = json.load(open(os.path.join(src, "model.safetensors.index.json")))
  assert len(set(index["weight_map"].values())) > 2  # really sharded
  model = load_hf_model(src)
  out = str(tmp_path / "out")
  files = save_hf_model(model, out, max_shard_size="60KB")
  assert len(files) > 2
  ours = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  assert set(ours["weight_map"]) == set(index["weight_map"])
  assert ours["metadata"]["total_size"] == sum(t.numel() * 4 for t in _all_tensors(out).values())
  a, b = _all_tensors(src), _all_tensors(out)
  assert all(torch.equal(a[k], b[k]) for k in a)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  tokens = torch.tensor([[1, 5, 9, 200, 3]])
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(tokens).logits.numpy(), hf(tokens).logits.numpy())


def test_export_bfloat16(tmp_path):
  hf = make_hf_model("qwen3", seed=4)
  model = load_hf_model(save_hf_model_dir(hf, tmp_path / "src"))
  out = str(tmp_path / "bf16")
  save_hf_model(model, out, dtype="bfloat16")
  tensors = _all_tensors(out)
  assert all(t.dtype == torch.bfloat16 for t in tensors.values())
  ref = hf.state_dict()
  for k, t in tensors.items():
    assert torch.equal(t, ref[k].to(torch.bfloat16)), k
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
  # bf16 -> our fp32 master weights -> bf16 is lossless.
  out2 = str(tmp_path / "bf16_again")
  save_hf_model(load_hf_model(out), out2, dtype="bfloat16")
  again = _all_tensors(out2)
  assert all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_export_writes_tokenizer_files(tmp_path, qwen_tokenizer):
  hf = make_hf_model("qwen2_tied", seed=1)
  model = load_hf_model(save_hf_model_dir(hf, tmp_path / "src"))
  out = str(tmp_path / "out")
  save_hf_model(model, out, tokenizer=qwen_tokenizer)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.encode("Hello, world!") == qwen_tokenizer.encode("Hello, world!")
  assert tok.chat_template == qwen_tokenizer.chat_template


def test_unknown_model_type_is_a_clear_error(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
  with pytest.raises(ValueError, match=r"config.json.*model_type 'gpt2'.*supported: qwen2, qwen3, llama"):
    load_hf_model(str(tmp_path))


def test_missing_and_extra_tensors_are_listed(tmp_path):
  hf = make_hf_model("llama", seed=2)
  src = save_hf_model_dir(hf, tmp_path)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
  save_file(tensors, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError) as e:
    load_hf_model(src)
  msg = str(e.value)
  assert "missing tensors (1): model.layers.1.mlp.up_proj.weight" in msg
  assert "unexpected tensors (1): model.layers.1.mlp.extra.weight" in msg
  assert src in msg


def test_wrong_shape_is_a_clear_error(tmp_path):
  hf = make_hf_model("llama", seed=2)
  src = save_hf_model_dir(hf, tmp_path)
  cfg = json.load(open(os.path.join(src, "config.json")))
  cfg["intermediate_size"] = 96
  json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
  with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight has shape \((128, 64|64, 128)\); the config expects \((96, 64|64, 96)\)"):
    load_hf_model(src)


def test_no_weights_is_a_clear_error(tmp_path):
  hf = make_hf_model("llama", seed=2)
  hf.config.save_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    load_hf_model(str(tmp_path))


def test_legacy_transformers4_config_is_read(tmp_path):
  """Hub checkpoints carry transformers-4 `rope_theta` / `rope_scaling` keys."""
  cfg = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
         "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
         "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
         "tie_word_embeddings": True}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  c = load_hf_config(str(tmp_path))
  assert c.rope_theta == 500000.0 and c.rope_scaling.rope_type == "llama3" and c.rope_scaling.factor == 32.0
  assert c.tie_word_embeddings and not c.qkv_bias
