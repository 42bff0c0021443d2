"""Config history of a run directory, and refusal of resumes that would not be exact.

`record(cfg)` writes the resolved config as `config.yaml` (atomically) and as
`config.<step>.yaml`, where step is where this config takes effect (0 for a fresh run, the
resumed step otherwise), so what earlier steps used is never lost. When the directory already
holds checkpoints and the previous `config.yaml` differs in a setting that makes the resume
inexact (the architecture, the data and its order, the batch size, the algorithm), the resume is
refused with one line naming the settings (`ConfigChangeError`) unless `allow_config_change` is
set (CLI: `--allow-config-change`). Other changes (learning rate, logging, eval, ...) are
allowed and listed in a note.
"""

from __future__ import annotations

import os
import sys

import yaml

from jaxreason.errors import ConfigChangeError
from jaxreason.io_utils import atomic_write_text

__all__ = ["record", "config_changes", "INEXACT_KEYS"]

EXECUTION_FIELDS = ("dtype", "param_dtype", "attention_backend", "remat")  # = train.loop.EXECUTION_FIELDS
INEXACT_KEYS = ("model.", "init_from", "tokenizer", "data.", "seed", "train.global_batch_size", "algorithm")
IGNORED_KEYS = ("allow_config_change", "output_dir")


def _flat(d, prefix=""):
  out = {}
  if isinstance(d, dict):
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}{k}."))
    if not d and prefix:
      out[prefix[:-1]] = {}
  else:
    out[prefix[:-1]] = d
  return out


def _inexact(key: str) -> bool:
  if key.startswith("model.") and key.split(".")[1] in EXECUTION_FIELDS:
    return False
  return any(key == k or (k.endswith(".") and key.startswith(k)) for k in INEXACT_KEYS)


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
  """(dotted key, old value, new value) for every setting that differs."""
  a, b = _flat(old), _flat(new)
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and k not in IGNORED_KEYS]


def _latest_step(output_dir: str) -> int | None:
  d = os.path.join(output_dir, "checkpoints")
  steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
  return max(steps) if steps else None


def record(cfg, is_main: bool = True) -> list[tuple[str, object, object]]:
  """Checks `cfg` against the run directory's config (see module docstring) and records it.
  Returns the changed settings (empty for a fresh run or an unchanged resume)."""
  from jaxreason.config import dump_yaml
  out = cfg.output_dir
  text = dump_yaml(cfg)
  path = os.path.join(out, "config.yaml")
  step = _latest_step(out)
  changes: list = []
  if step is not None and os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        old = yaml.safe_load(f) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
      raise ConfigChangeError(f"{path}: the saved config of this run cannot be read ({e}); "
                              "restore it, or train into a new output_dir") from None
    changes = config_changes(old, yaml.safe_load(text) or {})
    inexact = [c for c in changes if _inexact(c[0])]
    if inexact and not getattr(cfg, "allow_config_change", False):
      arch = [c for c in inexact if c[0].startswith("model.") or c[0] in ("init_from", "tokenizer")]
      shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in (arch or inexact)[:4])
      more = f" (and {len(inexact) - 4} more)" if len(inexact) > 4 else ""
      what = "the architecture differs from" if arch else "settings that make the resume inexact differ from"
      raise ConfigChangeError(f"{out} has checkpoints up to step {step} and {what} the saved config.yaml "
                              f"({shown}{more}); undo the change, train into a new output_dir, or pass "
                              "--allow-config-change")
    if changes and is_main:
      print(f"note: resuming at step {step} with changed settings: "
            + ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:8])
            + (" ..." if len(changes) > 8 else "") + f" (recorded in config.{step}.yaml)",
            file=sys.stderr, flush=True)
  if is_main:
    atomic_write_text(os.path.join(out, f"config.{step or 0}.yaml"), text)
    atomic_write_text(path, text)
  return changes
