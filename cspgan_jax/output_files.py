"""Output files written whole or not at all: each under a temporary name beside it, synced,
then renamed, so a full disk or a stopped command leaves every output as it was, and nothing
half-written to block a rerun that will not overwrite."""

from __future__ import annotations

import os
import secrets
from typing import Callable, List, Optional, Sequence

from cspgan_jax.errors import CspganError, first_line, io_reason


# Below this, a write that failed without saying why failed for want of space (numpy says
# "196608 requested and 992 written", torch "unexpected pos", neither the system's reason).
_NEARLY_FULL_BYTES = 1 << 20


def _write_failure(error: BaseException, directory: str) -> str:
  """Why a write into `directory` failed: the system's reason where the error carries one."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror  # without the temporary file's name, which is gone by then
  reason = io_reason(error)
  if reason:
    return reason
  try:
    stats = os.statvfs(directory)
    if stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES:
      return f"No space left on device ({first_line(error)})"
  except OSError:
    pass
  return first_line(error)


def _write_temporary(path: str, write: Callable[[str], None]) -> str:
  """`write(name)` into a new file beside `path`, synced; returns that file's name. On any
  failure the file is removed and, for a write the system refused (torch says so with a
  RuntimeError), the error is one line naming `path` and the reason."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
  try:
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask's mode
    write(temporary)
    fd = os.open(temporary, os.O_RDONLY)  # on the disk before it takes the output's name
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except BaseException as e:
    reason = _write_failure(e, directory) if isinstance(e, (OSError, RuntimeError)) else None
    _remove(temporary)
    if reason is None:
      raise
    raise CspganError(f"cannot write {path}: {reason}") from e
  return temporary


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def missing_folders(folder: str) -> List[str]:
  """`folder` and the folders above it that do not exist yet, deepest first: what
  `os.makedirs(folder)` makes, and what to take away again where the work then fails."""
  missing, at = [], os.path.abspath(folder)
  while not os.path.lexists(at):
    missing.append(at)
    at = os.path.dirname(at)
  return missing


def file_in_the_way(folder: str) -> Optional[str]:
  """The file standing where `folder` or a folder above it would be (`os.makedirs` says only
  "File exists" or "Not a directory" of it), else None."""
  missing = missing_folders(folder)
  nearest = os.path.dirname(missing[-1]) if missing else os.path.abspath(folder)
  return None if os.path.isdir(nearest) else nearest


def remove_folders(folders: Sequence[str]) -> None:
  """rmdir of each (deepest first); one that holds something now stays."""
  for folder in folders:
    try:
      os.rmdir(folder)
    except OSError:
      pass


def write_outputs(outputs: Sequence[tuple]) -> None:
  """Writes each (path, write) to a temporary file, all of them before any takes its name: a
  failure (a full disk) leaves every output as it was, and nothing half-written to block a
  rerun, nor the folders made for them."""
  made = sorted({f for path, _ in outputs
                 for f in missing_folders(os.path.dirname(os.path.abspath(path)))},
                key=len, reverse=True)
  written = []
  try:
    for path, write in outputs:
      written.append((_write_temporary(path, write), path))
  except BaseException:
    for temporary, _ in written:
      _remove(temporary)
    remove_folders(made)
    raise
  for temporary, path in written:
    os.replace(temporary, path)
