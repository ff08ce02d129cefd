"""The command line's persistent compilation cache: compiled programs kept on disk across runs.

A restarted or resumed run, or the next experiment of the same shapes, loads the training step
and the initialiser instead of compiling them again. It is jax's own cache, keyed by the
program, the compiler options, the devices and jax's version, so an entry only ever serves the
identical program. The command line turns it on; a script that imports `cspgan_jax` keeps
jax's defaults.

  (default)                            ~/.cache/cspgan/jax-compilation-cache ($XDG_CACHE_HOME)
  CSPGAN_COMPILATION_CACHE=DIR         that folder
  CSPGAN_COMPILATION_CACHE=off         no cache
  JAX_COMPILATION_CACHE_DIR=DIR        jax's own setting, which then decides alone
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from typing import Optional

ENV = "CSPGAN_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no", "none")
# jax evicts the least recently used entries beyond this (its default is no limit). A
# baseline step compiled for one GPU is tens of MB; 2 GiB holds every experiment's at both
# dtypes many times over.
MAX_BYTES = 2 * 2**30


def cache_root(environ=os.environ) -> str:
  """The project's folder under the user's cache ($XDG_CACHE_HOME or ~/.cache)."""
  cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "cspgan")


def chosen_dir(environ=os.environ) -> Optional[str]:
  """The folder the command line caches compiled programs in; None where it leaves jax alone
  (JAX_COMPILATION_CACHE_DIR set, or the cache turned off)."""
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return None
  choice = environ.get(ENV, "").strip()
  if choice.lower() in OFF:
    return None
  return os.path.abspath(os.path.expanduser(choice)) if choice else os.path.join(
      cache_root(environ), "jax-compilation-cache")


def enable(environ=os.environ) -> Optional[str]:
  """Points jax's persistent compilation cache at `chosen_dir()` before anything compiles;
  returns the folder (None: left to jax). Programs that compile in under jax's threshold
  (1 s by default) are not written: they cost less to compile than to look up."""
  path = chosen_dir(environ)
  if path is None:
    return None
  try:  # jax would only warn, at length, on every program it could not write
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    print(f"cspgan: note: compiled programs are not kept across runs: cannot write {path} "
          f"({e.strerror or e}; set {ENV} to another folder, or to off)", file=sys.stderr)
    return None
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in environ and _can_cap():
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return path


def _can_cap() -> bool:
  """Whether jax can keep the cache under a size: its eviction locks the folder with `filelock`
  (a dependency of ours, not of jax's). Without it every lookup and write of a capped cache
  fails with a warning, so an environment that lacks it keeps the cache uncapped instead."""
  try:
    importlib.import_module("filelock")
  except ImportError:
    return False
  return True
