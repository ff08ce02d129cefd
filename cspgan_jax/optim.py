"""Optimizers: optax's Adam, and Adam with torch.optim.Adam's exact float32 operation order.

Adam's update divides by sqrt(v), so a one-ulp difference in how it is rounded reaches every
parameter; in the GAN game, D's step feeds G's gradient directly. `torch_adam` reproduces
PyTorch's single-tensor CPU Adam operation by operation (lerp for the first moment, the second
moment's `addcmul_` as the fused multiply-add PyTorch's vectorized CPU kernel computes, scalar
bias corrections computed in float64 and applied in float32): on the CPU, given the same
gradients, its moments are PyTorch's bit for bit, step after step, and so is its update wherever
PyTorch's float32 sqrt is correctly rounded (its AVX512 kernel is an ulp off for about a fifth of
the values; `tests/test_optim.py`). Both share optax's `ScaleByAdamState`.
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


def _two_sum(a, b):
  """s + r == a + b exactly, s = RN(a + b) (Knuth)."""
  s = a + b
  b_virtual = s - a
  return s, (a - (s - b_virtual)) + (b - b_virtual)


def _two_product(a, b):
  """p + e == a * b exactly, p = RN(a * b) (Dekker; float32 halves of 12 bits)."""
  def halves(x):
    t = np.float32(4097.0) * x
    hi = t - (t - x)
    return hi, x - hi
  (ah, al), (bh, bl) = halves(a), halves(b)
  p = a * b
  return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _sum_rounded_to_odd(a, b):
  """a + b rounded to odd: an inexact sum takes the neighbour whose last bit is 1."""
  s, r = _two_sum(a, b)
  bits = jax.lax.bitcast_convert_type(s, jnp.int32)
  toward_r = jnp.where((r > 0) == (s > 0), 1, -1).astype(jnp.int32)
  odd = jnp.where((r != 0) & (bits & 1 == 0), bits + toward_r, bits)
  return jax.lax.bitcast_convert_type(odd, s.dtype)


def fused_multiply_add(a, b, c):
  """RN(a * b + c), one rounding, in float32 arithmetic: Dekker's exact product, then the
  correctly rounded sum of three of Boldo and Melquiond (2008, rounding to odd). XLA has no
  FMA operation, and XLA:CPU does not contract a * b + c into one."""
  p, e = _two_product(a, b)
  high, low = _two_sum(c, p)
  return high + _sum_rounded_to_odd(low, e)


def _second_moment(v, g, b2):
  """torch's `exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)`. Its CPU kernel computes
  `v + value * g * g`, which the compiler fuses into fma(value * g, g, v): with the plain
  expression a quarter of the elements came out an ulp off from step 2 on. Elsewhere (GPUs)
  the plain expression, which the compiler may fuse itself; the emulation's error-free steps
  rely on products not being fused, so they are kept to the CPU."""
  c, vb = np.float32(1.0 - b2), v * np.float32(b2)
  return jax.lax.platform_dependent(vb, g, cpu=lambda vb, g: fused_multiply_add(c * g, g, vb),
                                    default=lambda vb, g: vb + c * g * g)


def _divided(x, scalar):
  """x / scalar as one division per element. XLA rewrites a division by a broadcast scalar as
  a multiplication by its reciprocal, an ulp off for many elements; on the CPU the divisor is
  made an elementwise value it cannot see through (`x >= 0` holds for a square root; NaN takes
  1 and stays NaN). Elsewhere the plain division (not checked against PyTorch bit for bit)."""
  elementwise = lambda x: x / jnp.where(x >= 0, scalar, jnp.ones_like(x))
  return jax.lax.platform_dependent(x, cpu=elementwise, default=lambda x: x / scalar)


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
    nu = jax.tree_util.tree_map(lambda v, g: _second_moment(v, g, b2), state.nu, grads)
    step_size = jnp.asarray(step_sizes)[jnp.minimum(count, len(step_sizes)) - 1]
    bc2_sqrt = jnp.asarray(bc2_sqrts)[jnp.minimum(count, len(bc2_sqrts)) - 1]
    updates = jax.tree_util.tree_map(
        lambda m, v: step_size * m / (_divided(jnp.sqrt(v), bc2_sqrt) + f32(eps)), mu, nu)
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
