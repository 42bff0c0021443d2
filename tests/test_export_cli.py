"""`python -m jaxreason.export` on a HF directory: loads in transformers with the same logits."""

import os
import subprocess
import sys

import numpy as np
import torch
import transformers

from hf_models import make_hf_model, save_hf_model_dir


def test_export_cli_hf_dir_to_bf16_and_fp32(tmp_path, qwen_tokenizer):
  hf = make_hf_model("qwen2_tied", seed=8)
  src = save_hf_model_dir(hf, tmp_path / "src")
  qwen_tokenizer.save_pretrained(src)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for dtype in ("float32", "bfloat16"):
    out = tmp_path / dtype
    r = subprocess.run([sys.executable, "-m", "jaxreason.export", "--checkpoint", src, "--out", str(out),
                        "--dtype", dtype], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", dtype=getattr(torch, dtype)).eval()
    want = {k: v.to(getattr(torch, dtype)) for k, v in hf.state_dict().items()}
    got = reloaded.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    if dtype == "float32":
      tokens = torch.tensor([[1, 2, 3, 200, 100]])
      with torch.no_grad():
        np.testing.assert_array_equal(reloaded(tokens).logits.numpy(), hf(tokens).logits.numpy())
    assert transformers.AutoTokenizer.from_pretrained(out).encode("Hello") == qwen_tokenizer.encode("Hello")


def test_export_cli_bad_checkpoint_is_a_clear_error(tmp_path):
  r = subprocess.run([sys.executable, "-m", "jaxreason.export", "--checkpoint", str(tmp_path), "--out",
                      str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert "neither an Orbax checkpoint" in r.stderr and "Traceback" not in r.stderr
