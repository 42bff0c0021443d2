"""`rollout.mesh`: the sampler on a layout of its own (here tensor-parallel), weights resharded on device."""


import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxreason import sharding
from jaxreason.config import load_config
from jaxreason.data.char_tokenizer import build_char_tokenizer
from jaxreason.models import ModelConfig
from jaxreason.models.build import init_model
from jaxreason.rollout import RolloutSampler, load_questions
from jaxreason.yamlconfig import ConfigError


def test_rollouts_on_their_own_mesh_equal_rollouts_on_the_training_mesh(tmp_path):
  tok = build_char_tokenizer()
  base = {"output_dir": str(tmp_path), "algorithm": "grpo", "init_from": "x",
          "data": {"train": ["task:addition:n=8,seed=1,min_digits=2,max_digits=2"]},
          "rollout": {"prompts_per_step": 8, "num_generations": 2, "max_new_tokens": 8, "temperature": 0.0},
          "train": {"global_batch_size": 16}}
  plain = load_config(None, base=base)
  own = load_config(None, base=base, overrides=["rollout.mesh.data=1", "rollout.mesh.fsdp=2", "rollout.mesh.tensor=4"])
  assert own.rollout.mesh == sharding.MeshConfig(data=1, fsdp=2, tensor=4)
  mcfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=4, max_position_embeddings=256)
  train_mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8, tensor=1))
  model = init_model(mcfg, seed=0, mesh=train_mesh)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  questions = load_questions(base["data"]["train"], str(tmp_path), "s1", tok)[:8]
  outs = []
  for cfg in (plain, own):
    roller = RolloutSampler(graphdef, state, mcfg, train_mesh, tok, cfg.rollout)
    roller.set_params(params)
    outs.append(roller.sample(questions, seed=0))
  sampled = roller.sampler.state["layers"]["attn"]["q_proj"]
  assert dict(sampled.sharding.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
  assert sampled.sharding.spec == P(None, None, "tensor", None)  # heads split 4 ways for decoding
  assert outs[0].output.tokens == outs[1].output.tokens
  np.testing.assert_allclose(np.concatenate([np.asarray(x, np.float64) for x in outs[0].output.logprobs]),
                             np.concatenate([np.asarray(x, np.float64) for x in outs[1].output.logprobs]), atol=1e-5)



def test_rollout_engine_and_slots_come_from_the_config(tmp_path):
  """rollout.engine / rollout.slots reach the sampler: the dense engine and continuous batching in
  4 slots (prompts queued and inserted as rows end) give the same temperature-1 samples (per-row seeds)."""
  tok = build_char_tokenizer()
  base = {"output_dir": str(tmp_path), "algorithm": "grpo", "init_from": "x",
          "data": {"train": ["task:addition:n=8,seed=1,min_digits=2,max_digits=3"]},
          "rollout": {"prompts_per_step": 6, "num_generations": 2, "max_new_tokens": 12, "temperature": 1.0},
          "train": {"global_batch_size": 12}}
  mcfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=256)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  model = init_model(mcfg, seed=0, mesh=mesh)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  questions = load_questions(base["data"]["train"], str(tmp_path), "s1", tok)[:6]
  outs = {}
  for sets in (["rollout.engine=dense"], ["rollout.slots=4"]):
    cfg = load_config(None, base=base, overrides=sets)
    roller = RolloutSampler(graphdef, state, mcfg, mesh, tok, cfg.rollout)
    roller.set_params(params)
    outs[sets[0]] = roller.sample(questions, seed=3).output
  dense, cont = outs["rollout.engine=dense"], outs["rollout.slots=4"]
  assert dense.metrics["engine"] == "dense" and dense.metrics["slots"] == 12
  assert cont.metrics["engine"] == "continuous" and cont.metrics["slots"] == 4 and cont.metrics["inserted"] > 0
  assert dense.tokens == cont.tokens
  assert len({len(t) for t in dense.tokens}) > 1  # rows of several lengths: the slots really turned over


@pytest.mark.parametrize("sets, key", [(["rollout.engine=paged"], "rollout.engine"),
                                       (["rollout.slots=1"], "rollout.slots")])
def test_rollout_engine_settings_are_checked(tmp_path, sets, key):
  base = {"output_dir": str(tmp_path), "algorithm": "grpo", "init_from": "x", "rollout": {"num_generations": 2}}
  with pytest.raises(ConfigError, match=key):
    load_config(None, base=base, overrides=sets)
