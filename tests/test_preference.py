"""DPO and reward-model training: pair data, steps against PyTorch and the SPEC §6 formulas,
tiny end-to-end runs that learn, exact resume, load_scorer, clear errors."""

import json
import math
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from hf_models import make_hf_model, save_hf_model_dir
from jaxreason.train import loop as train_loop
from jaxreason import checkpoint
from jaxreason.config import load_config
from jaxreason.data.char_tokenizer import build_char_tokenizer
from jaxreason.data.preference import build_preference_batches
from jaxreason.data.sources import DataError
from jaxreason.models.build import init_model
from jaxreason.models.config import ModelConfig
from jaxreason.models.hf import load_hf_model, param_map
from jaxreason.algorithms.dpo import loss as dpo_loss
from jaxreason.algorithms.registry import run
from jaxreason.algorithms.reward_model import loss as rm_loss
from jaxreason.algorithms.reward_model.loss import SCORE_HEAD, load_scorer
from jaxreason.train.loop import Preempted
from jaxreason.train.state import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=64, eos_token_id=2, pad_token_id=0)


def _write(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def _sums(n, seed):
  """Toy preferences: the right single-digit sum over a wrong one."""
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + rng.choice([-2, -1, 1, 2]))})
  return rows


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
  """A randomly initialised tiny policy checkpoint (the char tokenizer is given in the configs)."""
  path = tmp_path_factory.mktemp("init")
  checkpoint.save_model(init_model(TINY, seed=0), str(path / "checkpoints"), 0)
  return str(path)


def _cfg(tmp, init, algorithm, data, *sets):
  return load_config(None, [
      f"output_dir={tmp}/{algorithm}", "tokenizer=builtin:char", f"algorithm={algorithm}", f"data.train=[{data}]",
      "data.format=preference", "data.seq_len=8", "data.num_epochs=40", "optimizer.lr=1e-2", "optimizer.b2=0.99",
      "schedule.warmup_steps=0", "train.global_batch_size=16", "train.micro_batch_size=8", "train.log_every=1",
      "checkpoint.every_steps=1000", "logging.progress_bar=false", "logging.tensorboard=false",
      *([f"init_from={init}"] if init else []), *sets])


def _metrics(out):
  return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


# ----------------------------------------------------------------------------------------------- data


def test_text_pair_tokens_and_mask_by_hand(tmp_path):
  tok = build_char_tokenizer()
  ids = tok.convert_tokens_to_ids
  eos = ids("<|im_end|>")
  data = _write(tmp_path / "p.jsonl", [
      {"prompt": "12+3=", "chosen": "15", "rejected": "16<|im_end|>"},  # eos already there: not appended again
      {"prompt": "1+1=", "chosen": "2222222", "rejected": "3"},        # chosen cut at 8 tokens
      {"prompt": "1234567+1=", "chosen": "1", "rejected": "2"},        # prompt fills seq_len: dropped
  ])
  b = build_preference_batches([(data, "preference")], tok, seq_len=8, max_tokens=8, global_batch_size=2,
                               shuffle=False)
  assert b.stats["pairs"] == 2 and b.stats["dropped_prompt_too_long"] == 1 and b.stats["truncated"] == 1
  x = b.batch([0, 1])
  assert x["tokens"].shape == (2, 2, 8)
  chosen = [ids(c) for c in "12+3=15"] + [eos]
  rejected = [ids(c) for c in "12+3=16"] + [eos]
  np.testing.assert_array_equal(x["tokens"][0, 0], chosen)
  np.testing.assert_array_equal(x["tokens"][0, 1], rejected)
  np.testing.assert_array_equal(x["response_mask"][0, 0], [0, 0, 0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(x["tokens"][1, 0], [ids(c) for c in "1+1=2222"])
  np.testing.assert_array_equal(x["tokens"][1, 1], [ids(c) for c in "1+1=3"] + [eos, 0, 0])
  np.testing.assert_array_equal(x["response_mask"][1, 1], [0, 0, 0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(x["valid"][1, 1], [1, 1, 1, 1, 1, 1, 0, 0])


def test_chat_pair_renders_the_template(tmp_path, qwen_tokenizer):
  tok = qwen_tokenizer
  user = {"role": "user", "content": "Hello, world!"}
  rows = [{"chosen": [user, {"role": "assistant", "content": "Hi"}],
           "rejected": [user, {"role": "assistant", "content": "Go away"}]},
          {"prompt": [user], "chosen": [{"role": "assistant", "content": "Hi"}],
           "rejected": [{"role": "assistant", "content": "Go away"}]}]
  data = _write(tmp_path / "chat.jsonl", rows)
  b = build_preference_batches([(data, "preference")], tok, seq_len=64, max_tokens=64, global_batch_size=2,
                               shuffle=False)
  x = b.batch([0, 1])
  # Qwen2.5's template with its default system prompt (ids as in test_tokenize), then the assistant turn.
  im_start, im_end, nl = 151644, 151645, 198
  prompt = ([im_start, 8948, nl] + tok.encode("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
            + [im_end, nl, im_start, 872, nl, 9707, 11, 1879, 0, im_end, nl, im_start, 77091, nl])
  for i in range(2):
    for j, text in enumerate(["Hi", "Go away"]):
      expected = prompt + tok.encode(text) + [im_end]  # the end-of-turn token is trained; nothing appended
      n = len(expected)
      np.testing.assert_array_equal(x["tokens"][i, j, :n], expected)
      assert x["valid"][i, j].sum() == n
      np.testing.assert_array_equal(x["response_mask"][i, j, :n], [0] * len(prompt) + [1] * (n - len(prompt)))


def test_missing_key_names_file_and_line_or_is_skipped(tmp_path):
  tok = build_char_tokenizer()
  data = _write(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
                                         {"prompt": "2+2=", "chosen": "4"}, "{not json"])
  with pytest.raises(DataError, match=r"bad.jsonl line 2: .*missing 'rejected'"):
    build_preference_batches([(data, "preference")], tok, seq_len=8, max_tokens=9, global_batch_size=1)
  b = build_preference_batches([(data, "preference")], tok, seq_len=8, max_tokens=9, global_batch_size=1,
                               on_bad_row="skip")
  assert b.stats["pairs"] == 1 and b.stats["bad_rows_skipped"] == 2
  with pytest.raises(ValueError, match="format: preference"):
    build_preference_batches([(data, "s1")], tok, seq_len=8, max_tokens=9, global_batch_size=1)


def test_batches_resume_exactly_and_processes_split_the_global_batch(tmp_path):
  tok = build_char_tokenizer()
  data = _write(tmp_path / "toy.jsonl", _sums(10, seed=1))
  kw = dict(seq_len=8, max_tokens=9, global_batch_size=4, num_epochs=3, seed=7)
  whole = build_preference_batches([(data, "preference")], tok, **kw)
  assert whole.num_batches == 7  # 30 pairs in the stream; the last 2 dropped
  it = iter(whole)
  batches = [next(it)["index"] for _ in range(7)]
  with pytest.raises(StopIteration):
    next(it)
  stream = np.concatenate(batches)  # 28 of the 30 pairs
  assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
  assert not np.array_equal(stream[:10], stream[10:20])  # reshuffled each epoch
  it = iter(whole)
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert state == {"epoch": 1, "index": 2}
  again = iter(whole)
  again.set_state(json.loads(json.dumps(state)))
  for k in range(3, 7):
    np.testing.assert_array_equal(next(again)["index"], batches[k])
  halves = [build_preference_batches([(data, "preference")], tok, process_index=p, process_count=2, **kw)
            for p in range(2)]
  its = [iter(h) for h in halves]
  for k in range(7):
    parts = [next(i) for i in its]
    np.testing.assert_array_equal(np.concatenate([p["index"] for p in parts]), batches[k])
    np.testing.assert_array_equal(parts[1]["tokens"], whole.batch(batches[k][2:])["tokens"])


# ---------------------------------------------------------------------------------- steps vs torch


def _pair_batch(rng, p=4, length=12, vocab=256):
  """Pairs sharing a prompt, right-padded; [P, 2, L]."""
  tokens = np.zeros((p, 2, length), np.int32)
  resp = np.zeros((p, 2, length), np.float32)
  valid = np.zeros((p, 2, length), np.int32)
  for i in range(p):
    prompt = rng.integers(1, vocab, size=int(rng.integers(2, 5)))
    for j in range(2):
      n = int(rng.integers(len(prompt) + 1, length + 1))
      tokens[i, j, :n] = np.concatenate([prompt, rng.integers(1, vocab, size=n - len(prompt))])
      valid[i, j, :n] = 1
      resp[i, j, len(prompt):n] = 1
  return {"tokens": tokens, "response_mask": resp, "valid": valid}


def _torch_seq_logps(hf, batch):
  """Sum of response-token log-probs per sequence (SPEC §6), [P, 2], from HF's logits."""
  p, _, length = batch["tokens"].shape
  tokens = torch.tensor(batch["tokens"].reshape(2 * p, length), dtype=torch.long)
  valid = torch.tensor(batch["valid"].reshape(2 * p, length), dtype=torch.long)
  mask = torch.tensor(batch["response_mask"].reshape(2 * p, length))[:, 1:]
  logits = hf(input_ids=tokens[:, :-1], attention_mask=valid[:, :-1]).logits.float()
  logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
  return (logp * mask).sum(-1).reshape(p, 2), mask.sum(-1).reshape(p, 2)


def _accum(batch, a):
  return {k: jnp.asarray(v.reshape((a, v.shape[0] // a) + v.shape[1:])) for k, v in batch.items()}


def _grads_from_sgd(old, new):
  return jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), old, new)  # sgd(1): new = old - grad


def _check_grads(model_cfg, grads, hf):
  torch_grads = {n: q.grad.numpy() for n, q in hf.named_parameters()}
  for e in param_map(model_cfg):
    ours = grads
    for k in e.path:
      ours = ours[k]
    want = e.to_ours(torch_grads[e.hf_name])
    atol = 3e-6 * max(1.0, float(np.abs(want).max()))  # IPO's squared loss has gradients ~1
    np.testing.assert_allclose(ours, want, atol=atol, rtol=1e-4, err_msg=e.hf_name)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_step_matches_pytorch_and_spec(tmp_path, loss_type):
  beta, s = 0.2, 0.1
  hf, hf_ref = make_hf_model("qwen2_untied", seed=3), make_hf_model("qwen2_untied", seed=4)
  model = load_hf_model(save_hf_model_dir(hf, tmp_path / "pi"), scan_layers=False)  # per-layer paths in _check_grads
  ref_model = load_hf_model(save_hf_model_dir(hf_ref, tmp_path / "ref"), scan_layers=False)
  batch = _pair_batch(np.random.default_rng(0))

  pi, lengths = _torch_seq_logps(hf, batch)
  with torch.no_grad():
    ref, _ = _torch_seq_logps(hf_ref, batch)
  if loss_type == "ipo":
    pi, ref = pi / lengths, ref / lengths
  delta = (pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1])
  logsig = torch.nn.functional.logsigmoid
  if loss_type == "sigmoid":  # SPEC §6 with label smoothing s
    expected = (-(1 - s) * logsig(beta * delta) - s * logsig(-beta * delta)).mean()
  else:
    expected = ((delta - 1 / (2 * beta)) ** 2).mean()
  expected.backward()

  graphdef, st = nnx.split(model)
  params = nnx.to_pure_dict(st)
  ref_params = nnx.to_pure_dict(nnx.state(ref_model))
  tx = optax.sgd(1.0)
  kw = dict(beta=beta, loss_type=loss_type, label_smoothing=s)
  on_the_fly = jax.jit(dpo_loss.make_dpo_step(graphdef, tx, optax.constant_schedule(1.0), precompute_ref=False, **kw))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  new, metrics = on_the_fly(state, _accum(batch, 2), ref_params)  # 2 micro-batches of 2 pairs
  np.testing.assert_allclose(float(metrics["loss"]), expected.item(), rtol=1e-5, atol=1e-6)
  _check_grads(model.cfg, _grads_from_sgd(params, new.params), hf)
  if loss_type == "sigmoid":
    rewards = beta * (pi - ref).detach().numpy()
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), rewards[:, 0].mean(), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["rewards/margin"]), (rewards[:, 0] - rewards[:, 1]).mean(), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["logps/rejected"]), pi[:, 1].mean().item(), rtol=1e-5)

  # Precomputed reference log-probs: the same loss and update.
  ref_logps = jax.jit(dpo_loss.pair_ref_logps(graphdef))(ref_params, {k: jnp.asarray(v) for k, v in batch.items()})
  pre = jax.jit(dpo_loss.make_dpo_step(graphdef, tx, optax.constant_schedule(1.0), precompute_ref=True, **kw))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  new2, metrics2 = pre(state, {**_accum(batch, 2), "ref_logps": jnp.reshape(ref_logps, (2, 2, 2))})
  np.testing.assert_allclose(float(metrics2["loss"]), float(metrics["loss"]), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5),
               new2.params, new.params)


def test_reward_model_step_matches_pytorch(tmp_path):
  coef = 0.05
  hf = make_hf_model("qwen2_tied", seed=5)
  model = load_hf_model(save_hf_model_dir(hf, tmp_path / "m"), scan_layers=False)  # per-layer paths in _check_grads
  batch = _pair_batch(np.random.default_rng(1))
  d = model.cfg.hidden_size
  rng = np.random.default_rng(2)
  w, b = rng.normal(0, 0.5, (d, 1)).astype(np.float32), np.float32(0.3)

  p, _, length = batch["tokens"].shape
  tokens = torch.tensor(batch["tokens"].reshape(2 * p, length), dtype=torch.long)
  valid = torch.tensor(batch["valid"].reshape(2 * p, length), dtype=torch.long)
  hidden = hf.model(input_ids=tokens, attention_mask=valid).last_hidden_state  # final-normed, [2P, L, D]
  last = valid.sum(-1) - 1
  tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
  scores = (hidden[torch.arange(2 * p), last] @ tw)[:, 0] + tb
  rc, rr = scores.reshape(p, 2)[:, 0], scores.reshape(p, 2)[:, 1]
  expected = -torch.nn.functional.logsigmoid(rc - rr).mean() + coef * ((rc + rr) ** 2).mean()  # SPEC §6 + TRL centering
  expected.backward()

  graphdef, st = nnx.split(model)
  params = {**nnx.to_pure_dict(st), SCORE_HEAD: {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
  tx = optax.sgd(1.0)
  step = jax.jit(rm_loss.make_reward_model_step(graphdef, tx, optax.constant_schedule(1.0), center_coef=coef))
  new, metrics = step(TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)),
                      _accum(batch, 2))
  np.testing.assert_allclose(float(metrics["loss"]), expected.item(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), (rc > rr).float().mean().item())
  grads = _grads_from_sgd(params, new.params)
  np.testing.assert_allclose(grads[SCORE_HEAD]["kernel"], tw.grad.numpy(), atol=1e-6, rtol=1e-4)
  np.testing.assert_allclose(grads[SCORE_HEAD]["bias"], tb.grad.numpy(), atol=1e-6, rtol=1e-4)
  _check_grads(model.cfg, grads, hf)


# --------------------------------------------------------------------------------------- end to end


def _pair_accuracy(params, data, init_params=None):
  """Implicit-reward accuracy over every pair of `data` (policy vs reference = init_params)."""
  graphdef, _ = nnx.split(init_model(TINY))
  fn = jax.jit(dpo_loss.pair_ref_logps(graphdef))
  batch = {k: jnp.asarray(v) for k, v in data.batch(range(len(data.pairs))).items() if k != "index"}
  pi, ref = np.asarray(fn(params, batch)), np.asarray(fn(init_params, batch))
  return float(np.mean((pi[:, 0] - ref[:, 0]) > (pi[:, 1] - ref[:, 1])))


def test_dpo_raises_implicit_reward_accuracy(tmp_path, tiny_init):
  data = _write(tmp_path / "toy.jsonl", _sums(64, seed=0))
  cfg = _cfg(tmp_path, tiny_init, "dpo", data, "train.max_steps=120", "dpo.beta=0.5")
  result = run(cfg)
  rows = _metrics(cfg.output_dir)
  assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy = reference at step 1
  late = rows[-20:]
  assert np.mean([r["rewards/accuracy"] for r in late]) >= 0.8
  assert np.mean([r["loss"] for r in late]) < 0.45
  assert result["metrics"]["rewards/margin"] > 0
  for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm", "lr",
              "tokens_per_sec"):
    assert key in rows[-1]
  # The saved checkpoint is an ordinary policy: it loads as a model and the whole set now prefers chosen.
  trained = checkpoint.load_model(cfg.output_dir)
  init = checkpoint.load_model(tiny_init)
  pairs = build_preference_batches([(data, "preference")], build_char_tokenizer(), seq_len=8, max_tokens=9,
                                   global_batch_size=16)
  acc = _pair_accuracy(nnx.to_pure_dict(nnx.state(trained)), pairs, nnx.to_pure_dict(nnx.state(init)))
  assert acc >= 0.8  # 0 before training (policy = reference)


def test_dpo_precompute_ref_and_on_the_fly_agree_and_resume_exactly(tmp_path, tiny_init, monkeypatch, preempt_after):
  data = _write(tmp_path / "toy.jsonl", _sums(32, seed=2))
  base = ("train.max_steps=6", "data.num_epochs=3")
  a = _cfg(tmp_path / "a", tiny_init, "dpo", data, *base)
  run(a)
  b = _cfg(tmp_path / "b", tiny_init, "dpo", data, *base, "dpo.precompute_ref=false")
  run(b)
  la, lb = [r["loss"] for r in _metrics(a.output_dir)], [r["loss"] for r in _metrics(b.output_dir)]
  np.testing.assert_allclose(lb, la, rtol=1e-5)

  # Interrupted (SIGTERM seen after step 4), then resumed: the same losses and final weights as straight.
  c = _cfg(tmp_path / "c", tiny_init, "dpo", data, *base)
  preempt_after(train_loop, 4)
  with pytest.raises(Preempted, match="4"):
    run(c)
  monkeypatch.undo()
  run(c)
  lc = {r["step"]: r["loss"] for r in _metrics(c.output_dir)}
  assert [lc[s] for s in range(1, 7)] == la
  _assert_same(checkpoint.load_model(a.output_dir), checkpoint.load_model(c.output_dir))


def _assert_same(m1, m2):
  f1, f2 = nnx.to_flat_state(nnx.state(m1)), nnx.to_flat_state(nnx.state(m2))
  for (p1, x), (p2, y) in zip(f1, f2):
    assert p1 == p2
    np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]))


def _rm_params(run_dir):
  import orbax.checkpoint as ocp
  directory, step = checkpoint.resolve_checkpoint(run_dir)
  with ocp.CheckpointManager(directory) as m:
    return m.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore())).params


def test_reward_model_learns_scores_and_resumes_exactly(tmp_path, monkeypatch, preempt_after):
  rows = _sums(64, seed=0)
  data = _write(tmp_path / "toy.jsonl", rows)
  base = ("train.max_steps=120", "model.vocab_size=128", "model.hidden_size=32", "model.intermediate_size=64",
          "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.max_position_embeddings=64")
  a = _cfg(tmp_path / "a", None, "reward_model", data, *base)  # from scratch (no init_from)
  run(a)
  m = _metrics(a.output_dir)
  assert np.mean([r["accuracy"] for r in m[-20:]]) >= 0.8 > np.mean([r["accuracy"] for r in m[:10]]) + 0.15
  assert np.mean([r["loss"] for r in m[-20:]]) < 0.4
  score = load_scorer(a.output_dir)
  prompts = [r["prompt"] for r in rows]
  sc, sr = score(prompts, [r["chosen"] for r in rows]), score(prompts, [r["rejected"] for r in rows])
  assert sc.dtype == np.float32 and sc.shape == (64,)
  assert np.mean(sc > sr) >= 0.8
  with pytest.raises(ValueError, match="reward model checkpoint"):
    checkpoint.load_model(a.output_dir)  # export / eval load policies this way
  # As a GRPO reward ("reward_model:PATH", weighted with a rule reward): the scorer's values.
  from jaxreason.rollout import Completions, Question, Rewards
  from jaxreason.sampling.sampler import SamplingOutput
  qs = [Question(id=i, text=r["prompt"], ids=(1,), answer="0") for i, r in enumerate(rows[:4])]
  texts = [x for r in rows[:4] for x in (r["chosen"], r["rejected"])]
  out = SamplingOutput(tokens=[[1]] * 8, logprobs=[], entropies=[], injected=[], finish_reason=["stop"] * 8,
                       thinking_tokens=np.zeros(8), answer_tokens=np.zeros(8), waits=np.zeros(8),
                       forced_end=np.zeros(8, bool), truncated=np.zeros(8, bool), prompt_index=np.repeat(np.arange(4), 2))
  rewards = Rewards({f"reward_model:{a.output_dir}": 0.5, "gsm8k": 1.0}, "s1")
  got = rewards(Completions(qs, 2, out, texts, texts))
  want = score([q.text for q in qs for _ in range(2)], texts)
  np.testing.assert_allclose(got[f"reward_model:{a.output_dir}"], want, rtol=1e-6)
  np.testing.assert_allclose(got["reward"], 0.5 * want + got["gsm8k"], rtol=1e-6)

  b = _cfg(tmp_path / "b", None, "reward_model", data, *base)
  preempt_after(train_loop, 50)
  with pytest.raises(Preempted, match="50"):
    run(b)
  monkeypatch.undo()
  run(b)
  lb = {r["step"]: r["loss"] for r in _metrics(b.output_dir)}
  assert [lb[s] for s in range(1, 121)] == [r["loss"] for r in m]
  pa, pb = _rm_params(a.output_dir), _rm_params(b.output_dir)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), pa, pb)


# ------------------------------------------------------------------------------- errors and config


def test_dpo_needs_init_from_and_scorer_needs_a_reward_model(tmp_path, tiny_init):
  data = _write(tmp_path / "toy.jsonl", _sums(16, seed=0))
  with pytest.raises(ValueError, match="dpo needs init_from"):
    run(_cfg(tmp_path, None, "dpo", data))
  with pytest.raises(ValueError, match="not a reward model checkpoint"):
    load_scorer(tiny_init)
  with pytest.raises(ValueError, match="no preference data"):
    run(_cfg(tmp_path, tiny_init, "dpo", data, "data.train=[]"))


def test_self_pairs_are_built_then_trained_on(tmp_path, tiny_init, monkeypatch):
  """The real sampler answers the questions; (right, wrong) pairs are built and DPO trains on them
  (data.train is empty: the pairs are the only data). "Right" = even (non-zero) length, so that a random
  policy has both kinds."""
  from jaxreason.algorithms.dpo import self_pairs

  class EvenLength(self_pairs.Rewards):
    def __call__(self, c):
      return {**super().__call__(c), "correct": np.asarray([len(t) > 0 and len(t) % 2 == 0 for t in c.texts])}

  monkeypatch.setattr(self_pairs, "Rewards", EvenLength)
  cfg = _cfg(tmp_path, tiny_init, "dpo", "unused", "data.train=[]", "dpo.self_pairs=task:addition:n=8",
             "train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=null", "data.seq_len=48",
             "rollout.format=raw", "rollout.max_new_tokens=6", "rollout.num_generations=4",
             "rollout.prompts_per_step=8")
  out = run(cfg)
  assert out["final_step"] == 2
  pairs = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "data", "pairs.jsonl"))]
  assert pairs and all(len(p["chosen"]) % 2 == 0 and len(p["rejected"]) % 2 == 1 for p in pairs)
  m = _metrics(cfg.output_dir)
  assert [r["step"] for r in m] == [1, 2]
  # Step 1: the policy is the reference, so every pair's sigmoid DPO loss is -log sigmoid(0).
  np.testing.assert_allclose(m[0]["loss"], math.log(2), rtol=1e-5)
  assert m[1]["loss"] != m[0]["loss"]  # the update changed the policy


def test_quickstart_dpo_config_is_valid():
  cfg = load_config(os.path.join(REPO, "configs", "quickstart_dpo.yaml"))
  sft = load_config(os.path.join(REPO, "configs", "quickstart.yaml"))
  assert cfg.algorithm == "dpo" and cfg.init_from == "runs/quickstart" and cfg.dpo.self_pairs
  assert cfg.eval == sft.eval  # held_out() drops the SFT run's training questions too (init_from lineage)
