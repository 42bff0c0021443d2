"""An exclusive lock on a run's output directory, so two runs never write into one.

`acquire(output_dir)` takes `output_dir/.lock.p<process>` (one per JAX process, so every host
that writes holds one) with `flock`, which the kernel releases when the process dies: a lock left
by a killed run is free again and taken over, with a note naming the dead holder. While a live
run holds it, a second run gets `RunLockedError` naming the holder's PID, host and start time.
The file keeps the holder's description as JSON for that message.
"""

from __future__ import annotations

import atexit
import datetime
import fcntl
import json
import os
import socket
import sys

from jaxreason.errors import RunLockedError

__all__ = ["RunLock", "acquire"]

_HELD: dict[str, "RunLock"] = {}


class RunLock:

  def __init__(self, path: str, fd: int, previous: dict | None):
    self.path, self.fd, self.previous = path, fd, previous

  def release(self) -> None:
    if self.fd is None:
      return
    try:
      os.ftruncate(self.fd, 0)
      fcntl.flock(self.fd, fcntl.LOCK_UN)
    finally:
      os.close(self.fd)
      self.fd = None
      _HELD.pop(self.path, None)


def _describe(info: dict) -> str:
  return (f"PID {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"
          + (f" ({info['argv']})" if info.get("argv") else ""))


def acquire(output_dir: str, process_index: int = 0) -> RunLock:
  """Locks `output_dir` for this process until it exits (or `release`); idempotent per process."""
  path = os.path.join(os.path.abspath(output_dir), f".lock.p{process_index}")
  if path in _HELD:
    return _HELD[path]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    try:
      info = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:
      info = {}
    os.close(fd)
    raise RunLockedError(f"{output_dir} is in use by another run ({_describe(info)}); wait for it to finish, "
                         "stop it, or pick another output_dir") from None
  try:
    previous = json.loads(os.pread(fd, 65536, 0) or b"null")
  except ValueError:
    previous = None
  info = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
          "argv": " ".join(sys.argv)[:500]}
  data = json.dumps(info).encode()
  os.ftruncate(fd, 0)
  os.pwrite(fd, data, 0)
  lock = RunLock(path, fd, previous if isinstance(previous, dict) and previous else None)
  _HELD[path] = lock
  atexit.register(lock.release)
  if lock.previous:
    print(f"note: took over the lock of a run that is no longer running ({_describe(lock.previous)})",
          file=sys.stderr, flush=True)
  return lock
