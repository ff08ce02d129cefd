"""Strict conversion between PyTorch `state_dict`s (the report's key layout) and Flax variables.

One rule maps every leaf: the Flax module path `main_0/right_3` is the PyTorch module path
`main.0.right.3`; leaf names map by `_LEAF_NAMES`; every 4-D weight (Conv2d (O, I, kh, kw) and
ConvTranspose2d (I, O, kh, kw) alike) transposes (2, 3, 1, 0) into Flax's (kh, kw, ., .). The
table is built from the model's own variables, and conversion asserts that the key sets are
equal and every shape matches, so nothing is silently dropped. A module name not of that form,
flax's automatic `BatchNorm_0` included (a forgotten `name=`), is a CheckpointError naming the
parameter. So is a value the model cannot hold (a sparse, meta, complex or non-finite tensor,
a float count), named with its file where it came from one. Arrays here are numpy; only the
file functions and the reference check import torch.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np
from flax import traverse_util

from cspgan_jax.errors import CheckpointError, first_line

# (Flax collection, Flax leaf name) -> PyTorch parameter or buffer name.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
    ("batch_stats", "num_batches_tracked"): "num_batches_tracked",
}
# PyTorch's registration order within a module, so written state_dicts read like the report's.
_TORCH_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_TO_FLAX = (2, 3, 1, 0)    # torch (O, I, kh, kw) / ConvT (I, O, kh, kw) -> flax (kh, kw, ., .)
_TO_TORCH = (3, 2, 0, 1)   # the inverse
MODULE_NAME = re.compile(r"^(.*)_(\d+)$")  # a Flax name that mirrors a PyTorch path part
# flax's automatic name for a submodule created without `name=`: the class's name, a counter
AUTO_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*_\d+$")
# What wrappers put before every key: nn.DataParallel / DistributedDataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LIST_AT_MOST = 6


class Entry(NamedTuple):
  torch_key: str
  collection: str
  path: Tuple[str, ...]      # Flax path within the collection
  torch_shape: Tuple[int, ...]


def mirrors_torch(name: str) -> bool:
  """Whether a Flax module name is one part of a PyTorch path (`right_3`), not flax's own."""
  return bool(MODULE_NAME.match(name)) and not AUTO_NAME.match(name)


def torch_module_path(flax_path: Tuple[str, ...], where: str = "") -> str:
  """('main_0', 'right_3') -> 'main.0.right.3'. `where`: the full path named in an error
  (default: the module's)."""
  parts = []
  for name in flax_path:
    if not mirrors_torch(name):
      why = (f"{name!r} is flax's automatic name (a submodule created without name=)"
             if AUTO_NAME.match(name) else f"module name {name!r} is not <attribute>_<index>")
      raise CheckpointError(f"{where or '/'.join(flax_path)}: {why}; name it after the "
                            "PyTorch module path it mirrors, dots as underscores (right.3 -> "
                            "'right_3')")
    m = MODULE_NAME.match(name)
    parts += [m.group(1), m.group(2)]
  return ".".join(parts)


def is_bn_statistic(torch_key: str) -> bool:
  """True for BatchNorm buffers (running statistics, num_batches_tracked)."""
  return torch_key.rsplit(".", 1)[1] in _TORCH_LEAF_ORDER[2:]


def _torch_order(key: str):
  *modules, leaf = key.split(".")
  return tuple(int(p) if p.isdigit() else p for p in modules), _TORCH_LEAF_ORDER.index(leaf)


def conversion_table(variables: Mapping) -> List[Entry]:
  """One entry per leaf of Flax `variables` ({'params': ..., 'batch_stats': ...}), torch order."""
  table = []
  for collection in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(dict(variables.get(collection, {})))
    for path, value in flat.items():
      leaf = _LEAF_NAMES[(collection, path[-1])]
      shape = tuple(np.shape(value))
      torch_shape = tuple(shape[i] for i in _TO_TORCH) if len(shape) == 4 else shape
      module = torch_module_path(path[:-1], where="/".join((collection,) + path))
      table.append(Entry(f"{module}.{leaf}", collection, path, torch_shape))
  return sorted(table, key=lambda e: _torch_order(e.torch_key))


def strip_wrapper_prefixes(state_dict: Mapping) -> Dict:
  """Drops nn.DataParallel's `module.` and torch.compile's `_orig_mod.` prefixes (in any
  nesting) where every key has them."""
  state_dict = dict(state_dict)
  while True:
    prefix = next((p for p in _WRAPPER_PREFIXES
                   if state_dict and all(k.startswith(p) for k in state_dict)), None)
    if prefix is None:
      return state_dict
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}


def _some(keys) -> str:
  keys = sorted(keys, key=lambda k: str(k))
  more = f" (+{len(keys) - _LIST_AT_MOST} more)" if len(keys) > _LIST_AT_MOST else ""
  return ", ".join(keys[:_LIST_AT_MOST]) + more


def check_keys(state_dict: Mapping, table: List[Entry], what: str) -> None:
  """Raises CheckpointError listing missing, unexpected and mis-shaped keys, if any."""
  expected = {e.torch_key: e.torch_shape for e in table}
  missing = expected.keys() - state_dict.keys()
  unexpected = state_dict.keys() - expected.keys()
  misshaped = [f"{k} {tuple(np.shape(state_dict[k]))} != {expected[k]}"
               for k in expected.keys() & state_dict.keys()
               if tuple(np.shape(state_dict[k])) != expected[k]]
  problems = []
  if missing:
    problems.append(f"missing {len(missing)}: {_some(missing)}")
  if unexpected:
    problems.append(f"unexpected {len(unexpected)}: {_some(unexpected)}")
  if misshaped:
    problems.append(f"mis-shaped {len(misshaped)}: {_some(misshaped)}")
  if problems:
    raise CheckpointError(f"{what} does not fit the configured model: " + "; ".join(problems))


def torch_to_flax(state_dict: Mapping, template: Mapping, what: str = "state_dict") -> Dict:
  """PyTorch state_dict (numpy values) -> Flax variables shaped like `template`."""
  state_dict = strip_wrapper_prefixes(state_dict)
  table = conversion_table(template)
  check_keys(state_dict, table, what)
  out = {}
  for e in table:
    value = np.asarray(state_dict[e.torch_key])
    why = unusable_value(e.torch_key, value)
    if why:
      raise CheckpointError(f"{what}: {e.torch_key} {why}")
    if e.path[-1] == "num_batches_tracked":
      if not 0 <= int(value) < 2 ** 31:
        raise CheckpointError(f"{what}: {e.torch_key}={int(value)} does not fit int32")
      value = value.astype(np.int32)
    else:
      value = value.astype(np.float32, copy=False)
      if value.ndim == 4:
        value = np.transpose(value, _TO_FLAX)
    out[(e.collection,) + e.path] = value
  return traverse_util.unflatten_dict(out)


def unusable_value(key: str, value: np.ndarray) -> Optional[str]:
  """Why a parameter or buffer's values cannot become the model's, else None: a count that is
  not an integer, a parameter or statistic that is not real floating point (a cast would drop
  a complex one's imaginary part, or floor a NaN count to int64's minimum), or one holding NaN
  or inf (PyTorch's BCELoss would fail on the NaN output many lines later) or values float32
  cannot hold (float64's, which the cast would make inf)."""
  leaf = key.rsplit(".", 1)[-1]
  why = _unusable_dtype(leaf, value.dtype.name, value.dtype.kind == "f",
                        value.dtype.kind in "iu")
  if why or leaf not in _TORCH_LEAF_ORDER or leaf == "num_batches_tracked":
    return why
  finite = np.isfinite(value)
  if not finite.all():
    return f"holds NaN or inf values ({finite.size - finite.sum()} of {finite.size})"
  if value.size and np.abs(value).max() > np.finfo(np.float32).max:
    return f"holds values beyond float32's range (largest magnitude {np.abs(value).max():.3g})"
  return None


def _unusable_dtype(leaf: str, dtype: str, floating: bool, integer: bool) -> Optional[str]:
  """Why a dtype (numpy's or torch's, named without `torch.`) does not suit a leaf, else None."""
  if leaf not in _TORCH_LEAF_ORDER:  # no model has it: `check_keys` lists it with the others
    return None
  if leaf == "num_batches_tracked":
    return None if integer else f"is {dtype}, not an integer count"
  return None if floating else f"is {dtype}, not a real floating-point tensor"


def flax_to_torch(variables: Mapping, model_config=None, role: str = "") -> Dict[str, np.ndarray]:
  """Flax variables -> state_dict in PyTorch layout (numpy; num_batches_tracked int64).

  With `model_config` and `role` ("netG" or "netD"), the result is checked against the PyTorch
  reference's state_dict (`check_against_reference`)."""
  out = {}
  for e in conversion_table(variables):
    value = np.asarray(traverse_util.flatten_dict(dict(variables[e.collection]))[e.path])
    if e.path[-1] == "num_batches_tracked":
      value = value.astype(np.int64)
    elif value.ndim == 4:
      value = np.ascontiguousarray(np.transpose(value, _TO_TORCH))
    out[e.torch_key] = value
  if model_config is not None:
    check_against_reference(out, model_config, role)
  return out


# ---- files and the reference check (torch imported here only) ----

def load_torch_state_dict(path: str, role: str) -> Dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint file: a state_dict, or a dict holding one under `role`.

  `role` is "netG" or "netD". Loads with `weights_only=True`: no code in the file runs. A
  tensor that is sparse, on the meta device, of the wrong kind (a complex or integer weight, a
  float count) or not finite is a CheckpointError naming the file and the tensor.
  """
  import torch  # pylint: disable=import-outside-toplevel

  if not os.path.isfile(path):
    raise CheckpointError(f"{role} checkpoint not found: {path}")
  try:
    with warnings.catch_warnings():
      # torch >= 2.14 warns, on stderr beside the one line below, that it scans each sparse
      # tensor it loads; this loader refuses sparse tensors anyway (`_unusable_tensor`).
      warnings.filterwarnings("ignore", message="Validating sparse tensor invariants",
                              category=UserWarning)
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # truncated or not a torch file: say so in one line
    raise CheckpointError(f"{path}: not a readable PyTorch checkpoint "
                          f"({type(e).__name__}: {first_line(e)})") from e
  if isinstance(obj, Mapping) and role in obj and isinstance(obj[role], Mapping):
    obj = obj[role]
  if not isinstance(obj, Mapping) or not obj or not all(
      isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
    raise CheckpointError(f"{path}: expected a {role} state_dict (a dict of tensors by name), "
                          f"or a dict with a '{role}' entry")
  out = {}
  for k, v in obj.items():
    why = _unusable_tensor(k, v)
    if why is None:
      # numpy has no bfloat16: a bf16 (or float16) tensor becomes float32, exactly. A tensor
      # saved as a negated or conjugated view keeps that bit, which numpy() refuses.
      v = (v.float() if v.is_floating_point() and v.dtype != torch.float64 else v)
      out[k] = v.detach().resolve_neg().resolve_conj().cpu().numpy()
      why = unusable_value(k, out[k])
    if why:  # convert and parity both read the file here: one line, before any work
      raise CheckpointError(f"{path}: {role}'s {k} {why}")
  return out


def _unusable_tensor(key: str, tensor) -> Optional[str]:
  """Why a loaded tensor cannot become a numpy array of its kind (see `unusable_value`), judged
  before the float32 cast that would hide a bf16 count's dtype; else None."""
  import torch  # pylint: disable=import-outside-toplevel

  if tensor.layout != torch.strided:
    return f"is a {tensor.layout} tensor, not a dense one (save it with .to_dense())"
  if tensor.is_meta:
    return "is on the meta device: it has a shape but no values"
  dtype = str(tensor.dtype).replace("torch.", "")
  if tensor.is_quantized:
    return f"is quantized ({dtype}), not a floating-point tensor"
  floating = tensor.is_floating_point()
  integer = not (floating or tensor.is_complex() or tensor.dtype == torch.bool)
  return _unusable_dtype(key.rsplit(".", 1)[-1], dtype, floating, integer)


def float64_rounding(state_dict: Mapping, what: str) -> Optional[str]:
  """One line on the float64 tensors of a state_dict the model holds in float32, and how many
  values the rounding changed; None where it has none. Said once the conversion succeeded."""
  state_dict = strip_wrapper_prefixes(state_dict)
  keys = [k for k, v in state_dict.items() if np.asarray(v).dtype == np.float64]
  if not keys:
    return None
  total = sum(np.size(state_dict[k]) for k in keys)
  # float32 values compare with float64 exactly; the cast cannot overflow: the range is checked
  changed = sum(int(np.count_nonzero(np.asarray(state_dict[k], np.float32) != state_dict[k]))
                for k in keys)
  plural = "s" if len(keys) > 1 else ""
  return (f"{what}: {len(keys)} float64 tensor{plural} (first: {keys[0]}) rounded to float32; "
          + (f"{changed} of {total} values changed" if changed else "no value changed"))


def module_state_dict(module) -> Dict[str, np.ndarray]:
  """A torch module's state_dict as numpy arrays."""
  return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def check_against_reference(state_dict: Mapping, model_config, role: str) -> None:
  """Raises CheckpointError unless `state_dict` has the keys and shapes of the reference's
  `role` network ("netG" or "netD"), which PyTorch would load with strict=True. Skipped where
  the reference (torch) cannot be imported."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from cspgan_jax import torch_reference  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  with torch.device("meta"):  # shapes only: nothing allocated or initialised
    nets = dict(zip(("netG", "netD"), torch_reference.build_reference(model_config)))
  expected = [Entry(k, "", (), tuple(v.shape)) for k, v in nets[role].state_dict().items()]
  check_keys(state_dict, expected, f"{role} converted from Flax (checked against "
             "torch_reference)")
