"""Loading ml_collections config files, `--config.group.field=value` overrides, validation."""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import sys
from typing import Iterable

import ml_collections

from cspgan_jax import datasets, input_pipeline, losses, models, parallel, train
from cspgan_jax.errors import ConfigError

OPTIMIZERS = ("torch_adam", "adam")
# The names each module accepts, checked before anything runs.
DATA_SOURCES = datasets.SOURCES
DTYPES = tuple(train.DTYPES)
PRECISIONS = ("default", "high", "highest")  # jax.default_matmul_precision's names
PIPELINES = input_pipeline.PIPELINES

# Every field of a config, with its type (configs/baseline.py's; a test holds the two equal): a
# config file that lacks one, or sets one to another type (None for an int), is one error line
# before anything runs rather than a traceback wherever the field is first read.
FIELD_TYPES = {
    "model": dict(block=str, discriminator=str, nz=int, ngf=int, ndf=int, nc=int, resolution=int,
                  bn_momentum=float, bn_epsilon=float, edge_layers_as_matmul=bool),
    "train": dict(batch_size=int, epochs=int, num_steps=int, lr_g=float, lr_d=float, beta1=float,
                  beta2=float, adam_eps=float, optimizer=str, seed=int, loss=str, dtype=str,
                  matmul_precision=str, steps_per_dispatch=int, scan_unroll=int,
                  d_real_fake_together=bool, sync_bn=bool, sample_use_running_average=bool,
                  num_samples=int, log_every=int, sample_every=int, checkpoint_every=int,
                  keep_checkpoints=int, stop_check_every=int, profile_start=int,
                  profile_steps=int, xla_options=str),
    "data": dict(source=str, name=str, data_dir=str, split=str, num_examples=int,
                 synthetic_seed=int, shuffle_seed=int, pipeline=str, device_budget_gb=float,
                 prefetch=int, reader_threads=int),
    "dist": dict(cluster=str, coordinator_address=str, num_processes=int, process_id=int,
                 initialization_timeout=int),
}


def _has_type(value, kind) -> bool:
  if isinstance(value, bool):
    return kind is bool
  return isinstance(value, kind) or (kind is float and isinstance(value, int))


def check_fields(config) -> None:
  """Raises ConfigError for the first field of `FIELD_TYPES` missing or of another type."""
  for group, fields in FIELD_TYPES.items():
    node = config.get(group) if isinstance(config, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"config lacks the group {group!r}")
    for name, kind in fields.items():
      if name not in node:
        raise ConfigError(f"config lacks the field {group}.{name}")
      if not _has_type(node[name], kind):
        raise ConfigError(f"config field {group}.{name} must be {kind.__name__}, got "
                          f"{node[name]!r}")


def check_known(config) -> None:
  """Raises ConfigError for a group or field of a config file that `FIELD_TYPES` lacks: nothing
  reads it, so a misspelt field (`train.lr_G`) would leave the baseline's value in force."""
  for group in config.keys():
    fields = FIELD_TYPES.get(group)
    if fields is None:
      raise ConfigError(f"config has a group {group!r} that nothing reads (groups: "
                        f"{', '.join(FIELD_TYPES)})")
    node = config[group]
    for name in (node.keys() if isinstance(node, ml_collections.ConfigDict) else ()):
      if name not in fields:
        raise ConfigError(f"config field {group}.{name} is not one that cspgan reads (a typo? a "
                          "new field goes into configs/baseline.py and config_lib.FIELD_TYPES)")


# The folder holding this package and, in a checkout or an editable install, `configs/`
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def load_config(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Runs `get_config()` of the Python file at `path`, applies overrides, validates."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  if not path.endswith(".py"):
    raise ConfigError(f"config file must be a Python file defining get_config(): {path}")
  path = os.path.abspath(path)
  # Variant configs do `from configs import baseline`: make the folder above `configs/`
  # importable, and, for a config kept elsewhere (a researcher's own folder), this checkout's.
  extra = [os.path.dirname(os.path.dirname(path)), os.path.dirname(path)]
  if os.path.isfile(os.path.join(_CHECKOUT, "configs", "baseline.py")):
    extra.append(_CHECKOUT)
  sys.path[:0] = extra
  try:
    spec = importlib.util.spec_from_file_location(f"_cspgan_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if isinstance(config, ml_collections.FrozenConfigDict):  # overrides change it: a copy
      config = ml_collections.ConfigDict(config)
  except Exception as e:  # a broken config file is the user's input: one line, not a traceback
    raise ConfigError(f"cannot load config {path}: {type(e).__name__}: {e}") from e
  finally:
    del sys.path[:len(extra)]
  overrides = list(overrides)
  apply_overrides(config, overrides)
  validate_config(config)
  check_known(config)
  check_seeds(config)
  named = {_override_key(item) for item in overrides}
  if "train.epochs" in named and "train.num_steps" not in named and config.train.num_steps:
    # The file sets num_steps (the quickstart, tiny), which wins: the override would do nothing.
    raise ConfigError(f"train.epochs has no effect: {os.path.basename(path)} sets "
                      f"train.num_steps={config.train.num_steps}, which wins; add "
                      "--config.train.num_steps=0")
  return config


def check_seeds(config) -> None:
  """Seeds in [0, 2**32): jax's key takes a seed's low 32 bits (2**32 is the key of 0, -1 that
  of 2**32 - 1) and numpy's generators refuse negatives, and past int64 both end in a traceback
  where first used. Checked on the configs a user gives, not on those stored in checkpoints,
  which trained as they were."""
  t, d = config.train, config.data
  if not all(0 <= seed < 2**32 for seed in (t.seed, d.synthetic_seed, d.shuffle_seed)):
    raise ConfigError(f"train.seed, data.synthetic_seed and data.shuffle_seed must be in "
                      f"[0, 2**32), got {t.seed}, {d.synthetic_seed} and {d.shuffle_seed}")


def _override_key(item: str) -> str:
  text = item[len("--config."):] if item.startswith("--config.") else item
  return text.split("=", 1)[0]


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  """Applies `group.field=value` strings (a leading `--config.` is accepted) in place.

  Values are parsed as Python literals where possible, else taken as strings; the field must
  exist and keep its type (ints are accepted for floats).
  """
  for item in overrides:
    text = item[len("--config."):] if item.startswith("--config.") else item
    if "=" not in text:
      raise ConfigError(f"override {item!r} is not of the form --config.group.field=value")
    key, raw = text.split("=", 1)
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        raise ConfigError(f"unknown config field {key!r}")
      node = node[p]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ConfigError(f"unknown config field {key!r}")
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(old, str) and not isinstance(value, str):
      value = raw
    if old is not None and type(value) is not type(old):
      raise ConfigError(f"config field {key!r} is {type(old).__name__}, got {raw!r}")
    node[leaf] = value


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field that cannot work."""
  check_fields(config)
  m, t, d = config.model, config.train, config.data
  checks = [
      (m.block in models.BLOCKS, f"model.block must be one of {models.BLOCKS}, got {m.block!r}"),
      (m.discriminator in models.DISCRIMINATORS,
       f"model.discriminator must be one of {models.DISCRIMINATORS}, got {m.discriminator!r}"),
      (m.resolution >= 32 and m.resolution & (m.resolution - 1) == 0,
       f"model.resolution must be a power of two >= 32, got {m.resolution}"),
      (min(m.nz, m.ngf, m.ndf) >= 1, "model.nz, ngf and ndf must be positive"),
      (m.nc == 3, f"model.nc must be 3 (the data are RGB images), got {m.nc}"),
      (m.nz >= 2, f"model.nz must be >= 2 (CSPup splits it in two), got {m.nz}"),
      (0 <= m.bn_momentum <= 1, f"model.bn_momentum must be in [0, 1], got {m.bn_momentum}"),
      (m.bn_epsilon > 0, f"model.bn_epsilon must be positive, got {m.bn_epsilon}"),
      (t.batch_size >= 2, f"train.batch_size must be >= 2 (BatchNorm), got {t.batch_size}"),
      (0 < t.lr_g < math.inf, f"train.lr_g must be positive and finite, got {t.lr_g}"),
      (0 < t.lr_d < math.inf, f"train.lr_d must be positive and finite, got {t.lr_d}"),
      (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and beta2 must be in [0, 1)"),
      (0 <= t.adam_eps < math.inf,  # as torch.optim.Adam requires
       f"train.adam_eps must be >= 0 and finite, got {t.adam_eps}"),
      (t.optimizer in OPTIMIZERS, f"train.optimizer must be one of {OPTIMIZERS}, got {t.optimizer!r}"),
      (t.loss in losses.LOSSES, f"train.loss must be one of {tuple(losses.LOSSES)}, got {t.loss!r}"),
      (t.matmul_precision in PRECISIONS,
       f"train.matmul_precision must be one of {PRECISIONS}, got {t.matmul_precision!r}"),
      (t.dtype in DTYPES, f"train.dtype must be one of {DTYPES}, got {t.dtype!r}"),
      (d.source in DATA_SOURCES, f"data.source must be one of {DATA_SOURCES}, got {d.source!r}"),
      (d.pipeline in PIPELINES, f"data.pipeline must be one of {PIPELINES}, got {d.pipeline!r}"),
      (config.dist.cluster in parallel.CLUSTERS,
       f"dist.cluster must be one of {parallel.CLUSTERS}, got {config.dist.cluster!r}"),
      (d.num_examples >= 0, f"data.num_examples must be >= 0, got {d.num_examples}"),
      (d.device_budget_gb >= 0, f"data.device_budget_gb must be >= 0, got {d.device_budget_gb}"),
      (d.prefetch >= 1, f"data.prefetch must be >= 1, got {d.prefetch}"),
      (d.reader_threads >= 1, f"data.reader_threads must be >= 1, got {d.reader_threads}"),
      (t.epochs >= 1 or t.num_steps >= 1, "train.epochs or train.num_steps must be >= 1"),
      (t.num_steps >= 0, f"train.num_steps must be >= 0, got {t.num_steps}"),
      (t.num_samples >= 2, f"train.num_samples must be >= 2 (BatchNorm), got {t.num_samples}"),
      (min(t.log_every, t.sample_every, t.checkpoint_every, t.stop_check_every) >= 1,
       "train.log_every, sample_every, checkpoint_every and stop_check_every must be >= 1"),
      (t.scan_unroll >= 1, f"train.scan_unroll must be >= 1, got {t.scan_unroll}"),
      (t.steps_per_dispatch >= 1, f"train.steps_per_dispatch must be >= 1, got {t.steps_per_dispatch}"),
      # (< 1 left to its own check above: the list is built whole, and `% 0` would raise here)
      (t.steps_per_dispatch < 1 or all(e % t.steps_per_dispatch == 0
                                       for e in (t.log_every, t.sample_every, t.checkpoint_every)),
       f"train.log_every, sample_every and checkpoint_every must be multiples of "
       f"train.steps_per_dispatch ({t.steps_per_dispatch})"),
      (t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}"),
      (min(t.profile_steps, t.profile_start) >= 0,
       f"train.profile_steps and profile_start must be >= 0, got "
       f"{t.profile_steps} and {t.profile_start}"),
  ]
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)
  parallel.xla_options(t)  # its form; XLA itself names an option it does not know
