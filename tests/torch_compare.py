"""Our NHWC arrays against PyTorch's NCHW tensors: the helpers the module tests share."""

import numpy as np
import torch

from cspgan_jax import parity

FORWARD_TOL = 1e-6  # one forward pass in float32: summation order only


def rel(a, b):
  """||a - b|| / ||b||, as `cspgan parity` reports it."""
  return parity.errors(a, b)[1]


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)
