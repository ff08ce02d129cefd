"""The convolutions' parameters in the compute dtype, written by the step that updates them.

In bf16 mixed precision every convolution reads its kernel and bias rounded to bf16. Cast where
the step starts, that is a kernel per parameter on a GPU, reading float32 and writing bf16: in
the H200 run's program (batch 64, bf16) 47 such casts; the 23 its trace names took 0.15 ms of
the 4.83 ms of kernels an iteration, most of them launch-bound (a 1,024-value bias cast took
3-4 us). Kept in the state beside the float32 parameters and rounded by the step that updated
them, the casts join the optimizer's update (XLA fuses them into Adam's kernels) and the next
step reads bf16 directly; the D copies come free, since the G step already casts D's updated
parameters.

The arithmetic does not change: a copy holds exactly `master.astype(dtype)`, the value the
modules' own casts would have made, and `from_copy`'s gradient goes to the float32 master as
the cast's would, once per use (so cotangents of a parameter used twice are still added in
float32). Checkpoints do not hold the copies; they are made again from the parameters.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util


def make(params, dtype) -> Optional[dict]:
  """Copies of `params`' convolution kernels and biases in `dtype` (a nested dict holding only
  those leaves), or None for float32, where the modules cast nothing.

  A bias is copied only beside a kernel: BatchNorm's `scale` and `bias` are used in float32."""
  if jnp.dtype(dtype) == jnp.float32:
    return None
  flat = traverse_util.flatten_dict(params)
  has_kernel = {path[:-1] for path in flat if path[-1] == "kernel"}
  return traverse_util.unflatten_dict({
      path: leaf.astype(dtype) for path, leaf in flat.items()
      if path[-1] in ("kernel", "bias") and path[:-1] in has_kernel})


@jax.custom_vjp
def from_copy(master, copy):
  """`master` as its copy holds it (`copy.astype(master.dtype)`), differentiable in `master`.

  The module's cast back to the copy's dtype then cancels (XLA folds a widening convert and
  the narrowing one after it), so the convolution reads the copy; the cotangent is passed to
  `master` unchanged."""
  return copy.astype(master.dtype)


def _from_copy_fwd(master, copy):
  return copy.astype(master.dtype), copy


def _from_copy_bwd(copy, ct):
  return ct, jnp.zeros_like(copy)  # the copy is never differentiated; XLA drops this


from_copy.defvjp(_from_copy_fwd, _from_copy_bwd)


def use(params, copies: Optional[dict]) -> Any:
  """`params` with every copied leaf read through `from_copy`; `params` itself without copies.

  Call it inside the differentiated function, once per use of the parameters."""
  if copies is None:
    return params
  flat = traverse_util.flatten_dict(params)
  for path, copy in traverse_util.flatten_dict(copies).items():
    flat[path] = from_copy(flat[path], copy)
  return traverse_util.unflatten_dict(flat)
