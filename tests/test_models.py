"""The networks against the PyTorch reference: CSPup blocks, G and D layer by layer (float32 and
bf16), parameter counts and initialisation (CPU)."""

import jax
import numpy as np
import pytest
import torch

from cspgan_jax import layers, models, parity, torch_port, torch_reference, train
from cspgan_jax.errors import ConfigError
from torch_compare import FORWARD_TOL, nchw, nhwc, rel


def _flax_vars(net, module, x):
  template = module.init(jax.random.PRNGKey(0), x, train=False)
  return torch_port.torch_to_flax(torch_port.module_state_dict(net), template)


@pytest.mark.parametrize("block", models.BLOCKS)
@pytest.mark.parametrize("in_ch,stride,pad,hw", [(100, 1, 0, 1), (64, 2, 1, 4), (33, 2, 1, 4)])
def test_cspup_matches_reference(block, in_ch, stride, pad, hw):
  torch.manual_seed(0)
  net = torch_reference.CSPup(in_ch, 32, 4, stride, pad, block)
  net.apply(torch_reference.weights_init)
  x = np.random.RandomState(0).randn(8, hw, hw, in_ch).astype(np.float32)
  module = models.CSPup(32, 4, stride, pad, block=block)
  variables = _flax_vars(net, module, x)
  y, mutated = module.apply(variables, x, train=True, mutable=["batch_stats"])
  ref = net.train()(nchw(x))
  assert y.shape == nhwc(ref).shape
  assert rel(y, nhwc(ref)) <= FORWARD_TOL
  assert ("batch_stats" in variables) == any("running" in k for k in net.state_dict())
  if "batch_stats" in variables:  # running statistics moved as PyTorch's
    got = torch_port.flax_to_torch({"params": variables["params"], **mutated})
    for key, value in net.state_dict().items():
      if "running" in key:
        assert rel(got[key], value.numpy()) <= FORWARD_TOL, key
      if "num_batches_tracked" in key:
        assert got[key] == value.item() == 1


def _layer_rows(block, kind):
  """Rows of a layer-by-layer comparison at 32x32: every conv, BatchNorm, LeakyReLU after a
  BatchNorm (which the BatchNorm module applies) and CSPup block. G: three CSPup blocks (their
  layers and the block) and the last ConvT; D: its convs, BatchNorms and their LeakyReLUs."""
  g_rows, d_rows = {"relu": 3 * 6 + 1, "leaky_bn": 3 * 10 + 1}, {"dcgan": 8, "avgpool": 7}
  assert block in g_rows and kind in d_rows, (
      f"a new variant: write its rows into tests/test_models.py's _layer_rows ({block}, {kind})")
  return g_rows[block] + d_rows[kind]


@pytest.mark.parametrize("block", models.BLOCKS)
@pytest.mark.parametrize("kind", models.DISCRIMINATORS)
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
  rows += parity.forward_rows("D", disc, d_vars, net_d, images[0], nchw(images[0]))
  assert len(rows) == _layer_rows(block, kind)
  for r in rows:
    # Single modules meet 1e-6 (tests above); along a deep BatchNorm stack float32's own error
    # (PyTorch fp32 vs fp64, the floor) grows past it, and two implementations differ by ~2x it.
    assert parity.within_floor(r, FORWARD_TOL), r


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
  rows += parity.forward_rows("D", disc, d_vars, net_d, images[0], nchw(images[0]),
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
    errors[as_matmul] = (rel(images, ref_images), [rel(a, b) for a, b in zip(grads, ref_grads)])
  (conv_images, conv_grads), (mm_images, mm_grads) = errors[False], errors[True]
  assert 1e-3 < conv_images and mm_images < 1.5 * conv_images, (conv_images, mm_images)
  assert np.median(mm_grads) < 1.5 * np.median(conv_grads), (conv_grads, mm_grads)


@pytest.mark.parametrize("field,listed,module,twin", [
    ("block", "BLOCKS", "CSPup", "torch_reference.CSPup"),
    ("discriminator", "DISCRIMINATORS", "Discriminator", "torch_reference.Discriminator")])
def test_a_listed_variant_without_its_branches_says_which(tiny_config, monkeypatch, field, listed,
                                                           module, twin):
  """A name added to models.BLOCKS / DISCRIMINATORS before its branches: parity, and the Flax
  model, each say in one line which class to extend (not "unknown block")."""
  monkeypatch.setattr(models, listed, getattr(models, listed) + ("new",))
  config = tiny_config(f"model.{field}=new")  # validation reads the tuples: accepted
  with pytest.raises(ConfigError) as e:
    parity.run_parity(config, steps=1)
  assert str(e.value) == f"model.{field}='new' has no PyTorch twin: add its branch to {twin}"
  with pytest.raises(ConfigError) as e:
    train.variable_shapes(config)
  assert str(e.value) == (f"model.{field}='new' is listed in models.{listed} but has no branch "
                          f"in models.{module}: add one")


def test_conv2d_bias_fan_in_defaults_to_the_input_channels():
  """PyTorch's Conv2d(in, out, k) bias init is U(+-1/sqrt(in k k)), `in` the input's channels:
  without `in_features`, the same numbers as with it."""
  x = np.zeros((2, 8, 8, 3), np.float32)
  key = jax.random.PRNGKey(0)
  default = layers.Conv2d(16, 4, 2, 1, use_bias=True).init(key, x)
  explicit = layers.Conv2d(16, 4, 2, 1, in_features=3, use_bias=True).init(key, x)
  jax.tree_util.tree_map(np.testing.assert_array_equal, default, explicit)
  bias = np.asarray(default["params"]["bias"])
  assert 0.5 / np.sqrt(3 * 16) < np.abs(bias).max() <= 1 / np.sqrt(3 * 16)
