"""User-facing errors: the CLI prints each as one line and exits non-zero."""

import errno
import os
import re
import sys
from typing import Optional


class CspganError(Exception):
  """Base class of the errors a user can cause (bad config, file, data or checkpoint)."""


class ConfigError(CspganError):
  """A config file or override that cannot be used."""


class CheckpointError(CspganError):
  """A checkpoint that is missing, unreadable, or does not fit the model."""


class DataError(CspganError):
  """Input data that cannot be used."""


class DivergedError(CspganError):
  """Training reached non-finite losses (a sweep can catch this one and go on to the next)."""


def drop_closed_event_loop_reports() -> None:
  """Once orbax has given up on a checkpoint (a restore that failed, a write the disk refused),
  it closes its event loop while tensorstore's other reads or writes are still in flight; each
  of them, finishing, reports `RuntimeError('Event loop is closed')` through
  `sys.unraisablehook`, a traceback apiece (94 for the tiny model's state) after the one line
  that says what went wrong. Those reports, and only those, are dropped from then on: the
  `cspgan` command calls this for its whole process."""
  if getattr(sys.unraisablehook, "drops_closed_event_loop_reports", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_closed_event_loop_reports = True
  sys.unraisablehook = hook


def reader_left() -> int:
  """For `except BrokenPipeError` around a command's output: the reader left early (`... |
  head`), which is not an error. stdout goes to /dev/null so that Python's flush at exit
  raises no second one; returns 141 (128 + SIGPIPE), what a shell reports for such a command."""
  os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  return 141


def first_line(error: BaseException, limit: int = 300) -> str:
  """An error's message cut to its first line (libraries append pages of context), else its
  type; without terminal colour codes (torch's unpickler bolds names with them)."""
  text = _COLOUR_CODES.sub("", str(error)).strip()
  return text.splitlines()[0][:limit] if text else type(error).__name__


_COLOUR_CODES = re.compile(r"\x1b\[[0-9;]*m")


# What a write can meet that the user, not the code, has to fix
_WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)


def io_reason(error: BaseException) -> Optional[str]:
  """The system's reason inside a failed write, however the library wrapped it: an OSError's
  own, tensorstore's "...: No space left on device [os_error_code='28']", or array_record's
  "write() failed: No space left on device; ..."; None if the error carries none."""
  seen = set()
  while error is not None and id(error) not in seen:  # the error and what caused it
    seen.add(id(error))
    if isinstance(error, OSError) and error.strerror:
      return error.strerror + (f": {error.filename}" if error.filename else "")
    text = str(error)
    found = re.search(r":\s*([^:\[]+?)\s*\[os_error_code='(\d+)'\]", text)
    if found:
      return f"{found.group(1)} (errno {found.group(2)})"
    for code in _WRITE_FAILURES:
      if os.strerror(code) in text:
        return f"{os.strerror(code)} (errno {code})"
    error = error.__cause__ or error.__context__
  return None
