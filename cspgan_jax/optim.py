"""Optimizers: optax's Adam, and Adam with torch.optim.Adam's exact float32 operation order.

Adam's update divides by sqrt(v), so a one-ulp difference in how it is rounded reaches every
parameter; in the GAN game, D's step feeds G's gradient directly. `torch_adam` reproduces
PyTorch's single-tensor CPU Adam operation by operation (lerp for the first moment, scalar
bias corrections computed in float64 and applied in float32), which keeps parity runs
bit-identical where the gradients are. Both share optax's `ScaleByAdamState`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _float32_schedule(fn, base: float) -> np.ndarray:
  """fn(t) for t = 1, 2, ... computed in float64 and rounded to float32, up to where it stops
  changing (base**t below float32 resolution); the last entry holds for every later step."""
  t_max = int(np.ceil(np.log(2.0 ** -30) / np.log(base))) + 1 if 0 < base < 1 else 1
  t = np.arange(1, t_max + 1, dtype=np.float64)
  return fn(t).astype(np.float32)


def torch_adam(learning_rate: float, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8) -> optax.GradientTransformation:
  """`torch.optim.Adam(lr, betas=(b1, b2), eps)` (no weight decay, amsgrad or maximize)."""
  w1 = 1.0 - b1  # torch: exp_avg.lerp_(grad, 1 - beta1)
  # PyTorch computes these scalars as Python floats and applies them rounded to float32.
  step_sizes = _float32_schedule(lambda t: -learning_rate / (1.0 - b1 ** t), b1)
  bc2_sqrts = _float32_schedule(lambda t: np.sqrt(1.0 - b2 ** t), b2)
  f32 = np.float32

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p, jnp.float32)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=jax.tree_util.tree_map(zeros, params),
                                  nu=jax.tree_util.tree_map(zeros, params))

  def update_fn(grads, state, params=None):
    del params
    count = state.count + 1

    def lerp(m, g):  # at::lerp's two branches, chosen by the weight
      return m + f32(w1) * (g - m) if abs(w1) < 0.5 else g - (g - m) * f32(1.0 - w1)

    mu = jax.tree_util.tree_map(lerp, state.mu, grads)
    nu = jax.tree_util.tree_map(lambda v, g: v * f32(b2) + f32(1.0 - b2) * g * g, state.nu, grads)
    step_size = jnp.asarray(step_sizes)[jnp.minimum(count, len(step_sizes)) - 1]
    bc2_sqrt = jnp.asarray(bc2_sqrts)[jnp.minimum(count, len(bc2_sqrts)) - 1]
    updates = jax.tree_util.tree_map(
        lambda m, v: step_size * m / (jnp.sqrt(v) / bc2_sqrt + f32(eps)), mu, nu)
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
