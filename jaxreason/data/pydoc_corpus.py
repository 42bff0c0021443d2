"""A real English + code corpus that every machine has: the documentation of installed Python packages.

  python -m jaxreason.data.pydoc_corpus --out corpus.jsonl [--max-mb 20] [--roots DIR ...]

Documents, one jsonl row {"text", "source"} each:
  - per Python module (stdlib and site-packages): its module docstring, then every class and
    function docstring under a `class Name` / `def name(args)` header line (read with `ast`,
    nothing is imported);
  - every .rst / .md / .txt file (READMEs, docs, licence texts are skipped) and every
    `*.dist-info/METADATA` long description.
Cleaning (seed 003): documents shorter than `min_chars` are dropped, exact duplicates (same text
after whitespace normalisation) are dropped, files are visited in sorted order (the same corpus
on the same installation), and collection stops at `max_mb` of text.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import site
import sys
import sysconfig
from collections.abc import Iterator, Sequence

_SKIP_DIRS = {"__pycache__", ".git", "node_modules"}
_SKIP_NAMES = re.compile(r"(?i)^(license|licence|copying|notice|authors|record|entry_points|top_level)")


def default_roots() -> list[str]:
  roots = [sysconfig.get_paths()["stdlib"]]
  for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]:
    if os.path.isdir(p) and p not in roots:
      roots.append(p)
  return roots


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
  try:
    return f"def {node.name}({ast.unparse(node.args)})"
  except Exception:  # noqa: BLE001  (odd syntax trees: keep the name)
    return f"def {node.name}(...)"


def module_document(source: str, name: str) -> str | None:
  """Docstrings of a module, in source order, each under its class/def header."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return None
  parts = []
  doc = ast.get_docstring(tree)
  if doc:
    parts.append(f"Module {name}\n\n{doc}")
  for node in ast.walk(tree):
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      d = ast.get_docstring(node)
      if d:
        head = f"class {node.name}" if isinstance(node, ast.ClassDef) else _signature(node)
        parts.append(f"{head}\n\n{d}")
  return "\n\n".join(parts) if parts else None


def _metadata_description(text: str) -> str:
  head, sep, body = text.partition("\n\n")
  return body if sep else ""


def iter_files(roots: Sequence[str]) -> Iterator[str]:
  for root in roots:
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test"))
      for f in sorted(filenames):
        yield os.path.join(dirpath, f)


def iter_documents(roots: Sequence[str], min_chars: int = 200) -> Iterator[dict]:
  for path in iter_files(roots):
    base = os.path.basename(path)
    ext = os.path.splitext(base)[1].lower()
    try:
      if ext == ".py":
        with open(path, encoding="utf-8", errors="replace") as f:
          text = module_document(f.read(), os.path.splitext(base)[0])
      elif base == "METADATA" and path.endswith(".dist-info" + os.sep + "METADATA"):
        with open(path, encoding="utf-8", errors="replace") as f:
          text = _metadata_description(f.read())
      elif ext in (".rst", ".md", ".txt") and not _SKIP_NAMES.match(base):
        with open(path, encoding="utf-8", errors="replace") as f:
          text = f.read()
      else:
        continue
    except OSError:
      continue
    if text and len(text) >= min_chars:
      yield {"text": text, "source": path}


def build_corpus(out: str, roots: Sequence[str] | None = None, *, max_mb: float = 20.0, min_chars: int = 200,
                 log=print) -> dict:
  roots = list(roots or default_roots())
  seen, n, size, dups = set(), 0, 0, 0
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    for doc in iter_documents(roots, min_chars):
      key = hashlib.sha1(" ".join(doc["text"].split()).encode()).digest()
      if key in seen:
        dups += 1
        continue
      seen.add(key)
      f.write(json.dumps(doc) + "\n")
      n += 1
      size += len(doc["text"].encode())
      if size >= max_mb * 2**20:
        break
  stats = {"documents": n, "bytes": size, "exact_duplicates_dropped": dups, "roots": roots}
  log(f"{n} documents, {size / 2**20:.1f} MB ({dups} exact duplicates dropped) -> {out}")
  return stats


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxreason.data.pydoc_corpus", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--roots", nargs="*", default=None, help="directories to read (default: stdlib + site-packages)")
  p.add_argument("--max-mb", type=float, default=20.0)
  p.add_argument("--min-chars", type=int, default=200)
  a = p.parse_args(argv)
  build_corpus(a.out, a.roots, max_mb=a.max_mb, min_chars=a.min_chars)
  return 0


if __name__ == "__main__":
  sys.exit(main())
