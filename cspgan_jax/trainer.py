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

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
import signal
import socket
import sys
import time
from typing import Optional, Tuple

import jax
import numpy as np

from cspgan_jax import (background, checkpoint, images, input_pipeline, output_files, parallel,
                        profiling, train)
from cspgan_jax.errors import CspganError, DivergedError, first_line

TENSORBOARD_DIR = "tensorboard"
SAMPLES_DIR = "samples"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".cspgan-train.lock"
PROCESS_LOCK_FILE = ".cspgan-train.process-{}.lock"  # process i > 0 of a multi-host run
METRIC_TAGS = {"Loss_D": "iter/Loss_D", "Loss_G": "iter/Loss_G", "D_x": "iter/D_x",
               "D_G_z1": "iter/D_G_z1", "D_G_z2": "iter/D_G_z2"}


# ---- workdir ----

def prepare_workdir(workdir: str) -> None:
  """Creates the workdir and proves it writable before any work is done."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise CspganError(f"workdir {workdir} is a file, not a directory")
  for sub in (checkpoint.checkpoint_dir(workdir), os.path.join(workdir, TENSORBOARD_DIR),
              os.path.join(workdir, SAMPLES_DIR)):
    if os.path.exists(sub) and not os.path.isdir(sub):  # found before any step, not at a save
      raise CspganError(f"{sub} is a file, where the run keeps a folder: move it away")
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

_EVENT_FILES = itertools.count()  # this process's TensorBoard event files, for their names


class RunLog:
  """Console line, TensorBoard scalars and images, metrics.jsonl and sample PNGs (process 0)."""

  def __init__(self, workdir: str, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    self.workdir = workdir
    self.writer = None
    self._unlogged = {}  # a file of lines set aside -> the results this run has yet to log
    if enabled:
      # The run goes on from `start_step` (its checkpoint, or 0): whatever an interrupted run
      # logged after that step is superseded by what this one logs again (the same numbers, as
      # a resumed run is bit-identical), so neither metrics.jsonl nor TensorBoard (purge_step)
      # keeps a step twice; the lines taken out are kept beside it.
      self._set_aside_metrics_past(start_step)
      self._take_up_earlier_asides()
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      # tensorboardX names its file by the second and host and opens it for writing anew: a
      # second writer in the same second (a run that failed at once, then its restart) would
      # empty the first one's file. The process and a count make each name its own.
      self.writer = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                                  purge_step=start_step + 1,
                                  filename_suffix=f".{os.getpid()}.{next(_EVENT_FILES)}")
      os.makedirs(os.path.join(workdir, SAMPLES_DIR), exist_ok=True)

  def _set_aside_metrics_past(self, step: int) -> None:
    aside, moved = set_aside_metrics_past(self.workdir, step)
    if aside is None:
      return
    said = f"[train] {len(moved)} line(s) of {METRICS_FILE} past step {step}"
    if None in moved:  # lines no run logs again: the file stays
      said += f" or not a run's record: kept in {aside}"
    else:
      # Only what this run will not log again stays: after a kill, the steps past the last
      # checkpoint come back with the same numbers, and a file kept on every such resume would
      # tell the user nothing. Any that differ (another config, another number of devices, a
      # step this run does not reach) keep the file.
      self._unlogged[aside] = [_results(r) for r in moved]
      said += f": kept in {aside} until this run logs those steps again with the same numbers"
    print(said, file=sys.stderr, flush=True)

  def _take_up_earlier_asides(self) -> None:
    """The files of run records that an earlier start set aside and a kill kept (the run that
    was to log those steps again stopped first): each goes once metrics.jsonl holds all of its
    records, the steps up to this start's checkpoint there already, the rest when logged."""
    logged = [_results(r) for r in logged_metrics(self.workdir)]
    for path in _aside_files(self.workdir):
      if path in self._unlogged:  # this start's
        continue
      records = _records_of(path)
      if records is None:  # a line no run logs again: kept for good
        continue
      self._unlogged[path] = [r for r in map(_results, records) if r not in logged]
      self._logged_again(None)

  def _logged_again(self, record: Optional[dict]) -> None:
    """Takes `record` off each file's moved ones; removes a file once none is left."""
    results = None if record is None else _results(record)
    for path, unlogged in list(self._unlogged.items()):
      self._unlogged[path] = unlogged = [r for r in unlogged if r != results]
      if not unlogged:
        with contextlib.suppress(OSError):  # kept, at worst
          os.remove(path)
        del self._unlogged[path]

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
    if self._unlogged:
      self._logged_again(record)

  def samples(self, step: int, samples: np.ndarray) -> str:
    """G(fixed_noise) as a PNG grid and in TensorBoard, with how alike its tiles are."""
    grid = images.make_grid(samples)
    path = os.path.join(self.workdir, SAMPLES_DIR, f"fixed_noise_{step:08d}.png")
    images.save_png(grid, path)
    self.writer.add_image("samples/fixed_noise", images.to_uint8(grid), step, dataformats="HWC")
    self.writer.add_scalar("samples/tile_spread", images.tile_spread(samples), step)
    return path

  def close(self):
    if self.writer is not None:
      self.writer.close()


def _logged_record(line: str) -> Optional[dict]:
  """A metrics.jsonl line's record: an int step and numbers, as `RunLog.scalars` writes it;
  None for anything else (a line a killed run left unfinished, or one edited by hand)."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  numbers = isinstance(record, dict) and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in record.values())
  return record if numbers and isinstance(record.get("step"), int) else None


def _results(record: dict) -> dict:
  """A record without its images_per_sec: a timing, which no two runs repeat."""
  return {k: v for k, v in record.items() if k != "images_per_sec"}


def set_aside_metrics_past(workdir: str, step: int) -> Tuple[Optional[str], list]:
  """Moves the lines of metrics.jsonl past `step`, and those that are no run's record, byte for
  byte to a new metrics.jsonl.dropped-N; returns its path (None: nothing moved) and their records
  (None for each line that is not one). Both files are written whole, the moved lines' first:
  stopped anywhere, every line is in one file or the other."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return None, []
  with open(path, "rb") as f:  # bytes of no run's writing are kept as they are
    lines = f.readlines()
  records = [_logged_record(l.decode("utf-8", errors="replace")) for l in lines]
  past = [r is None or r["step"] > step for r in records]
  if not any(past):
    return None, []
  aside = _unused_name(path + ".dropped-")
  output_files.write_outputs([
      (aside, _lines_writer([l for l, p in zip(lines, past) if p])),
      (path, _lines_writer([l for l, p in zip(lines, past) if not p]))])
  return aside, [r for r, p in zip(records, past) if p]


def _aside_files(workdir: str) -> list:
  """The metrics.jsonl.dropped-N files in `workdir`, oldest first."""
  prefix = os.path.join(workdir, METRICS_FILE + ".dropped-")
  return [f"{prefix}{n}" for n in _numbers_taken(prefix)]


def _records_of(path: str) -> Optional[list]:
  """The records of a file of metrics.jsonl lines; None if any line is not one (or it cannot
  be read: it is then left as it is)."""
  try:
    with open(path, "rb") as f:
      records = [_logged_record(l.decode("utf-8", errors="replace")) for l in f]
  except OSError:
    return None
  return None if None in records else records


def _numbers_taken(prefix: str) -> list:
  """The N of each file named `prefix`N, in order."""
  folder, base = os.path.split(prefix)
  return sorted(int(n[len(base):]) for n in os.listdir(folder)
                if n.startswith(base) and n[len(base):].isascii() and n[len(base):].isdigit())


def _unused_name(prefix: str) -> str:
  """`prefix` and a number past every one taken beside it: the newest file has the highest."""
  return f"{prefix}{max(_numbers_taken(prefix), default=0) + 1}"


def _lines_writer(lines: list):
  def write(name):
    with open(name, "wb") as f:
      f.writelines(lines)
  return write


def logged_metrics(workdir: str) -> list:
  """The records of the run's metrics.jsonl, in order (none if it has none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8", errors="replace") as f:
    return [r for r in map(_logged_record, f) if r is not None]


def console_line(epoch, epochs, step_in_epoch, steps_per_epoch, m) -> str:
  """The seed's (PyTorch DCGAN tutorial's) line."""
  return (f"[{epoch}/{epochs}][{step_in_epoch}/{steps_per_epoch}]\tLoss_D: {m['Loss_D']:.4f}\t"
          f"Loss_G: {m['Loss_G']:.4f}\tD(x): {m['D_x']:.4f}\t"
          f"D(G(z)): {m['D_G_z1']:.4f} / {m['D_G_z2']:.4f}")


# ---- the loop ----

@contextlib.contextmanager
def workdir_lock(workdir: str, take: bool = True):
  """Holds `workdir/LOCK_FILE` (an flock) while a run trains there: a second run on the same
  workdir would interleave its checkpoints and logs with the first's. One process of a run
  takes it (its others share the workdir by design). Yields None, or why the workdir is
  refused (every process of the run has to learn it before it raises: `_check_start`)."""
  if not take:
    yield None
    return
  path = os.path.join(workdir, LOCK_FILE)
  with open(path, "a+") as f:
    locked = True
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        f.seek(0)
        holder = f.read().strip() or "unknown"
        yield (f"workdir {workdir} is in use by another `cspgan train` (pid {holder}, by its "
               "lock); wait for it to end, or use another --workdir")
        return
      locked = False  # a file system without locks (some network ones): run unguarded
    if locked:
      f.seek(0)
      f.truncate()
      f.write(str(os.getpid()))
      f.flush()
    try:
      yield None
    finally:
      if locked:  # the lock would end with the file's closing, or the process's end, anyway
        f.seek(0)
        f.truncate()
        fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def process_claim(workdir: str, plan: Optional[parallel.DistributedPlan]):
  """Before a process of a multi-host run joins the others: the workdir made (an unusable one
  found here, not after the join), and for a process other than 0 the lock of its
  dist.process_id taken. jax's coordinator ends every process of a run, with an abort, when a
  second process registers under a taken id; refused here, that process stops with one line
  and the run goes on. (Process 0's lock is the run's, `workdir_lock`, taken once all joined: a
  second process 0 cannot run the coordinator on the first one's port.)

  Yields `abandon()`, which removes what this made (the workdir, where this made it and it
  holds nothing else, and the lock file in it): called here on any error in the block, and by
  the join's watchdog before it ends the process. None for a run of one process."""
  if plan is None:
    yield None
    return
  made = not os.path.exists(workdir)
  prepare_workdir(workdir)
  path = (None if plan.process_id == 0 else
          os.path.join(workdir, PROCESS_LOCK_FILE.format(plan.process_id)))

  def abandon():
    if not made:
      return
    for remove, target in ((os.remove, path), (os.rmdir, workdir)):
      try:
        if target is not None:
          remove(target)
      except OSError:  # another process's files there now: theirs to keep
        pass

  with contextlib.ExitStack() as held:
    if path is not None:
      f = held.enter_context(open(path, "a+"))
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          f = None  # a file system without locks (some network ones): run unguarded
        else:
          f.seek(0)
          holder = f.read().strip() or "unknown"
          raise CspganError(
              f"dist.process_id {plan.process_id} is in use on workdir {workdir}: a process of "
              f"a run there holds its lock (pid {holder}); give each process its own "
              "dist.process_id (a second one would have ended that run), or use another "
              "--workdir") from None
      if f is not None:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} on {socket.gethostname()}")
        f.flush()
        held.callback(f.truncate, 0)  # then closed: the lock ends with the file
    try:
      yield abandon
    except BaseException:
      held.close()
      abandon()
      raise


def train_and_evaluate(config, workdir: str, progress: bool = True) -> train.GANState:
  """Trains to `config.train.num_steps` (or `epochs`), resuming from the latest checkpoint."""
  plan = parallel.distributed_plan(config)
  lone = parallel.lone_launched_task(config) if plan is None else None
  if lone:  # said first: the other tasks' runs may refuse the workdir this one takes
    print(f"[train] note: {lone}", file=sys.stderr, flush=True)
  with process_claim(workdir, plan) as abandon:
    if plan is not None:
      parallel.initialize_distributed(plan, on_abandon=abandon)
    parallel.check_xla_options(config.train)
    prepare_workdir(workdir)
    with workdir_lock(workdir, take=jax.process_index() == 0) as refusal:
      _check_start(config, workdir, refusal)
      return _train_and_evaluate(config, workdir, progress)


def _per_process(values) -> np.ndarray:
  """(processes, len(values)) int64: every process's `values` (a collective: all must call)."""
  mine = np.asarray(values, np.int64)
  if jax.process_count() == 1:
    return mine[None]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)


def _differing(rows: np.ndarray, column: int) -> Optional[str]:
  """"process 0: a, process 1: b" where the processes' values in `column` differ, else None."""
  values = rows[:, column]
  if (values == values[0]).all():
    return None
  return ", ".join(f"process {i}: {v}" for i, v in enumerate(values.tolist()))


def _config_fingerprint(config) -> int:
  """The config without `dist` (whose process_id differs by design), as a 63-bit number."""
  fields = {k: v for k, v in config.to_dict().items() if k != "dist"}
  digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).digest()
  return int.from_bytes(digest[:8], "little") >> 1


def _check_start(config, workdir: str, refusal: Optional[str]) -> None:
  """Before any work, the same error line on every process where they could not train together:
  process 0 refused the workdir, the processes see different checkpoints (workdirs not one
  shared folder), or were started with different configs or numbers of processes. Left alone,
  each of those ended in a traceback on some processes and a hang or an abort on the others."""
  latest = checkpoint.latest_step(workdir)
  rows = _per_process([refusal is not None, -1 if latest is None else latest,
                       _config_fingerprint(config), parallel.dist_settings(config)[1]])
  if rows[:, 0].any():
    raise CspganError(refusal or f"workdir {workdir} is in use by another `cspgan train` "
                      "(process 0 was refused its lock)")
  steps = _differing(rows, 1)
  if steps:
    raise CspganError(f"the processes see different checkpoints in {workdir} (latest step, -1 "
                      f"for none: {steps}): the workdir must be one folder they all share")
  if _differing(rows, 2):
    raise CspganError("the processes were started with different configs (files or --config "
                      "overrides; dist.* aside): start every process with the same ones")
  counts = _differing(rows, 3)
  if counts:  # jax takes process 0's count: another one's would be ignored unsaid
    raise CspganError(f"the processes were given different dist.num_processes ({counts}): "
                      "give each the same")


def _train_and_evaluate(config, workdir: str, progress: bool) -> train.GANState:
  main_process = jax.process_index() == 0
  t = config.train
  say = (lambda msg: print(f"[train] {msg}", file=sys.stderr, flush=True)) if main_process else (
      lambda msg: None)

  started = time.perf_counter()
  start = checkpoint.latest_step(workdir)
  if start is not None:
    state, _ = checkpoint.restore(workdir, config)
    say(f"resuming from the checkpoint at step {start} in {checkpoint.checkpoint_dir(workdir)}")
    written = checkpoint.read_layout(workdir, start) or {}
    if start and written.get("devices", jax.device_count()) != jax.device_count():
      # The epoch's order is keyed by shard, one shard a device (input_pipeline.Layout).
      say(f"note: the checkpoint was written on {written['devices']} devices, this run has "
          f"{jax.device_count()}: the rest of this epoch may repeat or skip images, and "
          "BatchNorm's per-device batches change; later epochs each cover the data once (not "
          "bit-identical to an uninterrupted run)")
    before = checkpoint.read_config(workdir, start).train.batch_size
    if start and before != t.batch_size:
      # An epoch is a number of steps of one batch size: the step now falls elsewhere in it.
      say(f"note: the checkpoint's run trained at batch size {before}, this run at "
          f"{t.batch_size}: its {start} steps are counted as steps of {t.batch_size} images, so "
          "the epoch and the position in it change (images may repeat or be skipped), and "
          "Adam's state carries over as it is")
  else:
    state = train.init_state(config, jax.random.PRNGKey(t.seed))
  start = int(state.step)

  # Where the device's memory runs out before the loop (the data placed, the step or the
  # sampler run once), one line too; `stage` says which.
  stage = ["placing the data"]
  with _naming_out_of_memory(lambda e: _out_of_memory_before_the_loop(config, stage[0], e)):
    failure = None
    try:
      data = input_pipeline.make_input(config)
      layout = data.layout
      total = t.num_steps or t.epochs * layout.steps_per_epoch
      facts = [False, layout.used_examples, total]
    except CspganError as e:  # each process reads its own copy of the data: told to all
      failure, facts = e, [True, 0, 0]
    data_rows = _per_process(facts)
    if data_rows[:, 0].any():
      raise failure or CspganError("another process of the run could not load its data (its "
                                   "own error line says why)")
    # The same config can still meet different data.
    if _differing(data_rows, 1) or _differing(data_rows, 2):
      raise CspganError(f"the processes see different datasets (images a pass: "
                        f"{_differing(data_rows, 1) or layout.used_examples}; steps: "
                        f"{_differing(data_rows, 2) or total}): give them the same data")
    epochs = -(-total // layout.steps_per_epoch)
    say(f"{jax.process_count()} process(es), {jax.device_count()} device(s) "
        f"({jax.local_device_count()} here, {jax.devices()[0].platform}); data: {data.kind}, "
        f"{layout.used_examples} images a pass, {layout.steps_per_epoch} steps an epoch; "
        f"steps {start} -> {total}")

    if start >= total:
      say(f"the checkpoint is at step {start}, at or past this run's {total}: nothing to train "
          "(raise train.num_steps or train.epochs to go on)")
      return state
    batch_fn = data.batch_fn() if data.kind == "device" else None
    k = t.get("steps_per_dispatch", 1)
    shard_ids = data.shard_ids if data.kind == "device" else input_pipeline.put_sharded(
        list(layout.local_shard_ids()))
    base = jax.random.PRNGKey(t.seed)
    noise_rng, fixed_rng = jax.random.fold_in(base, 1), jax.random.fold_in(base, 2)
    batch_spec = data.images if data.kind == "device" else data.batch_spec()
    step_args = (batch_spec, shard_ids, noise_rng)
    stage[0] = "compiling the step"
    # The one-iteration step picks the state's layouts; a k-iteration one keeps them.
    step_fns = {}
    step_fns[1], p_state = parallel.compile_training_step(config, data.kind, batch_fn, 1,
                                                          parallel.replicate(state), *step_args)
    del state
    if k > 1:
      step_fns[k] = parallel.compile_like(step_fns[1], config, data.kind, batch_fn, k, p_state,
                                          *step_args)
    stage[0] = "making the first grid"
    fixed_noise = train.sample_latents(fixed_rng, t.num_samples, config.model.nz)
    use_ra = t.get("sample_use_running_average", False)
    sample_fn = jax.jit(lambda p, s, z: train.generate(config, p, s, z, use_ra))
    if main_process:
      # Compiled now (one untimed grid, not written) rather than by the first grid's call in the
      # loop, which would wait for it. Called rather than compiled ahead of time: a jit compiles
      # again for arguments in other layouts, where a compiled object would refuse them.
      g = parallel.first_local_copy(p_state.g)
      sample_fn(g.params, g.batch_stats, fixed_noise)
      del g
  cache = getattr(jax.config, "jax_compilation_cache_dir", None)
  say(f"ready after {time.perf_counter() - started:.1f} s (state {'restored' if start else 'made'}"
      f", data placed, step and sampler compiled; compiled programs "
      + (f"kept in {cache})" if cache else "not kept across runs)"))
  streamed = None if data.kind == "device" else data.batches(start, max(total - start, 0))

  log = RunLog(workdir, main_process, start)
  trace = profiling.StepTrace(os.path.join(workdir, TENSORBOARD_DIR), t.get("profile_start", 0),
                              t.get("profile_steps", 0), main_process, say)
  mngr = checkpoint.manager(workdir, keep=t.keep_checkpoints)
  # Grids and (one process) checkpoint writes leave the loop: it goes on dispatching steps.
  output = background.BackgroundWriter()
  wait_each_step = parallel.steps_must_wait()
  bar = None
  if main_process and progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=total, initial=start, unit=" steps", dynamic_ncols=True, file=sys.stderr)
  last_saved = start if start else None
  step = checked = start
  try:
    with StopRequest() as stop:
      tick, tick_step = time.perf_counter(), start
      while step < total:
        batch = data.images if data.kind == "device" else next(streamed)
        # k steps a dispatch from multiples of k only: the cadences are multiples of k
        # (validated), and a run resumed or extended from another step gets back in line.
        n = k if step % k == 0 and total - step >= k else 1
        trace.before(step, p_state)
        p_state, metrics = step_fns[n](p_state, batch, shard_ids, noise_rng)
        if wait_each_step:
          jax.block_until_ready(metrics)
        step += n
        trace.after(step, (p_state, metrics), step_fns[n], last=step >= total)
        if bar is not None:
          bar.update(n)
        # One process: the flag is free to read. Several: agreeing is a collective, so not
        # every step.
        check = (jax.process_count() == 1 or step == total
                 or (step - n) // t.stop_check_every != step // t.stop_check_every)
        stopping = stop.requested() if check else False
        log_now = step % t.log_every == 0 or step == total
        sample_now = step % t.sample_every == 0 or step == total
        save_now = step % t.checkpoint_every == 0 or step == total or stopping
        if log_now or sample_now or save_now:
          # the only sync: before anything of this step is written (the metrics are averaged
          # over every device, so all processes see the same values and stop together)
          m = _finite_metrics(metrics, step, checked, start, last_saved)
          checked = step
        if log_now:
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
        if main_process and sample_now:
          # G's copy on this process's first device: sampling there needs no trip of G's
          # 128 MB of parameters through the host (one process samples, so no collective).
          g = parallel.first_local_copy(p_state.g)
          output.submit(_write_grid, log, step, sample_fn(g.params, g.batch_stats, fixed_noise))
        if save_now:
          _save(mngr, p_state, config, output)
          last_saved = step
        if stopping:
          say(f"signal {stop.signal or '(another process)'}: saved step {step}, exiting")
          break
      # The last grid and checkpoint written (or their error raised here) while a signal only
      # sets the flag: a SIGTERM now must not end the process before the last save is on disk.
      output.drain()
      checkpoint.wait_for_writes(mngr)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise CspganError(_out_of_memory(config, step_fns[1], data, e)) from e
  finally:
    if streamed is not None:
      streamed.close()  # stops the prefetching thread
    if bar is not None:
      bar.close()
    trace.stop()
    output.close()
    try:
      checkpoint.finish_writes(mngr)  # asynchronous saves complete before the program ends
    finally:
      log.close()
  if main_process and last_saved is not None:
    say(f"checkpoint at step {last_saved} in {checkpoint.checkpoint_dir(workdir)}")
  return parallel.unreplicate(p_state)


def _finite_metrics(metrics, step: int, checked: int, start: int,
                    last_saved: Optional[int]) -> dict:
  """This step's metrics on the host; a DivergedError where any is NaN or inf, before it is
  logged, drawn or saved, so the checkpoints written before stay the latest (with
  `keep_checkpoints`, saving the diverged state would delete them one by one)."""
  m = {name: float(v) for name, v in parallel.unreplicate(metrics).items()}
  order = lambda name: (list(METRIC_TAGS).index(name) if name in METRIC_TAGS else len(METRIC_TAGS),
                        name)  # the logged ones in their order, then any a step adds
  bad = {name: m[name] for name in sorted(m, key=order) if not np.isfinite(m[name])}
  if not bad:
    return m
  kept = (f"the checkpoint at step {last_saved} is the latest" if last_saved is not None
          else "no checkpoint was written")
  since = (f"step {checked}, the last checked" if checked > start
           else f"the run's start, step {start}")
  raise DivergedError(
      f"training diverged: {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}, "
      f"somewhere after {since}; nothing after step {checked} was logged or saved and {kept} "
      "(resumed, the run repeats these steps bit for bit: lower train.lr_d / train.lr_g or "
      "change the config)")


@contextlib.contextmanager
def _naming_out_of_memory(describe):
  """XLA's RESOURCE_EXHAUSTED inside the block -> one CspganError line, `describe(error)`."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise CspganError(describe(e)) from e


def _out_of_memory_before_the_loop(config, stage: str, error) -> str:
  limit = input_pipeline.device_memory_bytes()
  of = f" (a device has {limit / 2**30:.1f} GiB)" if limit else ""
  return (f"out of device memory {stage} ({first_line(error, 160)}){of}: lower "
          f"train.batch_size (now {config.train.batch_size}), or set train.dtype=bfloat16 or "
          "data.pipeline=streaming")


def _out_of_memory(config, compiled_step, data, error) -> str:
  """One line for a step that ran out of device memory: what the step and the dataset take
  there, and what to change."""
  need = parallel.step_memory_bytes(compiled_step)
  takes = "the step takes " + (f"{need / 2**30:.1f} GiB a device" if need is not None
                                else "an unknown amount (XLA gave no memory analysis)")
  held = (f" and the dataset {data.images.addressable_shards[0].data.nbytes / 2**30:.1f} GiB"
          if data.kind == "device" else "")
  limit = input_pipeline.device_memory_bytes()
  of = f" of the {limit / 2**30:.1f} GiB a device has" if limit else ""
  return (f"out of device memory ({first_line(error, 160)}): {takes} at "
          f"train.batch_size={config.train.batch_size}{held}{of}; "
          "lower train.batch_size, or set train.dtype=bfloat16"
          + (" or data.pipeline=streaming" if data.kind == "device" else ""))


def _write_grid(log, step, samples) -> None:  # on the output thread: waits for G's samples
  log.samples(step, np.asarray(samples))


def _save(mngr, p_state, config, output) -> None:
  """Has orbax write device 0's state; the loop goes on at once where it can.

  One process: a device copy of the state (the next step donates its buffers) is fetched and
  handed to orbax on the output thread. Several: orbax's save meets the other processes in a
  device collective, which must not run beside the step's own, so the copy to the host happens
  here and only the file writes are in the background.
  """
  if jax.process_count() > 1:
    checkpoint.save_async(mngr, parallel.unreplicate(p_state.without_compute_params()), config)
    return
  snapshot = _device_snapshot(parallel.first_local_copy(p_state.without_compute_params()))
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
