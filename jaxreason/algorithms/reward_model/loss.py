"""Pairwise (Bradley-Terry) reward model loss, as in TRL's RewardTrainer (InstructGPT-style RM).

SPEC §6: a scalar head on the decoder's last non-pad hidden state; loss -logsigmoid(r_chosen -
r_rejected) averaged over pairs. Optional TRL `center_rewards_coefficient` term
coef * mean((r_chosen + r_rejected)^2) (off by default). No margin term.

The model is the decoder plus SCORE_HEAD, a linear layer on the final-normed hidden state of each
sequence's last token (HF's AutoModelForSequenceClassification `score`, here with a bias); its
checkpoints carry a `reward_model` item (`jaxreason.checkpoint.is_reward_model`). `load_scorer`
turns a trained one into a batch scoring function (GRPO's `reward_model:PATH` reward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxreason.algorithms.pairs import make_pair_step


def last_token_index(mask: Int[Array, "B T"]) -> Int[Array, "B"]:
  """Index of each row's last non-pad position (mask or segment ids, > 0 = real token); 0 if none."""
  t = mask.shape[1]
  return jnp.max(jnp.where(mask > 0, jnp.arange(t)[None, :], 0), axis=1)


def reward_scores(hidden: Float[Array, "B T D"], head_w: Float[Array, "D"], head_b: Float[Array, ""],
                  mask: Int[Array, "B T"]) -> Float[Array, "B"]:
  """Scalar score of each row from its last non-pad hidden state (float32)."""
  idx = last_token_index(mask)  # [B]
  # [B, D]
  last = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
  w = jnp.asarray(head_w).reshape(-1)
  return jnp.einsum("BD,D->B", last, w.astype(last.dtype), preferred_element_type=jnp.float32) + \
      jnp.asarray(head_b, jnp.float32).reshape(())


def pairwise_loss(r_chosen: Float[Array, "B"], r_rejected: Float[Array, "B"], *, center_coef: float = 0.0):
  """mean(-logsigmoid(r_chosen - r_rejected)) -> (loss, metrics)."""
  rc, rr = jnp.asarray(r_chosen, jnp.float32), jnp.asarray(r_rejected, jnp.float32)
  loss = jnp.mean(-jax.nn.log_sigmoid(rc - rr))
  if center_coef:
    loss = loss + center_coef * jnp.mean((rc + rr) ** 2)
  metrics = {
      "accuracy": jnp.mean((rc > rr).astype(jnp.float32)),
      "reward_chosen": jnp.mean(rc),
      "reward_rejected": jnp.mean(rr),
      "margin": jnp.mean(rc - rr),
  }
  return loss, metrics


# ---------------------------------------------------------------------------------------------
# The model: the decoder's pure param dict plus SCORE_HEAD {"kernel": [D, 1], "bias": []}
# (HF's `score` layer of AutoModelForSequenceClassification, with a bias).

SCORE_HEAD = "score_head"


def init_score_head(hidden_size: int, std: float, seed: int, dtype=jnp.float32) -> dict:
  """N(0, std) kernel (HF initialises its score layer with initializer_range), zero bias."""
  kernel = std * jax.random.normal(jax.random.key(seed), (hidden_size, 1), dtype)
  return {"kernel": kernel, "bias": jnp.zeros((), dtype)}


def decoder_params(params: dict) -> dict:
  return {k: v for k, v in params.items() if k != SCORE_HEAD}


def sequence_scores(graphdef, params: dict, tokens: Int[Array, "B T"], valid: Int[Array, "B T"]) -> Float[Array, "B"]:
  """Score of each right-padded row (valid = 1 on tokens) from its last token's hidden state."""
  from flax import nnx
  model = nnx.merge(graphdef, decoder_params(params))
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  hidden, _ = model.hidden_states(tokens, positions, valid)
  head = params[SCORE_HEAD]
  return reward_scores(hidden, head["kernel"], head["bias"], valid)


def pair_scores(graphdef, params: dict, batch: dict[str, jax.Array]) -> Float[Array, "P 2"]:
  """Scores of each pair's (chosen, rejected); batch: tokens, valid [P, 2, L] (jaxreason.data.preference)."""
  p, _, length = batch["tokens"].shape
  flat = lambda x: x.reshape(2 * p, length)
  return sequence_scores(graphdef, params, flat(batch["tokens"]), flat(batch["valid"])).reshape(p, 2)


def load_scorer(path: str, *, batch_size: int = 32, max_len: int | None = None, tokenizer=None, **overrides):
  """A trained reward model (run dir, checkpoints dir or step) as score(prompts, responses) -> float32 [N].

  Each (prompt, response) is tokenised as in training (`data.preference.encode_response`: the
  response gets the eos unless it ends with it), cut to `max_len` tokens (default: the run's
  data.seq_len), and scored in jitted batches of at most `batch_size` rows, padded to power-of-two
  row counts and lengths so that few shapes compile. `overrides`: execution fields (dtype, ...).
  """
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding, PartitionSpec

  from jaxreason import checkpoint
  from jaxreason.data.preference import encode_response
  from jaxreason.data.tokenizer import load_tokenizer

  directory, step = checkpoint.resolve_checkpoint(path)
  if not checkpoint.is_reward_model(path):
    raise ValueError(f"{path}: not a reward model checkpoint (no {checkpoint.REWARD_MODEL_ITEM!r} item); it looks like "
                     "a policy. Train a reward model with `algorithm: reward_model` and pass its run directory.")
  cfg = checkpoint.load_model_config(path).replace(**overrides)
  graphdef, target = checkpoint.abstract_params(cfg)
  one = NamedSharding(jax.tree.leaves(target)[0].sharding.mesh, PartitionSpec())
  dtype = jnp.dtype(cfg.param_dtype)
  target[SCORE_HEAD] = {"kernel": jax.ShapeDtypeStruct((cfg.hidden_size, 1), dtype, sharding=one),
                        "bias": jax.ShapeDtypeStruct((), dtype, sharding=one)}
  from jaxreason.lora.checkpoint import load_merged_params, lora_pointer
  pointer = lora_pointer(directory, step)
  if pointer is not None:  # LoRA: adapters + score head on the base it points at, merged
    stored = checkpoint.load_model_config(path)
    graphdef, params, _, _ = load_merged_params(directory, step, pointer, stored, extras={SCORE_HEAD: target[SCORE_HEAD]})
    info = checkpoint.read_json_item(directory, step, checkpoint.REWARD_MODEL_ITEM)
  else:
    with ocp.CheckpointManager(directory) as mngr:
      restored = mngr.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(target), **{checkpoint.REWARD_MODEL_ITEM: ocp.args.JsonRestore()}))
    params, info = restored.params, restored[checkpoint.REWARD_MODEL_ITEM]
  tok = tokenizer or load_tokenizer(checkpoint.tokenizer_dir_for(path))
  limit = max_len or int(info.get("seq_len") or cfg.max_position_embeddings)
  fn = jax.jit(lambda p, t, v: sequence_scores(graphdef, p, t, v))

  def bucket(n: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, 1 << (n - 1).bit_length()))

  def score(prompts, responses) -> np.ndarray:
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    seqs = [encode_response(tok, p, r)[0][:limit] for p, r in zip(prompts, responses)]
    out = np.zeros(len(seqs), np.float32)
    for start in range(0, len(seqs), batch_size):
      chunk = seqs[start:start + batch_size]
      rows, width = bucket(len(chunk), 1, batch_size), bucket(max(map(len, chunk)), 16, limit)
      tokens, valid = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
      for i, ids in enumerate(chunk):
        tokens[i, :len(ids)], valid[i, :len(ids)] = ids, 1
      out[start:start + len(chunk)] = np.asarray(fn(params, tokens, valid))[:len(chunk)]
    return out

  return score


def make_reward_model_step(graphdef, tx, schedule, *, center_coef: float = 0.0):
  """step(state, batch) -> (state, metrics); params = decoder + SCORE_HEAD (see `algorithms.pairs`)."""
  def mean_loss(params, mb):
    scores = pair_scores(graphdef, params, mb)  # [P, 2]
    return pairwise_loss(scores[:, 0], scores[:, 1], center_coef=center_coef)

  return make_pair_step(tx, schedule, mean_loss)
