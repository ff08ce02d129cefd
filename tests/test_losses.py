"""Losses against torch.nn.BCELoss, including a saturated discriminator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cspgan_jax import losses


def _torch_bce(logits, target):
  x = torch.tensor(np.asarray(logits), requires_grad=True)
  loss = torch.nn.BCELoss()(torch.sigmoid(x), torch.full(x.shape, float(target)))
  loss.backward()
  return loss.item(), x.grad.numpy()


@pytest.mark.parametrize("target", [0.0, 1.0])
def test_torch_bce_matches_pytorch(target):
  logits = np.random.RandomState(0).randn(64).astype(np.float32) * 3
  value, grad = jax.value_and_grad(losses.torch_bce)(jnp.asarray(logits), target)
  ref_value, ref_grad = _torch_bce(logits, target)
  assert abs(float(value) - ref_value) <= 1e-6 * abs(ref_value)
  # The gradient is (p - target) / n: where p is near the target, the difference keeps only p's
  # last bits, so XLA:GPU's sigmoid, an ulp or two off the CPU's, moves it by up to a few ulp of
  # 1 / n (target 1.0 failed here on an H200 with the CPU's atol). On a CPU: exact.
  atol = 1e-12 if jax.default_backend() == "cpu" else 4 * np.finfo(np.float32).eps / logits.size
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=atol)


def test_torch_bce_keeps_its_precision_on_confidently_rejected_fakes():
  """BCELoss takes log1p(-p): with log(1 - p) the loss of a fake rejected at logit -16 would be
  6% off PyTorch's (1.19e-7 for 1.13e-7). (Target 1 at logit +16 takes log(p) of a p an ulp
  below 1 in either form, where an ulp-off sigmoid, as on a GPU, moves the loss by half.)"""
  logits = np.asarray([-16.0, -12.0, -8.0], np.float32)
  ref_value, _ = _torch_bce(logits, 0.0)
  assert abs(float(losses.torch_bce(jnp.asarray(logits), 0.0)) - ref_value) <= (
      1e-6 * abs(ref_value))


@pytest.mark.parametrize("target", [0.0, 1.0])
def test_saturated_discriminator_is_clamped_not_nan(target):
  # sigmoid(+-200) is exactly 1 or 0 in float32: log terms hit PyTorch's -100 clamp.
  logits = np.array([200.0, -200.0, 150.0, -150.0, 0.5, -0.5, 30.0, -30.0], np.float32)
  value, grad = jax.value_and_grad(losses.torch_bce)(jnp.asarray(logits), target)
  ref_value, ref_grad = _torch_bce(logits, target)
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
  assert abs(float(value) - ref_value) <= 1e-6 * abs(ref_value)
  assert ref_value > 100 * 2 / 8  # two saturated wrong-side terms contribute 100 each
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-12)
  # The naive clamp differentiates to NaN where p is exactly 0 or 1: why the custom VJP exists.
  def naive(l):
    p = jax.nn.sigmoid(l)
    return -jnp.mean(target * jnp.maximum(jnp.log(p), -100.0)
                     + (1 - target) * jnp.maximum(jnp.log(1 - p), -100.0))
  assert np.isnan(np.asarray(jax.grad(naive)(jnp.asarray(logits)))).any()


def test_bce_logits_is_stable_and_agrees_away_from_saturation():
  logits = jnp.asarray(np.random.RandomState(1).randn(32).astype(np.float32))
  for target in (0.0, 1.0):
    np.testing.assert_allclose(losses.bce_logits(logits, target), losses.torch_bce(logits, target),
                               rtol=1e-6)
  big = jnp.asarray([200.0, -200.0])
  assert float(losses.bce_logits(big, 1.0)) == pytest.approx(100.0, rel=1e-6)  # softplus(200)/2
  assert np.all(np.isfinite(jax.grad(losses.bce_logits)(big, 1.0)))


@pytest.mark.parametrize("name,bce", [("torch_bce", losses.torch_bce),
                                      ("bce_logits", losses.bce_logits)])
def test_bce_games_are_triples_of_their_bce(name, bce):
  """Each LOSSES entry is D's loss on real logits, D's on fake ones and G's on fake ones: for
  the BCE games, BCE against 1, 0 and 1, values and gradients."""
  game = losses.LOSSES[name]
  assert game._fields == ("d_on_real", "d_on_fake", "g_on_fake")
  logits = jnp.asarray(np.random.RandomState(2).randn(16).astype(np.float32) * 3)
  for f, target in zip(game, (1.0, 0.0, 1.0)):
    assert float(f(logits)) == float(bce(logits, target))
    np.testing.assert_array_equal(jax.grad(f)(logits), jax.grad(bce)(logits, target))


@pytest.mark.parametrize("name", list(losses.LOSSES))
def test_each_loss_has_its_pytorch_twin(name):
  """torch_reference.LOSSES[name] (what `cspgan parity` runs) gives each of the three losses'
  values and gradients, saturated logits included, where the BCE games part: BCELoss clamps
  at 100, BCEWithLogitsLoss does not."""
  from cspgan_jax import torch_reference
  game, twin = losses.LOSSES[name], torch_reference.LOSSES[name]
  logits = np.concatenate([np.random.RandomState(3).randn(14) * 3, [200.0, -200.0]])
  logits = logits.astype(np.float32)
  for f, f_twin in zip(game, twin[:3]):
    x = torch.tensor(logits, requires_grad=True)
    ref = f_twin(x if twin.on_logits else torch.sigmoid(x))
    ref.backward()
    value, grad = jax.value_and_grad(f)(jnp.asarray(logits))
    assert float(value) == pytest.approx(ref.item(), rel=1e-6)
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-5, atol=1e-9)
