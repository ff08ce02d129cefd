"""Run with 4 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4); prints RESULT json.

(a) per-device BatchNorm: the step mapped as the trainer maps it vs PyTorch's per-chunk iteration
    (averaged gradients), with BatchNorm in D, then in G too (leaky_bn);
(b) sync_bn: the mapped step vs the single-device step on the whole batch;
(c) the trainer's step: noise fold_in(fold_in(rng, step), device), batches from the data;
(d) the device-resident input: each device gathers its own shard's batch, the one the streaming
    input would have fed it.
"""
import functools
import json
import sys

import jax
import numpy as np
import torch

from cspgan_jax import (config_lib, input_pipeline, parallel, parity, torch_port, torch_reference,
                        train)

assert jax.local_device_count() == 4
N = 4
config_path = sys.argv[1]


def tree_errors(a, b):
  """Largest per-leaf relative error ||a - b|| / ||b||, and largest absolute error."""
  rel, absolute = 0.0, 0.0
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    absolute = max(absolute, float(np.abs(x - y).max()))
    rel = max(rel, float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)))
  return rel, absolute


def split(x):
  return x.reshape((N, x.shape[0] // N) + x.shape[1:])


def replicas_identical(tree):
  """Every device's copy of every replicated leaf is the same, bit for bit."""
  return all(np.array_equal(np.asarray(x.addressable_shards[0].data),
                            np.asarray(s.data))
             for x in jax.tree_util.tree_leaves(tree) for s in x.addressable_shards)


def mapped_step(config):
  """`train_step_with_noise` mapped over the 4 devices as the trainer maps its step (the state
  replicated in the compiler's layouts, images and noise split); -> (new state, metrics)."""
  step = functools.partial(train.train_step_with_noise, config=config, axis_name=parallel.AXIS)

  def run(state, images, latents):
    compiled, placed = parallel.compile_step(
        lambda fmt: parallel.map_over_devices(step, (True, True), state_format=fmt),
        parallel.replicate(state), images, latents)
    return compiled(placed, images, latents)

  return run


def first(tree):
  return parallel.unreplicate(tree)


def start(config, seed=0):
  net_g, net_d = torch_reference.build_reference(config.model, seed=seed)
  g_t, d_t = train.init_variables(config, jax.random.PRNGKey(0))
  g = torch_port.torch_to_flax(torch_port.module_state_dict(net_g), g_t, "netG")
  d = torch_port.torch_to_flax(torch_port.module_state_dict(net_d), d_t, "netD")
  return net_g, net_d, train.create_state(config, g, d)


def per_chunk_step(overrides):
  """One mapped step and PyTorch's per-chunk iteration from the same weights and data, with
  per-device BatchNorm: (our state after it, our metrics, PyTorch's, its net_g and net_d)."""
  config = config_lib.load_config(config_path, overrides + ["--config.train.batch_size=16"])
  images, latents = parity.parity_data(config, 1, 0, "noise")
  net_g, net_d, state = start(config)
  new, metrics = mapped_step(config)(state, split(images[0]), split(latents[0]))
  opt_g, opt_d = torch_reference.make_optimizers(net_g, net_d, config.train)
  ref_m = torch_reference.train_iteration_per_chunk(
      net_g, net_d, opt_g, opt_d, torch.from_numpy(images[0].transpose(0, 3, 1, 2).copy()),
      torch.from_numpy(latents[0])[:, :, None, None], N)
  return new, metrics, ref_m, net_g, net_d


def as_flax(net, ours, role):
  """PyTorch `net`'s variables in the layout of our network state `ours`."""
  return torch_port.torch_to_flax(torch_port.module_state_dict(net),
                                  {"params": ours.params, "batch_stats": ours.batch_stats}, role)


result = {}
# (a) per-device statistics against PyTorch, chunk by chunk
new, metrics, ref_m, net_g, net_d = per_chunk_step(["--config.model.discriminator=avgpool"])
result["a_replicas_identical"] = replicas_identical(new)
ours = first(new)
g_ref, d_ref = as_flax(net_g, ours.g, "G"), as_flax(net_d, ours.d, "D")
result["a_params"] = tree_errors((ours.g.params, ours.d.params), (g_ref["params"], d_ref["params"]))
result["a_batch_stats"] = tree_errors(ours.d.batch_stats, d_ref["batch_stats"])
m = {k: float(v) for k, v in first(metrics).items()}
result["a_metrics"] = max(abs(m[k] - ref_m[k]) / abs(ref_m[k]) for k in ref_m)

# (a, leaky_bn) BatchNorm in G too: its running statistics averaged over the devices as D's are
# (per-chunk PyTorch). G's parameters are left out, as in (b) below: conv biases feeding
# training-mode BatchNorm move by Adam-normalised rounding noise.
new, _, _, net_g, _ = per_chunk_step(["--config.model.block=leaky_bn"])
result["a_leaky_bn_replicas_identical"] = replicas_identical(new)
ours = first(new)
result["a_leaky_bn_g_batch_stats"] = tree_errors(ours.g.batch_stats,
                                                 as_flax(net_g, ours.g, "G")["batch_stats"])

# (b) cross-device statistics: equal to one device on the whole batch. Two variants: relu G with
# avgpool D (BatchNorm in D), where every leaf is compared; leaky_bn G (BatchNorm in G too),
# where G's parameters and Adam moments are left out: conv biases feeding training-mode BatchNorm
# have an exactly-zero gradient and Adam's first step moves every near-zero gradient by +-lr, so
# any change of summation order (psum of partial sums) flips them. G's statistics are compared.
for block in ("relu", "leaky_bn"):
  config = config_lib.load_config(config_path, [f"--config.model.block={block}",
                                                "--config.model.discriminator=avgpool",
                                                "--config.train.batch_size=16",
                                                "--config.train.sync_bn=True"])
  _, _, state = start(config)
  images, latents = parity.parity_data(config, 1, 0, "faces")
  single, single_m = jax.jit(functools.partial(train.train_step_with_noise, config=config))(
      state, images[0], latents[0])
  mapped, mapped_m = mapped_step(config)(state, split(images[0]), split(latents[0]))
  result[f"b_{block}_replicas_identical"] = replicas_identical(mapped)
  mapped = first(mapped)
  pick = lambda s: ((s.g.params, s.d.params, s.g.batch_stats, s.d.batch_stats) if block == "relu"
                    else (s.d.params, s.g.batch_stats, s.d.batch_stats))
  adam = lambda s: (s.g.opt_state, s.d.opt_state) if block == "relu" else s.d.opt_state
  result[f"b_{block}_state"] = tree_errors(pick(mapped), pick(single))
  # Adam's second moment is g^2: twice the gradient's relative error.
  result[f"b_{block}_adam"] = tree_errors(adam(mapped), adam(single))
  mapped_m = first(mapped_m)
  result[f"b_{block}_metrics"] = max(abs(float(mapped_m[k]) - float(single_m[k]))
                                     / abs(float(single_m[k])) for k in single_m)

# (c) the trainer's step: per-device noise and the streamed uint8 batch
config = config_lib.load_config(config_path, ["--config.train.batch_size=16"])
_, _, state = start(config)
rng = jax.random.PRNGKey(7)
data = np.random.default_rng(0).integers(0, 256, (N, 4, 32, 32, 3), dtype=np.uint8)
shard_ids = input_pipeline.put_sharded(list(np.arange(N, dtype=np.int32)))
state5 = state.replace(step=state.step + 5)
step_fn, placed = parallel.compile_step(
    lambda fmt: parallel.make_step(config, "streaming", state_format=fmt),
    parallel.replicate(state5), input_pipeline.put_sharded(list(data)), shard_ids, rng)
got, _ = step_fn(placed, input_pipeline.put_sharded(list(data)), shard_ids, rng)
z = np.stack([np.asarray(train.sample_latents(
    jax.random.fold_in(jax.random.fold_in(rng, 5), d), 4, config.model.nz)) for d in range(N)])
want, _ = mapped_step(config)(state5, np.asarray(input_pipeline.to_unit_range(data)), z)
result["c_equal"] = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(
    jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)))

# (d) the device-resident input: device s gathers shard s's positions of this step's batch
shard = 32
data = np.random.default_rng(1).integers(0, 256, (N, shard, 32, 32, 3), dtype=np.uint8)
order = dict(seed=config.data.shuffle_seed, per_device_batch=4, steps_per_epoch=shard // 4)
batch_fn = functools.partial(input_pipeline.gather_batch, **order)
step_fn, placed = parallel.compile_step(
    lambda fmt: parallel.make_step(config, "device", batch_fn, state_format=fmt),
    parallel.replicate(state5), input_pipeline.put_sharded(list(data)), shard_ids, rng)
got, _ = step_fn(placed, input_pipeline.put_sharded(list(data)), shard_ids, rng)
batches = np.stack([data[s][np.asarray(input_pipeline.batch_positions(
    order["seed"], 5, s, shard_size=shard, per_device_batch=4,
    steps_per_epoch=order["steps_per_epoch"]))] for s in range(N)])
step_fn, placed = parallel.compile_step(
    lambda fmt: parallel.make_step(config, "streaming", state_format=fmt),
    parallel.replicate(state5), input_pipeline.put_sharded(list(batches)), shard_ids, rng)
want, _ = step_fn(placed, input_pipeline.put_sharded(list(batches)), shard_ids, rng)
result["d_equal"] = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(
    jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)))
print("RESULT" + json.dumps(result))
