"""Evaluation metrics and reports (SPEC §8): hand-computed pass@k / maj@k, summaries, output files."""

import json
import math
import os

import numpy as np
import pytest

from jaxreason.eval import metrics as M
from jaxreason.eval import report as R

# ----------------------------------------------------------------------------------------------
# pass@k


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4),
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
    (5, 0, 3, 0.0),
    (5, 3, 3, 1.0),  # n - c = 2 < k
    (5, 5, 1, 1.0),
    (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),
])
def test_pass_at_k_hand_values(n, c, k, expected):
  assert M.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_comb_and_is_stable():
  for n in range(1, 12):
    for c in range(n + 1):
      for k in range(1, n + 1):
        exact = 1.0 if n - c < k else 1 - math.comb(n - c, k) / math.comb(n, k)
        assert M.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
  # large n, where C(n, k) overflows floats: the product form stays finite
  assert M.pass_at_k(2000, 1, 1000) == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
  with pytest.raises(ValueError, match="pass@k"):
    M.pass_at_k(n, c, k)


# ----------------------------------------------------------------------------------------------
# maj@k


def test_maj_at_k_majority_and_first_k():
  pairs = [("3", False), ("4", True), ("4", True), ("3", False), ("3", False)]
  assert M.maj_at_k(pairs, 3) is True  # "4" twice in the first 3
  assert M.maj_at_k(pairs, 5) is False  # "3" three times in 5
  assert M.maj_at_k(pairs, 1) is False


def test_maj_at_k_tie_goes_to_first_seen():
  assert M.maj_at_k([("a", True), ("b", False), ("b", False), ("a", True)], 4) is True
  assert M.maj_at_k([("b", False), ("a", True), ("a", True), ("b", False)], 4) is False


def test_maj_at_k_samples_without_answer_do_not_vote():
  pairs = [(None, False), (None, False), ("7", True)]
  assert M.maj_at_k(pairs, 3) is True
  assert M.maj_at_k(pairs, 2) is False  # nobody voted
  assert M.maj_at_k([(None, False), ("1", False), (None, False), ("2", True), ("2", True)], 5) is True


def test_maj_at_k_winner_correctness_from_its_first_sample():
  # the same key graded differently (e.g. a flaky grader) uses the first sample with that key
  assert M.maj_at_k([("x", True), ("x", False)], 2) is True


def test_answer_key_normalises():
  assert M.answer_key(None) is None
  assert M.answer_key("  ") is None
  assert M.answer_key("0.5") == M.answer_key("1/2") == M.answer_key("\\frac{1}{2}") == M.answer_key("$\\dfrac{1}{2}$")
  assert M.answer_key("1,000") == M.answer_key("1000.0") == M.answer_key(1000) == "1000"
  assert M.answer_key("x + 1") == M.answer_key("x+1")
  assert M.answer_key("x+1") != M.answer_key("x+2")


# ----------------------------------------------------------------------------------------------
# summarize


def _s(id, budget, correct, answer, think, ans, *, forced=False, truncated=False, reward=None, entropy=None):
  row = {"id": id, "budget": budget, "correct": correct, "answer": answer, "thinking_tokens": think,
         "answer_tokens": ans, "response_token_ids": list(range(think + ans)), "forced_end": forced,
         "truncated": truncated}
  if reward is not None:
    row["reward"] = reward
  if entropy is not None:
    row["mean_entropy"] = entropy
  return row


SAMPLES = [
    # budget 512: question q1 (3 samples, 2 correct), q2 (3 samples, 0 correct, one without answer)
    _s("q1", 512, True, "5", 100, 10, reward={"reward": 1.0, "format_reward": 1.0}, entropy=0.5),
    _s("q1", 512, False, "6", 200, 20, forced=True, reward={"reward": 0.0, "format_reward": 1.0}, entropy=0.7),
    _s("q1", 512, True, "5.0", 300, 30, reward={"reward": 1.0, "format_reward": 1.0}, entropy=0.6),
    _s("q2", 512, False, "1", 400, 0, forced=True, truncated=True, reward={"reward": 0.0, "format_reward": 0.0}),
    _s("q2", 512, False, None, 500, 0, truncated=True, reward={"reward": 0.0, "format_reward": 0.0}),
    _s("q2", 512, False, "2", 600, 40, reward={"reward": 0.0, "format_reward": 1.0}),
    # budget None (no forcing): one question, one sample; plain float rewards, no format reward
    _s("q1", None, True, "5", 1000, 50, reward=1.0),
]


def test_summarize_hand_computed():
  out = M.summarize(SAMPLES, ks=[1, 2, 4])
  assert out["ks"] == [1, 2, 4]
  assert [b["budget"] for b in out["budgets"]] == [512, None]
  b = out["budgets"][0]
  assert b["n_questions"] == 2 and b["n_samples"] == 6 and b["samples_per_question"] == 3
  assert b["accuracy"] == pytest.approx(2 / 6)
  assert b["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
  assert b["pass@2"] == pytest.approx((1.0 + 0) / 2)  # q1: n-c = 1 < 2
  assert "pass@4" not in b and "maj@4" not in b  # k > 3 samples per question
  # q1: maj@1 votes "5" (correct); maj@2 "5" vs "6" tie -> "5"; q2: "1" (wrong) either way
  assert b["maj@1"] == pytest.approx(0.5) and b["maj@2"] == pytest.approx(0.5)
  assert b["mean_thinking_tokens"] == pytest.approx(350.0)
  assert b["mean_answer_tokens"] == pytest.approx(100 / 6)
  assert b["mean_length"] == pytest.approx((110 + 220 + 330 + 400 + 500 + 640) / 6)
  assert b["share_forced"] == pytest.approx(2 / 6)
  assert b["share_no_answer"] == pytest.approx(1 / 6)
  assert b["share_truncated"] == pytest.approx(2 / 6)
  assert b["mean_length_correct"] == pytest.approx((110 + 330) / 2)
  assert b["mean_length_wrong"] == pytest.approx((220 + 400 + 500 + 640) / 4)
  assert b["mean_entropy"] == pytest.approx(0.6)  # only samples that have one
  assert b["mean_reward"] == pytest.approx(2 / 6)
  assert b["mean_format_reward"] == pytest.approx(4 / 6)

  n = out["budgets"][1]
  assert n["n_questions"] == 1 and n["accuracy"] == 1.0 and n["pass@1"] == 1.0 and n["maj@1"] == 1.0
  assert "pass@2" not in n
  assert n["mean_length_wrong"] is None and n["mean_entropy"] is None and n["mean_reward"] == 1.0
  assert "mean_format_reward" not in n
  json.dumps(out)  # plain JSON


def test_summarize_answer_key_and_length_fields():
  samples = [{"id": 0, "correct": False, "answer": "a", "answer_key": "k1", "length": 7},
             {"id": 0, "correct": True, "answer": "b", "answer_key": "k2", "length": 3},
             {"id": 0, "correct": True, "answer": "c", "answer_key": "k2", "length": 5}]
  b = M.summarize(samples, ks=[3])["budgets"][0]
  assert b["budget"] is None and b["maj@3"] == 1.0 and b["mean_length"] == 5.0
  assert b["mean_thinking_tokens"] is None and b["share_forced"] == 0.0


def test_summarize_missing_fields_is_a_clear_error():
  with pytest.raises(KeyError, match="sample 1 has no 'correct'"):
    M.summarize([{"id": 0, "correct": True}, {"id": 1, "answer": "3"}])


# ----------------------------------------------------------------------------------------------
# report


def test_write_samples_and_summary_atomic_round_trip(tmp_path):
  rows = [{"id": 1, "response": "é \\boxed{3}", "entropies": np.float32(0.25), "ids": np.arange(3),
           "ok": np.bool_(True)}]
  path = R.write_samples(tmp_path / "out" / "samples.jsonl", rows)
  lines = open(path, encoding="utf-8").read().splitlines()
  assert json.loads(lines[0]) == {"id": 1, "response": "é \\boxed{3}", "entropies": 0.25, "ids": [0, 1, 2], "ok": True}
  summary = M.summarize(SAMPLES, ks=[1, 2])
  spath = R.write_summary(tmp_path / "summary.json", summary)
  assert json.load(open(spath)) == json.loads(json.dumps(summary))
  assert sorted(os.listdir(tmp_path / "out")) == ["samples.jsonl"]  # no temporary files left


def test_write_is_atomic_on_failure(tmp_path):
  path = tmp_path / "samples.jsonl"
  R.write_samples(path, [{"a": 1}])
  with pytest.raises(TypeError, match="cannot write a object"):
    R.write_samples(path, [{"a": 2}, {"b": object()}])
  assert path.read_text() == '{"a": 1}\n'  # the old file survives
  assert os.listdir(tmp_path) == ["samples.jsonl"]


def test_format_table():
  text = R.format_table(M.summarize(SAMPLES, ks=[1, 2]))
  lines = text.splitlines()
  assert lines[0].split() == ["budget", "questions", "acc%", "pass@1%", "pass@2%", "maj@1%", "maj@2%", "think",
                              "answer", "forced%", "no-ans%"]
  assert lines[2].split() == ["512", "2", "33.3", "33.3", "50.0", "50.0", "50.0", "350.0", "16.7", "33.3", "16.7"]
  assert lines[3].split()[:4] == ["none", "1", "100.0", "100.0"] and lines[3].split()[4] == "-"
  assert len({len(line) for line in lines}) == 1  # aligned


def test_plot_scaling_writes_png(tmp_path):
  budgets = [{"budget": b, "accuracy": acc, "mean_thinking_tokens": t}
             for b, acc, t in [(512, 0.30, 480.0), (1024, 0.42, 950.0), (2048, 0.50, 1800.0),
                               (4096, 0.55, 3500.0), (8192, 0.57, 6100.0)]]
  path = R.plot_scaling(tmp_path / "plots" / "scaling.png", {"budgets": budgets})
  data = open(path, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
  assert os.listdir(tmp_path / "plots") == ["scaling.png"]
  with pytest.raises(ValueError, match="nothing to plot"):
    R.plot_scaling(tmp_path / "empty.png", [{"budget": 1, "accuracy": 0.5, "mean_thinking_tokens": None}])
