"""`layers` against PyTorch's `nn` layers and flax's: BatchNorm, the convolutions and their
matmul forms, values and gradients (float32 unless a test says otherwise; CPU)."""

import jax
import numpy as np
import pytest
import torch

from cspgan_jax import layers, ops
from torch_compare import FORWARD_TOL, nchw, nhwc, rel


@pytest.mark.parametrize("std", [0.5, 2.0])
def test_batch_norm_forward_backward_and_running_stats(std):
  """At std 2 sqrt(var + eps) and sqrt(var) + eps differ beyond FORWARD_TOL; at 0.5 they agree
  to first order."""
  rs = np.random.RandomState(1)
  x = (rs.randn(16, 6, 6, 8) * std + 3.0 * rs.randn(8)).astype(np.float32)  # |mean| >> std
  dy = rs.randn(*x.shape).astype(np.float32)
  bn = layers.BatchNorm()
  variables = bn.init(jax.random.PRNGKey(0), x, use_running_average=True)
  tb = torch.nn.BatchNorm2d(8)
  tb.weight.data = torch.from_numpy(np.array(variables["params"]["scale"]))

  def f(x, params):
    y, mutated = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                          use_running_average=False, mutable=["batch_stats"])
    return (y * dy).sum(), (y, mutated["batch_stats"])

  (_, (y, stats)), (dx, dparams) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
      x, variables["params"])
  xt = nchw(x).requires_grad_(True)
  yt = tb.train()(xt)
  (yt * nchw(dy)).sum().backward()
  assert rel(y, nhwc(yt)) <= FORWARD_TOL
  assert rel(dx, nhwc(xt.grad)) <= 1e-5
  assert rel(dparams["scale"], tb.weight.grad.numpy()) <= 1e-5
  assert rel(dparams["bias"], tb.bias.grad.numpy()) <= 1e-5
  assert rel(stats["mean"], tb.running_mean.numpy()) <= FORWARD_TOL
  assert rel(stats["var"], tb.running_var.numpy()) <= FORWARD_TOL  # unbiased, unlike flax's
  # Evaluation mode uses the running statistics.
  y_eval = bn.apply({"params": variables["params"], "batch_stats": stats}, x,
                    use_running_average=True)
  assert rel(y_eval, nhwc(tb.eval()(nchw(x)))) <= FORWARD_TOL


def test_batch_norm_input_gradient_where_the_cotangent_has_a_large_mean():
  """sum(dy) of a cotangent whose mean is 100x its spread, summed plainly, puts dx 7.3e-6 from
  PyTorch's; the shifted sum 2.4e-7 (measured). (The forward pass, x * alpha + beta at
  |mean| / std = 600, is ~3e-5 from PyTorch's in either form: PyTorch's formula cancels there.)"""
  rs = np.random.RandomState(0)
  x = (rs.randn(64, 8, 8, 4) * 0.05 + 30.0).astype(np.float32)
  dy = (rs.randn(*x.shape) * 0.01 + 1.0).astype(np.float32)
  ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
  loss = lambda x, s, b: (ops.batch_norm_train(x, s, b, 1e-5, None)[0] * dy).sum()
  dx, _, dbias = jax.grad(loss, argnums=(0, 1, 2))(jax.numpy.asarray(x), ones, zeros)
  xt = nchw(x).requires_grad_(True)
  tb = torch.nn.BatchNorm2d(4).train()
  (tb(xt) * nchw(dy)).sum().backward()
  assert rel(dx, nhwc(xt.grad)) <= 1e-6
  assert rel(dbias, tb.bias.grad.numpy()) <= 1e-6


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("groups", [1, 2])
def test_batch_norm_with_leaky_relu_is_the_two_modules(dtype, groups):
  """`BatchNorm(activation="leaky_relu")` (D's and leaky_bn's BatchNorms) against LeakyReLU
  applied to a plain BatchNorm's output: the outputs, running statistics and gradients, bit for
  bit. Its backward pass takes the derivative's sign from the normalisation recomputed from the
  input, so channel 0 is constant with zero bias: its output is 0 (or the rounding of x alpha),
  where the derivative is the slope. In float32 training steps on the CPU the two forms agree
  bit for bit (docs/PERFORMANCE.md); here the sums' order shows."""
  dt = getattr(jax.numpy, dtype)
  rs = np.random.RandomState(3)
  x = (rs.randn(8 * groups, 4, 4, 16) + 2.0 * rs.randn(16)).astype(np.float32)
  x[..., 0] = 1.5
  x = jax.numpy.asarray(x, dt)
  ct = jax.numpy.asarray(rs.randn(*x.shape), dt)
  fused, plain = layers.BatchNorm(dtype=dt, activation="leaky_relu"), layers.BatchNorm(dtype=dt)
  variables = plain.init(jax.random.PRNGKey(0), x, use_running_average=True)
  params = {"scale": variables["params"]["scale"],
            "bias": jax.numpy.asarray(rs.randn(16) * 0.3, np.float32).at[0].set(0.0)}

  def run(apply):
    def f(x, params):
      y, mutated = apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
      return (y.astype(np.float32) * ct.astype(np.float32)).sum(), (y, mutated["batch_stats"])
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, params)

  bn_kw = dict(use_running_average=False, groups=groups, mutable=["batch_stats"])
  got = run(lambda v, x: fused.apply(v, x, **bn_kw))
  want = run(lambda v, x: (lambda y, m: (ops.leaky_relu(y), m))(*plain.apply(v, x, **bn_kw)))
  (_, (y, _)), _ = want
  assert 0 < float((np.asarray(y.astype(np.float32)) <= 0).mean()) < 1
  as_f32 = lambda a: np.asarray(a.astype(np.float32))
  # The forward pass is the same arithmetic: outputs and running statistics bit for bit.
  for a, b in zip(jax.tree_util.tree_leaves(got[0]), jax.tree_util.tree_leaves(want[0])):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(as_f32(a), as_f32(b))
  # The backward pass sums its two per-channel sums as one reduction: float32 sums in another
  # order, so gradients within float32's rounding (bf16's x gradient: an ulp apart at most).
  for a, b in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
    assert a.dtype == b.dtype
    if a.dtype == np.float32:  # 2e-7 on the CPU; a wrong derivative would be O(1)
      assert rel(as_f32(a), as_f32(b)) < 1e-5
    else:
      np.testing.assert_allclose(as_f32(a), as_f32(b), rtol=2 ** -7, atol=0)
      assert float((as_f32(a) != as_f32(b)).mean()) < 0.05
  # evaluation mode too
  np.testing.assert_array_equal(
      np.asarray(fused.apply(variables, x, use_running_average=True).astype(np.float32)),
      np.asarray(ops.leaky_relu(plain.apply(variables, x, use_running_average=True))
                 .astype(np.float32)))


def test_bfloat16_conv_bias_gradient_is_summed_in_float32():
  """A 1x1 convolution's bias gradient at batch 64 from bf16 output gradients: summed in float32
  as PyTorch's autocast backward sums it (a bf16 sum, autodiff's default, was 9% off)."""
  rs = np.random.RandomState(0)
  x = rs.randn(64, 8, 8, 32).astype(np.float32)
  dy = jax.numpy.asarray(rs.randn(64, 8, 8, 512) * 0.01 + 0.003, jax.numpy.bfloat16)
  conv = layers.Conv2d(512, 1, in_features=32, dtype=jax.numpy.bfloat16)
  params = conv.init(jax.random.PRNGKey(0), x)["params"]
  grad = jax.vjp(lambda p: conv.apply({"params": p}, x), params)[1](dy)[0]["bias"]
  dy32 = np.asarray(dy.astype(jax.numpy.float32))
  exact = dy32.astype(np.float64).sum((0, 1, 2))
  assert grad.dtype == jax.numpy.float32 and rel(grad, exact) < 1e-5
  tc = torch.nn.Conv2d(32, 512, 1)
  with torch.autocast("cpu", torch.bfloat16):
    out = tc(nchw(x))
  out.backward(nchw(dy32).to(torch.bfloat16))
  assert rel(grad, tc.bias.grad.numpy()) < 4e-3  # PyTorch rounds its sum to bf16 once


@pytest.mark.parametrize("in_ch, out_ch, stride, pad, hw", [(6, 5, 2, 1, 5), (4, 3, 1, 0, 1)])
def test_conv_transpose_matches_pytorch_and_flax(in_ch, out_ch, stride, pad, hw):
  """`ConvTranspose2d` (custom VJP: the strided convolution's own gradients) against PyTorch's
  ConvTranspose2d, forward and both gradients, and against flax's ConvTranspose, whose
  initialisation and forward it must repeat bit for bit (checkpoints and seeds are unchanged)."""
  import flax.linen as nn
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, hw, hw, in_ch)).astype(np.float32)
  ours = layers.conv_transpose2d(out_ch, 4, stride, pad)
  theirs = nn.ConvTranspose(out_ch, (4, 4), strides=(stride, stride),
                            padding=[(3 - pad, 3 - pad)] * 2, use_bias=False,
                            transpose_kernel=True, kernel_init=layers.conv_kernel_init)
  variables = ours.init(jax.random.PRNGKey(3), x)
  np.testing.assert_array_equal(variables["params"]["kernel"],
                                theirs.init(jax.random.PRNGKey(3), x)["params"]["kernel"])
  np.testing.assert_array_equal(ours.apply(variables, x), theirs.apply(variables, x))

  cot = rng.standard_normal(np.shape(ours.apply(variables, x))).astype(np.float32)
  loss = lambda module: lambda v, x: (module.apply(v, x) * cot).sum()
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
  g_flax = jax.grad(loss(theirs), argnums=(0, 1))(variables, x)

  net = torch.nn.ConvTranspose2d(in_ch, out_ch, 4, stride, pad, bias=False)
  with torch.no_grad():
    net.weight.copy_(torch.from_numpy(
        np.transpose(np.asarray(variables["params"]["kernel"]), (3, 2, 0, 1)).copy()))
  xt = nchw(x).requires_grad_(True)
  y = net(xt)
  (y * nchw(cot)).sum().backward()
  assert rel(ours.apply(variables, x), nhwc(y)) < FORWARD_TOL
  dw_torch = net.weight.grad.numpy().transpose(2, 3, 1, 0)
  for g in (g_ours, g_flax):
    assert rel(g[0]["params"]["kernel"], dw_torch) < FORWARD_TOL
    assert rel(g[1], nhwc(xt.grad)) < FORWARD_TOL
  # the same sums as plain autodiff, up to float32 rounding
  assert rel(g_ours[0]["params"]["kernel"], g_flax[0]["params"]["kernel"]) < 1e-6


@pytest.mark.parametrize("transposed, in_ch, out_ch, stride, pad, hw", [
    (False, 3, 5, 2, 1, 8),   # D's first layer
    (False, 6, 1, 1, 0, 4),   # D's last layer: a 4x4 window over 4x4, one output
    (True, 6, 3, 2, 1, 5),    # G's last layer
    (True, 4, 3, 1, 0, 1)])   # G's first block's transposed convolutions: 1x1 -> 4x4
def test_matmul_forms_match_pytorch_and_the_convolutions(transposed, in_ch, out_ch, stride, pad,
                                                         hw):
  """`model.edge_layers_as_matmul`: a convolution as im2col + one matmul, a transposed one as
  one matmul + col2im. Same parameters (name, shape, initialisation) as the convolution forms,
  forward and both gradients against PyTorch's modules and against the convolution forms."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, hw, hw, in_ch)).astype(np.float32)
  if transposed:
    ours = layers.conv_transpose2d(out_ch, 4, stride, pad, as_matmul=True)
    conv_form = layers.conv_transpose2d(out_ch, 4, stride, pad)
    net = torch.nn.ConvTranspose2d(in_ch, out_ch, 4, stride, pad, bias=False)
    to_torch = (3, 2, 0, 1)  # (k, k, out, in) -> (in, out, k, k)
  else:
    ours = layers.Conv2dAsMatmul(out_ch, 4, stride, pad)
    conv_form = layers.Conv2d(out_ch, 4, stride, pad, use_bias=False)
    net = torch.nn.Conv2d(in_ch, out_ch, 4, stride, pad, bias=False)
    to_torch = (3, 2, 0, 1)  # HWIO -> OIHW
  variables = ours.init(jax.random.PRNGKey(3), x)
  np.testing.assert_array_equal(variables["params"]["kernel"],
                                conv_form.init(jax.random.PRNGKey(3), x)["params"]["kernel"])

  cot = rng.standard_normal(np.shape(ours.apply(variables, x))).astype(np.float32)
  loss = lambda module: lambda v, x: (module.apply(v, x) * cot).sum()
  g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(variables, x)
  g_conv = jax.jit(jax.grad(loss(conv_form), argnums=(0, 1)))(variables, x)
  with torch.no_grad():
    net.weight.copy_(torch.from_numpy(
        np.transpose(np.asarray(variables["params"]["kernel"]), to_torch).copy()))
  xt = nchw(x).requires_grad_(True)
  y = net(xt)
  (y * nchw(cot)).sum().backward()
  assert rel(ours.apply(variables, x), nhwc(y)) < FORWARD_TOL
  assert rel(g_ours[0]["params"]["kernel"], net.weight.grad.numpy().transpose(2, 3, 1, 0)) \
      < FORWARD_TOL
  assert rel(g_ours[1], nhwc(xt.grad)) < FORWARD_TOL
  # the convolution forms' numbers, up to the order of float32 sums
  assert rel(ours.apply(variables, x), conv_form.apply(variables, x)) < FORWARD_TOL
  for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_conv)):
    assert rel(a, b) < FORWARD_TOL
