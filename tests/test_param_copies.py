"""bf16 copies of the convolutions' parameters in the state (`param_copies`): what they hold,
that training with them is bit for bit training without them, and that checkpoints leave them
out and restore them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cspgan_jax import checkpoint, param_copies, train


def _flat(tree):
  return traverse_util.flatten_dict(tree)


def test_copies_hold_the_convolutions_kernels_and_biases_rounded_to_bf16(tiny_config):
  # leaky_bn: BatchNorm inside G's blocks too, whose scale and bias stay float32
  state = train.init_state(tiny_config("--config.train.dtype=bfloat16",
                                       "--config.model.block=leaky_bn"), jax.random.PRNGKey(0))
  names = {"copied": set(), "not": set()}
  for net in (state.g, state.d):
    params, copies = _flat(net.params), _flat(net.compute_params)
    convs = {p[:-1] for p in params if p[-1] == "kernel"}
    assert set(copies) == {p for p in params if p[:-1] in convs}
    names["copied"] |= {p[-1] for p in copies}
    names["not"] |= {p[-1] for p in params if p not in copies}
    for path, copy in copies.items():
      assert copy.dtype == jnp.bfloat16
      np.testing.assert_array_equal(np.asarray(copy), np.asarray(params[path].astype(jnp.bfloat16)))
  # G's 1x1 convolutions have biases; BatchNorm's scale and bias are used in float32
  assert names == {"copied": {"kernel", "bias"}, "not": {"scale", "bias"}}
  assert train.init_state(tiny_config(), jax.random.PRNGKey(0)).g.compute_params is None


def test_from_copy_reads_the_copy_and_differentiates_the_master():
  master = jnp.array([1.0 + 2 ** -12, -3.0, 0.1], jnp.float32)
  copy = master.astype(jnp.bfloat16)
  value = param_copies.from_copy(master, copy)
  assert value.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(value), np.asarray(copy.astype(jnp.float32)))
  assert float(value[0]) == 1.0  # the copy's rounding, not the master's value
  weights = jnp.array([0.5, 2.0, -1.0])
  grad = jax.grad(lambda m: (param_copies.from_copy(m, copy) * weights).sum())(master)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(weights))


def _steps(config, state, n):
  step = jax.jit(lambda s, real, z: train.train_step_with_noise(s, real, z, config=config))
  r, nz, b = config.model.resolution, config.model.nz, config.train.batch_size
  out = []
  for i in range(n):
    k1, k2 = jax.random.split(jax.random.PRNGKey(100 + i))
    real = jax.random.uniform(k1, (b, r, r, 3), minval=-1.0, maxval=1.0)
    state, metrics = step(state, real, jax.random.normal(k2, (b, nz)))
    out.append((state, metrics))
  return out


@pytest.mark.parametrize("overrides", [
    (), ("--config.train.d_real_fake_together=True",), ("--config.model.block=leaky_bn",)],
    ids=["two_d_passes", "d_real_fake_together", "leaky_bn"])
def test_bf16_steps_with_copies_equal_steps_without(tiny_config, overrides):
  config = tiny_config("--config.train.dtype=bfloat16", *overrides)
  state = train.init_state(config, jax.random.PRNGKey(0))
  with_copies = _steps(config, state, 3)
  without = _steps(config, state.without_compute_params(), 3)
  for (a, ma), (b, mb) in zip(with_copies, without):
    assert b.g.compute_params is None and b.d.compute_params is None
    for x, y in zip(jax.tree_util.tree_leaves((a.without_compute_params(), ma)),
                    jax.tree_util.tree_leaves((b, mb))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for net in (a.g, a.d):  # each step leaves the copies of the parameters it wrote
      expected = param_copies.make(net.params, jnp.bfloat16)
      for x, y in zip(jax.tree_util.tree_leaves(net.compute_params),
                      jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # and the parameters moved: the comparison above is not of two unchanged states
  assert not np.array_equal(np.asarray(with_copies[-1][0].g.params["main_0"]["left_0"]["kernel"]),
                            np.asarray(state.g.params["main_0"]["left_0"]["kernel"]))


def test_checkpoints_leave_the_copies_out_and_restore_them(tmp_path, tiny_config):
  config = tiny_config("--config.train.dtype=bfloat16")
  state = _steps(config, train.init_state(config, jax.random.PRNGKey(0)), 1)[0][0]
  checkpoint.save(str(tmp_path), state, config)
  restored, _ = checkpoint.restore(str(tmp_path))
  for x, y in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # the files hold the float32 state only: the same checkpoint resumes in float32
  as_float32, _ = checkpoint.restore(str(tmp_path), tiny_config())
  assert as_float32.g.compute_params is None and as_float32.d.compute_params is None
  for x, y in zip(jax.tree_util.tree_leaves(as_float32),
                  jax.tree_util.tree_leaves(state.without_compute_params())):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
