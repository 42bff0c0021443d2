"""Errors the command lines report as one line, and the top-level handler they share.

`JaxreasonError` (and its kinds below) carry a message written for the user: what went wrong,
where (file, line, step, holder) and what to do. `cli_main(main)` runs a CLI's `main`; a known
error (ours, OSError, ValueError, KeyError, UnicodeError, and their wrapped causes, e.g. an OSError
raised in Orbax's async writer) prints one `error: ...` line to stderr and exits with its code. A
Python traceback is printed only with `--debug` or `JAXREASON_DEBUG=1`.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

__all__ = [
  "JaxreasonError", "CheckpointError", "RunLockedError", "ConfigChangeError", "NonFiniteError",
  "one_line", "cli_main", "debug_enabled",
]


class JaxreasonError(Exception):
  """An error with a user-facing message; the CLIs print it as one line and exit `exit_code`."""
  exit_code = 2


class CheckpointError(JaxreasonError):
  """A checkpoint that cannot be used: missing, truncated, corrupt or holding non-finite weights."""


class RunLockedError(JaxreasonError):
  """Another live run holds the output directory."""


class ConfigChangeError(JaxreasonError):
  """A resumed run's config differs from the saved one in a way that makes the resume inexact."""


class NonFiniteError(JaxreasonError):
  """Training produced a non-finite loss or gradient norm and the NaN policy stopped it."""
  exit_code = 3


_ERRNO_TEXT = {
  errno.ENOSPC: "disk full",
  errno.EDQUOT: "disk quota exceeded",
  errno.EROFS: "read-only file system",
  errno.EACCES: "permission denied",
  errno.EPERM: "operation not permitted",
  errno.ENOENT: "no such file or directory",
  errno.EIO: "I/O error",
}


def _chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _os_error_line(e: OSError) -> str:
  what = _ERRNO_TEXT.get(e.errno, e.strerror or type(e).__name__)
  where = e.filename or ""
  if getattr(e, "filename2", None):
    where = f"{where} -> {e.filename2}"
  return f"{what}: {where}" if where else f"{what} ({e})"


def one_line(e: BaseException) -> str:
  """The message of `e` on one line; for a file-system fault (also one wrapped by a library, as
  Orbax's async writer does) the kind of fault and the path."""
  if not isinstance(e, JaxreasonError):
    for c in _chain(e):
      if isinstance(c, OSError) and c.errno in _ERRNO_TEXT:
        return _os_error_line(c)
    if isinstance(e, OSError) and e.errno is not None:
      return _os_error_line(e)
  if isinstance(e, KeyError) and len(e.args) == 1:
    text = str(e.args[0])
  else:
    text = str(e).strip() or type(e).__name__
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  msg = lines[0] if lines else type(e).__name__
  return msg if len(msg) <= 2000 else msg[:2000] + " ..."


def debug_enabled(argv: list[str] | None = None) -> bool:
  return os.environ.get("JAXREASON_DEBUG", "").strip() not in ("", "0") or "--debug" in (argv or [])


def cli_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
  """Runs `main(argv)` (argv without `--debug`); known errors become one line and an exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = debug_enabled(argv)
  argv = [a for a in argv if a != "--debug"]
  if debug:
    return main(argv)
  try:
    return main(argv)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  except JaxreasonError as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    return e.exit_code
  except (OSError, ValueError, KeyError, UnicodeError, RuntimeError, MemoryError) as e:
    print(f"error: {one_line(e)} (JAXREASON_DEBUG=1 or --debug shows the traceback)", file=sys.stderr)
    return 1 if isinstance(e, (OSError, MemoryError)) else 2
