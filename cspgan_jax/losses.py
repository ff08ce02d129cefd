"""GAN losses on discriminator logits: each game is a `GANLoss`, three functions of float32
logits (N,) to a scalar, so that a loss need not be "BCE against a target" (hinge's G loss is
-mean(l); one-sided label smoothing changes D's real term only).

The seed uses `nn.BCELoss` on `Sigmoid` outputs. PyTorch clamps each log term at -100 and divides
its gradient by `max(p (1 - p), 1e-12)`, so a saturated discriminator (p exactly 0 or 1) gives a
loss of 100 and a zero gradient instead of inf/NaN. `torch_bce` reproduces that, forward and
backward; `bce_logits` is the numerically stable loss a new experiment should prefer.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

_LOG_CLAMP = -100.0  # PyTorch's BCELoss clamp of log(p) and log(1 - p)
_GRAD_EPS = 1e-12    # PyTorch's binary_cross_entropy_backward: (p - y) / max(p (1 - p), eps)


@jax.custom_vjp
def torch_bce_probs(p, y):
  """Elementwise PyTorch BCELoss on probabilities `p` against targets `y`."""
  log_p = jnp.maximum(jnp.log(p), _LOG_CLAMP)
  log_1mp = jnp.maximum(jnp.log1p(-p), _LOG_CLAMP)
  return (y - 1) * log_1mp - y * log_p  # PyTorch's own order of terms


def _torch_bce_fwd(p, y):
  return torch_bce_probs(p, y), (p, y)


def _torch_bce_bwd(res, g):
  # The plain gradient of the clamped forward is NaN at p in {0, 1}; PyTorch's is finite.
  p, y = res
  grad_p = g * (p - y) / jnp.maximum((1 - p) * p, _GRAD_EPS)
  return grad_p, jnp.zeros_like(y)  # targets are constants


torch_bce_probs.defvjp(_torch_bce_fwd, _torch_bce_bwd)


def torch_bce(logits, target):
  """`nn.BCELoss()(sigmoid(logits), target)`: mean over the batch, PyTorch's clamping included."""
  p = jax.nn.sigmoid(logits)
  return torch_bce_probs(p, jnp.broadcast_to(target, p.shape).astype(p.dtype)).mean()


def bce_logits(logits, target):
  """Stable BCE on logits: softplus(-l) for target 1, softplus(l) for 0; never saturates."""
  return optax.sigmoid_binary_cross_entropy(
      logits, jnp.broadcast_to(target, logits.shape).astype(logits.dtype)).mean()


class GANLoss(NamedTuple):
  """One GAN game's losses, each of D's float32 logits (N,) -> a scalar. `train.py` adds
  `d_on_real` and `d_on_fake` for D's loss; torch_reference.LOSSES holds each one's twin."""
  d_on_real: Callable  # D's loss on its logits of real images
  d_on_fake: Callable  # D's loss on its logits of G's images (detached)
  g_on_fake: Callable  # G's loss on D's logits of G's images (D after its step)


def bce_game(bce: Callable) -> GANLoss:
  """The seed's game from a BCE(logits, target): D tells real (1) from fake (0); G wants 1."""
  return GANLoss(d_on_real=functools.partial(bce, target=1.0),
                 d_on_fake=functools.partial(bce, target=0.0),
                 g_on_fake=functools.partial(bce, target=1.0))


LOSSES = {"torch_bce": bce_game(torch_bce), "bce_logits": bce_game(bce_logits)}


def get_loss(name: str) -> GANLoss:
  return LOSSES[name]
