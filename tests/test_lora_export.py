"""LoRA export/import against `transformers` and `peft` (torch, fp32): the merged HF export, our
PEFT adapter loaded by peft onto the HF base, and a peft-made adapter imported into jaxreason."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hf_models import make_hf_model, save_hf_model_dir
from jaxreason.lora import adapters as la
from jaxreason.lora.config import LoraConfig
from jaxreason.models.hf import load_hf_model

peft = pytest.importorskip("peft")
TOKENS = np.random.default_rng(0).integers(1, 256, (2, 14)).astype(np.int64)


def _torch_logits(model):
  with torch.no_grad():
    return model(torch.as_tensor(TOKENS)).logits.float().numpy()


def _ours(model):
  return np.asarray(model(jnp.asarray(TOKENS, jnp.int32)))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """An HF base, and a LoRA checkpoint on it as the trainer writes one (adapters + base pointer),
  with random (non-zero) adapters; plus the jaxreason model computing base + adapters."""
  from jaxreason.lora.train import LORA_ITEM
  from jaxreason.train.checkpointing import TrainCheckpointer
  from jaxreason.train.state import TrainState
  tmp = tmp_path_factory.mktemp("lora")
  hf = make_hf_model("qwen2_untied", seed=3)
  base_dir = save_hf_model_dir(hf, tmp / "base")
  base = load_hf_model(base_dir, scan_layers=True)
  graphdef, state = nnx.split(base)
  spec = LoraConfig(rank=4, alpha=16.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
  trainable, frozen = la.split(nnx.to_pure_dict(state), spec, seed=0)
  rng = np.random.default_rng(1)
  trainable = jax.tree.map(lambda x: jnp.asarray(0.05 * rng.normal(size=x.shape), jnp.float32), trainable)
  ours = nnx.merge(graphdef, la.merge(frozen, trainable))
  ckpt = TrainCheckpointer(str(tmp / "run" / "checkpoints"), async_save=False)
  pointer = {"config": {"targets": list(spec.targets), "rank": 4, "alpha": 16.0, "rslora": False, "dropout": 0.0,
                        "quantize": None, "base_dtype": None}, "base": base_dir, "seed": 0}
  ckpt.save(5, TrainState(step=jnp.asarray(5), params=trainable, opt_state={"count": jnp.zeros((), jnp.int32)}), base.cfg, {"step": 5},
            extra={LORA_ITEM: pointer})
  ckpt.close()
  return {"base": base_dir, "run": str(tmp / "run"), "ours": _ours(ours), "tmp": tmp}


def test_merged_export_matches_transformers(lora_run):
  from jaxreason.export.__main__ import main
  out = lora_run["tmp"] / "merged"
  assert main(["--checkpoint", lora_run["run"], "--out", str(out)]) == 0
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  np.testing.assert_allclose(_torch_logits(hf), lora_run["ours"], atol=1e-5, rtol=1e-5)
  base = transformers.AutoModelForCausalLM.from_pretrained(lora_run["base"], dtype=torch.float32).eval()
  assert np.max(np.abs(_torch_logits(base) - lora_run["ours"])) > 1e-2  # the adapters matter


def test_peft_export_loads_in_peft_with_the_same_logits(lora_run):
  from jaxreason.export.__main__ import main
  out = lora_run["tmp"] / "peft"
  assert main(["--checkpoint", lora_run["run"], "--out", str(out), "--format", "peft"]) == 0
  config = json.load(open(out / "adapter_config.json"))
  assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16.0
  assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"])
  from safetensors.numpy import load_file
  keys = load_file(os.path.join(out, "adapter_model.safetensors"))
  a = keys["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
  b = keys["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
  assert a.shape == (4, 64) and b.shape == (64, 4)  # [r, in], [out, r]
  base = transformers.AutoModelForCausalLM.from_pretrained(lora_run["base"], dtype=torch.float32).eval()
  model = peft.PeftModel.from_pretrained(base, str(out)).eval()
  np.testing.assert_allclose(_torch_logits(model), lora_run["ours"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_peft_made_adapter_imports_with_the_same_logits(lora_run, scan):
  from jaxreason.lora.peft import load_with_peft_adapter
  base = transformers.AutoModelForCausalLM.from_pretrained(lora_run["base"], dtype=torch.float32).eval()
  torch.manual_seed(0)
  cfg = peft.LoraConfig(r=8, lora_alpha=12, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                        use_rslora=True, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM")
  model = peft.get_peft_model(base, cfg).eval()
  adapter = lora_run["tmp"] / f"made_by_peft_{scan}"
  model.save_pretrained(adapter)
  want = _torch_logits(model)
  ours = load_with_peft_adapter(load_hf_model(lora_run["base"], scan_layers=scan), str(adapter))
  np.testing.assert_allclose(_ours(ours), want, atol=1e-5, rtol=1e-5)
  if scan:  # and through the export CLI: --adapter merges it into an HF export
    from jaxreason.export.__main__ import main
    out = lora_run["tmp"] / "merged_peft"
    assert main(["--checkpoint", lora_run["base"], "--adapter", str(adapter), "--out", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(_torch_logits(hf), want, atol=1e-5, rtol=1e-5)
