"""`rewards.png` for RL runs (GRPO, PPO): sampled reward and completion length against step.

Read from the run's metrics.jsonl: raw points per logged step and a centred moving average
(window ~ a tenth of the run, at least 3 steps). Written by the main process at the end of a run;
a plotting failure only warns (the run's results do not depend on it).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def smooth(y: np.ndarray, window: int) -> np.ndarray:
  """Centred moving average ignoring NaN, same length (the window shrinks at the ends)."""
  y = np.asarray(y, np.float64)
  out = np.full(y.shape, np.nan)
  h = window // 2
  for i in range(len(y)):
    part = y[max(0, i - h):i + h + 1]
    part = part[np.isfinite(part)]
    if part.size:
      out[i] = part.mean()
  return out


def write_rewards_plot(run_dir: str, reward_key: str = "reward_mean", length_key: str = "completion_length") -> str | None:
  """Writes run_dir/rewards.png; returns its path (None when there is nothing to plot)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  rows = {}
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if "step" in row and reward_key in row:
        rows[int(row["step"])] = row  # a resumed run rewrites steps: keep the last
  if not rows:
    return None
  steps = np.asarray(sorted(rows))
  series = [(reward_key, "sampled reward (mean)"), (length_key, "completion length (tokens)")]
  window = max(3, len(steps) // 10)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for ax, (key, label) in zip(axes, series):
      y = np.asarray([float(rows[s].get(key, np.nan)) for s in steps])
      ax.plot(steps, y, ".", alpha=0.35, label="per step")
      ax.plot(steps, smooth(y, window), "-", label=f"moving average ({window} steps)")
      ax.set_ylabel(label)
      ax.grid(alpha=0.3)
      ax.legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("step")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out = os.path.join(run_dir, "rewards.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
  except Exception as e:  # plotting is a convenience
    print(f"warning: rewards.png not written ({type(e).__name__}: {e})", file=sys.stderr)
    return None
