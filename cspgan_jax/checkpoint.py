"""Whole-training-state checkpoints with orbax: `WORKDIR/checkpoints/<step>/{state,config}`.

The state goes through flax's `to_state_dict` (plain nested dicts of arrays), so optax state
types never reach orbax's metadata; the run's config is stored beside it as JSON, so `sample`,
`convert` and a resumed `train` rebuild the same architecture from the workdir alone.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Optional, Tuple

import jax
import numpy as np
import ml_collections
import orbax.checkpoint as ocp
from flax import serialization, traverse_util

from cspgan_jax import config_lib, train
from cspgan_jax.errors import CheckpointError, ConfigError, first_line, io_reason

CHECKPOINT_DIR = "checkpoints"
_ARCHITECTURE_FIELDS = ("block", "discriminator", "nz", "ngf", "ndf", "nc", "resolution")
# Fields younger than some checkpoints, with what the code did before each existed: a stored
# config without them reads as the run that wrote it ran (config_lib checks every field).
_LATER_FIELDS = {
    "model": {"edge_layers_as_matmul": False},
    "train": {"sync_bn": False, "d_real_fake_together": False,
              "sample_use_running_average": False, "profile_start": 0, "profile_steps": 0,
              "xla_options": ""},
    "data": {"split": "train"},
    "dist": {"coordinator_address": "", "num_processes": 0, "process_id": -1,
             "initialization_timeout": 300, "cluster": ""},
}


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def manager(workdir: str, keep: Optional[int] = None, create: bool = True):
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               handler_registry=_handler_registry())


def _handler_registry():
  """A step's three items and the arguments each is saved and restored with (orbax's
  `item_names`, which chose them by the first call's arguments, is deprecated for this)."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item, save, restore in (("state", ocp.args.StandardSave, ocp.args.StandardRestore),
                              ("config", ocp.args.JsonSave, ocp.args.JsonRestore),
                              ("layout", ocp.args.JsonSave, ocp.args.JsonRestore)):
    registry.add(item, save)
    registry.add(item, restore)
  return registry


def _state_dict(state: train.GANState) -> dict:
  """The state as a checkpoint holds it: without the networks' `compute_params` (bf16 copies
  of parameters it holds, made again on restore), so checkpoints of either dtype and of
  earlier versions have one layout."""
  tree = serialization.to_state_dict(state.without_compute_params())
  for net in ("g", "d"):
    tree[net] = {k: v for k, v in tree[net].items() if k != "compute_params"}
  return tree


def _from_state_dict(template: train.GANState, tree: dict) -> train.GANState:
  tree = dict(tree, **{net: dict(tree[net], compute_params=None) for net in ("g", "d")})
  return serialization.from_state_dict(template.without_compute_params(), tree)


def _to_saveable(state: train.GANState):
  return _state_dict(jax.device_get(state))


@contextlib.contextmanager
def _writes_to(mngr: ocp.CheckpointManager):
  """orbax's failures to write (a full disk, a read-only folder: tensorstore's ValueError or an
  OSError, raised by the save that failed or by the next call after it) as one line."""
  try:
    yield
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot write a checkpoint in {mngr.directory}: {_reason(e)}") from e


def _reason(error: Exception) -> str:
  """What the system said (a full disk, a read-only folder), else the error's first line."""
  return io_reason(error) or first_line(error)


def wait_for_writes(mngr: ocp.CheckpointManager) -> None:
  """Waits for the asynchronous saves; a failed save is one line."""
  with _writes_to(mngr):
    mngr.wait_until_finished()


def finish_writes(mngr: ocp.CheckpointManager) -> None:
  """Waits for the asynchronous saves, then closes the manager; a failed save is one line."""
  try:
    wait_for_writes(mngr)
  finally:
    mngr.close()


def save(workdir: str, state: train.GANState, config: ml_collections.ConfigDict,
         mngr: Optional[ocp.CheckpointManager] = None) -> int:
  """Saves `state` at its step and waits for the write; returns the step."""
  step = int(jax.device_get(state.step))
  own = mngr is None
  mngr = mngr or manager(workdir)
  try:
    args = _save_args(_to_saveable(state), config)
    with _writes_to(mngr):
      mngr.save(step, args=args, force=True)
      mngr.wait_until_finished()
  finally:
    if own:
      mngr.close()
  return step


def save_async(mngr: ocp.CheckpointManager, state: train.GANState,
               config: ml_collections.ConfigDict) -> int:
  """Starts writing `state` (host arrays) at its step and returns; `mngr.wait_until_finished()`
  before exiting. Every process of a multi-host run calls it, as orbax requires."""
  step = int(np.asarray(state.step))
  args = _save_args(_state_dict(state), config)
  with _writes_to(mngr):  # also where an earlier asynchronous save's failure comes out
    mngr.save(step, args=args, force=True)
  return step


def _save_args(state_dict: dict, config: ml_collections.ConfigDict) -> ocp.args.Composite:
  # The devices and processes that wrote it: a run resumed on another number of devices reads
  # its data in another order (`read_layout`).
  layout = {"devices": jax.device_count(), "processes": jax.process_count()}
  return ocp.args.Composite(state=ocp.args.StandardSave(state_dict),
                            config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
                            layout=ocp.args.JsonSave(layout))


def read_layout(workdir: str, step: int) -> Optional[dict]:
  """{"devices": N, "processes": P} of the run that wrote checkpoint `step`; None for a
  checkpoint written before checkpoints recorded it."""
  mngr = manager(workdir, create=False)
  try:
    layout = mngr.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))["layout"]
    return layout if isinstance(layout, dict) else None
  except Exception:  # pylint: disable=broad-except  # older checkpoints have no such item
    return None
  finally:
    mngr.close()


def latest_step(workdir: str) -> Optional[int]:
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  mngr = manager(workdir, create=False)
  try:
    return mngr.latest_step()
  finally:
    mngr.close()


def all_steps(workdir: str):
  mngr = manager(workdir, create=False)
  try:
    return sorted(mngr.all_steps())
  finally:
    mngr.close()


def read_config(workdir: str, step: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config stored with a checkpoint (validated)."""
  step = _resolve_step(workdir, step)
  mngr = manager(workdir, create=False)
  try:
    data = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  except Exception as e:  # pylint: disable=broad-except
    # An empty or half-copied step folder (orbax's own writes are atomic renames)
    others = ", ".join(str(s) for s in all_steps(workdir) if s != step) or "none"
    raise CheckpointError(f"checkpoint step {step} in {checkpoint_dir(workdir)} has no "
                          f"readable config ({type(e).__name__}): it is incomplete or damaged; "
                          f"move its folder away to use the others (steps: {others})") from e
  finally:
    mngr.close()
  if not isinstance(data, dict) or "model" not in data or "train" not in data:
    raise CheckpointError(f"checkpoint step {step} in {checkpoint_dir(workdir)} has no config")
  for group, fields in _LATER_FIELDS.items():
    if isinstance(data.setdefault(group, {}), dict):
      for name, before in fields.items():
        data[group].setdefault(name, before)
  config = ml_collections.ConfigDict(data)
  try:
    config_lib.validate_config(config)
  except ConfigError as e:
    raise CheckpointError(f"checkpoint in {workdir} holds an unusable config: {e}") from e
  return config


def _resolve_step(workdir: str, step: Optional[int]) -> int:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise CheckpointError(f"workdir {workdir} is a file, not a directory")
  if not os.path.isdir(workdir):
    raise CheckpointError(f"workdir not found: {workdir}")
  latest = latest_step(workdir)
  if latest is None:
    raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}")
  if step is None:
    return latest
  steps = all_steps(workdir)
  if step not in steps:
    raise CheckpointError(f"no checkpoint at step {step} in {checkpoint_dir(workdir)} (steps: "
                          f"{', '.join(map(str, steps))})")
  return step


def check_architecture(stored: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                       where: str) -> None:
  """Raises CheckpointError when `config` describes other networks than the checkpoint."""
  diff = [f"model.{k}: checkpoint {stored.model[k]!r}, config {config.model[k]!r}"
          for k in _ARCHITECTURE_FIELDS if stored.model[k] != config.model[k]]
  if diff:
    raise CheckpointError(f"checkpoint in {where} is a different architecture: " + "; ".join(diff))
  if stored.train.optimizer != config.train.optimizer:  # the two keep their state differently
    raise CheckpointError(f"checkpoint in {where} holds {stored.train.optimizer!r}'s optimizer "
                          f"state, the config asks for {config.train.optimizer!r}: resume with "
                          f"--config.train.optimizer={stored.train.optimizer}")


def restore(workdir: str, config: Optional[ml_collections.ConfigDict] = None,
            step: Optional[int] = None) -> Tuple[train.GANState, ml_collections.ConfigDict]:
  """(state, config) from the latest (or given) checkpoint; `config` defaults to the stored one."""
  step = _resolve_step(workdir, step)
  stored = read_config(workdir, step)
  if config is not None:
    check_architecture(stored, config, workdir)
  config = config or stored
  # Shapes only: no initialisation runs; the static parts (modules, optimizers) come along.
  template = jax.eval_shape(lambda: train.init_state(config, jax.random.PRNGKey(0)))
  mngr = manager(workdir, create=False)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_state_dict(template))))
  except Exception as e:  # corrupt or foreign files: one line naming the checkpoint
    raise CheckpointError(f"cannot restore checkpoint step {step} from "
                          f"{checkpoint_dir(workdir)}: {first_line(e)}") from e
  finally:
    mngr.close()
  _check_shapes(_state_dict(template), restored["state"],
                os.path.join(checkpoint_dir(workdir), str(step)))
  state = _from_state_dict(template, restored["state"])
  return state.with_compute_params(train.compute_dtype(config)), config


def _check_shapes(expected: dict, restored: dict, where: str) -> None:
  """Raises CheckpointError unless every restored array has its template's shape. orbax
  restores each array at the shape it was stored with (and casts it to the template's dtype,
  so dtypes always agree), whatever the template says: arrays edited or copied in from a run of
  another width would otherwise fail deep inside flax, tens of lines later."""
  got = traverse_util.flatten_dict(restored)
  wrong = [(path, np.shape(got[path]) if path in got else None, tuple(leaf.shape))
           for path, leaf in traverse_util.flatten_dict(expected).items()
           if path not in got or np.shape(got[path]) != tuple(leaf.shape)]
  if wrong:
    path, have, want = wrong[0]
    have = "missing" if have is None else have
    more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
    raise CheckpointError(f"{where}: the checkpoint's arrays do not fit its stored config: "
                          f"{'/'.join(path)} is {have} there, the config's model needs "
                          f"{want}{more}")
