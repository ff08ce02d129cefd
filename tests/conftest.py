import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture
def config_path():
  return lambda name: os.path.join(ROOT, "configs", f"{name}.py")


@pytest.fixture
def tiny_config(config_path):
  from cspgan_jax import config_lib
  return lambda *overrides: config_lib.load_config(config_path("tiny"), overrides)
