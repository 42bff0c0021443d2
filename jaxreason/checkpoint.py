"""Orbax checkpoints of jaxreason models: layout, save, restore onto any mesh.

Layout (the trainer adds its own items next to these in each step):

  RUN_DIR/checkpoints/<step>/params        the model's nnx.State (Orbax StandardSave)
  RUN_DIR/checkpoints/<step>/model_config  ModelConfig as JSON (each step is self-contained)

`resolve_checkpoint` accepts a step directory, a `checkpoints/` directory or a run directory
(latest step). A reward model's steps also hold a `reward_model` JSON item (its params are the
decoder's plus a `score_head`): `load_model` refuses them, `jaxreason.algorithms.reward_model.loss.load_scorer`
loads them. Restoring builds abstract arrays with the target mesh's shardings, so a checkpoint
saved on 8 devices restores on 1 (and the reverse). Saves are atomic: Orbax writes to a temporary
directory and renames it when complete, so an interrupted save leaves the previous step intact.

Integrity: each step also holds an `integrity` JSON item (Orbax keeps no checksums of its own):
per saved array tree, for every leaf, a 32-bit checksum (the sum of the values' bit patterns
modulo 2^32; any single flipped bit changes it) and its count of non-finite values. `load_model`
and the trainer's restore recompute both; a mismatch, non-finite parameters, or a step that
cannot be read (truncated files) raise `CheckpointError` naming the step, so export and eval
refuse such weights and the trainer falls back to an earlier step. Steps saved before this item
existed are checked for finite parameters only.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxreason import sharding
from jaxreason.errors import CheckpointError
from jaxreason.models.build import abstract_model
from jaxreason.models.config import ModelConfig, RopeScaling
from jaxreason.models.transformer import Transformer


def config_to_json(cfg: ModelConfig) -> dict:
  return dataclasses.asdict(cfg)


def config_from_json(d: dict) -> ModelConfig:
  d = dict(d)
  d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
  if isinstance(d.get("eos_token_id"), list):
    d["eos_token_id"] = tuple(d["eos_token_id"])
  d.setdefault("scan_layers", False)  # checkpoints written before the option are unscanned
  return ModelConfig(**d)


def _is_step_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "model_config"))


def resolve_checkpoint(path: str) -> tuple[str, int]:
  """(checkpoints directory, step) for a step dir, a checkpoints dir or a run dir (latest step)."""
  path = os.path.abspath(path)
  if _is_step_dir(path):
    parent, name = os.path.split(path)
    if not name.isdigit():
      raise ValueError(f"{path}: a checkpoint step directory must be named by its step number")
    return parent, int(name)
  for candidate in (path, os.path.join(path, "checkpoints")):
    if os.path.isdir(candidate):
      steps = sorted(int(n) for n in os.listdir(candidate)
                     if n.isdigit() and _is_step_dir(os.path.join(candidate, n)))
      if steps:
        return candidate, steps[-1]
  raise FileNotFoundError(
      f"{path}: no Orbax checkpoint found (expected STEP/params and STEP/model_config under it or "
      "under its checkpoints/ folder). Pass a run directory, its checkpoints/ folder, or one step.")


def is_checkpoint(path: str) -> bool:
  try:
    resolve_checkpoint(path)
    return True
  except (FileNotFoundError, ValueError):
    return False


REWARD_MODEL_ITEM = "reward_model"


def is_reward_model(path: str) -> bool:
  """Whether the checkpoint at `path` is a reward model (decoder + score head), not a policy."""
  directory, step = resolve_checkpoint(path)
  return os.path.isdir(os.path.join(directory, str(step), REWARD_MODEL_ITEM))


def find_tokenizer_dir(path: str) -> str | None:
  """The `tokenizer/` folder a run keeps beside `checkpoints/` (None if there is none)."""
  directory, _ = resolve_checkpoint(path)
  candidate = os.path.join(os.path.dirname(directory), "tokenizer")
  return candidate if os.path.isdir(candidate) else None


def tokenizer_dir_for(model_path: str) -> str:
  """Where the tokenizer of a model lives: a checkpoint run's `tokenizer/`, or the HF dir itself."""
  if not os.path.exists(model_path):
    raise FileNotFoundError(f"{model_path}: no such model directory (expected a HuggingFace model directory "
                            "or an Orbax run / checkpoints / step directory)")
  if not is_checkpoint(model_path):
    return model_path
  tok_dir = find_tokenizer_dir(model_path)
  if tok_dir is None:
    raise FileNotFoundError(f"{model_path}: the checkpoint's run has no tokenizer/ folder; "
                            "give the tokenizer directory explicitly (--tokenizer / `tokenizer:`)")
  return tok_dir


INTEGRITY_ITEM = "integrity"


def _leaf_sums(x):
  """(checksum uint32, non-finite count int32) of one array, computed on its devices."""
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
  if bits is None or x.dtype == jnp.bool_:
    as_int = x.astype(jnp.uint32)
  else:
    as_int = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)
  checksum = jnp.sum(as_int, dtype=jnp.uint32)
  bad = jnp.sum(~jnp.isfinite(x)).astype(jnp.int32) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.int32(0)
  return checksum, bad


_tree_sums = jax.jit(lambda tree: (jax.tree.map(lambda x: _leaf_sums(x)[0], tree),
                                    jax.tree.map(lambda x: _leaf_sums(x)[1], tree)))


def fingerprint(tree) -> dict[str, list[int]]:
  """{leaf path: [checksum, non-finite count]} of an array tree (one small device-to-host copy)."""
  sums, bad = jax.device_get(_tree_sums(tree))
  flat = jax.tree_util.tree_flatten_with_path(sums)[0]
  return {jax.tree_util.keystr(path): [int(c), int(b)] for (path, c), b in zip(flat, jax.tree.leaves(bad))}


def check_integrity(where: str, trees: dict, saved: dict | None) -> None:
  """Raises CheckpointError when a restored tree has non-finite parameters or differs from the
  checksums `saved` with it (`saved` None: a step from before checksums, finite check only)."""
  for name, tree in trees.items():
    got = fingerprint(tree)
    want = (saved or {}).get(name)
    if want is not None:
      if set(want) != set(got):
        raise CheckpointError(f"{where}: item {name!r} does not have the saved structure; the step is corrupt")
      for path, (c, _) in got.items():
        if want[path][0] != c:
          raise CheckpointError(f"{where}: {name}{path} does not match its saved checksum; the step is corrupt")
    if name == "params":
      bad = {p: b for p, (_, b) in got.items() if b}
      if bad:
        first = next(iter(bad))
        raise CheckpointError(f"{where}: parameters are not finite ({sum(bad.values())} NaN/inf values, "
                              f"first in {first}); refusing to use these weights")


def save_model(model: Transformer, directory: str, step: int) -> None:
  """Saves `model` as `directory/<step>` (synchronously; the trainer uses its own async manager)."""
  params = nnx.to_pure_dict(nnx.state(model))
  with ocp.CheckpointManager(os.path.abspath(directory),
                             options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False)) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        model_config=ocp.args.JsonSave(config_to_json(model.cfg)),
        **{INTEGRITY_ITEM: ocp.args.JsonSave({"params": fingerprint(params)})}))
    mngr.wait_until_finished()


def read_json_item(directory: str, step: int, item: str) -> dict | None:
  """A JSON item of a step, or None when the step does not have it."""
  if not os.path.isdir(os.path.join(directory, str(step), item)):
    return None
  with ocp.CheckpointManager(directory) as mngr:
    return dict(mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item])


def load_model_config(path: str) -> ModelConfig:
  """The ModelConfig stored with a checkpoint (step, checkpoints or run directory)."""
  directory, step = resolve_checkpoint(path)
  try:
    with ocp.CheckpointManager(directory) as mngr:
      meta = mngr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{os.path.join(directory, str(step))}: cannot read the model config "
                          f"({short_error(e)})") from e
  return config_from_json(meta.model_config)


def load_model(path: str, *, mesh: Mesh | None = None, rules: sharding.Rules = sharding.TRAIN_RULES,
               **overrides) -> Transformer:
  """Restores a model from a step/checkpoints/run directory, sharded on `mesh` (or one device).

  `overrides` replace execution fields of the stored config (dtype, attention_backend, remat,
  scan_layers). The stored layer layout is restored, then converted when `scan_layers` differs.
  """
  directory, step = resolve_checkpoint(path)
  if is_reward_model(path):
    raise ValueError(f"{path}: this is a reward model checkpoint (a decoder with a score head), not a policy; "
                     "it cannot be sampled, evaluated or exported as a language model. Load it with "
                     "jaxreason.algorithms.reward_model.loss.load_scorer, or use it as the reward 'reward_model:PATH'.")
  stored = load_model_config(path)
  cfg = stored.replace(**overrides)
  from jaxreason.lora.checkpoint import load_merged, lora_pointer
  pointer = lora_pointer(directory, step)
  if pointer is not None:  # a LoRA step: its adapters merged into the base it points at
    from jaxreason.models.layout import with_scan_layers
    merged = load_merged(directory, step, pointer, stored, mesh, rules)[0]
    if cfg.dtype != stored.dtype or cfg.attention_backend != stored.attention_backend or cfg.remat != stored.remat:
      graphdef, state = nnx.split(merged)
      merged = nnx.merge(nnx.split(abstract_model(cfg.replace(scan_layers=stored.scan_layers)))[0], state)
    return with_scan_layers(merged, cfg.scan_layers)
  where = os.path.join(directory, str(step))
  # Restored in the layout it was saved in (integrity is checked on the saved leaf paths), then converted.
  graphdef, target = abstract_params(cfg.replace(scan_layers=stored.scan_layers), mesh, rules)
  try:
    with ocp.CheckpointManager(directory) as mngr:
      restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    saved = read_json_item(directory, step, INTEGRITY_ITEM)
  except Exception as e:  # TensorStore / Orbax errors of a truncated or damaged step
    raise CheckpointError(f"{where}: the checkpoint cannot be read ({short_error(e)}); "
                          "it is truncated or damaged") from e
  check_integrity(where, {"params": restored.params}, saved)
  from jaxreason.models.layout import with_scan_layers
  return with_scan_layers(nnx.merge(graphdef, restored.params), cfg.scan_layers)


def short_error(e: BaseException) -> str:
  """The first line of a (TensorStore / Orbax) error, without its multi-line details."""
  text = str(e).strip()
  line = text.splitlines()[0] if text else type(e).__name__
  line = line.split(" See full TensorStore details")[0].rstrip(". ")
  return line if len(line) < 300 else line[:300] + " ..."


def abstract_params(cfg: ModelConfig, mesh: Mesh | None = None,
                    rules: sharding.Rules = sharding.TRAIN_RULES):
  """(graphdef, pure dict of ShapeDtypeStructs carrying the target shardings) for restoring."""
  graphdef, abs_state = nnx.split(abstract_model(cfg))
  if mesh is None:
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  shardings = sharding.pure_shardings(abs_state, mesh, rules)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nnx.to_pure_dict(abs_state), shardings)
  return graphdef, target
