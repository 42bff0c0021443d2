"""Rollouts split across processes: the same rollouts (question id, sample index -> token ids,
log-probs, rewards; temperature sampling) on 1 device, 8 fake devices and 2 processes x 4 fake
devices, where each process samples and grades only its share of the questions.

The 2-process run is this file run as a script under jax.distributed (gloo CPU collectives)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "task:addition:n=12,seed=1,min_digits=2,max_digits=2"
GRADED = []  # rows graded in this process (by question id), appended by `digits`


def digits(response: str, answer) -> float:
  """Toy per-row reward: the share of digits in the completion (records that it ran here)."""
  GRADED.append(answer)
  return sum(ch.isdigit() for ch in response) / max(1, len(response))


def rollouts(out_dir: str, mesh_cfg, devices=None) -> dict:
  """Samples 12 questions x 3 (two sampler batches of 8 and 4 questions) from a random model on
  a training mesh `mesh_cfg`; returns {(qid, k): (tokens, logprobs, reward)} and what ran here."""
  from flax import nnx

  from jaxreason import sharding
  from jaxreason.config import load_config
  from jaxreason.data.char_tokenizer import build_char_tokenizer
  from jaxreason.models import ModelConfig
  from jaxreason.models.build import init_model
  from jaxreason.rollout import Rewards, RolloutSampler, load_questions

  tok = build_char_tokenizer()
  cfg = load_config(None, base={
      "output_dir": out_dir, "algorithm": "grpo", "init_from": "x", "data": {"train": [SPEC]},
      "rollout": {"prompts_per_step": 12, "num_generations": 3, "max_new_tokens": 10, "temperature": 1.0,
                  "batch_size": 8},
      "train": {"global_batch_size": 36}})
  mcfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=256)
  mesh = sharding.make_mesh(mesh_cfg, devices)
  graphdef, state = nnx.split(init_model(mcfg, seed=0, mesh=mesh))
  questions = load_questions([SPEC], os.path.join(out_dir, str(os.getpid())), "s1", tok)
  roller = RolloutSampler(graphdef, state, mcfg, mesh, tok, cfg.rollout)
  roller.set_params(nnx.to_pure_dict(state))
  fractions = []  # on several processes: per weight, the share of it one device holds on the way
  if roller.split:
    import jax
    for x in jax.tree.leaves(roller._to_local_layout(nnx.to_pure_dict(state))):
      fractions.append(max(sh.data.size for sh in x.addressable_shards) / x.size)
  rewards = Rewards({f"{__name__}:digits": 1.0}, "s1", accuracy=f"{__name__}:digits")
  GRADED.clear()
  c, r = roller.sample(questions, seed=11, rewards=rewards)
  rows = {f"{c.question(i).id}/{i % 3}": (c.output.tokens[i], np.asarray(c.output.logprobs[i]).tolist(),
                                          float(r["reward"][i])) for i in range(len(c))}
  local = c.local_rows.tolist() if c.local_rows is not None else list(range(len(c)))
  return {"rows": rows, "local_rows": local, "graded": len(GRADED),  # the verifier is the reward: one call a row
          "sampler_mesh": dict(roller.mesh.shape), "tokens": c.output.metrics["tokens"], "fractions": fractions}


def _assert_same(a: dict, b: dict):
  assert sorted(a["rows"]) == sorted(b["rows"])
  for key in a["rows"]:
    (ta, la, ra), (tb, lb, rb) = a["rows"][key], b["rows"][key]
    assert ta == tb, key
    np.testing.assert_allclose(la, lb, atol=2e-5, err_msg=key)
    assert ra == rb, key


def _one_device(tmp_path) -> dict:
  import jax

  from jaxreason import sharding
  return rollouts(str(tmp_path), sharding.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def test_rollouts_on_one_device_equal_eight_devices(tmp_path):
  from jaxreason import sharding
  one = _one_device(tmp_path)
  eight = rollouts(str(tmp_path), sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  lengths = {len(t) for t, _, _ in one["rows"].values()}
  assert len(one["rows"]) == 36 and len(lengths) > 1, lengths  # samples of varied length
  assert len({tuple(t) for t, _, _ in one["rows"].values()}) > 30  # temperature sampling: rows differ
  _assert_same(one, eight)
  assert one["graded"] == eight["graded"] == 36


@pytest.mark.slow  # two fresh JAX processes (~40 s of start-up and compilation on 2 cores)
def test_two_processes_split_rollouts_and_equal_one_device(tmp_path):
  one = _one_device(tmp_path)
  port = 21000 + (os.getpid() + 13) % 9000
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_cpu_collective_timeout_seconds=900",
               PYTHONPATH=os.pathsep.join([REPO, os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    procs.append(subprocess.Popen(
        [sys.executable, __file__, str(tmp_path), f"127.0.0.1:{port}", str(pid)], env=env, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
  for p in procs:
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-3000:]
  got = [json.load(open(tmp_path / f"proc{pid}.json")) for pid in range(2)]
  for g in got:
    _assert_same(one, {"rows": {k: tuple(v) for k, v in g["rows"].items()}})
    assert g["sampler_mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}  # this process's 4 devices
    assert g["tokens"] == sum(len(t) for t, _, _ in one["rows"].values())  # the whole batch's count
    # The weights reach the local samplers sharded as they use them (tensor 2 within a process), not
    # replicated on every device first: the tensor-parallel weights are halved on each device.
    assert min(g["fractions"]) == 0.5 and max(g["fractions"]) == 1.0, g["fractions"]
  # Each process sampled and graded only its share: batch 1 (8 questions) 4 + 4, batch 2 (4) 2 + 2.
  assert got[0]["local_rows"] == list(range(0, 12)) + list(range(24, 30))
  assert got[1]["local_rows"] == list(range(12, 24)) + list(range(30, 36))
  assert got[0]["graded"] == got[1]["graded"] == 18


if __name__ == "__main__":  # one process of the 2-process run
  out, address, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=pid)
  from jaxreason import sharding
  result = rollouts(out, sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  with open(os.path.join(out, f"proc{pid}.json"), "w") as f:
    json.dump(result, f)
