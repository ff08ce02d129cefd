"""`optim.torch_adam` against `torch.optim.Adam`, bit for bit on the CPU, step after step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cspgan_jax import optim


def test_fused_multiply_add_is_pytorchs_addcmul():
  """torch.addcmul(c, a, b) is computed as fma(a, b, c) by PyTorch's vectorized CPU kernel;
  the emulation rounds once too, over signs and magnitudes alike."""
  rs = np.random.RandomState(0)
  n = 1_000_000
  a, b, c = ((rs.randn(n) * 10.0 ** rs.uniform(-12, 4, n)).astype(np.float32) for _ in range(3))
  theirs = torch.addcmul(torch.from_numpy(c), torch.from_numpy(a), torch.from_numpy(b)).numpy()
  ours = np.asarray(jax.jit(optim.fused_multiply_add)(a, b, c))
  np.testing.assert_array_equal(ours, theirs)
  assert np.mean(ours != a * b + c) > 0.01  # the two roundings differ often enough to see
  # The rare case the rounding to odd is there for: c + RN(a * b) is a midpoint between two
  # floats (1 + 2**-24) and the product's remainder (+2**-48), rounded on its own, would be
  # lost, leaving a tie that rounds to even (1.0); the exact sum lies above the midpoint.
  a = np.float32([1 - 2 ** -24, -(1 - 2 ** -24)])
  b = np.float32([2 ** -24 * (1 + 2 ** -23)] * 2)
  c = np.float32([1.0, -1.0])
  expected = np.float32([1 + 2 ** -23, -(1 + 2 ** -23)])
  np.testing.assert_array_equal(np.asarray(optim.fused_multiply_add(a, b, c)), expected)
  np.testing.assert_array_equal(torch.addcmul(*map(torch.from_numpy, (c, a, b))).numpy(), expected)


@pytest.mark.parametrize("b1", [0.5, 0.9])  # at::lerp's two branches (weights 0.5 and 0.1)
def test_torch_adam_is_pytorchs_bit_for_bit(b1):
  """Given the same gradients, the moments equal PyTorch's at every step, and so does each
  step's update, except where PyTorch's own sqrt is not correctly rounded (on this machine's
  AVX512 build, 1 ulp off for about a fifth of the elements; XLA's is exact): there the
  update is compared within a few ulps. 40 steps pass the one where b1**t stops mattering (0.5: 31)."""
  rs = np.random.RandomState(0)
  n = 4096
  params = (rs.randn(n) * 10.0 ** rs.uniform(-4, 0, n)).astype(np.float32)
  tp = torch.tensor(params, requires_grad=True)
  opt = torch.optim.Adam([tp], lr=5e-5, betas=(b1, 0.999), eps=1e-8)
  tx = optim.torch_adam(5e-5, b1, 0.999, 1e-8)
  state = tx.init(jnp.asarray(params))
  update = jax.jit(tx.update)
  compared = np.zeros(n, int)
  for _ in range(40):
    grad = (rs.randn(n) * 10.0 ** rs.uniform(-6, 0, n)).astype(np.float32)
    before = tp.detach().numpy().copy()
    tp.grad = torch.from_numpy(grad)
    opt.step()
    updates, state = update(jnp.asarray(grad), state)
    theirs = opt.state[tp]
    np.testing.assert_array_equal(np.asarray(state.mu), theirs["exp_avg"].numpy())
    np.testing.assert_array_equal(np.asarray(state.nu), theirs["exp_avg_sq"].numpy())
    # optax's apply_updates: params + updates, from PyTorch's parameters before the step
    ours = before + np.asarray(updates)
    nu = theirs["exp_avg_sq"]
    exact_sqrt = nu.sqrt().numpy() == np.sqrt(nu.numpy().astype(np.float64)).astype(np.float32)
    after = tp.detach().numpy()
    np.testing.assert_array_equal(ours[exact_sqrt], after[exact_sqrt])
    # elsewhere: the update within a few of its ulps, the sum within one of its own
    bound = 4 * np.spacing(np.abs(np.asarray(updates))) + np.spacing(np.abs(after))
    assert (np.abs(ours - after) <= bound).all()
    compared += exact_sqrt
  assert compared.min() >= 20  # every element compared bit for bit at half the steps or more


def test_bias_corrections_hold_from_where_float32_stops_seeing_them():
  """The step-size and sqrt(1 - b2**t) tables end where further steps round to the same
  float32; their last entry serves every later step (PyTorch: 1e-4 and 1.0 for good)."""
  lr = 5e-5
  for base, fn in [(0.5, lambda t: -lr / (1.0 - 0.5 ** t)),
                   (0.999, lambda t: np.sqrt(1.0 - 0.999 ** t))]:
    table = optim._float32_schedule(fn, base)  # pylint: disable=protected-access
    t = np.arange(1, len(table) + 1, dtype=np.float64)
    np.testing.assert_array_equal(table, fn(t).astype(np.float32))
    later = fn(np.arange(len(table), 10 ** 6, 997, dtype=np.float64)).astype(np.float32)
    assert (later == table[-1]).all(), base
