"""The documentation corpus builder: docstrings by ast, doc files, exact dedup, size cap."""

import json

from jaxreason.data.pydoc_corpus import build_corpus, module_document

SRC = '''"""Tools for widgets. This module docstring is long enough to count as text."""

class Widget:
  """A widget holds parts."""

  def spin(self, speed: int = 3) -> None:
    """Spin the widget at `speed`."""

def helper(x):
  return x  # no docstring: not in the document
'''


def test_module_document_reads_docstrings_without_importing():
  doc = module_document(SRC, "widgets")
  assert doc.splitlines()[0] == "Module widgets"
  assert "class Widget\n\nA widget holds parts." in doc
  assert "def spin(self, speed: int=3)\n\nSpin the widget at `speed`." in doc
  assert "helper" not in doc
  assert module_document("def broken(:\n", "x") is None


def test_build_corpus_dedups_and_skips(tmp_path):
  root = tmp_path / "site"
  (root / "pkg").mkdir(parents=True)
  (root / "pkg" / "widgets.py").write_text(SRC)
  text = "Widgets\n=======\n\n" + "Widgets are documented here in prose. " * 10
  (root / "pkg" / "README.md").write_text(text)
  (root / "pkg" / "copy.rst").write_text(text.replace(" ", "  "))  # an exact duplicate after whitespace
  (root / "pkg" / "LICENSE.txt").write_text("Permission is hereby granted " * 20)
  (root / "pkg" / "short.md").write_text("too short")
  (root / "pkg" / "tests").mkdir()
  (root / "pkg" / "tests" / "test_w.md").write_text("test docs " * 50)
  out = tmp_path / "c.jsonl"
  stats = build_corpus(str(out), [str(root)], min_chars=50, log=lambda *_: None)
  rows = [json.loads(x) for x in out.read_text().splitlines()]
  assert sorted(r["source"].split("/")[-1] for r in rows) == ["README.md", "widgets.py"]
  assert stats["documents"] == 2 and stats["exact_duplicates_dropped"] == 1
  assert build_corpus(str(out), [str(root)], min_chars=50, max_mb=1e-6, log=lambda *_: None)["documents"] == 1
