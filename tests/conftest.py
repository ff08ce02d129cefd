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
