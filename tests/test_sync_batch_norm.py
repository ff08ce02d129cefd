"""Cross-device BatchNorm (`axis_name`) on 4 CPU devices equals BatchNorm over the whole batch,
alone and followed by LeakyReLU (`batch_norm_leaky_relu_train`).

The multi-device training issue builds on this; the custom VJP's collectives are tested here.
Runs in a subprocess: the device count is fixed when jax first initialises.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import jax, numpy as np
from cspgan_jax import ops
assert jax.local_device_count() == 4, jax.devices()
rs = np.random.RandomState(0)
x = (rs.randn(16, 4, 4, 8) + 3 * rs.randn(8)).astype(np.float32)  # |mean| >> std per channel
dy = rs.randn(*x.shape).astype(np.float32)
scale = (1 + 0.1 * rs.randn(8)).astype(np.float32)
bias = (0.1 * rs.randn(8)).astype(np.float32)

def run(x, dy, scale, bias, axis, leaky):
  def loss(x, scale, bias):
    if leaky:  # BatchNorm then LeakyReLU, D's layers (the derivative recomputed from x)
      y, mean, var, n = ops.batch_norm_leaky_relu_train(x, scale, bias, 1e-5, axis)
    else:
      y, mean, var, n = ops.batch_norm_train(x, scale, bias, 1e-5, axis)
    return (y * dy).sum(), (y, mean, var, n)
  (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
  return aux, grads

for leaky in (False, True):
  (y, mean, var, n), (dx, dscale, dbias) = run(x, dy, scale, bias, None, leaky)
  shard = lambda a: a.reshape(4, 4, *a.shape[1:])
  (ys, means, vars_, ns), (dxs, dscales, dbiases) = jax.pmap(
      lambda x, dy, s, b: run(x, dy, s, b, "batch", leaky), axis_name="batch",
      in_axes=(0, 0, None, None))(shard(x), shard(dy), scale, bias)
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))
  assert int(n) == 256 and np.all(np.asarray(ns) == 256), (n, ns)
  checks = {
      "y": rel(np.asarray(ys).reshape(x.shape), y),
      "mean": max(rel(m, mean) for m in means),
      "var": max(rel(v, var) for v in vars_),
      "dx": rel(np.asarray(dxs).reshape(x.shape), dx),
      # Parameter gradients stay per device; their sum over devices is the whole batch's.
      "dscale": rel(np.asarray(dscales).sum(0), dscale),
      "dbias": rel(np.asarray(dbiases).sum(0), dbias),
  }
  print(leaky, checks)
  assert all(v <= 1e-5 for v in checks.values()), checks
  if leaky:  # the whole batch's gradients are the composition's, summed in another order
    _, (dx0, dscale0, dbias0) = jax.value_and_grad(
        lambda x, s, b: (ops.leaky_relu(ops.batch_norm_train(x, s, b, 1e-5, None)[0]) * dy
                         ).sum(), argnums=(0, 1, 2))(x, scale, bias)
    composed = {"dx": rel(dx, dx0), "dscale": rel(dscale, dscale0), "dbias": rel(dbias, dbias0)}
    print(composed)
    assert max(composed.values()) <= 1e-5, composed  # dbias: a sum of +-1s, relative to little
print("SYNC_BN_OK")
"""


def test_sync_batch_norm_equals_whole_batch():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "SYNC_BN_OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
