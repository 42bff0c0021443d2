"""Errors the command lines report as one line, and the top-level handler they share.

`JaxreasonError` (and its kinds below) carry a message written for the user: what went wrong,
where (file, line, step, holder) and what to do. `cli_main(main)` runs a CLI's `main`; a known
error (ours, OSError, ValueError, KeyError, UnicodeError, and their wrapped causes, e.g. an OSError
raised in Orbax's async writer) prints one `error: ...` line to stderr and exits with its code. A
Python traceback is printed only with `--debug` or `JAXREASON_DEBUG=1`.

Exit codes: 1 for a file-system fault (disk full, read-only, I/O error, permissions), 2 for bad
input (config, data, paths, damaged files), 3 for a run stopped by the NaN guard, 143 on SIGTERM.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import threading
from collections.abc import Callable

__all__ = [
  "JaxreasonError", "CheckpointError", "RunLockedError", "ConfigChangeError", "NonFiniteError",
  "one_line", "exit_code", "cli_main", "debug_enabled",
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


_FAULT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}  # exit 1


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


_TS_ERRNO = re.compile(r"os_error_code='?(\d+)")  # TensorStore: "... [os_error_code='28']"
_TS_PATH = re.compile(r'(?:local file|Failed writing:|Failed to open:?) "([^"]+)"')


def _os_fault(e: BaseException) -> str | None:
  """'disk full: PATH' etc. for an OSError in `e`'s chain, or a TensorStore error naming an errno."""
  for c in _chain(e):
    if isinstance(c, OSError) and c.errno in _ERRNO_TEXT:
      return _os_error_line(c)
    m = _TS_ERRNO.search(str(c))
    if m and int(m.group(1)) in _ERRNO_TEXT:
      path = _TS_PATH.search(str(c))
      return f"{_ERRNO_TEXT[int(m.group(1))]}: {path.group(1) if path else str(c).splitlines()[0][:300]}"
  return None


def one_line(e: BaseException) -> str:
  """The message of `e` on one line; for a file-system fault (also one wrapped by a library, as
  Orbax's async writer does) the kind of fault and the path."""
  if not isinstance(e, JaxreasonError):
    fault = _os_fault(e)
    if fault is not None:
      return fault
    if isinstance(e, OSError) and e.errno is not None:
      return _os_error_line(e)
  if isinstance(e, KeyError) and len(e.args) == 1:
    text = str(e.args[0])
  else:
    text = str(e).strip() or type(e).__name__
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  msg = lines[0] if lines else type(e).__name__
  return msg if len(msg) <= 2000 else msg[:2000] + " ..."


def exit_code(e: BaseException) -> int:
  """The CLIs' exit status for `e`: its own for ours, 1 for file-system faults, 2 for bad input."""
  if isinstance(e, JaxreasonError):
    return e.exit_code
  if isinstance(e, MemoryError):
    return 1
  for c in _chain(e):
    code = c.errno if isinstance(c, OSError) else None
    m = _TS_ERRNO.search(str(c)) if code is None else None
    if (code if m is None else int(m.group(1))) in _FAULT_ERRNOS:
      return 1
  return 2


def _quiet_background_errors() -> None:
  """Errors printed from library threads and C++ callbacks (e.g. "Event loop is closed" after a
  failed async save) become one line each, or nothing for asyncio's shutdown noise."""
  def hook(exc_type, exc, tb):
    if exc_type is RuntimeError and "Event loop is closed" in str(exc):
      return
    print(f"warning: background error: {exc_type.__name__}: {one_line(exc)}", file=sys.stderr)
  sys.excepthook = hook
  sys.unraisablehook = lambda u: hook(u.exc_type, u.exc_value, u.exc_traceback)  # TensorStore callbacks
  threading.excepthook = lambda args: hook(args.exc_type, args.exc_value, args.exc_traceback)
  make_record = logging.getLogRecordFactory()

  def one_line_record(*args, **kwargs):
    # Library log records (Orbax's writer threads, asyncio's "exception never retrieved") keep their
    # message and lose the traceback: the same error reaches the main thread and is reported there.
    record = make_record(*args, **kwargs)
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return record
  logging.setLogRecordFactory(one_line_record)


def debug_enabled(argv: list[str] | None = None) -> bool:
  return os.environ.get("JAXREASON_DEBUG", "").strip() not in ("", "0") or "--debug" in (argv or [])


def cli_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
  """Runs `main(argv)` (argv without `--debug`); known errors become one line and an exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = debug_enabled(argv)
  argv = [a for a in argv if a != "--debug"]
  if debug:
    return main(argv)
  _quiet_background_errors()
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
    return exit_code(e)
