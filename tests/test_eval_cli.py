"""`python -m jaxreason.eval` end to end on a tiny random model with the real Qwen2.5 tokenizer."""

import json
import os

import numpy as np
import pytest

from hf_models import make_hf_model
from jaxreason.eval.__main__ import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen_tokenizer):
  d = tmp_path_factory.mktemp("evalmodel")
  make_hf_model("qwen2_tied", seed=3, vocab_size=151665).save_pretrained(d)
  qwen_tokenizer.save_pretrained(d)
  return str(d)


def test_eval_writes_samples_summary_and_plot(model_dir, tmp_path):
  data = tmp_path / "q.jsonl"
  data.write_text("\n".join(json.dumps({"id": f"q{i}", "question": f"What is {i}+{i}?", "answer": str(2 * i)})
                            for i in range(3)) + "\n")
  out = tmp_path / "out"
  rc = main(["--model", model_dir, "--data", str(data), "--format", "s1", "--out", str(out),
             "--budgets", "4,16,none", "--max-new-tokens", "40", "--max-answer-tokens", "8",
             "--temperature", "1.0", "--n", "2", "--seed", "1"])
  assert rc == 0
  rows = [json.loads(l) for l in open(out / "samples.jsonl")]
  assert len(rows) == 3 * 2 * 3  # questions x samples x budgets
  required = {"id", "budget", "prompt", "response", "response_token_ids", "ground_truth", "reward", "correct",
              "thinking_tokens", "answer_tokens", "waits", "forced_end", "truncated", "mean_entropy"}
  assert required <= set(rows[0])
  for r in rows:
    assert r["prompt"].endswith("<|im_start|>assistant\n<|im_start|>think\n")
    assert len(r["response_token_ids"]) <= 40
    if r["budget"] is not None:
      assert r["thinking_tokens"] <= r["budget"]
    if r["forced_end"]:  # a forced end appends the delimiter and "Final Answer:"
      assert "<|im_start|>answer\nFinal Answer:" in r["response"]
      assert r["thinking_tokens"] == r["budget"]
  assert any(r["forced_end"] for r in rows if r["budget"] == 4)
  summary = json.load(open(out / "summary.json"))
  budgets = [b["budget"] for b in summary["budgets"]]
  assert budgets == [4, 16, None]
  for b in summary["budgets"]:
    assert {"accuracy", "pass@1", "pass@2", "maj@2", "mean_thinking_tokens"} <= set(b)
  assert summary["budgets"][0]["mean_thinking_tokens"] <= 4
  assert os.path.getsize(out / "scaling.png") > 5000


def test_eval_on_builtin_task_and_bad_input(model_dir, tmp_path, capsys):
  out = tmp_path / "o"
  assert main(["--model", model_dir, "--data", "task:addition:n=2,max_digits=3", "--format", "s1",
               "--out", str(out), "--budgets", "8", "--max-new-tokens", "16"]) == 0
  assert len(open(out / "samples.jsonl").readlines()) == 2
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"question": "1+1", "answer": "2"}\n{not json}\n')
  assert main(["--model", model_dir, "--data", str(bad), "--out", str(out)]) == 2
  assert "bad.jsonl line 2" in capsys.readouterr().err
  with pytest.raises(SystemExit, match="no thinking phase"):
    main(["--model", model_dir, "--data", str(bad), "--out", str(out), "--format", "chat", "--budgets", "8"])


def test_eval_from_orbax_checkpoint_matches_hf_dir(model_dir, tmp_path, qwen_tokenizer):
  from jaxreason import checkpoint
  from jaxreason.models.hf import load_hf_model
  run = tmp_path / "run"
  checkpoint.save_model(load_hf_model(model_dir), str(run / "checkpoints"), step=2)
  qwen_tokenizer.save_pretrained(run / "tokenizer")
  common = ["--data", "task:addition:n=3,max_digits=3", "--format", "s1", "--budgets", "6",
            "--max-new-tokens", "20"]
  assert main(["--model", str(run), "--out", str(tmp_path / "a")] + common) == 0
  assert main(["--model", model_dir, "--out", str(tmp_path / "b")] + common) == 0
  a = [json.loads(l)["response_token_ids"] for l in open(tmp_path / "a" / "samples.jsonl")]
  b = [json.loads(l)["response_token_ids"] for l in open(tmp_path / "b" / "samples.jsonl")]
  assert a == b
