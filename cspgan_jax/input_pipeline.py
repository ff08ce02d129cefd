"""Training input: uint8 images on the accelerator, batches gathered inside the jitted step.

Layout. The dataset is cut into one shard per device over all processes (shard s holds examples
s, s + S, s + 2S, ...; the remainder that does not fill every shard is dropped). Each process
loads only its own devices' shards. In epoch e, shard s is visited in the order of a
pseudo-random permutation keyed by (seed, e, s) (`epoch_order`), `per_device_batch` examples a
step (each batch's indices sorted); an epoch is `shard_size // per_device_batch` steps (the last
partial batch is dropped, so every step has the same shapes). Position and epoch are functions
of the training step alone, so a resumed run sees exactly the batches an uninterrupted one would.

Two paths produce the same batches:
- device-resident: each device holds its shard as uint8, and `gather_batch` runs *inside* the
  jitted step (batch indices, gather, conversion to [-1, 1]); the host does nothing per step.
  The shard is an argument of the jitted function, never a closure (a closed-over array becomes
  a constant compiled into the program).
- streaming, where the shards exceed the device-memory budget: host threads compute the same
  indices, read uint8 batches from the source (random access into array_record), and put them
  on the devices ahead of time; the step converts them to float.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cspgan_jax import datasets
from cspgan_jax.errors import ConfigError, DataError

PIPELINES = ("auto", "device", "streaming")


# ---- what every path agrees on ----

@dataclasses.dataclass(frozen=True)
class Layout:
  """How the dataset is split over devices and steps."""
  num_examples: int      # examples in the source
  num_shards: int        # devices over all processes
  first_shard: int       # this process's first shard (process_index * local devices)
  local_shards: int      # shards on this process's devices
  per_device_batch: int

  @property
  def shard_size(self) -> int:
    return self.num_examples // self.num_shards

  @property
  def steps_per_epoch(self) -> int:
    return self.shard_size // self.per_device_batch

  @property
  def used_examples(self) -> int:
    return self.steps_per_epoch * self.per_device_batch * self.num_shards

  def shard_indices(self, shard: int) -> np.ndarray:
    """Source indices held by global shard `shard`."""
    return np.arange(self.shard_size, dtype=np.int64) * self.num_shards + shard

  def local_shard_ids(self) -> np.ndarray:
    return np.arange(self.first_shard, self.first_shard + self.local_shards, dtype=np.int32)

  def bytes_per_device(self, image_shape: Sequence[int]) -> int:
    return self.shard_size * int(np.prod(image_shape))


def make_layout(num_examples: int, global_batch: int, *, num_shards: Optional[int] = None,
                first_shard: Optional[int] = None, local_shards: Optional[int] = None) -> Layout:
  """The layout for this process's devices (defaults: all of JAX's devices)."""
  local = jax.local_device_count() if local_shards is None else local_shards
  total = jax.device_count() if num_shards is None else num_shards
  first = jax.process_index() * local if first_shard is None else first_shard
  if global_batch % total:
    raise ConfigError(f"train.batch_size {global_batch} does not divide evenly over {total} devices")
  layout = Layout(num_examples, total, first, local, global_batch // total)
  if layout.steps_per_epoch < 1:
    raise DataError(f"{num_examples} images are fewer than one batch of {global_batch} "
                    f"({layout.per_device_batch} on each of {total} devices)")
  return layout


SHUFFLE_ROUNDS_PER_BIT = 6  # swap-or-not rounds per bit of the shard size (its authors' ~6 lg n)


def _mix32(x):
  """A 32-bit integer hash (Wellons' lowbias32): keys and round functions."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def epoch_order(seed: int, epoch, shard, positions, shard_size: int) -> jax.Array:
  """Which example of the shard sits at `positions` of epoch `epoch`'s visiting order.

  The order is a pseudo-random permutation of range(shard_size), keyed by (seed, epoch, shard):
  the swap-or-not shuffle (Hoang, Morris and Rogaway, 2012). Round i pairs x with
  (k_i - x) mod n and swaps the pair or not by a hash of the pair, so each round is a
  permutation of exactly range(n), whatever n. It costs O(len(positions)) per step, where
  materialising `jax.random.permutation(shard_size)` would sort the whole shard (202,599 keys
  for CelebA) at every step; and a fixed number of rounds is straight-line code, a few small
  kernels. (A Feistel network needs a power-of-two domain and a loop of data-dependent length
  to walk back into range: on a GPU each trip of such a loop stops the host until the device
  has caught up, once a step.) Pure uint32 arithmetic: bit-identical under jit on every
  backend and on the host.
  """
  n = int(shard_size)
  x = jnp.asarray(positions, jnp.uint32)
  if n <= 1:
    return jnp.zeros(x.shape, jnp.int32)
  key = _mix32(jnp.uint32(seed & 0xFFFFFFFF) ^ jnp.uint32(0x9E3779B9))
  key = _mix32(key ^ jnp.uint32((seed >> 32) & 0xFFFFFFFF))
  key = _mix32(key ^ jnp.asarray(epoch).astype(jnp.uint32))
  key = _mix32(key ^ _mix32(jnp.asarray(shard).astype(jnp.uint32) + jnp.uint32(0x632BE5AB)))
  rounds = SHUFFLE_ROUNDS_PER_BIT * (n - 1).bit_length()
  # Every round's two keys at once (two small vectors, not 2 x rounds scalar computations).
  salts = (np.arange(2 * rounds, dtype=np.uint64) + 1) * 0x9E3779B9 & 0xFFFFFFFF
  keys = _mix32(key ^ jnp.asarray(salts.astype(np.uint32)))
  pair_keys, swap_keys = keys[:rounds] % jnp.uint32(n), keys[rounds:]
  for i in range(rounds):
    k = pair_keys[i]
    partner = jnp.where(x <= k, k - x, k + jnp.uint32(n) - x)  # (k - x) mod n, in range
    swap = (_mix32(jnp.maximum(x, partner) ^ swap_keys[i]) >> 31) == 1  # same for both of a pair
    x = jnp.where(swap, partner, x)
  return x.astype(jnp.int32)


def batch_positions(seed: int, step, shard, *, shard_size: int, per_device_batch: int,
                    steps_per_epoch: int) -> jax.Array:
  """Indices into shard `shard` of its batch at training step `step` (traceable), ascending.

  Sorted, which changes only the order of the batch's examples, makes the gather read the shard
  in order, and keeps the indices a buffer of their own: XLA does not fuse into a sort, while it
  would fuse the shuffle's rounds into the gather and recompute them for every pixel (seen on
  XLA:CPU: 6.4 ms a step at 32x32, batch 64; an optimization barrier does not stop it).
  """
  epoch, position = jnp.divmod(step, steps_per_epoch)
  first = (position * per_device_batch).astype(jnp.uint32)
  return jnp.sort(epoch_order(seed, epoch, shard,
                              first + jnp.arange(per_device_batch, dtype=jnp.uint32), shard_size))


# torchvision's ToTensor + Normalize(0.5, 0.5), `(x / 255 - 0.5) / 0.5` in float32, for each of
# the 256 byte values. A lookup instead of arithmetic: under jit XLA may rewrite x / 255 as
# x * (1 / 255), which is off by one ulp for most values; the table is exact on every backend.
UNIT_RANGE_TABLE = ((np.arange(256, dtype=np.float32) / np.float32(255.0) - np.float32(0.5))
                    / np.float32(0.5)).astype(np.float32)


def to_unit_range(images_uint8) -> jax.Array:
  """uint8 pixels -> float32 in [-1, 1], bit-identical to torchvision's ToTensor + Normalize."""
  return jnp.asarray(UNIT_RANGE_TABLE)[jnp.asarray(images_uint8).astype(jnp.int32)]


def gather_batch(shard_images, shard_id, step, *, seed: int, per_device_batch: int,
                 steps_per_epoch: int) -> jax.Array:
  """Inside the step: this device's float batch (b, R, R, 3) in [-1, 1] at `step`."""
  idx = batch_positions(seed, step, shard_id, shard_size=shard_images.shape[0],
                        per_device_batch=per_device_batch, steps_per_epoch=steps_per_epoch)
  return to_unit_range(jnp.take(shard_images, idx, axis=0))


# ---- placing arrays on the devices (a leading device axis, as the step maps it) ----

def put_sharded(shards: Sequence[np.ndarray], devices=None) -> jax.Array:
  """One host array per local device -> a global (all devices, ...) array, one entry each.

  The device axis is split over the same one-axis mesh as the training step's (`devices`, by
  default every device of every process), so the step takes it without a copy. Each process
  passes the arrays of its own devices, in the mesh's order.
  """
  devices = list(devices or jax.devices())
  local = [d for d in devices if d.process_index == jax.process_index()]
  if len(shards) != len(local):
    raise ValueError(f"{len(shards)} arrays for {len(local)} local devices")
  mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
  arrays = [jax.device_put(np.asarray(s)[None], d) for s, d in zip(shards, local)]
  shape = (len(devices),) + tuple(np.shape(shards[0]))
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


# ---- the two paths ----

class DeviceResidentInput:
  """Every local device holds its uint8 shard; batches are gathered in the step."""

  kind = "device"

  def __init__(self, source, layout: Layout, seed: int, devices=None):
    self.layout = layout
    self.seed = seed
    # Read and place one shard at a time: host memory peaks at one shard, not the dataset.
    shards = [datasets.read_all(source, layout.shard_indices(s), desc=f"shard {s}")
              for s in layout.local_shard_ids()]
    self.images = put_sharded(shards, devices)
    self.shard_ids = put_sharded(list(layout.local_shard_ids()), devices)

  def batch_fn(self):
    """(shard_images, shard_id, step) -> float batch; use inside the mapped step."""
    return functools.partial(gather_batch, seed=self.seed,
                             per_device_batch=self.layout.per_device_batch,
                             steps_per_epoch=self.layout.steps_per_epoch)


class StreamingInput:
  """Host-side twin of `gather_batch`: the same indices, read from the source ahead of the step."""

  kind = "streaming"

  def __init__(self, source, layout: Layout, seed: int, devices=None, prefetch: int = 2,
               readers: int = 4):
    self.source = source
    self.layout = layout
    self.seed = seed
    self.devices = devices  # the mesh's (None: all of them); this process fills its own
    self.prefetch = max(1, prefetch)
    self.readers = max(1, readers)
    self._cpu = jax.local_devices(backend="cpu")[0]
    b, size = layout.per_device_batch, layout.shard_size
    self._positions = jax.jit(jax.vmap(
        lambda step, shard: batch_positions(seed, step, shard, shard_size=size,
                                            per_device_batch=b,
                                            steps_per_epoch=layout.steps_per_epoch),
        in_axes=(None, 0)))

  def host_batch(self, step: int) -> np.ndarray:
    """uint8 (local devices, per_device_batch, R, R, 3) for training step `step`."""
    lay = self.layout
    with jax.default_device(self._cpu):  # the same computation as the device path, on the host
      positions = np.asarray(self._positions(np.int32(step), lay.local_shard_ids()))
    return np.stack([self.source.get(lay.shard_indices(int(shard))[positions[i]])
                     for i, shard in enumerate(lay.local_shard_ids())])

  def batch_spec(self) -> jax.ShapeDtypeStruct:
    """The shape, type and placement of what `batches` yields, to compile the step against."""
    lay = self.layout
    mesh = jax.sharding.Mesh(np.array(list(self.devices or jax.devices())), ("devices",))
    image_shape = self.source.get([0]).shape[1:]
    return jax.ShapeDtypeStruct(
        (lay.num_shards, lay.per_device_batch) + tuple(image_shape), np.uint8,
        sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices")))

  def batches(self, start_step: int, num_steps: int) -> Iterator[jax.Array]:
    """Device batches for steps start_step ... start_step + num_steps - 1, in order.

    `readers` threads each read (random access into array_record, whose reads and decompression
    run outside the GIL) and place whole steps, up to `prefetch + readers` steps ahead.
    """
    def read_and_place(step):
      return put_sharded(list(self.host_batch(step)), self.devices)

    end = start_step + num_steps
    with concurrent.futures.ThreadPoolExecutor(self.readers,
                                               thread_name_prefix="cspgan-reader") as pool:
      pending: collections.deque = collections.deque()
      next_step = start_step
      try:
        while next_step < end or pending:
          while next_step < end and len(pending) < self.prefetch + self.readers:
            pending.append(pool.submit(read_and_place, next_step))
            next_step += 1
          yield pending.popleft().result()
      finally:
        for future in pending:  # closed early (a stop, an error): drop what was read ahead
          future.cancel()


# ---- choosing ----

def device_memory_bytes(device=None) -> Optional[int]:
  """The memory the allocator may use on `device` (the first local one by default); None where
  the backend does not say (a CPU)."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # backends without memory_stats
    stats = {}
  return int(stats["bytes_limit"]) if stats.get("bytes_limit") else None


def device_budget_bytes(data_config, device=None) -> int:
  """config.data.device_budget_gb, or 40% of the device's memory (25% of RAM on a CPU)."""
  if data_config.device_budget_gb > 0:
    return int(data_config.device_budget_gb * 2**30)
  limit = device_memory_bytes(device)
  if limit:
    return int(0.4 * limit)
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    ram = 8 * 2**30
  return int(0.25 * ram)


def choose_pipeline(data_config, layout: Layout, image_shape, device=None) -> str:
  wanted = data_config.pipeline
  if wanted not in PIPELINES:
    raise ConfigError(f"data.pipeline must be one of {PIPELINES}, got {wanted!r}")
  if wanted != "auto":
    return wanted
  fits = layout.bytes_per_device(image_shape) <= device_budget_bytes(data_config, device)
  return "device" if fits else "streaming"


def make_input(config, devices=None, layout: Optional[Layout] = None):
  """The training input named by `config.data`, for `config.train.batch_size` global batches."""
  r = config.model.resolution
  source = datasets.load_source(config.data, r)
  layout = layout or make_layout(len(source), config.train.batch_size)
  kind = choose_pipeline(config.data, layout, (r, r, 3))
  seed = config.data.shuffle_seed
  if kind == "device":
    return DeviceResidentInput(source, layout, seed, devices)
  return StreamingInput(source, layout, seed, devices, prefetch=config.data.get("prefetch", 2),
                        readers=config.data.get("reader_threads", 4))
