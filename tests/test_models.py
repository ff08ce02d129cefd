"""Flax modules against the PyTorch reference, module by module (float32, CPU)."""

import jax
import numpy as np
import pytest
import torch

from cspgan_jax import conv_matmul, layers, models, ops, parity, torch_port, torch_reference, train

FORWARD_TOL = 1e-6


def _rel(a, b):
  return parity.errors(a, b)[1]


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _flax_vars(net, module, x):
  template = module.init(jax.random.PRNGKey(0), x, train=False)
  return torch_port.torch_to_flax(torch_port.module_state_dict(net), template)


@pytest.mark.parametrize("block", ["relu", "leaky_bn"])
@pytest.mark.parametrize("in_ch,stride,pad,hw", [(100, 1, 0, 1), (64, 2, 1, 4), (33, 2, 1, 4)])
def test_cspup_matches_reference(block, in_ch, stride, pad, hw):
  torch.manual_seed(0)
  net = torch_reference.CSPup(in_ch, 32, 4, stride, pad, block)
  net.apply(torch_reference.weights_init)
  x = np.random.RandomState(0).randn(8, hw, hw, in_ch).astype(np.float32)
  module = models.CSPup(32, 4, stride, pad, block=block)
  variables = _flax_vars(net, module, x)
  y, mutated = module.apply(variables, x, train=True, mutable=["batch_stats"])
  ref = net.train()(_nchw(x))
  assert y.shape == _nhwc(ref).shape
  assert _rel(y, _nhwc(ref)) <= FORWARD_TOL
  if block == "leaky_bn":  # running statistics moved as PyTorch's
    got = torch_port.flax_to_torch({"params": variables["params"], **mutated})
    for key, value in net.state_dict().items():
      if "running" in key:
        assert _rel(got[key], value.numpy()) <= FORWARD_TOL, key
      if "num_batches_tracked" in key:
        assert got[key] == value.item() == 1


def test_batch_norm_forward_backward_and_running_stats():
  rs = np.random.RandomState(1)
  x = (rs.randn(16, 6, 6, 8) * 0.5 + 3.0 * rs.randn(8)).astype(np.float32)  # |mean| >> std
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
  xt = _nchw(x).requires_grad_(True)
  yt = tb.train()(xt)
  (yt * _nchw(dy)).sum().backward()
  assert _rel(y, _nhwc(yt)) <= FORWARD_TOL
  assert _rel(dx, _nhwc(xt.grad)) <= 1e-5
  assert _rel(dparams["scale"], tb.weight.grad.numpy()) <= 1e-5
  assert _rel(dparams["bias"], tb.bias.grad.numpy()) <= 1e-5
  assert _rel(stats["mean"], tb.running_mean.numpy()) <= FORWARD_TOL
  assert _rel(stats["var"], tb.running_var.numpy()) <= FORWARD_TOL  # unbiased, unlike flax's
  # Evaluation mode uses the running statistics.
  y_eval = bn.apply({"params": variables["params"], "batch_stats": stats}, x,
                    use_running_average=True)
  assert _rel(y_eval, _nhwc(tb.eval()(_nchw(x)))) <= FORWARD_TOL


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


def _layer_rows(block, kind):
  """Rows of a layer-by-layer comparison at 32x32: every conv, BatchNorm, LeakyReLU after a
  BatchNorm (which the BatchNorm module applies) and CSPup block. G: three CSPup blocks (their
  layers and the block) and the last ConvT; D: its convs, BatchNorms and their LeakyReLUs."""
  return {"relu": 3 * 6 + 1, "leaky_bn": 3 * 10 + 1}[block] + {"dcgan": 8, "avgpool": 7}[kind]


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
      assert _rel(as_f32(a), as_f32(b)) < 1e-5
    else:
      np.testing.assert_allclose(as_f32(a), as_f32(b), rtol=2 ** -7, atol=0)
      assert float((as_f32(a) != as_f32(b)).mean()) < 0.05
  # evaluation mode too
  np.testing.assert_array_equal(
      np.asarray(fused.apply(variables, x, use_running_average=True).astype(np.float32)),
      np.asarray(ops.leaky_relu(plain.apply(variables, x, use_running_average=True))
                 .astype(np.float32)))


@pytest.mark.parametrize("block", ["relu", "leaky_bn"])
@pytest.mark.parametrize("kind", ["dcgan", "avgpool"])
def test_networks_match_reference_layer_by_layer(tiny_config, block, kind):
  # Real channel widths at 32x32: the widths set how well conditioned BatchNorm inputs are.
  config = tiny_config(f"model.block={block}", f"model.discriminator={kind}", "model.ngf=64",
                       "model.ndf=64", "model.nz=100")
  net_g, net_d = torch_reference.build_reference(config.model, seed=0)
  gen, disc = models.build_models(config.model)
  g_t, d_t = train.init_variables(config, jax.random.PRNGKey(0))
  g_vars = torch_port.torch_to_flax(torch_port.module_state_dict(net_g), g_t)
  d_vars = torch_port.torch_to_flax(torch_port.module_state_dict(net_d), d_t)
  images, latents = parity.parity_data(config, 1, seed=0)
  rows = parity.forward_rows("G", gen, g_vars, net_g, latents[0],
                             torch.from_numpy(latents[0])[:, :, None, None])
  rows += parity.forward_rows("D", disc, d_vars, net_d, images[0], _nchw(images[0]))
  assert len(rows) == _layer_rows(block, kind)
  for r in rows:
    # Single modules meet 1e-6 (tests above); along a deep BatchNorm stack float32's own error
    # (PyTorch fp32 vs fp64, the floor) grows past it, and two implementations differ by ~2x it.
    assert parity.within_floor(r, FORWARD_TOL), r


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
  assert grad.dtype == jax.numpy.float32 and _rel(grad, exact) < 1e-5
  tc = torch.nn.Conv2d(32, 512, 1)
  with torch.autocast("cpu", torch.bfloat16):
    out = tc(_nchw(x))
  out.backward(_nchw(dy32).to(torch.bfloat16))
  assert _rel(grad, tc.bias.grad.numpy()) < 4e-3  # PyTorch rounds its sum to bf16 once


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
  assert got.shape == (shape[-1],) and _rel(got, exact) < 1e-6
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


@pytest.mark.parametrize("block,kind", [("relu", "dcgan"), ("leaky_bn", "avgpool")])
def test_bfloat16_networks_match_pytorch_autocast_layer_by_layer(tiny_config, block, kind):
  """bf16 against PyTorch's CPU bf16 autocast, from the same weights. Every operation between
  the convolutions rounds as PyTorch's does (the bias in the convolution's float32 sums, the
  LeakyReLU slope and the average pool in float32, each rounded once), so the first layers agree
  to the bit where the convolutions' float32 sums do and each layer stays well inside PyTorch's
  own bf16 error (its autocast against its float32, the row's floor). Flax's Conv, bf16 slope
  and bf16 pool sums put G's first block 2e-3 off, near that floor."""
  config = tiny_config(f"model.block={block}", f"model.discriminator={kind}", "model.ngf=64",
                       "model.ndf=64", "model.nz=100")
  net_g, net_d = torch_reference.build_reference(config.model, seed=0)
  gen, disc = models.build_models(config.model, dtype=jax.numpy.bfloat16)
  g_t, d_t = train.init_variables(config, jax.random.PRNGKey(0))
  g_vars = torch_port.torch_to_flax(torch_port.module_state_dict(net_g), g_t)
  d_vars = torch_port.torch_to_flax(torch_port.module_state_dict(net_d), d_t)
  images, latents = parity.parity_data(config, 1, seed=0)
  rows = parity.forward_rows("G", gen, g_vars, net_g, latents[0],
                             torch.from_numpy(latents[0])[:, :, None, None], bfloat16=True)
  rows += parity.forward_rows("D", disc, d_vars, net_d, images[0], _nchw(images[0]),
                              bfloat16=True)
  assert len(rows) == _layer_rows(block, kind)
  for r in rows:
    assert 1e-3 < r.floor < 3e-2, r  # bf16's own error, as measured
    assert r.rel < 0.6 * r.floor, r
    if r.name.startswith("main.0") or (r.group == "forward D" and r.name == "main.1"):
      # The first block, and D's first layers: bit for bit but a few. A GPU's convolutions sum
      # in another order than oneDNN's; there the bound still tells one rounding from two.
      assert r.rel < (1e-4 if jax.default_backend() == "cpu" else 0.3 * r.floor), r


def test_parameter_counts(config_path):
  from cspgan_jax import config_lib
  config = config_lib.load_config(config_path("baseline"))
  g, d = jax.eval_shape(lambda: train.init_variables(config, jax.random.PRNGKey(0)))
  count = lambda v: sum(x.size for x in jax.tree_util.tree_leaves(v["params"]))

  def cspup(cin, c):  # left ConvT, 1x1 conv (+bias), ConvT, two 1x1 convs (+bias)
    return cin // 2 * c * 16 + ((cin - cin // 2) * c + c) + c * c * 16 + 2 * (c * c + c)

  g_expected = (cspup(100, 1024) + cspup(1024, 512) + cspup(512, 256) + cspup(256, 128)
                + cspup(128, 64) + 64 * 3 * 16)
  # dcgan: five 4x4 convs (no bias), four BatchNorms (scale + bias), final 4x4 conv to 1.
  d_expected = (3 * 64 * 16 + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16
                + 512 * 1024 * 16 + 2 * (128 + 256 + 512 + 1024) + 1024 * 16)
  assert count(g) == g_expected
  assert count(d) == d_expected
  ref_g, ref_d = torch_reference.build_reference(config.model)
  assert count(g) == sum(p.numel() for p in ref_g.parameters())
  assert count(d) == sum(p.numel() for p in ref_d.parameters())


def test_dcgan_initialisation_statistics(config_path):
  from cspgan_jax import config_lib
  config = config_lib.load_config(config_path("exp2"))  # leaky_bn: has BatchNorm in G too
  g, d = train.init_variables(config, jax.random.PRNGKey(0))
  from flax import traverse_util
  flat = {**traverse_util.flatten_dict(g["params"]), **{("D",) + k: v for k, v in
                                                         traverse_util.flatten_dict(d["params"]).items()}}
  kernels = np.concatenate([np.ravel(v) for k, v in flat.items() if k[-1] == "kernel"])
  scales = np.concatenate([np.ravel(v) for k, v in flat.items() if k[-1] == "scale"])
  assert abs(kernels.std() - 0.02) < 0.0005 and abs(kernels.mean()) < 0.0005
  assert abs(scales.mean() - 1.0) < 0.003 and abs(scales.std() - 0.02) < 0.003
  for path, v in flat.items():
    if path[-1] == "bias" and "right_0" in path and path[0] == "main_1":  # 1x1 conv on 512 ch
      bound = 1 / np.sqrt(512)
      assert np.abs(v).max() <= bound and np.abs(v).max() > 0.8 * bound
    if path[-1] == "bias" and path[0] == "D":
      assert not np.any(v)  # BatchNorm biases start at 0


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
  xt = _nchw(x).requires_grad_(True)
  y = net(xt)
  (y * _nchw(cot)).sum().backward()
  assert _rel(ours.apply(variables, x), _nhwc(y)) < FORWARD_TOL
  dw_torch = net.weight.grad.numpy().transpose(2, 3, 1, 0)
  for g in (g_ours, g_flax):
    assert _rel(g[0]["params"]["kernel"], dw_torch) < FORWARD_TOL
    assert _rel(g[1], _nhwc(xt.grad)) < FORWARD_TOL
  # the same sums as plain autodiff, up to float32 rounding
  assert _rel(g_ours[0]["params"]["kernel"], g_flax[0]["params"]["kernel"]) < 1e-6


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
  xt = _nchw(x).requires_grad_(True)
  y = net(xt)
  (y * _nchw(cot)).sum().backward()
  assert _rel(ours.apply(variables, x), _nhwc(y)) < FORWARD_TOL
  assert _rel(g_ours[0]["params"]["kernel"], net.weight.grad.numpy().transpose(2, 3, 1, 0)) \
      < FORWARD_TOL
  assert _rel(g_ours[1], _nhwc(xt.grad)) < FORWARD_TOL
  # the convolution forms' numbers, up to the order of float32 sums
  assert _rel(ours.apply(variables, x), conv_form.apply(variables, x)) < FORWARD_TOL
  for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_conv)):
    assert _rel(a, b) < FORWARD_TOL


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
  assert _rel(mm, exact) < 1.02 * _rel(conv, exact)
  # The backward pass stays in bf16 (its matmuls take the bf16 cotangent).
  dx, dk = jax.vjp(lambda a, b: conv_matmul.conv_transpose(a, b, 2, 1), x, kernel)[1](
      jnp.ones((8, 64, 64, 3), jnp.bfloat16))
  assert dx.dtype == dk.dtype == jnp.bfloat16


def test_edge_layers_as_matmul_lose_nothing_in_bfloat16(tiny_config):
  """Both networks with their edge layers as matmuls hold the same variables as with the
  convolutions, and in bfloat16 give G's images and every parameter's gradient (through D) no
  further from the float32 convolutions than the bf16 convolutions do: col2im adds each
  output's taps in float32 and rounds once, as a convolution's accumulator does. (Float32:
  the module test above, and whole training steps against PyTorch in test_train_parity.py.)"""
  import jax.numpy as jnp
  from jax import tree_util
  config = tiny_config()  # the dcgan D: the variables other tests create (init is slow eagerly)
  variables = train.init_variables(config, jax.random.PRNGKey(0))
  z = jax.random.normal(jax.random.PRNGKey(1), (8, config.model.nz))
  config.model.edge_layers_as_matmul = True
  assert tree_util.tree_all(tree_util.tree_map(
      np.array_equal, variables, train.init_variables(config, jax.random.PRNGKey(0))))

  def images_and_grads(as_matmul, dtype):
    config.model.edge_layers_as_matmul = as_matmul
    gen, disc = models.build_models(config.model, dtype=dtype)
    (g_vars, d_vars) = variables

    def f(params_g, params_d):
      images, _ = gen.apply({**g_vars, "params": params_g}, z, mutable=["batch_stats"])
      logits, _ = disc.apply({**d_vars, "params": params_d}, images, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(100 * logits)), images
    (_, images), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        g_vars["params"], d_vars["params"])
    return images, tree_util.tree_leaves(grads)

  ref_images, ref_grads = images_and_grads(False, jnp.float32)
  errors = {}
  for as_matmul in (False, True):
    images, grads = images_and_grads(as_matmul, jnp.bfloat16)
    assert len(grads) == len(ref_grads)
    errors[as_matmul] = (_rel(images, ref_images), [_rel(a, b) for a, b in zip(grads, ref_grads)])
  (conv_images, conv_grads), (mm_images, mm_grads) = errors[False], errors[True]
  assert 1e-3 < conv_images and mm_images < 1.5 * conv_images, (conv_images, mm_images)
  assert np.median(mm_grads) < 1.5 * np.median(conv_grads), (conv_grads, mm_grads)
