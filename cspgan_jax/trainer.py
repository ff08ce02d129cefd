"""`cspgan train`: the training loop over all local devices, on one or several processes.

One compiled step per iteration (jit of shard_map over every device): the per-device
`train_step` gathers its batch from the device-resident data (or takes the streamed one), draws
its noise from `fold_in(fold_in(rng, step), device)`, averages gradients (and, with per-device
BatchNorm, the running statistics) over devices. Everything a step depends on (data position,
noise, step) is a function of `state.step`, so a resumed run repeats an uninterrupted one bit
for bit.

Only process 0 writes logs, samples and `metrics.jsonl`; every process takes part in
checkpointing, as orbax requires.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from typing import Optional

import jax
import numpy as np

from cspgan_jax import background, checkpoint, images, input_pipeline, train
from cspgan_jax.errors import ConfigError, CspganError

AXIS = "devices"
TENSORBOARD_DIR = "tensorboard"
SAMPLES_DIR = "samples"
METRICS_FILE = "metrics.jsonl"
METRIC_TAGS = {"Loss_D": "iter/Loss_D", "Loss_G": "iter/Loss_G", "D_x": "iter/D_x",
               "D_G_z1": "iter/D_G_z1", "D_G_z2": "iter/D_G_z2"}


# ---- processes and devices ----

def maybe_initialize_distributed(config) -> None:
  """Joins the processes of a multi-host run, from `config.dist` or the usual environment."""
  dist = config.get("dist", None)

  def get(key, unset, env):  # the config wins where set, else the environment
    value = dist.get(key, unset) if dist is not None else unset
    return os.environ.get(env, unset) if value == unset else value

  address = get("coordinator_address", "", "JAX_COORDINATOR_ADDRESS")
  if not address:
    return
  num_processes = int(get("num_processes", 0, "JAX_NUM_PROCESSES"))
  process_id = int(get("process_id", -1, "JAX_PROCESS_ID"))
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ConfigError(f"multi-host run at {address} needs dist.num_processes >= 1 and "
                      f"0 <= dist.process_id < num_processes, got {num_processes}, {process_id}")
  # Collectives between CPU processes (tests, CPU clusters); GPUs use NCCL regardless.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                             process_id=process_id)


def device_mesh(devices=None) -> jax.sharding.Mesh:
  """One axis over every device of every process (or over `devices`, e.g. compile-only ones)."""
  return jax.sharding.Mesh(np.array(list(devices or jax.devices())), (AXIS,))


def replicated_sharding(mesh=None) -> jax.sharding.NamedSharding:
  """The whole value on every device (of every process): where the training state lives."""
  return jax.sharding.NamedSharding(mesh or device_mesh(), jax.sharding.PartitionSpec())


def replicate(tree):
  """The state as the step takes it: one full copy per device, no device axis.

  Built from single-device copies, so that each process places only its own devices' copies.
  `place_for` then gives each leaf the memory layout the compiled step chose.
  """
  sharding = replicated_sharding()
  devices = list(sharding.addressable_devices)

  def place(x):
    x = np.asarray(x)
    return jax.make_array_from_single_device_arrays(
        x.shape, sharding, [jax.device_put(x, d) for d in devices])

  return jax.tree_util.tree_map(place, tree)


def unreplicate(tree):
  """This process's first copy of a replicated value (the state, the metrics), on the host."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_shards[0].data), tree)


def first_local_copy(tree):
  """This process's first copy of a replicated value, left on its device (in its layout)."""
  return jax.tree_util.tree_map(lambda x: x.addressable_shards[0].data, tree)


def map_over_devices(device_fn, mapped, mesh=None, state_format=None):
  """`device_fn(state, *args)` run on every device, as one jitted program (jit of shard_map).

  The state (first argument and first result) is replicated, and XLA picks its memory layout
  (`Layout.AUTO`) unless `state_format` pins one: on a GPU it stores each conv kernel the way
  cuDNN reads it (HWIO logically, OHWI in memory), so no step transposes the weights, their
  gradients or their Adam moments (1,117 -> 554 MiB of data movement an iteration in float32,
  672 -> 233 in bfloat16, baseline at batch 64, XLA:GPU for an H100; docs/PERFORMANCE.md).
  Arguments flagged in `mapped` carry a leading device axis and `device_fn` sees its own entry
  (as under pmap); the others are replicated. Results other than the state are replicated too.
  Such a function runs only compiled (`compile_step`), since the layouts are the compiler's.
  """
  mesh = mesh or device_mesh()
  spec = jax.sharding.PartitionSpec
  rep = jax.sharding.NamedSharding(mesh, spec())
  per_device = jax.sharding.NamedSharding(mesh, spec(AXIS))

  def local(state, *args):
    return device_fn(state, *(a[0] if m else a for a, m in zip(args, mapped)))

  in_specs = (spec(),) + tuple(spec(AXIS) if m else spec() for m in mapped)
  # check_vma=False: pmap's semantics, which train_step is written for (gradients per device,
  # averaged by its own pmean). With the check on, shard_map would sum the gradients of the
  # replicated parameters itself. The outputs declared replicated are each a pmean or computed
  # from replicated values; that is not checked here (as with pmap's out_axes=None,
  # jax-ml/jax#21671): the multi-device tests compare every device's copy.
  body = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(spec(), spec()),
                       check_vma=False)
  state_format = state_format if state_format is not None else _auto_format(rep)
  return jax.jit(body, in_shardings=(state_format,) + tuple(per_device if m else rep
                                                             for m in mapped),
                 out_shardings=(state_format, rep), donate_argnums=0)


def _auto_format(sharding):
  """`sharding` with the memory layout left to XLA; plain `sharding` (row-major) on a jax
  without `jax.experimental.layout` (the step is then the same, with the transposes back)."""
  try:
    from jax.experimental.layout import Format, Layout  # pylint: disable=import-outside-toplevel
  except ImportError:
    return sharding
  return Format(Layout.AUTO, sharding)


def compile_step(make, state, *args):
  """(compiled step, state placed as it expects): the state's layouts are the compiler's choice.

  `make(state_format)` builds the step (`make_step(..., state_format=...)`); it is compiled with
  the layouts left to XLA. `state` may be abstract (`jax.ShapeDtypeStruct`s) to compile only;
  the second result is then the state's formats. Where XLA chose other layouts for the state
  coming out than going in (it has not, so far), the step is compiled again with the input's
  layouts pinned on both sides, so that one iteration's result is the next one's argument.
  """
  # Layout.AUTO compiles against shapes only: an array would bring its own layout.
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  compiled = make(None).lower(shapes, *args).compile()
  formats = compiled.input_formats[0][0]
  if jax.tree_util.tree_leaves(compiled.output_formats[0]) != jax.tree_util.tree_leaves(formats):
    compiled = make(formats).lower(shapes, *args).compile()
  return compiled, place_for(state, formats)


def _concrete_layouts(state_format):
  """The per-leaf layouts of a state format tree that `compile_step` returned, else None."""
  leaves = jax.tree_util.tree_leaves(state_format)
  layouts = [getattr(f, "layout", None) for f in leaves]
  if not leaves or any(l is None or not hasattr(l, "major_to_minor") for l in layouts):
    return None
  return jax.tree_util.tree_map(lambda f: f.layout, state_format)


def compile_training_step(config, kind, batch_fn, steps, state, *args, mesh=None):
  """`make_step` for `steps` iterations a dispatch, compiled; -> (compiled, state placed).

  One iteration is compiled first with the state's layouts left to XLA; several a dispatch
  (a `lax.scan`) are then compiled with those layouts, pinned in every iteration, so that the
  single and the scanned step take the same state.
  """
  one, placed = compile_step(
      lambda fmt: make_step(config, kind, batch_fn, 1, mesh, state_format=fmt), state, *args)
  if steps == 1:
    return one, placed
  return compile_like(one, config, kind, batch_fn, steps, state, *args, mesh=mesh), placed


def compile_like(compiled_one, config, kind, batch_fn, steps, state, *args, mesh=None):
  """The `steps`-iteration step, compiled for the state's layouts in `compiled_one`."""
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  return make_step(config, kind, batch_fn, steps, mesh,
                   state_format=compiled_one.input_formats[0][0]).lower(shapes, *args).compile()


def place_for(state, formats):
  """`state` in the given per-leaf formats (a no-op where they already match)."""
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(state)):
    return formats
  return jax.device_put(state, formats, donate=True)


def step_memory_bytes(compiled) -> int:
  """Device memory a compiled step needs, as XLA's buffer assignment sizes it: its arguments
  and results (the donated state counted once) and its temporaries (on a GPU, cuDNN's
  workspaces that autotuning picked among them)."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def abstract_training_inputs(config, devices):
  """(batch_fn, mesh, state, args) of the device-data step over `devices`, as shapes only: what
  compiles or lowers the step without data, parameters or, with a compile-only device, a GPU."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  layout = input_pipeline.make_layout(config.data.num_examples, config.train.batch_size,
                                      num_shards=len(devices), first_shard=0,
                                      local_shards=len(devices))
  r = config.model.resolution
  batch_fn = functools.partial(input_pipeline.gather_batch, seed=config.data.shuffle_seed,
                               per_device_batch=layout.per_device_batch,
                               steps_per_epoch=layout.steps_per_epoch)
  state = jax.eval_shape(lambda: train.init_state(config, jax.random.PRNGKey(0)))
  args = (jax.ShapeDtypeStruct((len(devices), layout.shard_size, r, r, 3), jnp.uint8),
          jax.ShapeDtypeStruct((len(devices),), jnp.int32),
          jax.ShapeDtypeStruct((2,), jnp.uint32))
  return batch_fn, device_mesh(devices), state, args


def make_step(config, kind: str, batch_fn=None, steps: int = 1, mesh=None, state_format=None):
  """The iteration on every device: (state, data, shard_id, rng) -> (state, metrics).

  `data` and `shard_id` carry a leading device axis; each device gathers its batch from its
  shard (device-resident data) or takes its streamed batch. With `steps` > 1 (device-resident
  data only) one dispatch runs that many iterations in a `lax.scan` and returns the last one's
  metrics: fewer launches, the same arithmetic. Compile it with `compile_step`.
  """

  def device_step(state, data, shard_id, rng):
    if kind == "device":
      real = batch_fn(data, shard_id, state.step)
    else:
      real = input_pipeline.to_unit_range(data)
    rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), shard_id)
    return train.train_step(state, real, rng, config=config, axis_name=AXIS)

  if steps > 1:
    if kind != "device":
      raise ConfigError("train.steps_per_dispatch > 1 needs the device-resident data "
                        "(data.pipeline device or auto)")
    one_step = device_step
    layouts = _concrete_layouts(state_format)
    try:
      # pylint: disable-next=import-outside-toplevel
      from jax.experimental.layout import with_layout_constraint
    except ImportError:  # a jax without the layout API: the scan is correct, only slower
      layouts = None

    def iteration(state, data, shard_id, rng):
      state, metrics = one_step(state, data, shard_id, rng)
      if layouts is not None:
        # The loop carries the state in one layout per leaf; left free, XLA:GPU picks one the
        # update does not produce and relayouts the largest kernels and both Adam moments every
        # iteration (437 vs 175 MiB of data movement an iteration, batch 64, bf16). Pinned to
        # the single step's layouts, the scan moves what single steps move.
        state = with_layout_constraint(state, layouts)
      return state, metrics

    def device_step(state, data, shard_id, rng):  # pylint: disable=function-redefined
      state, metrics = jax.lax.scan(lambda s, _: iteration(s, data, shard_id, rng), state, None,
                                    length=steps, unroll=config.train.get("scan_unroll", 1))
      return state, jax.tree_util.tree_map(lambda m: m[-1], metrics)

  # The state is replicated, not stacked on a device axis as pmap(in_axes=0) would: through a
  # stacked `[1, ...]` per-device shape XLA copies the donated state instead of updating it in
  # place (121 copies, 329 MiB an iteration, in the baseline's step).
  return map_over_devices(device_step, (True, True, False), mesh, state_format)


# ---- workdir ----

def prepare_workdir(workdir: str) -> None:
  """Creates the workdir and proves it writable before any work is done."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise CspganError(f"workdir {workdir} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise CspganError(f"workdir {workdir} is not writable: {e.strerror or e}") from e


class StopRequest:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly at the next step."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handlers, no clean stop
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def requested(self) -> bool:
    """The same answer on every process (any process signalled => all stop)."""
    flag = self.signal is not None
    if jax.process_count() == 1:
      return flag
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return bool(np.asarray(multihost_utils.process_allgather(np.array([flag]))).any())


# ---- logging ----

class RunLog:
  """Console line, TensorBoard scalars and images, metrics.jsonl and sample PNGs (process 0)."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.workdir = workdir
    self.writer = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.writer = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))
      os.makedirs(os.path.join(workdir, SAMPLES_DIR), exist_ok=True)

  def scalars(self, step: int, metrics: dict, images_per_sec: Optional[float]) -> None:
    if not self.enabled:
      return
    for name, tag in METRIC_TAGS.items():
      self.writer.add_scalar(tag, metrics[name], step)
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    if images_per_sec is not None:
      self.writer.add_scalar("perf/images_per_sec", images_per_sec, step)
      record["images_per_sec"] = images_per_sec
    with open(os.path.join(self.workdir, METRICS_FILE), "a") as f:
      f.write(json.dumps(record) + "\n")

  def samples(self, step: int, grid: np.ndarray) -> str:
    path = os.path.join(self.workdir, SAMPLES_DIR, f"fixed_noise_{step:08d}.png")
    images.save_png(grid, path)
    self.writer.add_image("samples/fixed_noise", images.to_uint8(grid), step, dataformats="HWC")
    return path

  def close(self):
    if self.writer is not None:
      self.writer.close()


def console_line(epoch, epochs, step_in_epoch, steps_per_epoch, m) -> str:
  """The seed's (PyTorch DCGAN tutorial's) line."""
  return (f"[{epoch}/{epochs}][{step_in_epoch}/{steps_per_epoch}]\tLoss_D: {m['Loss_D']:.4f}\t"
          f"Loss_G: {m['Loss_G']:.4f}\tD(x): {m['D_x']:.4f}\t"
          f"D(G(z)): {m['D_G_z1']:.4f} / {m['D_G_z2']:.4f}")


# ---- the loop ----

def train_and_evaluate(config, workdir: str, progress: bool = True) -> train.GANState:
  """Trains to `config.train.num_steps` (or `epochs`), resuming from the latest checkpoint."""
  maybe_initialize_distributed(config)
  main_process = jax.process_index() == 0
  prepare_workdir(workdir)
  t = config.train
  say = (lambda msg: print(f"[train] {msg}", file=sys.stderr, flush=True)) if main_process else (
      lambda msg: None)

  start = checkpoint.latest_step(workdir)
  if start is not None:
    state, _ = checkpoint.restore(workdir, config)
    say(f"resuming from the checkpoint at step {start} in {checkpoint.checkpoint_dir(workdir)}")
  else:
    state = train.init_state(config, jax.random.PRNGKey(t.seed))
  start = int(state.step)

  data = input_pipeline.make_input(config)
  layout = data.layout
  total = t.num_steps or t.epochs * layout.steps_per_epoch
  epochs = -(-total // layout.steps_per_epoch)
  say(f"{jax.process_count()} process(es), {jax.device_count()} device(s) "
      f"({jax.local_device_count()} here, {jax.devices()[0].platform}); data: {data.kind}, "
      f"{layout.used_examples} images a pass, {layout.steps_per_epoch} steps an epoch; "
      f"steps {start} -> {total}")

  batch_fn = data.batch_fn() if data.kind == "device" else None
  k = t.get("steps_per_dispatch", 1)
  shard_ids = data.shard_ids if data.kind == "device" else input_pipeline.put_sharded(
      list(layout.local_shard_ids()))
  base = jax.random.PRNGKey(t.seed)
  noise_rng, fixed_rng = jax.random.fold_in(base, 1), jax.random.fold_in(base, 2)
  batch_spec = data.images if data.kind == "device" else data.batch_spec()
  step_args = (batch_spec, shard_ids, noise_rng)
  # The one-iteration step picks the state's layouts; a k-iteration one keeps them.
  step_fns = {}
  step_fns[1], p_state = compile_training_step(config, data.kind, batch_fn, 1, replicate(state),
                                               *step_args)
  del state
  if k > 1:
    step_fns[k] = compile_like(step_fns[1], config, data.kind, batch_fn, k, p_state, *step_args)
  fixed_noise = train.sample_latents(fixed_rng, t.num_samples, config.model.nz)
  use_ra = t.get("sample_use_running_average", False)
  sample_fn = jax.jit(lambda p, s, z: train.generate(config, p, s, z, use_ra))
  streamed = None if data.kind == "device" else data.batches(start, max(total - start, 0))

  log = RunLog(workdir, main_process)
  mngr = checkpoint.manager(workdir, keep=t.keep_checkpoints)
  # Grids and (one process) checkpoint writes leave the loop: it goes on dispatching steps.
  output = background.BackgroundWriter()
  bar = None
  if main_process and progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=total, initial=start, unit=" steps", dynamic_ncols=True, file=sys.stderr)
  last_saved = start if start else None
  step = start
  try:
    with StopRequest() as stop:
      tick, tick_step = time.perf_counter(), start
      while step < total:
        batch = data.images if data.kind == "device" else next(streamed)
        n = k if total - step >= k else 1  # the cadences are multiples of k (validated)
        p_state, metrics = step_fns[n](p_state, batch, shard_ids, noise_rng)
        step += n
        if bar is not None:
          bar.update(n)
        if step % t.log_every == 0 or step == total:
          m = {name: float(v) for name, v in unreplicate(metrics).items()}  # the only sync per log
          now = time.perf_counter()
          rate = (step - tick_step) * t.batch_size / max(now - tick, 1e-9)
          tick, tick_step = now, step
          log.scalars(step, m, rate)
          epoch, in_epoch = divmod(step - 1, layout.steps_per_epoch)
          line = console_line(epoch, epochs, in_epoch + 1, layout.steps_per_epoch, m)
          if bar is not None:
            bar.set_postfix(epoch=epoch, Loss_D=f"{m['Loss_D']:.3f}", Loss_G=f"{m['Loss_G']:.3f}",
                            img_s=f"{rate:.0f}")
            bar.write(line, file=sys.stderr)
          elif main_process:
            print(line, file=sys.stderr, flush=True)
        if main_process and (step % t.sample_every == 0 or step == total):
          # G's copy on this process's first device: sampling there needs no trip of G's
          # 128 MB of parameters through the host (one process samples, so no collective).
          g = first_local_copy(p_state.g)
          output.submit(_write_grid, log, step, sample_fn(g.params, g.batch_stats, fixed_noise))
        # One process: the flag is free to read. Several: agreeing is a collective, so not every step.
        check = (jax.process_count() == 1 or step == total
                 or (step - n) // t.stop_check_every != step // t.stop_check_every)
        stopping = stop.requested() if check else False
        if step % t.checkpoint_every == 0 or step == total or stopping:
          _save(mngr, p_state, config, output)
          last_saved = step
        if stopping:
          say(f"signal {stop.signal or '(another process)'}: saved step {step}, exiting")
          break
    output.drain()  # the last grid and checkpoint written, or their error raised here
  finally:
    if streamed is not None:
      streamed.close()  # stops the prefetching thread
    if bar is not None:
      bar.close()
    output.close()
    mngr.wait_until_finished()  # asynchronous saves complete before the program ends
    mngr.close()
    log.close()
  if main_process and last_saved is not None:
    say(f"checkpoint at step {last_saved} in {checkpoint.checkpoint_dir(workdir)}")
  return unreplicate(p_state)


def _write_grid(log, step, samples) -> None:  # on the output thread: waits for G's samples
  log.samples(step, images.make_grid(np.asarray(samples)))


def _save(mngr, p_state, config, output) -> None:
  """Has orbax write device 0's state; the loop goes on at once where it can.

  One process: a device copy of the state (the next step donates its buffers) is fetched and
  handed to orbax on the output thread. Several: orbax's save meets the other processes in a
  device collective, which must not run beside the step's own, so the copy to the host happens
  here and only the file writes are in the background.
  """
  if jax.process_count() > 1:
    checkpoint.save_async(mngr, unreplicate(p_state.without_compute_params()), config)
    return
  snapshot = _device_snapshot(first_local_copy(p_state.without_compute_params()))
  output.submit(lambda: checkpoint.save_async(mngr, jax.tree_util.tree_map(np.asarray, snapshot),
                                              config))


def _device_snapshot(tree):
  """A copy on the device that the next step's donation leaves intact (no compilation). A jax
  that cannot make one gets a host copy made here, as before the output thread, and one line."""
  try:
    return jax.device_put(tree, may_alias=False)
  except (TypeError, ValueError, NotImplementedError) as e:
    if not getattr(_device_snapshot, "warned", False):
      _device_snapshot.warned = True
      print(f"[train] note: no device copy of the state for checkpoints ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); copying it to the host in the loop instead",
            file=sys.stderr, flush=True)
    return jax.tree_util.tree_map(np.asarray, tree)
