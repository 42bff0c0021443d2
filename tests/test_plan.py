"""`python -m jaxreason.plan`: topologies, presets, and AOT compiles for a TPU topology checked against
independent arithmetic (parameters x bytes, Adam moments, KV cache = 2 x L x rows x len x K x H x bytes)."""

import math
import os

import pytest

from jaxreason.config import load_config
from jaxreason.plan import run
from jaxreason.plan.presets import preset
from jaxreason.plan.topology import GIB, parse_topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_topology_names():
  assert parse_topology("v5e-8").shape == (2, 4) and parse_topology("v5e-8").num_chips == 8
  assert parse_topology("v5p-64").num_chips == 32 and parse_topology("v5p-64").shape == (2, 4, 4)
  assert parse_topology("v4-8").shape == (2, 2, 1)
  assert parse_topology("v6e-256").shape == (16, 16)
  assert parse_topology("h100:8").platform == "gpu"
  with pytest.raises(ValueError, match="unknown kind"):
    parse_topology("v9-8")


def test_presets_have_the_published_sizes():
  # Parameter counts from the model cards (billions).
  for name, billions in [("qwen2.5-0.5b", 0.49), ("qwen2.5-7b", 7.61), ("qwen2.5-32b", 32.76), ("qwen3-8b", 8.19),
                         ("qwen3-0.6b", 0.60), ("llama3.1-8b", 8.03), ("llama3.2-1b", 1.24)]:
    assert abs(preset(name).num_params() / 1e9 - billions) < 0.01, name


def _tpu():
  pytest.importorskip("libtpu", reason="compile-only TPU devices need libtpu (in the dev extra)")
  return parse_topology("v5e-8")


SMALL = ["init_from=null", "tokenizer=builtin:char", "model.dtype=bfloat16", "model.param_dtype=float32",
         "model.remat=full", "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"]


def _small_model():
  # Qwen2.5-0.5B's widths at 4 layers: small enough for CI, wide enough that the sharded shards are
  # the real ones (embed 896 over fsdp 8, vocab 151936).
  return preset("qwen2.5-0.5b", dtype="bfloat16", param_dtype="float32", remat="full").replace(num_layers=4)


def _check_train(rep, model, micro, seq, keys, devices=8):
  n = model.num_params()
  # Independent figures: fp32 params and two fp32 Adam moments, split over all 8 devices (fsdp); the
  # batch: `keys` int32/float32 arrays [accum, micro, seq] split over the 8 devices.
  params, moments = n * 4 / devices, 2 * n * 4 / devices
  batch = keys * micro * seq * 4 / devices
  assert rep.compiled, rep.error
  assert rep.argument == pytest.approx(params + moments + batch, rel=0.02)
  assert rep.params == pytest.approx(params, rel=0.02)
  assert rep.opt_state == pytest.approx(moments, rel=0.02)
  # Temporaries hold at least the fp32 gradient accumulator (params-sized) and stay within budget.
  assert params <= rep.temp < 15.75 * GIB


@pytest.mark.parametrize("algo", ["sft", "grpo"])
def test_aot_on_v5e_8_matches_independent_estimates(algo):
  topo = _tpu()
  sets = SMALL + ["train.global_batch_size=16", "train.micro_batch_size=8"]
  if algo == "sft":
    sets += ["data.seq_len=512"]
  else:
    sets += ["algorithm=grpo", "rollout.prompts_per_step=8", "rollout.num_generations=4", "rollout.batch_size=8",
             "rollout.max_new_tokens=256", "grpo.beta=0.01"]
  cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), sets)
  model = _small_model()
  reports = {r.name: r for r in run.plan(cfg, model, topo, prompt_len=128)}
  if algo == "sft":
    _check_train(reports["sft step"], model, 16, 512, keys=5)
    return
  _check_train(reports["grpo step"], model, 16, 384, keys=6 + 1 + 2 / 384)  # 7 row arrays + adv/valid
  sampler = reports["sampler"]
  assert sampler.compiled, sampler.error
  # Sampling rules: weights not split over fsdp, so each device holds all of them in bf16.
  assert sampler.argument == pytest.approx(model.num_params() * 2, rel=0.02)
  rows, length = 8 * 4, 128 + 256
  kv = 2 * model.num_layers * rows * length * model.num_kv_heads * model.resolved_head_dim * 2 / 8
  assert sampler.kv_cache == pytest.approx(kv, rel=1e-6)
  # The cache lives in the temporaries: at least its size, and (tolerance) not more than twice it
  # plus 64 MiB of per-step logits/sampling buffers ([rows, V] fp32 per device and friends).
  assert kv <= sampler.temp <= 2 * kv + 64 * 2 ** 20 + rows / 8 * model.vocab_size * 4 * 4
  assert reports["reference scorer"].compiled


def test_cli_exits_nonzero_and_says_what_to_change_when_it_does_not_fit(capsys):
  pytest.importorskip("libtpu")
  from jaxreason.plan.__main__ import main
  rc = main(["--config", os.path.join(ROOT, "configs", "quickstart.yaml"), "--topology", "v5e-8", "--model",
             "qwen2.5-7b", "--estimate", "--set", "init_from=null", "--set", "tokenizer=builtin:char",
             "--set", "model.dtype=bfloat16", "--set", "data.seq_len=8192", "--set", "train.micro_batch_size=64",
             "--set", "train.global_batch_size=64"])
  out = capsys.readouterr().out
  assert rc == 1
  assert "DOES NOT FIT: sft step" in out and "micro_batch_size" in out


@pytest.mark.slow
@pytest.mark.parametrize("config,topology", [("cs336_grpo.yaml", "v5p-8"), ("simplerl_zoo_grpo.yaml", "v5p-64"),
                                             ("s1.yaml", "v5p-64")])
def test_shipped_real_scale_config_fits_the_topology_its_header_names(config, topology):
  topo = parse_topology(topology)
  pytest.importorskip("libtpu")
  path = os.path.join(ROOT, "configs", config)
  assert topology in open(path).read().split("\noutput_dir")[0]  # the header names it
  from jaxreason.plan.__main__ import resolve_model
  cfg = load_config(path)
  model, _ = resolve_model(cfg, None)
  reports = run.plan(cfg, model, topo)
  bad = [(r.name, r.error, r.total / GIB) for r in reports if not r.fits]
  assert not bad, bad
  # The sampler is compiled where RolloutSampler runs it: on one process's devices of a multi-host slice.
  from jaxreason.plan.topology import tpu_devices
  devices = tpu_devices(topo)
  per_process = len(devices) // len({d.process_index for d in devices})
  for r in reports:
    if r.name == "sampler":
      assert math.prod(r.mesh) == per_process, (r.mesh, per_process)


def test_gpu_topology_is_estimated_and_labelled(capsys):
  """No GPU here: h100:8 is laid out on the fake CPU devices, with analytic figures marked (est.)."""
  from jaxreason.plan.__main__ import main
  rc = main(["--config", os.path.join(ROOT, "configs", "quickstart_dpo.yaml"), "--topology", "h100:8",
             "--model", "qwen2.5-0.5b", "--set", "init_from=null", "--set", "tokenizer=builtin:char"])
  out = capsys.readouterr().out
  assert rc == 0
  assert "cannot be compiled without GPUs" in out and "ANALYTIC ESTIMATES" in out
  row = next(line for line in out.splitlines() if line.startswith("| dpo pair step"))
  assert "yes (est.)" in row
  cfg = load_config(os.path.join(ROOT, "configs", "quickstart_dpo.yaml"), ["init_from=null", "tokenizer=builtin:char"])
  model = preset("qwen2.5-0.5b")
  (rep,) = run.plan(cfg, model, parse_topology("h100:8"), compile=False)
  # fp32 params and two moments over fsdp=8 devices (norms/biases replicated: within 2 %).
  assert rep.params == pytest.approx(model.num_params() * 4 / 8, rel=0.02)
  assert rep.opt_state == pytest.approx(2 * model.num_params() * 4 / 8, rel=0.02)


def test_save_compiled_writes_the_executable(tmp_path):
  cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                    ["train.global_batch_size=8", "train.micro_batch_size=8", "data.seq_len=64"])
  model = cfg.model.replace(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                            num_kv_heads=1)
  (rep,) = run.plan(cfg, model, parse_topology("cpu:8"), save_dir=str(tmp_path))
  assert rep.compiled and rep.fits
  path = tmp_path / "sft_step.xla"
  assert path.stat().st_size > 0

