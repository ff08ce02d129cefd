"""Differentiable primitives of the networks, with PyTorch's arithmetic and backward passes that
XLA:GPU compiles well: activations, per-channel sums, the bias add, the transposed convolution
and training-mode BatchNorm (NHWC).

Most are custom VJPs (PyTorch's gradient formulas, and backward passes that let XLA:GPU fuse
what it otherwise would not), so the networks support reverse-mode differentiation only:
`jax.jvp` / `jax.jacfwd` through them raise. `layers` wraps them in modules; why each backward
pass has its form, and what it moved in the compiled step, is in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

LEAKY_SLOPE = 0.2


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

# activations NHWC, kernels HWIO (flax's layout; PyTorch's OIHW transposed (2, 3, 1, 0))
CONV_DIMS = ("NHWC", "HWIO", "NHWC")


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



def _strided_conv(u, kernel, stride: int, pad: int):
  """The convolution a transposed convolution transposes: (N, sH, sW, F) -> (N, H, W, C)."""
  return lax.conv_general_dilated(u, kernel, (stride, stride), [(pad, pad)] * 2,
                                  dimension_numbers=CONV_DIMS)


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


def normalize(x, mean, invstd, scale, bias):
  """BatchNorm's output as PyTorch's CPU kernel computes it: x * alpha + (bias - mean * alpha),
  alpha = invstd * scale."""
  alpha = invstd * scale
  return x * alpha + (bias - mean * alpha)


def _batch_norm_fwd(x, scale, bias, epsilon, axis_name):
  total, n = _shifted_sum(x, axis_name)
  mean = total / n
  xmu = x - mean
  var = _channel_sum(jnp.square(xmu), axis_name) / n  # two-pass, as PyTorch
  invstd = 1.0 / jnp.sqrt(var + epsilon)
  y = normalize(x, mean, invstd, scale, bias)
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
    y = normalize(x.astype(jnp.float32), mean, invstd, scale, bias).astype(x.dtype)
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
