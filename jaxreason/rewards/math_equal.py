r"""Math answer equivalence (SPEC §4): cheap checks in the caller, HuggingFace math-verify in workers.

`is_equiv(pred, gold)` and `Grader.grade_many` decide whether a predicted answer equals a reference:

1. Inputs are made safe: non-strings are converted, NUL bytes dropped, invalid UTF-8 and lone
   surrogates replaced by "?". An extracted answer (or reference) longer than `MAX_ANSWER_CHARS`
   (10,000) characters is rejected as wrong without parsing; a full response (`full_response=True`)
   keeps only its last `MAX_RESPONSE_CHARS` (10,000) characters, where the final answer sits.
2. A normalised string comparison (whitespace, `$`, `\left`/`\right`, `\dfrac` -> `\frac`, a
   trailing period) and a numeric comparison of plain numbers (`1,000`, `-0.5`, `3/4`,
   `\frac{3}{4}`, parsed with `fractions.Fraction`, never `eval`) settle most answers here.
3. Everything else goes to math-verify (`parse` + `verify`) in a pool of worker processes, because
   math-verify times out with `signal.alarm`, which only works in a main thread. Each item has a
   hard limit: the worker arms its own timer at 80% of it and answers False; if it has not answered
   at the limit (C code such as a huge integer power ignores signals), it is killed, replaced, and
   the item is False. Workers also run under a memory limit (RLIMIT_AS, +4 GiB by default).
   The whole call has a deadline too, waiting for a free worker included (`call_timeout`): a
   caller queued behind other threads' grading cannot stall; items not graded by then are False.

Model output is untrusted: nothing here evaluates it, and any failure (parse error, timeout,
crashed worker) is reported as "not equal", never raised into the caller.

Extracted answers are parsed as `\boxed{answer}` (math-verify's LaTeX extraction needs a
delimiter; bare `\dfrac{3}{4}` is otherwise not found). Full responses (SimpleRL-Zoo / verl
`math_verify` reward) are parsed as they are, with expression then LaTeX extraction, against
`\boxed{gold}`.
"""

from __future__ import annotations

import atexit
import collections
import logging
import multiprocessing as mp
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from fractions import Fraction
from multiprocessing.connection import wait as _wait_conns
from typing import Any

__all__ = [
  "MAX_ANSWER_CHARS", "MAX_RESPONSE_CHARS", "DEFAULT_TIMEOUT", "Grader", "is_equiv", "verify_response",
  "default_grader", "set_default_grader", "default_num_workers", "sanitize", "normalize_answer",
  "parse_number", "quick_equal",
]

logger = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 10_000
MAX_RESPONSE_CHARS = 10_000
DEFAULT_TIMEOUT = 5.0
_SOFT_FRACTION = 0.8  # the worker gives up by itself at this share of the limit
_STARTUP_TIMEOUT = 120.0  # a worker must import math-verify and warm up within this
_MAX_NUMBER_CHARS = 64

# ----------------------------------------------------------------------------------------------
# Cheap checks (caller side, pure Python)


def sanitize(s: Any) -> str:
  """Any value -> a str that is valid UTF-8 with no NUL bytes (lone surrogates become "?")."""
  if isinstance(s, (bytes, bytearray)):
    s = bytes(s).decode("utf-8", "replace")
  elif not isinstance(s, str):
    try:
      s = str(s)
    except Exception:  # e.g. an int with more digits than int->str allows
      return ""
  if "\x00" in s:
    s = s.replace("\x00", "")
  try:
    s.encode("utf-8")
  except UnicodeEncodeError:
    s = s.encode("utf-8", "replace").decode("utf-8")
  return s


_DELIMS = (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_LATEX_NOISE = re.compile(r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\[!,;: ]|\s+")


def normalize_answer(s: str) -> str:
  r"""Light normalisation for string comparison: `$..$`, `\left`, spacing, `\dfrac`, final period."""
  s = s.strip()
  for left, right in _DELIMS:
    if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
      s = s[len(left):len(s) - len(right)].strip()
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = _LATEX_NOISE.sub("", s)
  while s.endswith(".") and not s.endswith(".."):
    s = s[:-1]
  return s


_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
_FRACTION = re.compile(r"([+-]?\d+)/(\d+)|([+-]?)\\frac\{(\d+)\}\{(\d+)\}|([+-]?)\\frac(\d)(\d)")


def parse_number(s: str) -> tuple[Fraction, bool] | None:
  r"""A plain number (`1,234`, `-0.5`, `.5`, `3/4`, `\frac{3}{4}`) as (exact value, has decimals).

  None for anything else (including exponents, which could be astronomically large).
  """
  if len(s) > _MAX_NUMBER_CHARS:
    return None
  if _PLAIN_NUMBER.fullmatch(s):
    return Fraction(s.replace(",", "")), "." in s
  m = _FRACTION.fullmatch(s)
  if m:
    if m.group(1) is not None:
      num, den = int(m.group(1)), int(m.group(2))
    elif m.group(4) is not None:
      num, den = int(m.group(3) + m.group(4)), int(m.group(5))
    else:
      num, den = int(m.group(6) + m.group(7)), int(m.group(8))
    if den != 0:
      return Fraction(num, den), False
  return None


def quick_equal(pred: str, gold: str) -> bool | None:
  """True/False when string or plain-number comparison settles it, None when math-verify must decide.

  Plain numbers that differ are unequal, except decimals within 1e-6 of each other, which
  math-verify compares after rounding to 6 places.
  """
  p, g = normalize_answer(pred), normalize_answer(gold)
  if not p or not g:
    return False
  if p == g:
    return True
  np_, ng = parse_number(p), parse_number(g)
  if np_ is None or ng is None:
    return None
  (vp, dec_p), (vg, dec_g) = np_, ng
  if vp == vg:
    return True
  if (dec_p or dec_g) and abs(vp - vg) < Fraction(1, 10**6):
    return None
  return False


# ----------------------------------------------------------------------------------------------
# Worker process


class _Deadline(BaseException):
  """Raised by the worker's timer; a BaseException so math-verify's `except Exception` lets it pass."""


_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def _as_math(s: str) -> str:
  if "\\boxed" in s or "\\fbox" in s or "\\(" in s or "\\[" in s or _UNESCAPED_DOLLAR.search(s):
    return s
  return "\\boxed{" + s + "}"


def _mv_equal(pred: str, gold: str, full_response: bool) -> bool:
  from math_verify import parse, verify
  from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

  gold_parsed = parse(_as_math(gold), [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
  if not gold_parsed:
    return False
  if full_response:
    pred_parsed = parse(pred, [ExprExtractionConfig(), LatexExtractionConfig()], parsing_timeout=None)
  else:
    pred_parsed = parse(_as_math(pred), [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
  if not pred_parsed:
    return False
  return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _limit_address_space(extra_mb: int) -> None:
  """RLIMIT_AS = current address space + `extra_mb` (the worker may have imported the caller's
  `__main__` module, which can be large); huge allocations then fail fast with MemoryError."""
  try:
    import resource
    current = 0
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmSize:"):
          current = int(line.split()[1]) * 1024
    limit = current + int(extra_mb) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  except (ImportError, OSError, ValueError):
    pass  # not Linux: rely on the time limit alone


def _on_alarm(signum, frame):
  raise _Deadline()


def _worker_main(conn, memory_limit_mb: int | None) -> None:
  """Worker loop: receive (pred, gold, full_response, soft_seconds) or None (exit); send a bool."""
  import signal
  import sys
  import warnings

  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; it shuts workers down
  if memory_limit_mb:
    _limit_address_space(memory_limit_mb)
  warnings.simplefilter("ignore")
  for name in ("math_verify", "latex2sympy2_extended"):
    logging.getLogger(name).setLevel(logging.CRITICAL + 1)
  sys.stdout = open(os.devnull, "w")  # libraries that print would otherwise spam the trainer's log
  signal.signal(signal.SIGALRM, _on_alarm)
  _mv_equal("\\frac{1}{2}", "0.5", False)  # imports sympy and the LaTeX parser before the first item
  conn.send(("ready", os.getpid()))
  while True:
    try:
      msg = conn.recv()
    except (EOFError, OSError):
      return
    if msg is None:
      return
    pred, gold, full_response, soft = msg
    ok = False
    try:
      try:
        signal.setitimer(signal.ITIMER_REAL, max(soft, 0.01))
        ok = _mv_equal(pred, gold, full_response)
      finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    except BaseException:  # _Deadline, RecursionError, MemoryError, anything from sympy
      ok = False
    try:
      conn.send(bool(ok))
    except (EOFError, OSError):
      return


# ----------------------------------------------------------------------------------------------
# Worker pool


def default_num_workers() -> int:
  """`JAXREASON_GRADER_WORKERS` if set, else min(4, CPU count)."""
  env = os.environ.get("JAXREASON_GRADER_WORKERS", "").strip()
  if env:
    try:
      return max(1, int(env))
    except ValueError:
      raise ValueError(f"JAXREASON_GRADER_WORKERS must be a positive integer, got {env!r}") from None
  return min(4, os.cpu_count() or 1)


class _Worker:
  __slots__ = ("proc", "conn", "ready", "started")

  def __init__(self, proc, conn):
    self.proc, self.conn, self.ready, self.started = proc, conn, False, time.monotonic()


class Grader:
  """A pool of math-verify worker processes with a hard time limit per item (thread-safe).

  Args:
    num_workers: worker processes (default: `JAXREASON_GRADER_WORKERS` or min(4, CPU count)).
    timeout: default per-item limit in seconds, from the moment the item reaches a worker.
    memory_limit_mb: address space each worker may add after start-up (RLIMIT_AS; None: no limit).
    call_timeout: the longest one `grade_many` call may take in seconds, queueing for a worker
      and start-up included (None: `_STARTUP_TIMEOUT` + 2 x timeout x ceil(items / workers)).
      Items not graded by then count as wrong, with a warning.
    context: multiprocessing start method, "spawn" or "forkserver" (never "fork": the caller may
      run JAX threads). As with any spawned process, a calling script needs an
      `if __name__ == "__main__":` guard.

  Workers start in the background when the pool is created; the first call waits for them
  (about a second). Several threads may call `grade_many` at once: each takes the idle workers.
  """

  def __init__(self, num_workers: int | None = None, timeout: float = DEFAULT_TIMEOUT,
               memory_limit_mb: int | None = 4096, context: str = "spawn",
               call_timeout: float | None = None):
    if context not in ("spawn", "forkserver"):
      raise ValueError(f"Grader context must be 'spawn' or 'forkserver', got {context!r}")
    if num_workers is None:
      num_workers = default_num_workers()
    if num_workers < 1:
      raise ValueError(f"Grader needs at least one worker, got num_workers={num_workers}")
    self.num_workers = num_workers
    self.timeout = float(timeout)
    self.memory_limit_mb = memory_limit_mb
    self.call_timeout = None if call_timeout is None else float(call_timeout)
    self.restarts = 0  # workers killed (time limit) or found dead, for logging
    self._ctx = mp.get_context(context)
    self._pid = os.getpid()
    self._cond = threading.Condition()
    self._closed = False
    self._idle: list[_Worker] = [self._spawn() for _ in range(num_workers)]

  # -- public API --------------------------------------------------------------------------------

  @property
  def closed(self) -> bool:
    return self._closed

  def is_equiv(self, pred: Any, gold: Any, timeout: float | None = None) -> bool:
    """Whether one extracted answer equals the reference (see module docstring)."""
    return self.grade_many([(pred, gold)], timeout=timeout)[0]

  def grade_many(self, items: Iterable[tuple[Any, Any]], timeout: float | None = None,
                 full_response: bool = False, call_timeout: float | None = None) -> list[bool]:
    """Grades (pred, gold) pairs in parallel; each item False on any failure or after `timeout` s.

    With `full_response=True`, `pred` is a whole model response and math-verify extracts the
    answer itself (SimpleRL-Zoo / verl); otherwise `pred` is an already extracted answer.
    The call returns within `call_timeout` seconds (default: the pool's, see the class), queueing
    for a worker included. Never raises for bad input.
    """
    start = time.monotonic()
    items = list(items)
    limit = self.timeout if timeout is None else float(timeout)
    results = [False] * len(items)
    todo: collections.deque[tuple[int, tuple[str, str, bool, float]]] = collections.deque()
    for i, item in enumerate(items):
      try:
        pred, gold = item
        decided, payload = self._prepare(pred, gold, full_response)
      except Exception:
        decided, payload = False, None
      if decided is not None:
        results[i] = decided
      else:
        todo.append((i, payload + (full_response, limit * _SOFT_FRACTION)))
    if todo:
      if call_timeout is None:
        call_timeout = self.call_timeout
      if call_timeout is None:
        rounds = -(-len(todo) // self.num_workers)
        call_timeout = _STARTUP_TIMEOUT + 2 * limit * rounds
      try:
        self._run(todo, results, limit, start + float(call_timeout))
      except Exception:
        logger.exception("math grading failed; %d item(s) counted as wrong", len(todo))
    return results

  def close(self) -> None:
    """Stops the idle workers (workers busy in another thread stop when that call returns)."""
    with self._cond:
      self._closed = True
      workers, self._idle = self._idle, []
      self._cond.notify_all()
    if os.getpid() != self._pid:
      return  # a forked child does not own these processes
    for w in workers:
      try:
        w.conn.send(None)
      except (OSError, ValueError):
        pass
    deadline = time.monotonic() + 1.0
    for w in workers:
      w.proc.join(max(0.0, deadline - time.monotonic()))
      self._kill(w)

  def __enter__(self) -> Grader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- internals ---------------------------------------------------------------------------------

  @staticmethod
  def _prepare(pred: Any, gold: Any, full_response: bool) -> tuple[bool | None, tuple[str, str]]:
    pred, gold = sanitize(pred), sanitize(gold)
    if len(gold) > MAX_ANSWER_CHARS:
      return False, ("", "")
    if full_response:
      return (False if not pred.strip() else None), (pred[-MAX_RESPONSE_CHARS:], gold)
    if len(pred) > MAX_ANSWER_CHARS:
      return False, ("", "")
    return quick_equal(pred, gold), (pred, gold)

  def _spawn(self) -> _Worker:
    parent, child = self._ctx.Pipe(duplex=True)
    proc = self._ctx.Process(target=_worker_main, args=(child, self.memory_limit_mb),
                             name="jaxreason-grader", daemon=True)
    proc.start()
    child.close()
    return _Worker(proc, parent)

  @staticmethod
  def _kill(w: _Worker) -> None:
    try:
      if w.proc.is_alive():
        w.proc.kill()
      w.proc.join(1.0)
    except Exception:
      pass
    try:
      w.conn.close()
    except Exception:
      pass

  def _replace(self, w: _Worker) -> _Worker:
    self._kill(w)
    self.restarts += 1
    return self._spawn()

  def _acquire(self, k: int, deadline: float) -> list[_Worker]:
    with self._cond:
      while not self._idle:
        if self._closed:
          raise RuntimeError("Grader is closed")
        left = deadline - time.monotonic()
        if left <= 0:
          return []
        self._cond.wait(min(1.0, left))
      taken, self._idle = self._idle[:k], self._idle[k:]
      return taken

  def _release(self, workers: Sequence[_Worker]) -> None:
    if not workers:
      return
    with self._cond:
      if self._closed:
        for w in workers:
          self._kill(w)
        return
      self._idle.extend(workers)
      self._cond.notify_all()

  def _run(self, todo: collections.deque, results: list[bool], limit: float, call_deadline: float) -> None:
    if self._closed:
      raise RuntimeError("Grader is closed")
    if os.getpid() != self._pid:
      raise RuntimeError("Grader used in a forked child; create one per process (default_grader() does)")
    held = self._acquire(len(todo), call_deadline)
    busy: dict[int, tuple[int, float]] = {}  # id(worker) -> (item index, hard deadline)
    startup_failures = 0
    try:
      while todo or busy:
        now = time.monotonic()
        if now >= call_deadline:  # queueing, start-up and work together took too long
          logger.warning("math grading: call deadline passed; %d item(s) counted as wrong",
                         len(todo) + len(busy))
          break
        for w in held:
          if todo and w.ready and id(w) not in busy:
            i, payload = todo.popleft()
            try:
              w.conn.send(payload)
              busy[id(w)] = (i, now + limit)
            except (OSError, ValueError):  # died while idle: the item never reached it, retry
              todo.appendleft((i, payload))
              held[held.index(w)] = self._replace(w)
        if not todo:  # hand back workers this call no longer needs
          spare = [w for w in held if w.ready and id(w) not in busy]
          held = [w for w in held if not (w.ready and id(w) not in busy)]
          self._release(spare)
          if not busy:
            break
        waiting = [w for w in held if id(w) in busy or not w.ready]
        deadlines = [busy[id(w)][1] if id(w) in busy else w.started + _STARTUP_TIMEOUT for w in waiting]
        ready = set(_wait_conns([w.conn for w in waiting],
                                timeout=max(0.0, min(min(deadlines), call_deadline) - now)))
        for k, w in enumerate(list(held)):
          if w.conn not in ready:
            continue
          try:
            msg = w.conn.recv()
          except (EOFError, OSError):  # the worker died (segfault, OOM kill, failed start-up)
            if id(w) in busy:
              results[busy.pop(id(w))[0]] = False
            elif not w.ready:
              startup_failures += 1
              if startup_failures > self.num_workers:
                raise RuntimeError("math-verify workers keep dying at start-up (is math-verify installed?)")
            held[k] = self._replace(w)
            continue
          if isinstance(msg, tuple):
            w.ready = True
          elif id(w) in busy:
            results[busy.pop(id(w))[0]] = bool(msg)
        now = time.monotonic()
        for k, w in enumerate(list(held)):
          if id(w) in busy and busy[id(w)][1] <= now:  # hard limit: kill, replace, count as wrong
            results[busy.pop(id(w))[0]] = False
            held[k] = self._replace(w)
          elif not w.ready and w.started + _STARTUP_TIMEOUT <= now:
            startup_failures += 1
            if startup_failures > self.num_workers:
              raise RuntimeError(f"math-verify workers did not start within {_STARTUP_TIMEOUT:.0f} s")
            held[k] = self._replace(w)
    finally:
      for k, w in enumerate(held):
        if id(w) in busy:  # interrupted mid-item: its late answer must not reach another call
          held[k] = self._replace(w)
      self._release(held)


# ----------------------------------------------------------------------------------------------
# Shared default grader

_DEFAULT: Grader | None = None
_DEFAULT_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False


def _close_default() -> None:
  grader = _DEFAULT
  if grader is not None and grader._pid == os.getpid():
    grader.close()


def default_grader() -> Grader:
  """The process-wide Grader, created on first use (one per process; closed at exit)."""
  global _DEFAULT, _ATEXIT_REGISTERED
  with _DEFAULT_LOCK:
    if _DEFAULT is None or _DEFAULT.closed or _DEFAULT._pid != os.getpid():
      _DEFAULT = Grader()
      if not _ATEXIT_REGISTERED:
        atexit.register(_close_default)
        _ATEXIT_REGISTERED = True
    return _DEFAULT


def set_default_grader(grader: Grader | None) -> Grader | None:
  """Installs `grader` as the shared one (None: create lazily again); returns the previous one.

  The caller keeps ownership of both: the previous grader is not closed.
  """
  global _DEFAULT, _ATEXIT_REGISTERED
  with _DEFAULT_LOCK:
    previous, _DEFAULT = _DEFAULT, grader
    if grader is not None and not _ATEXIT_REGISTERED:
      atexit.register(_close_default)
      _ATEXIT_REGISTERED = True
    return previous


def is_equiv(pred: Any, gold: Any, timeout: float = DEFAULT_TIMEOUT) -> bool:
  r"""Whether the extracted answer `pred` equals `gold` (math-verify, with cheap checks first).

  Inputs over `MAX_ANSWER_CHARS` (10,000) characters are rejected (False) before any parsing.
  Returns False on anything that fails or exceeds `timeout` seconds; never raises.
  """
  try:
    return default_grader().is_equiv(pred, gold, timeout=timeout)
  except Exception:
    logger.exception("is_equiv failed; counted as wrong")
    return False


def verify_response(response: Any, gold: Any, timeout: float = DEFAULT_TIMEOUT) -> bool:
  r"""math-verify on a whole response against `\boxed{gold}` (its last 10,000 characters); never raises."""
  try:
    return default_grader().grade_many([(response, gold)], timeout=timeout, full_response=True)[0]
  except Exception:
    logger.exception("verify_response failed; counted as wrong")
    return False
