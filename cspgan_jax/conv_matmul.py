"""Strided and transposed convolutions as one matmul between data rearrangements.

For each network's first and last layers (`model.edge_layers_as_matmul`), whose shapes cuDNN
serves badly. A convolution with 3 input or output channels (D's first, G's last) is almost no
arithmetic, but cuDNN pads the channels (a padding kernel per call) and runs it through kernels
tuned for wide channels: on the H200 at batch 64 in bf16 those two layers took 0.72 ms of the
2.97 ms of convolutions for about 3% of the FLOPs (docs/PERFORMANCE.md). A 4x4 window over a
4x4 input (D's last) or a 1x1 input spread to 4x4 (G's first block) is a plain matmul, which
cuDNN's convolutions take with their kernels relayouted around them. As a matmul, the taps and
channels form one dimension (48 for 3 channels), and what is left is moving the activations
once, which is bandwidth-bound.

- `conv2d`: im2col (the k*k strided windows, stacked) then patches @ kernel, its float32 sums
  rounded once. Its gradients are the matmul's: the kernel's is patches^T @ dy, the input's
  dy @ kernel^T scattered back (pads).
- `conv_transpose`: x @ kernel gives every tap's contribution in float32, then col2im adds
  each at its place (one pad per tap, interior-padded by the stride) and rounds once.
  Gradients: im2col of dy then two matmuls.

In bf16 both round once, as a convolution does; the backward matmuls take bf16 cotangents.

The products are the convolution's; only the order of the sums differs, so results match the
convolutions to rounding (tests/test_models.py checks both against lax and PyTorch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - k) // stride + 1


def im2col(x, k: int, stride: int, pad: int):
  """(N, H, W, C) -> (N, Ho, Wo, k*k*C): each output position's k x k window, taps-major
  ((kh, kw, c) order, an HWIO kernel's rows)."""
  n, h, w, c = x.shape
  ho, wo = _out_size(h, k, stride, pad), _out_size(w, k, stride, pad)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  taps = [lax.slice(xp, (0, i, j, 0), (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                    (1, stride, stride, 1))
          for i in range(k) for j in range(k)]
  return jnp.concatenate(taps, axis=-1)


def _matmul(a, b, out_dtype=None):
  return lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())),
                         preferred_element_type=out_dtype)


def values_with_gradients_of(values, gradients):
  """A function returning `values(*args)` whose backward pass is `gradients`' (the same
  arguments; results equal up to rounding). In bf16: float32 sums rounded once in the forward
  pass, while the backward pass stays the bf16 form's, from a bf16 cotangent (autodiff of the
  float32 form would run float32 matmuls or convolutions there)."""
  f = jax.custom_vjp(values)
  f.defvjp(lambda *args: (values(*args), args),
           lambda args, dy: jax.vjp(gradients, *args)[1](dy))
  return f


# a @ b with the float32 sums not rounded to a's dtype
_matmul_float32_out = values_with_gradients_of(
    lambda a, b: _matmul(a, b, jnp.float32), lambda a, b: _matmul(a, b).astype(jnp.float32))


def conv2d(x, kernel, stride: int, pad: int):
  """`lax.conv_general_dilated(x, kernel, stride, pad)` for NHWC x and an HWIO kernel."""
  k, _, c, features = kernel.shape
  patches = im2col(x, k, stride, pad)
  # Float32 sums rounded once to x's dtype. The same as a bf16-out matmul where it stays one:
  # XLA:GPU turns D's last (one output column) into a multiply and a reduction, which left as
  # bf16 would round every product to bf16 before the float32 sum.
  return _matmul_float32_out(patches, kernel.reshape(k * k * c, features)).astype(x.dtype)


def conv_transpose(x, kernel, stride: int, pad: int):
  """`ops.conv_transpose`: PyTorch's `conv_transpose2d` for NHWC x and a (k, k, out, in)
  kernel: out[n, s*i - p + kh, s*j - p + kw, o] += x[n, i, j, c] * kernel[kh, kw, o, c]."""
  k, _, features, c = kernel.shape
  n, h, w, _ = x.shape
  # Each output gets (k / stride)^2 taps' sums over the input channels: kept in float32 and
  # added there, the total rounded once, as a convolution's accumulator does (rounding each
  # tap's sum to bf16 first put 40% of G's last layer's outputs an ulp off the convolution's,
  # 1.43x as far from float32, at batch 64).
  per_tap = _matmul_float32_out(x, kernel.transpose(3, 0, 1, 2).reshape(c, k * k * features))
  per_tap = per_tap.reshape(n, h, w, k, k, features)
  zero = jnp.zeros((), jnp.float32)
  out = None
  for i in range(k):
    for j in range(k):
      # low edge i - p, high k - 1 - i - p (negative: cropped), stride - 1 between inputs
      placed = lax.pad(per_tap[:, :, :, i, j, :], zero,
                       ((0, 0, 0), (i - pad, k - 1 - i - pad, stride - 1),
                        (j - pad, k - 1 - j - pad, stride - 1), (0, 0, 0)))
      out = placed if out is None else out + placed
  return out.astype(x.dtype)
