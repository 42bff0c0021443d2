"""Curation stages on the built-in planted pool: each stage removes exactly the planted rows."""

import json

import numpy as np
import pytest

from jaxreason.curate import (Decontaminate, Deduplicate, Difficulty, Diversity, Quality, curate,
                              s1_diversity_sample)
from jaxreason.curate.pool import builtin_pool, builtin_solver


@pytest.fixture(scope="module")
def pool():
  return builtin_pool(seed=0)


def _ids(pairs):
  return {r["id"] for r, _ in pairs}


def _planted(rows, stage):
  return {r["id"] for r in rows if r["planted"] == stage}


def test_each_stage_drops_exactly_the_planted_rows(pool):
  rows, evals = pool
  rng = np.random.default_rng(0)
  q = Quality().run(rows, rng)
  assert _ids(q.dropped) == _planted(rows, "quality") and len(q.dropped) == 10
  d = Deduplicate(threshold=0.7).run(q.kept, rng)
  assert _ids(d.dropped) == _planted(rows, "dedup") and len(d.dropped) == 12
  reasons = {r["id"]: why for r, why in d.dropped}
  assert all(reasons[i].startswith("exact duplicate") for i in reasons if i.startswith("exact-"))
  assert all(reasons[i].startswith("near duplicate") for i in reasons if i.startswith("near-"))
  c = Decontaminate({"eval": evals}).run(d.kept, rng)
  assert _ids(c.dropped) == _planted(rows, "decontam") and len(c.dropped) == 6
  assert {h["id"] for h in c.info["hits"]} == _planted(rows, "decontam")
  assert all(h["eval_set"] == "eval" and len(h["ngram"].split()) == 8 for h in c.info["hits"])
  h = Difficulty([builtin_solver], k=3).run(c.kept, rng)
  assert _ids(h.dropped) == _planted(rows, "difficulty") and len(h.dropped) > 10
  assert all(r["planted"] is None for r in h.kept)
  assert all(r["trace_length"] == len(r["thinking"].split()) for r in h.kept)


def test_quality_reasons_and_configurable_patterns():
  rows = [{"id": 0, "question": "Find x. [asy] draw(); [/asy]", "answer": "1"},
          {"id": 1, "question": "See ![f](a.png)", "answer": "1"},
          {"id": 2, "question": "(a) Find x. (b) Find y.", "answer": "1"},
          {"id": 3, "question": "Fine question", "answer": None},
          {"id": 4, "question": "Fine question", "answer": "2"}]
  res = Quality().run(rows, None)
  why = {r["id"]: w for r, w in res.dropped}
  assert why == {0: "pattern 'asy' in question", 1: "pattern 'image' in question",
                 2: "pattern 'numbered_parts' in question", 3: "missing field 'answer'"}
  assert [r["id"] for r in Quality(patterns={}).run(rows, None).kept] == [0, 1, 2, 4]
  with pytest.raises(ValueError, match="not a valid regex"):
    Quality(patterns={"bad": "("})


def test_decontamination_is_word_8grams_lowercased_whitespace_normalised():
  ev = {"e": [{"id": "a", "question": "one two three four five six seven eight nine"}]}
  rows = [{"id": 0, "question": "ZERO one  TWO three\nfour five six seven eight"},  # shares an 8-gram
          {"id": 1, "question": "one two three four five six seven nine eight"}]  # only 7-grams
  res = Decontaminate(ev).run(rows, None)
  assert _ids(res.dropped) == {0}
  assert res.info["hits"][0]["ngram"] == "one two three four five six seven eight"


def test_model_solver_runs_through_the_sampler(tmp_path):
  """A real (tiny, random) HF model answers k times per question through jaxreason's sampler;
  the responses are graded by the reward registry (a random model solves nothing)."""
  from jaxreason.curate import ModelSolver
  from jaxreason.data.char_tokenizer import build_char_tokenizer
  from tests.hf_models import make_hf_model, save_hf_model_dir
  tok = build_char_tokenizer()
  model_dir = save_hf_model_dir(make_hf_model("qwen2_tied", vocab_size=128), tmp_path / "m")
  tok.save_pretrained(model_dir)
  rows = [{"id": i, "question": f"{i}+{i}", "answer": str(2 * i), "thinking": "a b c"} for i in range(3)]
  solver = ModelSolver(model_dir, temperature=1.0, max_new_tokens=6, batch_size=2)
  out = solver(rows, 2)
  assert [len(o) for o in out] == [2, 2, 2] and all(isinstance(t, str) for o in out for t in o)
  res = Difficulty([solver], k=2).run(rows, None)
  assert len(res.kept) + len(res.dropped) == 3 and all("solve_rate" in r for r in res.kept)


def test_diversity_frequencies_follow_2_pow_minus_rank():
  """One domain of 5 rows, one pick: rank r (0 = longest) is drawn with probability 2^-r / sum."""
  lengths = [30, 50, 10, 40, 20]  # ranks: idx1=0, idx3=1, idx0=2, idx4=3, idx2=4
  rng = np.random.default_rng(123)
  trials = 20000
  counts = np.zeros(5)
  for _ in range(trials):
    counts[s1_diversity_sample(["d"] * 5, lengths, 1, rng)[0]] += 1
  rank_of = {1: 0, 3: 1, 0: 2, 4: 3, 2: 4}
  p = np.exp2(-np.arange(5.0))
  p /= p.sum()
  expected = np.array([p[rank_of[i]] for i in range(5)])
  sigma = np.sqrt(expected * (1 - expected) / trials)
  assert np.all(np.abs(counts / trials - expected) < 4 * sigma), (counts / trials, expected)


def test_diversity_domains_uniform_and_without_replacement():
  rng = np.random.default_rng(0)
  domains = ["a"] * 50 + ["b"] * 5
  trials = 4000
  first = np.array([domains[s1_diversity_sample(domains, list(range(55)), 1, rng)[0]] == "a" for _ in range(trials)])
  assert abs(first.mean() - 0.5) < 4 * np.sqrt(0.25 / trials)  # domain chosen uniformly, not by size
  picked = s1_diversity_sample(domains, list(range(55)), 20, rng)
  assert len(set(picked)) == 20 and sum(domains[i] == "b" for i in picked) == 5  # b exhausted, then only a
  assert sorted(s1_diversity_sample(domains, [0] * 55, 100, rng)) == list(range(55))


def test_same_seed_same_selection_and_outputs(pool, tmp_path):
  rows, evals = pool

  def stages():
    return [Quality(), Deduplicate(), Decontaminate({"eval": evals}), Difficulty([builtin_solver], k=2),
            Diversity(40)]

  a, _ = curate(rows, stages(), seed=7, out=str(tmp_path / "a"), log=lambda *_: None)
  b, _ = curate(rows, stages(), seed=7, out=str(tmp_path / "b"), log=lambda *_: None)
  c, _ = curate(rows, stages(), seed=8, log=lambda *_: None)
  assert [r["id"] for r in a] == [r["id"] for r in b] != [r["id"] for r in c]
  assert len(a) == 40 and all(r["planted"] is None for r in a)
  report = json.loads((tmp_path / "a" / "report.json").read_text())
  assert [s["stage"] for s in report["stages"]] == ["quality", "dedup", "decontam", "difficulty", "diversity"]
  assert report["stages"][2]["dropped"] == report["decontamination_hits"] == 6
  assert (tmp_path / "a" / "lengths.png").stat().st_size > 1000 and (tmp_path / "a" / "domains.png").exists()
  lines = [json.loads(x) for x in (tmp_path / "a" / "stages" / "01_dedup.jsonl").read_text().splitlines()]
  assert sum(not x["kept"] for x in lines) == 12 and all(x["reason"] for x in lines if not x["kept"])


def test_cli_on_builtin_pool(tmp_path):
  from jaxreason.curate.__main__ import main
  assert main(["--pool", "builtin", "--out", str(tmp_path), "--n", "30", "--k", "2"]) == 0
  sel = (tmp_path / "selected.jsonl").read_text().splitlines()
  assert len(sel) == 30


def test_cli_on_files_and_errors(tmp_path, capsys):
  from jaxreason.curate.__main__ import main
  rows, evals = builtin_pool(seed=0)
  pool = tmp_path / "pool.jsonl"
  pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
  ev = tmp_path / "eval.jsonl"
  ev.write_text("".join(json.dumps(r) + "\n" for r in evals))
  out = tmp_path / "out"
  assert main(["--pool", str(pool), "--eval", str(ev), "--out", str(out), "--n", "1000",
               "--stages", "quality,dedup,decontam,diversity", "--no-pattern", "asy"]) == 0
  report = json.loads((out / "report.json").read_text())
  assert [s["dropped"] for s in report["stages"]] == [8, 12, 6, 0]  # the 2 [asy] rows are kept
  assert main(["--pool", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
  assert "missing.jsonl" in capsys.readouterr().err
