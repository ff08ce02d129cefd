"""The seed's experiment configs against SPEC.md's numbers ("Constants", "The experiments")."""

import pytest

from cspgan_jax import config_lib

# SPEC.md's baseline row and constants, and what sets the training step and its outputs
BASELINE = {
    "model.block": "relu", "model.discriminator": "dcgan", "model.nz": 100, "model.ngf": 64,
    "model.ndf": 64, "model.nc": 3, "model.resolution": 128, "model.bn_momentum": 0.1,
    "model.bn_epsilon": 1e-5, "train.batch_size": 64, "train.epochs": 10, "train.num_steps": 0,
    "train.lr_g": 1e-4, "train.lr_d": 5e-5, "train.beta1": 0.5, "train.beta2": 0.999,
    "train.adam_eps": 1e-8, "train.loss": "torch_bce", "train.dtype": "float32",
    "train.sync_bn": False, "train.sample_use_running_average": False, "train.num_samples": 64,
    "train.log_every": 1000, "train.sample_every": 500, "data.source": "tfds",
    "data.name": "celeba", "data.split": "all", "data.num_examples": 0,
}
# What each experiment changes, and nothing else. num_samples: the report draws its fixed noise
# with the batch size (configs/exp3.py), where SPEC.md says 64.
EXPERIMENTS = {
    "exp1": {"model.discriminator": "avgpool", "train.lr_d": 3e-5},
    "exp2": {"model.block": "leaky_bn", "train.lr_d": 1e-4},
    "exp3": {"train.batch_size": 256, "train.epochs": 15, "train.num_samples": 256},
    "exp4": {"model.block": "leaky_bn", "model.discriminator": "avgpool",
             "train.batch_size": 256, "train.epochs": 15, "train.num_samples": 256},
}


def _fields(config_path, name):
  config = config_lib.load_config(config_path(name))
  return {f"{g}.{k}": v for g in config for k, v in config[g].items()}


def test_baseline_has_the_spec_numbers(config_path):
  fields = _fields(config_path, "baseline")
  assert {k: fields[k] for k in BASELINE} == BASELINE


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_each_experiment_changes_what_the_spec_says_and_nothing_else(config_path, name):
  base, fields = _fields(config_path, "baseline"), _fields(config_path, name)
  assert fields.keys() == base.keys()
  assert {k: v for k, v in fields.items() if v != base[k]} == EXPERIMENTS[name]
