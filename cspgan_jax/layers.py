"""PyTorch's `nn` layers as Flax Linen modules (NHWC): `Conv2d`, `ConvTranspose2d` and
`BatchNorm2d`, with PyTorch's initialisation, semantics and arithmetic, and flax's parameter
names and shapes, so that checkpoints and `torch_port` treat them as flax's own.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cspgan_jax import conv_matmul, ops

# DCGAN `weights_init`: every conv (transposed ones included) N(0, 0.02); BatchNorm weight
# N(1, 0.02).
conv_kernel_init = nn.initializers.normal(stddev=0.02)


def bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def torch_conv_bias_init(fan_in: int) -> Callable:
  """PyTorch's default Conv2d bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); DCGAN init keeps it."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Conv2d(nn.Module):
  """PyTorch `Conv2d(in_features, features, k, s, p, bias=use_bias)` (NHWC; flax Conv's
  parameters: `kernel` HWIO and `bias`, the same names, shapes, init and checkpoints).

  In bf16 the bias is added to the convolution's float32 sums and rounded once: on the CPU by the
  form written here, on a GPU by XLA's fusion (below). flax's Conv rounds the convolution to bf16
  and adds the bias there, and XLA:CPU runs that as written: two roundings, which put two thirds
  of G's bf16 values an ulp or more off PyTorch's CPU autocast (one rounding, in oneDNN's
  convolution) and G's images 10% further from float32. XLA:GPU fuses the same HLO into cuDNN's
  convolution-with-bias, which adds the bias in its float32 compute type before rounding (to be
  confirmed on a GPU by tests/test_models.py's autocast test), and a float32 convolution result
  there would cost bandwidth (baseline, batch 64: +26% traffic), so the float32-sum form is the
  CPU's only.
  (PyTorch on CUDA adds the bias after cuDNN's bf16 result: two roundings.) `in_features` only
  sets the bias init's fan-in (PyTorch's default bias init, which DCGAN keeps); by default the
  input's channel count, which is PyTorch's `in_channels`."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  in_features: Optional[int] = None
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, dt = self.kernel_size, self.dtype
    kernel = self.param("kernel", conv_kernel_init, (k, k, x.shape[-1], self.features))
    conv = functools.partial(lax.conv_general_dilated, window_strides=(self.stride,) * 2,
                             padding=[(self.padding,) * 2] * 2, dimension_numbers=ops.CONV_DIMS)
    if not self.use_bias:
      return conv(x.astype(dt), kernel.astype(dt))
    fan_in = (x.shape[-1] if self.in_features is None else self.in_features) * k * k
    if fan_in < 1:
      raise ValueError(f"Conv2d: in_features must be positive, got {self.in_features}")
    bias = self.param("bias", torch_conv_bias_init(fan_in), (self.features,))
    x, kernel = x.astype(dt), kernel.astype(dt)  # as autocast casts them (and the bias)
    as_written = lambda x, w, b: ops.add_bias(conv(x, w), b)
    if jnp.dtype(dt) == jnp.float32:
      return as_written(x, kernel, bias)

    # The backward pass as on the GPU and in PyTorch: from the bf16 gradient, in bf16.
    rounded_once = conv_matmul.values_with_gradients_of(
        lambda x, w, b: (conv(x, w, preferred_element_type=jnp.float32) + b.astype(dt)
                         ).astype(dt),
        as_written)
    return lax.platform_dependent(x, kernel, bias, cpu=rounded_once, default=as_written)


class ConvTranspose2d(nn.Module):
  """PyTorch `ConvTranspose2d(in, features, k, s, p, bias=False)` (NHWC).

  The kernel is stored (k, k, features, in), as flax's `ConvTranspose(transpose_kernel=True)`
  stores it (same name, shape and initialisation, so checkpoints and `torch_port` are
  unchanged): PyTorch's (in, features, k, k) weight transposed (2, 3, 1, 0), as for Conv2d. The
  arithmetic is `ops.conv_transpose`; forward results equal flax's bit for bit.
  """
  features: int
  kernel_size: int = 4
  stride: int = 2
  padding: int = 1
  dtype: Any = jnp.float32
  as_matmul: bool = False  # `conv_matmul.conv_transpose`: one matmul, then col2im

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", conv_kernel_init, (k, k, self.features, x.shape[-1]))
    compute = conv_matmul.conv_transpose if self.as_matmul else ops.conv_transpose
    return compute(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)


def conv_transpose2d(features: int, kernel_size: int = 4, stride: int = 2, padding: int = 1, *,
                     dtype=jnp.float32, as_matmul: bool = False, name=None) -> ConvTranspose2d:
  """PyTorch `ConvTranspose2d(in, features, k, s, p, bias=False)`."""
  return ConvTranspose2d(features, kernel_size, stride, padding, dtype=dtype, as_matmul=as_matmul,
                         name=name)


class Conv2dAsMatmul(nn.Module):
  """PyTorch `Conv2d(in, features, k, s, p, bias=False)` computed as im2col and one matmul
  (`conv_matmul.conv2d`), with flax Conv's parameter (`kernel`, HWIO, the same init), so
  checkpoints and `torch_port` do not tell the two forms apart."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", conv_kernel_init, (k, k, x.shape[-1], self.features))
    return conv_matmul.conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride,
                              self.padding)


# the name under which BatchNorm(activation=...) sows its output before the activation
BATCH_NORM_OUTPUT = "batch_norm_output"


class BatchNorm(nn.Module):
  """BatchNorm2d with PyTorch's semantics, which flax's BatchNorm does not have.

  Training mode normalises with the biased batch variance but moves `var` towards the *unbiased*
  one (flax uses the biased one); `momentum` is PyTorch's (weight of the new value).
  `num_batches_tracked` is kept so PyTorch checkpoints round-trip exactly. With `axis_name`,
  statistics are taken over the whole cross-device batch (sync BatchNorm). With `groups` > 1
  the batch is that many batches stacked (D on real and fake images in one pass): each is
  normalised by its own statistics, and the running ones move once per group, in order, as
  that many calls would move them.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  # "leaky_relu": LeakyReLU(0.2) applied to the output, its backward fused into BatchNorm's
  # (`batch_norm_leaky_relu_train`); the same values as `leaky_relu(BatchNorm(...)(x))`
  activation: Optional[str] = None

  @nn.compact
  def __call__(self, x, use_running_average: bool, groups: int = 1):
    c = x.shape[-1]
    scale = self.param("scale", bn_scale_init, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    tracked = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
    xf = x.astype(jnp.float32)  # statistics in float32 whatever the compute dtype

    if self.activation not in (None, "leaky_relu"):
      raise ValueError(f"unknown BatchNorm activation {self.activation!r}")
    leaky = self.activation == "leaky_relu"
    if use_running_average:
      alpha = scale / jnp.sqrt(ra_var.value + self.epsilon)
      y = (xf * alpha + (bias - ra_mean.value * alpha)).astype(self.dtype)
      return ops.leaky_relu(y) if leaky else y
    if leaky:
      xl = x  # in its own dtype: the backward pass keeps x, not a float32 copy
      train_bn = lambda v: ops.batch_norm_leaky_relu_train(v, scale, bias, self.epsilon,
                                                           self.axis_name)
    else:
      xl = xf
      train_bn = lambda v: ops.batch_norm_train(v, scale, bias, self.epsilon, self.axis_name)
    if groups == 1:
      y, mean, var, n = train_bn(xl)
      stats = [(mean, var, n)]
    else:
      y, mean, var, n = jax.vmap(train_bn)(xl.reshape((groups, -1) + xl.shape[1:]))
      y = y.reshape(xl.shape)
      n = jnp.broadcast_to(n, (groups,))
      stats = [(mean[g], var[g], n[g]) for g in range(groups)]
    if leaky and self.is_mutable_collection("intermediates"):
      # BatchNorm's own output, for layer-by-layer comparisons: PyTorch's LeakyReLU is the
      # next module, this module's output is that one's (`parity`)
      b = (groups,) + (1,) * (xf.ndim - 1) + (c,)  # per group, broadcast over its batch
      means, variances = (jnp.stack([st[i] for st in stats]).reshape(b) for i in (0, 1))
      self.sow("intermediates", BATCH_NORM_OUTPUT, ops.normalize(
          xf.reshape((groups, -1) + xf.shape[1:]), means,
          1.0 / jnp.sqrt(variances + self.epsilon), scale, bias).reshape(xf.shape)
                .astype(self.dtype))
    if not self.is_initializing():
      m = self.momentum
      for mean_g, var_g, n_g in stats:
        ra_mean.value = (1 - m) * ra_mean.value + m * mean_g
        ra_var.value = (1 - m) * ra_var.value + m * var_g * (n_g / (n_g - 1))
        tracked.value = tracked.value + 1
    return y.astype(self.dtype)
