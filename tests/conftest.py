import atexit
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# One persistent compilation cache for the session, inherited by the processes the tests start
# (the bench script, two-process training, the CLI), which otherwise compile again what the
# tests before them compiled. Set before anything compiles; an explicit setting wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="cspgan-tests-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
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
