import atexit
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A persistent compilation cache for the session, inherited by the processes the tests start
# (the bench script, two-process training, the CLI), which otherwise compile again what the
# tests before them compiled. Set before anything compiles; an explicit setting wins. Each
# xdist worker has its own: jax writes an entry in place, unlocked (its lock comes with a size
# limit, whose scan of every entry at each write took 25 ms at 558 entries, two files' worth),
# so a process of one worker could read half of an entry the other was writing, and warn on a
# stderr that a test reads whole.
_SESSION_CACHE = "CSPGAN_TESTS_JAX_CACHE"  # the session's folder (under xdist, its controller's)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ or _SESSION_CACHE in os.environ:
  if _SESSION_CACHE not in os.environ:
    os.environ[_SESSION_CACHE] = tempfile.mkdtemp(prefix="cspgan-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ[_SESSION_CACHE], ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      os.environ[_SESSION_CACHE], os.environ.get("PYTEST_XDIST_WORKER", "main"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture
def config_path():
  return lambda name: os.path.join(ROOT, "configs", f"{name}.py")


@pytest.fixture
def tiny_config(config_path):
  from cspgan_jax import config_lib
  return lambda *overrides: config_lib.load_config(config_path("tiny"), overrides)


def pytest_sessionfinish(session, exitstatus):
  """Frees the session's compiled programs and arrays before the worker reports its end.
  3 of 8 fresh-clone runs (2026-11-28) ended, all tests passed, with a KeyboardInterrupt inside
  jax's gc callback reported as an unraisable-exception warning. The likely cause (not proven):
  pytest collects garbage once more after the worker's report (at unconfigure), and
  pytest-xdist's controller, ending the worker's process, interrupted that collection. Freed
  here, there is little left for it; the runs since were clean."""
  del session, exitstatus
  import gc  # pylint: disable=import-outside-toplevel
  if "jax" in sys.modules:
    from cspgan_jax import train  # pylint: disable=import-outside-toplevel
    train._variables_initializer.cache_clear()  # pylint: disable=protected-access
    sys.modules["jax"].clear_caches()
  gc.collect()
