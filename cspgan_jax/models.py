"""Flax Linen models of the CSPup-GAN (NHWC), numerically matching the PyTorch reference.

Submodule names mirror the reference's `state_dict` paths with dots turned into underscores
(`main.0.right.3` -> `main_0/right_3`), so `torch_port` converts by one rule and a parity failure
names one layer. Activations are functions here but keep their index in the names, as in PyTorch.

BatchNorm, the activations and the bias add are custom VJPs (PyTorch's gradient formulas, and
backward passes that let XLA:GPU fuse what it otherwise would not), so the networks support
reverse-mode differentiation only: `jax.jvp` / `jax.jacfwd` through them raise.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cspgan_jax import conv_matmul

BLOCKS = ("relu", "leaky_bn")
DISCRIMINATORS = ("dcgan", "avgpool")
LEAKY_SLOPE = 0.2

# DCGAN `weights_init`: every conv (transposed ones included) N(0, 0.02); BatchNorm weight N(1, 0.02).
conv_kernel_init = nn.initializers.normal(stddev=0.02)


def bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def torch_conv_bias_init(fan_in: int) -> Callable:
  """PyTorch's default Conv2d bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); DCGAN init keeps it."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


@jax.custom_vjp
def leaky_relu(x):
  """LeakyReLU(0.2) with PyTorch's derivative at 0 (the slope; jax.nn.leaky_relu gives 1).

  Exact zeros are common: G's output is exactly 0 where a ReLU stack went dead. The backward
  pass reads the output, not the input (y > 0 exactly where x > 0, the slope being positive),
  so the pre-activation is not kept for it: about 8% less temporary memory in the compiled step
  (docs/PERFORMANCE.md). XLA still writes it: a matmul takes an elementwise epilogue only when
  its result has one reader, and the select reads it three times."""
  return jnp.where(x > 0, x, _times_slope(x))


def _times_slope(v):
  # In float32, rounded once, as PyTorch's kernels compute it in bf16: a bf16 0.2 is 0.2002,
  # and multiplying by it puts about one negative value in five an ulp off PyTorch's.
  return (v.astype(jnp.float32) * LEAKY_SLOPE).astype(v.dtype)


def _leaky_relu_fwd(x):
  y = leaky_relu(x)
  return y, y


def _leaky_relu_bwd(y, dy):
  return (jnp.where(y > 0, dy, _times_slope(dy)),)


leaky_relu.defvjp(_leaky_relu_fwd, _leaky_relu_bwd)


@jax.custom_vjp
def relu(x):
  """ReLU whose backward pass reads its output (y > 0 exactly where x > 0; the derivative at 0
  is 0, as PyTorch's and jax.nn.relu's).

  jax.nn.relu's backward reads the input, so the convolution before it has two readers and
  XLA:GPU cannot fold `max(conv + bias, 0)` into cuDNN's convolution-with-bias-and-ReLU (its
  rewriter wants one): G's 1x1 convolutions' ReLUs ran as kernels of their own, each reading
  and writing the activation once more."""
  return jnp.maximum(x, jnp.zeros((), x.dtype))


def _relu_fwd(x):
  y = relu(x)
  # Behind the barrier XLA cannot rewrite `max(x, 0) > 0` back to `x > 0`, which it does.
  return y, lax.optimization_barrier(y)


relu.defvjp(_relu_fwd, lambda y, dy: (jnp.where(y > 0, dy, jnp.zeros((), dy.dtype)),))


def check_resolution(resolution: int) -> int:
  """Number of stride-2 stages for a square power-of-two resolution >= 32 (128 -> 5)."""
  if resolution < 32 or resolution & (resolution - 1):
    raise ValueError(f"resolution must be a power of two >= 32, got {resolution}")
  return int(math.log2(resolution)) - 2


_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


# XLA:GPU sums up to this many rows of a column reduction in one kernel (32 x 128, its
# `ReductionIsRaceFree`); longer ones it splits in two stages itself.
XLA_ONE_KERNEL_ROWS = 4096


def channel_sum(v):
  """Sum of an NHWC array over all axes but the channels; up to `XLA_ONE_KERNEL_ROWS` rows,
  each sample first, then the batch.

  XLA:GPU gives such a reduction one kernel with a block per 64-128 channels: in the H200 run,
  G main_1/right_5's bias gradient ([64, 8, 8, 512] -> [512]) ran on 4 blocks of its 132 SMs
  and took 61 us for 8 MiB, D main_9's BatchNorm sums 8 us each on 8 blocks. Summed per sample
  first, the batch is a dimension every block takes a share of, and XLA fuses the first stage
  with more of its producers (compile-only for an H200, baseline, batch 64: 4.4% less traffic
  in bf16, 2.9% in float32, for 6-7 more kernels). Longer sums are left to XLA's own split, as
  the same form there moved more bytes. The float32 result differs from one sum only in the
  order of additions."""
  rows = math.prod(v.shape[:-1])
  if v.ndim < 3 or rows > XLA_ONE_KERNEL_ROWS:
    return v.sum(tuple(range(v.ndim - 1)))
  per_sample = v.reshape(v.shape[0], -1, v.shape[-1]).sum(1)
  # Without the barrier XLA folds the two sums back into one.
  return lax.optimization_barrier(per_sample).sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_channels(v, shape):
  """`jnp.broadcast_to(v, shape)` of a per-channel vector; its gradient is `channel_sum`."""
  return jnp.broadcast_to(v, shape)


broadcast_channels.defvjp(lambda v, shape: (jnp.broadcast_to(v, shape), None),
                          lambda shape, _, ct: (channel_sum(ct),))


def add_bias(y, bias):
  """y + bias (float32, over the last axis) in y's dtype, bias's gradient summed in float32.

  The bias is broadcast before it is cast, so its gradient is summed (`channel_sum`) over
  float32 values; cast first, the sum runs in bf16, and on the CPU the bias gradient of a 1x1
  convolution at batch 64 came out 9% off the exact sum of the bf16 gradients it adds (0.15%
  summed in float32, as PyTorch sums it). XLA moves the cast back before the broadcast in the
  forward pass, which stays the HLO it fuses into cuDNN's convolution-with-bias."""
  return y + broadcast_channels(bias, y.shape).astype(y.dtype)


class Conv2d(nn.Module):
  """PyTorch `Conv2d(in_features, features, k, s, p, bias=use_bias)` (NHWC; flax Conv's
  parameters: `kernel` HWIO and `bias`, the same names, shapes, init and checkpoints).

  In bf16 the bias is added to the convolution's float32 sums and rounded once, on every
  platform. flax's Conv rounds the convolution to bf16 and adds the bias there, and XLA:CPU runs
  that as written: two roundings, which put two thirds of G's bf16 values an ulp or more off
  PyTorch's CPU autocast (one rounding, in oneDNN's convolution) and G's images 10% further
  from float32. XLA:GPU fuses the same HLO into cuDNN's convolution-with-bias, which adds the
  bias in its float32 compute type before rounding (to be confirmed on a GPU by
  tests/test_models.py's autocast test), and a float32 convolution result there would cost
  bandwidth (baseline, batch 64: +26% traffic), so the float32-sum form is the CPU's only.
  (PyTorch on CUDA adds the bias after cuDNN's bf16 result: two roundings.) `in_features` only
  sets the bias init's fan-in (PyTorch's default bias init, which DCGAN keeps)."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  in_features: int = 0
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, dt = self.kernel_size, self.dtype
    kernel = self.param("kernel", conv_kernel_init, (k, k, x.shape[-1], self.features))
    conv = functools.partial(lax.conv_general_dilated, window_strides=(self.stride,) * 2,
                             padding=[(self.padding,) * 2] * 2, dimension_numbers=_CONV_DIMS)
    if not self.use_bias:
      return conv(x.astype(dt), kernel.astype(dt))
    bias = self.param("bias", torch_conv_bias_init(self.in_features * k * k), (self.features,))
    x, kernel = x.astype(dt), kernel.astype(dt)  # as autocast casts them (and the bias)
    as_written = lambda x, w, b: add_bias(conv(x, w), b)
    if jnp.dtype(dt) == jnp.float32:
      return as_written(x, kernel, bias)

    # The backward pass as on the GPU and in PyTorch: from the bf16 gradient, in bf16.
    rounded_once = conv_matmul.values_with_gradients_of(
        lambda x, w, b: (conv(x, w, preferred_element_type=jnp.float32) + b.astype(dt)
                         ).astype(dt),
        as_written)
    return lax.platform_dependent(x, kernel, bias, cpu=rounded_once, default=as_written)


def _strided_conv(u, kernel, stride: int, pad: int):
  """The convolution a transposed convolution transposes: (N, sH, sW, F) -> (N, H, W, C)."""
  return lax.conv_general_dilated(u, kernel, (stride, stride), [(pad, pad)] * 2,
                                  dimension_numbers=_CONV_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_transpose(x, kernel, stride: int, pad: int):
  """PyTorch's `conv_transpose2d` (NHWC; kernel (k, k, out, in)): the input-gradient of
  `_strided_conv`, which is what it computes, in float arithmetic too.

  Its gradients are that convolution's own: the input's is the strided convolution itself, the
  kernel's the convolution's kernel-gradient with dy as input and x as output cotangent. Plain
  autodiff of the lhs-dilated convolution gets the same numbers in another form (a convolution
  with batch and features swapped), which XLA:GPU does not hand to cuDNN's backward-filter and
  brackets with channels-first transposes of the activations instead: 770 -> 304 MiB of data
  movement an iteration (baseline, batch 256, bf16, `cspgan compile`; docs/PERFORMANCE.md).
  """
  return _conv_transpose_fwd(x, kernel, stride, pad)[0]


def _conv_transpose_fwd(x, kernel, stride, pad):
  k = kernel.shape[0]
  n, h, w, _ = x.shape
  out_shape = (n, (h - 1) * stride - 2 * pad + k, (w - 1) * stride - 2 * pad + k, kernel.shape[2])
  _, transpose = jax.vjp(lambda u: _strided_conv(u, kernel, stride, pad),
                         jnp.zeros(out_shape, x.dtype))
  return transpose(x)[0], (x, kernel)


def _conv_transpose_bwd(stride, pad, residuals, dy):
  x, kernel = residuals
  _, kernel_grad = jax.vjp(lambda kern: _strided_conv(dy, kern, stride, pad), kernel)
  return _strided_conv(dy, kernel, stride, pad), kernel_grad(x)[0]


conv_transpose.defvjp(_conv_transpose_fwd, _conv_transpose_bwd)


class ConvTranspose2d(nn.Module):
  """PyTorch `ConvTranspose2d(in, features, k, s, p, bias=False)` (NHWC).

  The kernel is stored (k, k, features, in), as flax's `ConvTranspose(transpose_kernel=True)`
  stores it (same name, shape and initialisation, so checkpoints and `torch_port` are
  unchanged): PyTorch's (in, features, k, k) weight transposed (2, 3, 1, 0), as for Conv2d. The
  arithmetic is `conv_transpose` above; forward results equal flax's bit for bit.
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
    compute = conv_matmul.conv_transpose if self.as_matmul else conv_transpose
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


def _channel_sum(v, axis_name):
  """Sum over all but the channel axis (and over devices with `axis_name`)."""
  total = channel_sum(v)
  return total if axis_name is None else lax.psum(total, axis_name)


def _shifted_sum(v, axis_name):
  """Per-channel sum, accurate where the values sit far from zero relative to their spread.

  PyTorch's CPU kernels accumulate BatchNorm sums in float64. Summing v - v[0] keeps float32
  sums of small numbers; the shift (one sample's value) is a constant to autodiff.
  """
  flat = v.reshape(-1, v.shape[-1])
  shift = lax.stop_gradient(flat[0])
  n = flat.shape[0] if axis_name is None else flat.shape[0] * lax.psum(1, axis_name)
  shift_total = shift * n if axis_name is None else lax.psum(shift * flat.shape[0], axis_name)
  return shift_total + _channel_sum(v - shift, axis_name), n


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, axis_name: Optional[str]):
  """Training-mode BatchNorm2d (NHWC, float32): returns (y, batch mean, biased batch var, n).

  Forward and backward follow PyTorch's CPU kernel: y = x * alpha + beta, and
  dx = (dy - mean(dy) - (x - mean) * k) * invstd * w with k = sum((x - mean) dy) invstd^2 / n.
  Differentiating the forward instead cancels terms of size |mean| / std and loses digits.
  """
  return _batch_norm_fwd(x, scale, bias, epsilon, axis_name)[0]


def _normalize(x, mean, invstd, scale, bias):
  alpha = invstd * scale
  return x * alpha + (bias - mean * alpha)


def _batch_norm_fwd(x, scale, bias, epsilon, axis_name):
  total, n = _shifted_sum(x, axis_name)
  mean = total / n
  xmu = x - mean
  var = _channel_sum(jnp.square(xmu), axis_name) / n  # two-pass, as PyTorch
  invstd = 1.0 / jnp.sqrt(var + epsilon)
  y = _normalize(x, mean, invstd, scale, bias)
  return (y, mean, var, n), (xmu, invstd, scale, n)


def _batch_norm_bwd(epsilon, axis_name, residuals, cotangents):
  del epsilon
  xmu, invstd, scale, n = residuals
  dy = cotangents[0]  # mean, var and n only feed running statistics, which are not trained
  sum_dy, _ = _shifted_sum(dy, axis_name)
  dotp = _channel_sum(xmu * dy, axis_name)
  k = dotp * invstd * invstd / n
  dx = (dy - sum_dy / n - xmu * k) * (invstd * scale)
  # Parameter gradients stay per device; the training step averages them across devices.
  local_dotp = dotp if axis_name is None else _channel_sum(xmu * dy, None)
  local_sum_dy = sum_dy if axis_name is None else _shifted_sum(dy, None)[0]
  return dx, local_dotp * invstd, local_sum_dy


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_leaky_relu_train(x, scale, bias, epsilon: float, axis_name: Optional[str]):
  """`leaky_relu` of `batch_norm_train`'s y cast to x's dtype, and the statistics (float32).

  The forward values are those of the two calls. The backward pass reads x and the cotangent
  only: it takes the LeakyReLU's derivative from the normalisation recomputed from x (the
  forward's expression on the same values, so the same signs) in both of BatchNorm's backward
  kernels, the per-channel sums and the input gradient, which read x anyway. The derivative is
  no tensor of its own: XLA:GPU wrote it out and read it back (a kernel reading the output and
  the cotangent and writing their product, three passes over the activation), and the two
  sums read it again. Compile-only for an H200: 3-7% less traffic an iteration in bf16
  (docs/PERFORMANCE.md). The sums differ from `batch_norm_train`'s in their order only.
  """
  return _batch_norm_leaky_relu_fwd(x, scale, bias, epsilon, axis_name)[0]


def _batch_norm_leaky_relu_fwd(x, scale, bias, epsilon, axis_name):
  (y, mean, var, n), (_, invstd, _, _) = _batch_norm_fwd(x.astype(jnp.float32), scale, bias,
                                                          epsilon, axis_name)
  return (leaky_relu(y.astype(x.dtype)), mean, var, n), (x, mean, invstd, scale, bias, n)


def _batch_norm_leaky_relu_bwd(epsilon, axis_name, residuals, cotangents):
  del epsilon
  x, mean, invstd, scale, bias, n = residuals
  # Behind a barrier the cotangent is the bf16 tensor it is: where its producer rounded a
  # float32 value (D's average pooling), XLA otherwise reads that float32 value instead, which
  # it then writes out as well (four bytes an element more, written and read)
  x, ct = lax.optimization_barrier((x, cotangents[0]))

  def d_normalized(x, ct):  # leaky_relu's derivative as `_leaky_relu_bwd`, then the cast's
    y = _normalize(x.astype(jnp.float32), mean, invstd, scale, bias).astype(x.dtype)
    return jnp.where(y > 0, ct, _times_slope(ct)).astype(jnp.float32)

  # sum(dy) shifted by its first row (as `_shifted_sum`) and sum((x - mean) dy), as one
  # reduction of the two side by side: as two, XLA:GPU computes dy once and writes it out for
  # both
  first = lambda v: v.reshape(-1, v.shape[-1])[0]
  shift = lax.stop_gradient(d_normalized(first(x), first(ct)))
  dy = d_normalized(x, ct)
  c = x.shape[-1]
  sums = channel_sum(jnp.concatenate([dy - shift, (x.astype(jnp.float32) - mean) * dy], -1))
  local_sum_dy = shift * (x.size // c) + sums[:c]
  local_dotp = sums[c:]
  sum_dy, dotp = ((local_sum_dy, local_dotp) if axis_name is None else
                  lax.psum((local_sum_dy, local_dotp), axis_name))
  k = dotp * invstd * invstd / n
  # dy again, from inputs XLA cannot tell are the same (the barrier): otherwise it computes dy
  # once and writes it out for this kernel too
  x2, ct2 = lax.optimization_barrier((x, ct))
  dx = (d_normalized(x2, ct2) - sum_dy / n - (x2.astype(jnp.float32) - mean) * k) * (
      invstd * scale)
  # Parameter gradients stay per device; the training step averages them across devices.
  return dx.astype(x.dtype), local_dotp * invstd, local_sum_dy


batch_norm_leaky_relu_train.defvjp(_batch_norm_leaky_relu_fwd, _batch_norm_leaky_relu_bwd)


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
      return leaky_relu(y) if leaky else y
    if leaky:
      xl = x  # in its own dtype: the backward pass keeps x, not a float32 copy
      train_bn = lambda v: batch_norm_leaky_relu_train(v, scale, bias, self.epsilon,
                                                       self.axis_name)
    else:
      xl = xf
      train_bn = lambda v: batch_norm_train(v, scale, bias, self.epsilon, self.axis_name)
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
      self.sow("intermediates", BATCH_NORM_OUTPUT, _normalize(
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


class CSPup(nn.Module):
  """Cross-stage-partial upsampling block: split channels, `left(x1) + right(x2)`.

  `relu` (the original): right = conv1x1, ReLU, convT, conv1x1, ReLU, conv1x1.
  `leaky_bn` (experiment 2): BatchNorm after both first 1x1 convs, LeakyReLU(0.2) for ReLU.
  """
  out_channels: int
  kernel_size: int = 4
  stride: int = 2
  padding: int = 1
  block: str = "relu"
  bn_momentum: float = 0.1
  bn_epsilon: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  transposed_as_matmul: bool = False  # left_0 and right_2 as `conv_matmul.conv_transpose`

  @nn.compact
  def __call__(self, x, train: bool = True):
    split = x.shape[-1] // 2
    x1, x2 = x[..., :split], x[..., split:]  # odd channel counts: x2 keeps the extra one
    c, dt = self.out_channels, self.dtype
    convt = functools.partial(conv_transpose2d, c, self.kernel_size, self.stride, self.padding,
                              dtype=dt, as_matmul=self.transposed_as_matmul)
    conv1x1 = functools.partial(Conv2d, c, 1, dtype=dt)
    left = convt(name="left_0")(x1)
    if self.block == "relu":
      h = relu(conv1x1(in_features=x2.shape[-1], name="right_0")(x2))
      h = convt(name="right_2")(h)
      h = relu(conv1x1(in_features=c, name="right_3")(h))
      right = conv1x1(in_features=c, name="right_5")(h)
    elif self.block == "leaky_bn":
      # each BatchNorm followed by LeakyReLU (right.2 and right.6 of PyTorch's Sequential)
      bn = functools.partial(BatchNorm, self.bn_momentum, self.bn_epsilon, self.axis_name, dt,
                             activation="leaky_relu")
      h = conv1x1(in_features=x2.shape[-1], name="right_0")(x2)
      h = bn(name="right_1")(h, use_running_average=not train)
      h = convt(name="right_3")(h)
      h = conv1x1(in_features=c, name="right_4")(h)
      h = bn(name="right_5")(h, use_running_average=not train)
      right = conv1x1(in_features=c, name="right_7")(h)
    else:
      raise ValueError(f"unknown block {self.block!r}; expected one of {BLOCKS}")
    return left + right


class Generator(nn.Module):
  """z (N, nz) or (N, 1, 1, nz) -> images (N, R, R, nc) in [-1, 1].

  128x128: CSPup(nz, 16ngf, 4, 1, 0) to 4x4, four CSPup doubling to 64x64 while halving channels,
  then ConvTranspose(ngf, nc) to 128x128 and tanh. Smaller resolutions drop the widest blocks.
  """
  nz: int = 100
  ngf: int = 64
  nc: int = 3
  resolution: int = 128
  block: str = "relu"
  bn_momentum: float = 0.1
  bn_epsilon: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  # the first block's transposed convs (from 1x1) and the last (to 3 channels) as matmuls
  edge_as_matmul: bool = False

  @nn.compact
  def __call__(self, z, train: bool = True):
    n_blocks = check_resolution(self.resolution)  # 128 -> 5 CSPup blocks
    x = z.reshape(z.shape[0], 1, 1, -1).astype(self.dtype)
    block = functools.partial(CSPup, block=self.block, bn_momentum=self.bn_momentum,
                              bn_epsilon=self.bn_epsilon, axis_name=self.axis_name,
                              dtype=self.dtype)
    for i in range(n_blocks):
      c = self.ngf * 2 ** (n_blocks - 1 - i)
      stride, pad = (1, 0) if i == 0 else (2, 1)
      x = block(c, 4, stride, pad, transposed_as_matmul=self.edge_as_matmul and i == 0,
                name=f"main_{i}")(x, train)  # (N, 4 * 2**i, 4 * 2**i, c)
    x = conv_transpose2d(self.nc, 4, 2, 1, dtype=self.dtype, as_matmul=self.edge_as_matmul,
                         name=f"main_{n_blocks}")(x)
    return jnp.tanh(x.astype(jnp.float32))


class Discriminator(nn.Module):
  """Images (N, R, R, nc) -> logits (N,). The reference applies Sigmoid; the loss does here.

  `dcgan`: Conv(nc, ndf)+LReLU, then Conv+BN+LReLU stages doubling channels down to 4x4, then
  Conv(., 1, 4, 1, 0). `avgpool` (experiment 1): Conv(nc, 2ndf)+BN+LReLU, AvgPool2d(4, 2, 1)
  (padding counted), then the same stages from 2ndf.
  """
  ndf: int = 64
  nc: int = 3
  resolution: int = 128
  kind: str = "dcgan"
  bn_momentum: float = 0.1
  bn_epsilon: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  # the first conv (from 3 channels) and the last (a 4x4 window to one logit) as matmuls
  edge_as_matmul: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True, groups: int = 1):
    """`groups` > 1: x is that many batches stacked, each with its own BatchNorm statistics."""
    n_down = check_resolution(self.resolution)  # stride-2 steps from R down to 4x4 (128 -> 5)
    # every BatchNorm is followed by LeakyReLU(0.2), which BatchNorm applies (the next name)
    bn = functools.partial(BatchNorm, self.bn_momentum, self.bn_epsilon, self.axis_name,
                           self.dtype, activation="leaky_relu")
    conv = functools.partial(Conv2d, kernel_size=4, stride=2, padding=1, use_bias=False,
                             dtype=self.dtype)
    # The first and last convolutions, either form (same parameters)
    edge_conv = Conv2dAsMatmul if self.edge_as_matmul else functools.partial(Conv2d,
                                                                           use_bias=False)
    x = x.astype(self.dtype)
    if self.kind == "dcgan":
      x = leaky_relu(edge_conv(self.ndf, 4, 2, 1, dtype=self.dtype, name="main_0")(x))
      c, idx, n_stages = self.ndf, 2, n_down - 1
    elif self.kind == "avgpool":
      x = edge_conv(2 * self.ndf, 4, 2, 1, dtype=self.dtype, name="main_0")(x)
      x = bn(name="main_1")(x, use_running_average=not train, groups=groups)
      # main.3. Summed in float32 and rounded once, as PyTorch does in bf16: summing in bf16
      # puts most outputs an ulp or more off (up to 1%).
      x = nn.avg_pool(x.astype(jnp.float32), (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)),
                      count_include_pad=True).astype(self.dtype)
      c, idx, n_stages = 2 * self.ndf, 4, n_down - 2
    else:
      raise ValueError(f"unknown discriminator {self.kind!r}; expected one of {DISCRIMINATORS}")
    for _ in range(n_stages):
      c *= 2
      x = conv(c, name=f"main_{idx}")(x)
      x = bn(name=f"main_{idx + 1}")(x, use_running_average=not train, groups=groups)
      idx += 3
    x = edge_conv(1, 4, 1, 0, dtype=self.dtype, name=f"main_{idx}")(x)  # (N, 1, 1, 1)
    return x.reshape(x.shape[0]).astype(jnp.float32)


def build_models(model_config, axis_name: Optional[str] = None, dtype=jnp.float32):
  """(Generator, Discriminator) from `config.model`."""
  mc = model_config
  if mc.block not in BLOCKS:
    raise ValueError(f"unknown block {mc.block!r}; expected one of {BLOCKS}")
  if mc.discriminator not in DISCRIMINATORS:
    raise ValueError(f"unknown discriminator {mc.discriminator!r}; expected one of {DISCRIMINATORS}")
  check_resolution(mc.resolution)
  common = dict(nc=mc.nc, resolution=mc.resolution, bn_momentum=mc.bn_momentum,
                bn_epsilon=mc.bn_epsilon, axis_name=axis_name, dtype=dtype,
                edge_as_matmul=mc.get("edge_layers_as_matmul", False))
  gen = Generator(nz=mc.nz, ngf=mc.ngf, block=mc.block, **common)
  disc = Discriminator(ndf=mc.ndf, kind=mc.discriminator, **common)
  return gen, disc
