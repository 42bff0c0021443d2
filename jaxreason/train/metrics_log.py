"""Training logs: console/progress bar, metrics.jsonl, TensorBoard, and W&B when configured.

`metrics.jsonl` survives faults: every line is valid JSON (NaN and infinities are written as the
strings "nan", "inf", "-inf"; `float(value)` reads them back), each row is one write, and on
start the file is repaired: a half-written last line (a crash or a full disk) is dropped, and so
are rows past the step the run resumes from (they are logged again, not duplicated).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from jaxreason.io_utils import append_jsonl, repair_jsonl


class MetricsLogger:

  def __init__(self, output_dir: str, *, total_steps: int, start_step: int, tensorboard: bool = True,
               wandb_project: str | None = None, wandb_run: str | None = None, progress_bar: bool = True,
               config: dict | None = None, is_main: bool = True):
    self.is_main = is_main
    self.path = os.path.join(output_dir, "metrics.jsonl")
    self.tb = self.wandb = self.bar = None
    if not is_main:
      return
    dropped = repair_jsonl(self.path, max_step=start_step)
    self.file = open(self.path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
    if wandb_project:
      try:
        import wandb
      except ImportError:
        raise RuntimeError("logging.wandb_project is set but wandb is not installed: pip install 'jaxreason[wandb]'")
      self.wandb = wandb.init(project=wandb_project, name=wandb_run, config=config, resume="allow")
    if progress_bar:
      from tqdm import tqdm
      self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
    if dropped:
      self.message(f"metrics.jsonl: dropped {dropped} line(s) after step {start_step} or half-written "
                   "(a resumed run logs those steps again)")

  def log(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.is_main:
      return
    row = {"step": step, **{k: (float(v) if v is not None else None) for k, v in metrics.items()}}
    append_jsonl(self.file, row)
    if self.tb is not None:
      for k, v in row.items():
        if k != "step" and v is not None and math.isfinite(v):
          self.tb.add_scalar(f"train/{k}", v, step)
    if self.wandb is not None:
      self.wandb.log(row, step=step)
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", lr=f"{row.get('lr', 0):.2e}",
                           tok_s=f"{row.get('tokens_per_sec', 0):.0f}")
    else:
      print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

  def advance(self, n: int = 1) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def message(self, text: str) -> None:
    if not self.is_main:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if not self.is_main:
      return
    if self.bar is not None:
      self.bar.close()
    self.file.close()
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()


def flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6 x matmul params + attention (12 L T d_head n_heads), PaLM-style."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim
  n, k = cfg.num_heads, cfg.num_kv_heads
  matmul = cfg.num_layers * (d * h * (n + 2 * k) + n * h * d + 3 * d * f) + cfg.vocab_size * d
  return 6 * matmul + 12 * cfg.num_layers * seq_len * n * h


def peak_flops_per_device(dtype: str) -> float:
  """Peak FLOP/s of one device: known accelerators by name, else a measured jitted matmul (CPU)."""
  import jax
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", "").lower()
  table = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v5p": 459e12, "v5 lite": 197e12, "v5e": 197e12,
           "v6": 918e12, "v4": 275e12}
  for name, value in table.items():
    if name in kind:
      return value
  import jax.numpy as jnp
  n = 1024
  a = jnp.ones((n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(5):
    f(a).block_until_ready()
  return 2 * n**3 * 5 / (time.perf_counter() - t)
