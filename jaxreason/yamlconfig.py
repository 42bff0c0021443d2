"""The generic YAML -> frozen-dataclass loader behind every config (training, evaluation).

`load(cls, path, overrides)` reads a YAML mapping (only what differs from the defaults), applies
dotted `--set a.b.c=value` overrides (each value parsed as YAML), builds the nested frozen
dataclasses from their type hints and runs their checks. Every mistake is a `ConfigError` that
says where (file and line, or the `--set` argument), which dotted key, and what to do: an unknown
key names the nearest valid one, a wrong type names the expected one, a value outside its set
lists the allowed values. Supported field types: int, float, bool, str, None, dataclasses,
tuple[X, ...], list[X], dict[str, X] and unions of them.

Sections check their own values in `__post_init__` with `require`, `choice`, `positive` and
`in_range` (errors name the key relative to the section; the loader adds the full key and where
it was set). A section may define `config_prepare(raw, key, where) -> raw` (a staticmethod) to
rewrite its raw mapping before it is built (e.g. `data.train` given as one path).

YAML notes: `1e-5` (no dot) is a string to PyYAML; float keys accept such numeric strings. Integers
are accepted for float keys; booleans must be `true`/`false`; `null` only where a key is optional.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from typing import Any, Callable, Sequence, Union

import yaml

Key = tuple  # a dotted key as a path of names and list indices: ("data", "train", 0, "path")


class ConfigError(ValueError):
  """A configuration mistake, worded for the user: where, which key, what to do."""

  def __init__(self, message: str, key: Key = (), detail: str | None = None):
    super().__init__(message)
    self.key = key  # from a dataclass check: the key at fault, relative to the checked object
    self.detail = detail  # that message without the key, for the loader to prefix with location


def dotted(key: Key) -> str:
  out = ""
  for part in key:
    out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
  return out


def invalid(key: str | Key, detail: str) -> ConfigError:
  key = key if isinstance(key, tuple) else (key,)
  return ConfigError(f"{dotted(key)} {detail}", key, detail)


def require(ok: bool, key: str | Key, detail: str) -> None:
  if not ok:
    raise invalid(key, detail)


def choice(obj: Any, name: str, allowed: Sequence[str]) -> None:
  value = getattr(obj, name)
  if value not in allowed:
    raise invalid(name, choice_detail(value, allowed))


def choice_detail(value: Any, allowed: Sequence[str]) -> str:
  near = difflib.get_close_matches(str(value), allowed, n=1)
  return f"must be one of {', '.join(allowed)}; got {value!r}" + (f" (did you mean {near[0]!r}?)" if near else "")


def positive(obj: Any, *names: str, optional: bool = False) -> None:
  for name in names:
    value = getattr(obj, name)
    if not (optional and value is None):
      require(value > 0, name, f"must be positive{', or null' if optional else ''}; got {value!r}")


def in_range(obj: Any, name: str, lo: float, hi: float, hi_open: bool = False) -> None:
  value = getattr(obj, name)
  ok = lo <= value < hi if hi_open else lo <= value <= hi
  require(ok, name, f"must be in [{lo}, {hi}{')' if hi_open else ']'}; got {value!r}")




# ------------------------------------------------------------------------------ types -> checks
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_NONE = type(None)
_NAMES = {int: ("an int", "ints"), float: ("a number", "numbers"), bool: ("a bool (true or false)", "bools"),
          str: ("a string", "strings"), _NONE: ("null", "nulls")}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _field_names(cls: type) -> list[str]:
  return [f.name for f in dataclasses.fields(cls) if f.init]


def _options(tp: Any) -> tuple:
  return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def _describe(tp: Any, plural: bool = False) -> str:
  options = _options(tp)
  if len(options) > 1:
    names = [_describe(t, plural) for t in options]
    return ", ".join(names[:-1]) + " or " + names[-1]
  if dataclasses.is_dataclass(tp):
    return "mappings" if plural else "a mapping"
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (tuple, list):
    return ("lists" if plural else "a list") + f" of {_describe(args[0], True)}"
  if origin is dict:
    return ("mappings" if plural else "a mapping") + f" of {_describe(args[0], True)} to {_describe(args[1], True)}"
  return _NAMES[tp][plural]


def _matches(value: Any, tp: Any) -> bool:
  """Whether `value` has the outer shape of `tp` (contents are checked by `_convert`)."""
  if tp is _NONE:
    return value is None
  if dataclasses.is_dataclass(tp):
    return isinstance(value, (dict, tp))
  origin = typing.get_origin(tp)
  if origin in (tuple, list):
    return isinstance(value, (list, tuple))
  if origin is dict:
    return isinstance(value, dict)
  if tp is bool:
    return isinstance(value, bool)
  if tp is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if tp is float:
    return ((isinstance(value, (int, float)) and not isinstance(value, bool))
            or (isinstance(value, str) and _FLOAT.fullmatch(value.strip()) is not None))
  if tp is str:
    return isinstance(value, str)
  raise TypeError(f"config type {tp!r} is not supported")


def _type_error(value: Any, tp: Any, key: Key, where: Callable[[Key], str]) -> ConfigError:
  shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
  hint = ""
  if value is None:
    hint = "; this key cannot be null (remove it to get the default)"
  elif str in _options(tp) and isinstance(value, (int, float, bool)):
    hint = "; quote it to make it a string"
  elif bool in _options(tp) and isinstance(value, str):
    hint = "; write true or false"
  return ConfigError(f"{where(key)}: {dotted(key)} must be {_describe(tp)}, got {shown}{hint}")


def _convert(value: Any, tp: Any, key: Key, where: Callable[[Key], str]) -> Any:
  option = next((t for t in _options(tp) if _matches(value, t)), None)
  if option is None:
    raise _type_error(value, tp, key, where)
  if value is None:
    return None
  if dataclasses.is_dataclass(option):
    return value if isinstance(value, option) else _build(option, value, key, where)
  origin, args = typing.get_origin(option), typing.get_args(option)
  if origin in (tuple, list):
    return tuple(_convert(v, args[0], key + (i,), where) for i, v in enumerate(value))
  if origin is dict:
    out = {}
    for k, v in value.items():
      if not isinstance(k, str):
        raise ConfigError(f"{where(key)}: {dotted(key)} keys must be strings, got {k!r}; quote it")
      out[k] = _convert(v, args[1], key + (k,), where)
    return out
  return float(value) if option is float else value


def _unknown(name: Any, key: Key, valid: Sequence[str]) -> str:
  section = dotted(key) or "the top level"
  near = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
  hint = f"did you mean {near[0]!r}? Valid" if near else "valid"
  return f"unknown key {name!r} in {section}; {hint} keys: {', '.join(valid)}"


def _build(cls: type, raw: dict, key: Key, where: Callable[[Key], str]) -> Any:
  """`cls(**raw)` with every key and value checked; errors located with `where`."""
  prepare = getattr(cls, "config_prepare", None)  # a section may rewrite its raw mapping first
  if prepare is not None:
    raw = prepare(raw, key, where)
  names = _field_names(cls)
  for name in raw:
    if name not in names:
      raise ConfigError(f"{where(key + (name,))}: {_unknown(name, key, names)}")
  for f in dataclasses.fields(cls):
    if f.init and f.name not in raw and f.default is f.default_factory is dataclasses.MISSING:
      full = dotted(key + (f.name,))
      raise ConfigError(f"{where(key)}: {full} is required; set it in the config file or with --set {full}=...")
  hints = _hints(cls)
  kwargs = {name: _convert(value, hints[name], key + (name,), where) for name, value in raw.items()}
  try:
    return cls(**kwargs)
  except ConfigError as e:
    if e.detail is None:
      raise
    full = key + e.key
    raise ConfigError(f"{where(full)}: {dotted(full)} {e.detail}", full, None) from None
  except ValueError as e:  # a check that names no key (ModelConfig's): locate the key it mentions
    full, msg = _mentioned(raw, key, str(e)), str(e)
    text = dotted(full) + msg[len(full[-1]):] if full and msg.startswith(f"{full[-1]} ") else f"{dotted(full)}: {msg}"
    raise ConfigError(f"{where(full)}: {text}") from None


def _mentioned(raw: dict, key: Key, message: str) -> Key:
  """The first key set in `raw` (depth first) that `message` names, else `key`."""
  words = set(re.findall(r"\w+", message))

  def walk(mapping: dict, prefix: Key):
    for name, value in mapping.items():
      if name in words:
        return prefix + (name,)
      if isinstance(value, dict) and (found := walk(value, prefix + (name,))):
        return found
    return None

  return walk(raw, key) or key




# ------------------------------------------------------------------------------- YAML and --set
class _Origins:
  """Where each dotted key was set ('configs/x.yaml line 12', '--set a.b=1', 'base config')."""

  def __init__(self, default: str):
    self.default = default
    self.at: dict[Key, str] = {}

  def __call__(self, key: Key) -> str:
    for n in range(len(key), 0, -1):
      if key[:n] in self.at:
        return self.at[key[:n]]
    inside = [origin for k, origin in self.at.items() if k[:len(key)] == key]  # a section-level check
    return inside[-1] if key and inside else self.default

  def replace(self, key: Key, origin: str) -> None:
    for k in [k for k in self.at if k[:len(key)] == key]:
      del self.at[k]
    self.at[key] = origin


def _read_yaml(path: str, origins: _Origins) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise ConfigError(f"{path}: config file not found (relative paths start at {os.getcwd()})") from None
  except OSError as e:
    raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
  loader = yaml.SafeLoader(text)
  try:
    node = loader.get_single_node()
    data = {} if node is None else _construct(node, (), loader, path, origins)
  except yaml.MarkedYAMLError as e:
    mark = e.problem_mark or e.context_mark
    line = f" line {mark.line + 1}" if mark else ""
    what = ", ".join(s for s in (e.context, e.problem) if s)
    raise ConfigError(f"{path}{line}: not valid YAML ({what})") from None
  except yaml.YAMLError as e:
    raise ConfigError(f"{path}: not valid YAML ({e})") from None
  finally:
    loader.dispose()
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: a config file must be a mapping of keys to values, got {type(data).__name__}")
  return data


def _construct(node: yaml.Node, key: Key, loader: yaml.SafeLoader, path: str, origins: _Origins) -> Any:
  """The node as Python data, recording the line of every mapping key and list item."""
  if isinstance(node, yaml.MappingNode):
    own = {id(k) for k, _ in node.value}
    loader.flatten_mapping(node)  # `<<: *anchor` merges
    out: dict = {}
    first: dict[str, tuple[int, bool]] = {}
    for knode, vnode in node.value:
      name, line = loader.construct_object(knode, deep=True), knode.start_mark.line + 1
      if not isinstance(name, str):
        raise ConfigError(f"{path} line {line}: keys must be strings, got {name!r}; quote it")
      if name in first and first[name][1] and id(knode) in own:
        raise ConfigError(f"{path} line {line}: duplicate key {dotted(key + (name,))!r} "
                          f"(first set on line {first[name][0]}); keep one")
      first[name] = (line, id(knode) in own)
      origins.at[key + (name,)] = f"{path} line {line}"
      out[name] = _construct(vnode, key + (name,), loader, path, origins)
    return out
  if isinstance(node, yaml.SequenceNode):
    items = []
    for i, item in enumerate(node.value):
      origins.at[key + (i,)] = f"{path} line {item.start_mark.line + 1}"
      items.append(_construct(item, key + (i,), loader, path, origins))
    return items
  return loader.construct_object(node, deep=True)


def _override_key(root: type, name: str, expr: str) -> Key:
  """`optimizer.lr` -> ("optimizer", "lr"), checked against the schema `root`."""
  tp, key = root, ()
  for part in name.split("."):
    options = [t for t in _options(tp) if t is not _NONE]
    tp = options[0] if len(options) == 1 else tp
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
      names = _field_names(tp)
      if part not in names:
        raise ConfigError(f"--set {expr}: {_unknown(part, key, names)}")
      tp, key = _hints(tp)[part], key + (part,)
    elif origin is dict and part:
      tp, key = typing.get_args(tp)[1], key + (part,)
    elif origin in (tuple, list) and part.isdigit():
      tp, key = typing.get_args(tp)[0], key + (int(part),)
    else:
      what = f"{dotted(key)} is {_describe(tp)}" if key else "KEY is empty"
      hint = "; index its entries by number, e.g. .0" if origin in (tuple, list) else ""
      raise ConfigError(f"--set {expr}: {what}, so it has no key {part!r}{hint}")
  return key


def _assign(data: dict, key: Key, value: Any, expr: str) -> None:
  node: Any = data
  for i, part in enumerate(key):
    if isinstance(part, int) and not (isinstance(node, list) and part < len(node)):
      n = len(node) if isinstance(node, list) else 0
      raise ConfigError(f"--set {expr}: {dotted(key[:i])} has {n} entries, so there is no entry {part}; "
                        f"set the whole list instead, e.g. --set '{dotted(key[:i])}=[...]'")
    if i == len(key) - 1:
      node[part] = value
      return
    child = node[part] if isinstance(part, int) else node.get(part)
    if isinstance(key[i + 1], int):
      child = [child] if isinstance(child, str) else child  # data.train: one path
    elif isinstance(child, str) and isinstance(part, int):
      child = {"path": child}  # a data source given as a plain path
    elif not isinstance(child, dict):
      child = {}  # absent or null (e.g. `eval: null`) sections start empty
    node[part] = child
    node = child


def _apply_override(root: type, data: dict, expr: str, origins: _Origins) -> None:
  name, sep, text = expr.partition("=")
  name = name.strip()
  if not sep or not name:
    raise ConfigError(f"--set {expr}: expected KEY=VALUE with a dotted KEY, e.g. --set optimizer.lr=3e-5")
  try:
    value = yaml.safe_load(text)
  except yaml.YAMLError as e:
    problem = getattr(e, "problem", None) or e
    raise ConfigError(f"--set {expr}: the value is not valid YAML ({problem}); "
                      f"quote it, e.g. --set '{name}=\"...\"'") from None
  key = _override_key(root, name, expr)
  _assign(data, key, value, expr)
  origins.replace(key, f"--set {expr}")


def _merge(base: dict, top: dict) -> dict:
  out = dict(base)
  for k, v in top.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def _plain(value: Any) -> Any:
  """Dataclasses -> dicts, tuples -> lists, recursively (a deep copy)."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value


def _key_paths(data: Any, prefix: Key = ()):
  items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
  for k, v in items:
    yield prefix + (k,)
    yield from _key_paths(v, prefix + (k,))


# ---------------------------------------------------------------------------------- public API
def load(cls: type, path: str | os.PathLike | None, overrides: Sequence[str] = (), base: dict | None = None,
         settings: dict | None = None) -> tuple[Any, dict, Callable[[Key], str]]:
  """`cls` from `base` (defaults under the file), the YAML file at `path`, `settings` (e.g. command
  line options, recorded as "the command line"), then the `--set` overrides.

  Returns (the validated object, the raw merged mapping, where(key) -> where that key was set).
  Raises ConfigError.
  """
  where = _Origins(os.fspath(path) if path is not None else "config")
  data: dict = {}
  if base:
    data = _plain(base)
    if not isinstance(data, dict):
      raise ConfigError(f"base config must be a mapping, got {type(base).__name__}")
    where.at.update((k, "base config") for k in _key_paths(data))
  if path is not None:
    data = _merge(data, _read_yaml(os.fspath(path), where))
  if settings:
    data = _merge(data, settings)
    where.at.update(((k,), "the command line") for k in settings)
  for expr in [overrides] if isinstance(overrides, str) else overrides:
    _apply_override(cls, data, expr, where)
  return _build(cls, data, (), where), data, where


def plain(value: Any) -> Any:
  """Dataclasses -> dicts, tuples -> lists, recursively (a deep copy): what `load` turns back."""
  return _plain(value)
