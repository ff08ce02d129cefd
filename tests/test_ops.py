"""`ops` against PyTorch: the activations, per-channel sums and the transposed convolution's
matmul form, values and gradients (CPU)."""

import jax
import numpy as np
import pytest
import torch

from cspgan_jax import conv_matmul, ops
from torch_compare import rel


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_leaky_relu_is_pytorchs_exactly(dtype):
  """Value and gradient bit for bit, in bf16 too (the slope applied in float32 and rounded
  once, as PyTorch does), though the backward pass reads the output, not the input; at exact
  and signed zeros too, where PyTorch's derivative is the slope. (Not at subnormals: XLA
  flushes them to zero, PyTorch's CPU kernels do not.)"""
  normal = np.finfo(np.float32).tiny * 10  # 0.2 x still normal
  special = np.array([0.0, -0.0, normal, -normal, 1.0, -1.0, 3e38, -3e38], np.float32)
  rs = np.random.RandomState(2)
  x = np.concatenate([special, rs.randn(1000).astype(np.float32)])
  dy = rs.randn(x.size).astype(np.float32)
  xj, dyj = jax.numpy.asarray(x, dtype), jax.numpy.asarray(dy, dtype)
  y, vjp = jax.vjp(ops.leaky_relu, xj)
  (dx,) = vjp(dyj)
  tdtype = getattr(torch, dtype)
  xt = torch.from_numpy(x).to(tdtype).requires_grad_(True)
  yt = torch.nn.functional.leaky_relu(xt, ops.LEAKY_SLOPE)
  yt.backward(torch.from_numpy(dy).to(tdtype))
  as_f32 = lambda a: np.asarray(jax.numpy.asarray(a, jax.numpy.float32))
  np.testing.assert_array_equal(as_f32(y), yt.detach().float().numpy())
  np.testing.assert_array_equal(as_f32(dx), xt.grad.float().numpy())
  slope_times_dy = (dy[:2] * np.float32(ops.LEAKY_SLOPE)).astype(np.float32)
  np.testing.assert_array_equal(as_f32(dx)[:2], as_f32(jax.numpy.asarray(slope_times_dy, dtype)))


@pytest.mark.parametrize("dtype", [np.float32, jax.numpy.bfloat16])
def test_relu_is_pytorchs_with_the_backward_reading_its_output(dtype):
  """`ops.relu`: the values and gradients of PyTorch's ReLU (0 at 0) and jax.nn.relu's, its
  backward pass a function of the output alone (what lets XLA:GPU fold it into cuDNN)."""
  x = jax.numpy.asarray(np.array([[-2.0, -0.0, 0.0, 1e-30, 3.0, -1e-30]]), dtype)
  dy = jax.numpy.asarray(np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]), dtype)
  y, vjp = jax.vjp(ops.relu, x)
  y_ref, vjp_ref = jax.vjp(jax.nn.relu, x)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  np.testing.assert_array_equal(np.asarray(vjp(dy)[0], np.float32),
                                np.asarray(vjp_ref(dy)[0], np.float32))
  t = torch.tensor(np.asarray(x, np.float32), requires_grad=True)
  torch.relu(t).backward(torch.tensor(np.asarray(dy, np.float32)))
  np.testing.assert_array_equal(np.asarray(vjp(dy)[0], np.float32), t.grad.numpy())
  jaxpr = str(jax.make_jaxpr(lambda x, dy: jax.vjp(ops.relu, x)[1](dy))(x, dy))
  assert jaxpr.count("optimization_barrier") == 1  # the residual is the barrier's output


@pytest.mark.parametrize("shape,two_stages", [((64, 8, 8, 512), True), ((8, 4, 4, 16), True),
                                              ((32, 16, 16, 8), False), ((5, 7), False)])
def test_channel_sum_is_the_sum_per_sample_first_up_to_xlas_own_split(shape, two_stages):
  """Per-channel sums (bias gradients, BatchNorm statistics) of up to 4,096 rows run each sample
  first, in a program XLA cannot fold back into one sum; the result is the float32 sum in
  another order. Longer ones are one sum, which XLA:GPU splits itself."""
  x = np.random.RandomState(0).randn(*shape).astype(np.float32) + 0.5
  got = jax.jit(ops.channel_sum)(x)
  exact = x.astype(np.float64).reshape(-1, shape[-1]).sum(0)
  assert got.shape == (shape[-1],) and rel(got, exact) < 1e-6
  lowered = jax.jit(ops.channel_sum).lower(x)
  assert lowered.as_text().count("stablehlo.optimization_barrier") == int(two_stages)
  if jax.default_backend() == "cpu":  # (XLA:GPU splits the longer one-stage sum itself)
    hlo = lowered.compile().as_text()
    assert hlo.count(" reduce(") == (2 if two_stages else 1), hlo
  # the bias gradient is the same sum
  bias = np.zeros(shape[-1], np.float32)
  grad = jax.jit(lambda b, ct: jax.vjp(lambda b: ops.add_bias(jax.numpy.zeros(shape), b),
                                       b)[1](ct)[0])(bias, x)
  np.testing.assert_array_equal(grad, got)


def test_transposed_matmul_form_rounds_once_in_bfloat16():
  """G's last layer as a matmul + col2im in bf16: each output's taps are summed in float32 and
  rounded once, as the convolution does, so the two forms agree but for a few ties (rounding
  each tap's channel sum to bf16 first put 40% of outputs an ulp off, 1.4x as far from float32
  at batch 64)."""
  import jax.numpy as jnp
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randn(8, 32, 32, 64), jnp.bfloat16)
  kernel = jnp.asarray(rs.randn(4, 4, 3, 64) * 0.02, jnp.bfloat16)
  exact = ops.conv_transpose(x.astype(jnp.float32), kernel.astype(jnp.float32), 2, 1)
  conv = np.asarray(ops.conv_transpose(x, kernel, 2, 1), np.float32)
  mm = np.asarray(conv_matmul.conv_transpose(x, kernel, 2, 1), np.float32)
  assert np.mean(conv == mm) > 0.999
  assert rel(mm, exact) < 1.02 * rel(conv, exact)
  # The backward pass stays in bf16 (its matmuls take the bf16 cotangent).
  pullback = lambda a, b, ct: jax.vjp(lambda a, b: conv_matmul.conv_transpose(a, b, 2, 1),
                                      a, b)[1](ct)
  ct = jnp.ones((8, 64, 64, 3), jnp.bfloat16)
  dx, dk = pullback(x, kernel, ct)
  assert dx.dtype == dk.dtype == jnp.bfloat16
  # Every matmul of forward and backward takes bf16 operands: a float32 one would be a float32
  # matmul on a GPU, the cost this form is there to avoid (not visible in the values on a CPU)
  operands = [[v.aval.dtype for v in e.invars] for e in _equations(
      jax.make_jaxpr(pullback)(x, kernel, ct).jaxpr) if e.primitive.name == "dot_general"]
  assert len(operands) >= 3 and all(d == [jnp.bfloat16] * 2 for d in operands), operands


def _equations(jaxpr):
  """Every equation of a jaxpr, those of the jaxprs inside its equations included."""
  for e in jaxpr.eqns:
    yield e
    for value in e.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)
