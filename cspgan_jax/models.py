"""Flax Linen models of the CSPup-GAN (NHWC), numerically matching the PyTorch reference.

Submodule names mirror the reference's `state_dict` paths with dots turned into underscores
(`main.0.right.3` -> `main_0/right_3`), so `torch_port` converts by one rule and a parity failure
names one layer. Activations are functions here (`ops`) but keep their index in the names, as in
PyTorch. The layers are `layers`' (PyTorch's `nn` modules); their arithmetic is `ops`', whose
custom VJPs make the networks reverse-mode differentiable only (`jax.jvp` through them raises).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from cspgan_jax import layers, ops
from cspgan_jax.errors import ConfigError

BLOCKS = ("relu", "leaky_bn")
DISCRIMINATORS = ("dcgan", "avgpool")


def _no_branch(field: str, name: str, names: tuple, listed: str, module: str) -> Exception:
  """The error of a module given a variant it has no branch for: a name listed in `names`
  (config validation accepted it) whose branch was not written yet, or one not listed at all."""
  if name in names:
    return ConfigError(f"model.{field}={name!r} is listed in models.{listed} but has no branch "
                       f"in models.{module}: add one")
  return ValueError(f"unknown {field} {name!r}; expected one of {names}")


def check_resolution(resolution: int) -> int:
  """Number of stride-2 stages for a square power-of-two resolution >= 32 (128 -> 5)."""
  if resolution < 32 or resolution & (resolution - 1):
    raise ValueError(f"resolution must be a power of two >= 32, got {resolution}")
  return int(math.log2(resolution)) - 2


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
    convt = functools.partial(layers.conv_transpose2d, c, self.kernel_size, self.stride,
                              self.padding, dtype=dt, as_matmul=self.transposed_as_matmul)
    conv1x1 = functools.partial(layers.Conv2d, c, 1, dtype=dt)
    left = convt(name="left_0")(x1)
    if self.block == "relu":
      h = ops.relu(conv1x1(in_features=x2.shape[-1], name="right_0")(x2))
      h = convt(name="right_2")(h)
      h = ops.relu(conv1x1(in_features=c, name="right_3")(h))
      right = conv1x1(in_features=c, name="right_5")(h)
    elif self.block == "leaky_bn":
      # each BatchNorm followed by LeakyReLU (right.2 and right.6 of PyTorch's Sequential)
      bn = functools.partial(layers.BatchNorm, self.bn_momentum, self.bn_epsilon, self.axis_name,
                             dt, activation="leaky_relu")
      h = conv1x1(in_features=x2.shape[-1], name="right_0")(x2)
      h = bn(name="right_1")(h, use_running_average=not train)
      h = convt(name="right_3")(h)
      h = conv1x1(in_features=c, name="right_4")(h)
      h = bn(name="right_5")(h, use_running_average=not train)
      right = conv1x1(in_features=c, name="right_7")(h)
    else:
      raise _no_branch("block", self.block, BLOCKS, "BLOCKS", "CSPup")
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
    x = layers.conv_transpose2d(self.nc, 4, 2, 1, dtype=self.dtype,
                                as_matmul=self.edge_as_matmul, name=f"main_{n_blocks}")(x)
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
    bn = functools.partial(layers.BatchNorm, self.bn_momentum, self.bn_epsilon, self.axis_name,
                           self.dtype, activation="leaky_relu")
    conv = functools.partial(layers.Conv2d, kernel_size=4, stride=2, padding=1, use_bias=False,
                             dtype=self.dtype)
    # The first and last convolutions, either form (same parameters)
    edge_conv = (layers.Conv2dAsMatmul if self.edge_as_matmul
                 else functools.partial(layers.Conv2d, use_bias=False))
    x = x.astype(self.dtype)
    if self.kind == "dcgan":
      x = ops.leaky_relu(edge_conv(self.ndf, 4, 2, 1, dtype=self.dtype, name="main_0")(x))
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
      raise _no_branch("discriminator", self.kind, DISCRIMINATORS, "DISCRIMINATORS",
                       "Discriminator")
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
