"""The per-device training step run on every device of every process, compiled.

`make_step` maps `train.train_step` over one mesh axis spanning every device (jit of
shard_map, pmap's semantics); `compile_step` compiles it with the state in the memory layouts
XLA picks (on a GPU, the ones cuDNN reads), and `replicate` / `place_for` put the state there.
`distributed_plan` and `initialize_distributed` join the processes of a multi-host run first.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import socket
import sys
import threading
import time
from typing import NamedTuple, Optional

import jax
import numpy as np

from cspgan_jax import input_pipeline, train
from cspgan_jax.errors import ConfigError, first_line

AXIS = "devices"


# ---- processes and devices ----

# `dist.cluster`: where the processes' settings come from when neither the config nor JAX_*
# give them. jax.distributed.initialize() finds SLURM's and Open MPI's itself, but only once it
# joins: the checks before joining (process 0's port, the process's lock) need them first.
CLUSTERS = ("", "slurm", "openmpi")


def dist_settings(config, environ=os.environ) -> tuple:
  """(coordinator address, number of processes, process id) as this process was given them:
  `config.dist` where set, else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
  else, with `dist.cluster` set, the launcher's (`slurm_settings`, `openmpi_settings`)."""
  dist = config.get("dist", None)
  unset = ("", 0, -1)

  def get(key, unset, env):  # the config wins where set, else the environment
    value = dist.get(key, unset) if dist is not None else unset
    return environ.get(env, unset) if value == unset else value

  try:
    settings = (get("coordinator_address", "", "JAX_COORDINATOR_ADDRESS"),
                int(get("num_processes", 0, "JAX_NUM_PROCESSES")),
                int(get("process_id", -1, "JAX_PROCESS_ID")))
  except ValueError as e:  # from the environment
    raise ConfigError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers ({e})") from None
  cluster = dist.get("cluster", "") if dist is not None else ""
  if cluster and any(s == u for s, u in zip(settings, unset)):
    found = {"slurm": slurm_settings, "openmpi": openmpi_settings}[cluster](environ)
    settings = tuple(f if s == u else s for s, u, f in zip(settings, unset, found))
  return settings


def _jobs_port(job: int, environ) -> int:
  """JAX_COORDINATOR_PORT, else jax's port for a job: one of the top 4096, by its number."""
  given = environ.get("JAX_COORDINATOR_PORT")
  if given and given.isdigit() and not 0 < int(given) < 65536:  # else blamed on the address
    raise ConfigError(f"JAX_COORDINATOR_PORT must be a port, 1 to 65535, got {given}")
  return int(given or job % 2**12 + (65535 - 2**12 + 1))


def slurm_settings(environ=os.environ) -> tuple:
  """(coordinator address, number of processes, process id) of this task of an srun step, as
  jax.distributed.initialize() reads them: the step's first node, at JAX_COORDINATOR_PORT or
  else at jax's port for the job (one of the top 4096, by SLURM_JOB_ID); ConfigError outside
  a step."""
  tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
  missing = [n for n in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID")
             if not environ.get(n)] + ([] if tasks else ["SLURM_STEP_NUM_TASKS"])
  if missing:
    raise ConfigError(f"dist.cluster is slurm, but {', '.join(missing)} unset: start each "
                      "process with srun, or give dist.coordinator_address, num_processes "
                      "and process_id")
  try:
    job, count, index = (int(v) for v in (environ["SLURM_JOB_ID"], tasks,
                                           environ["SLURM_PROCID"]))
    port = _jobs_port(job, environ)
  except ValueError as e:
    raise ConfigError(f"dist.cluster is slurm, but a variable is not an integer ({e})") from None
  return f"{_first_node(environ['SLURM_STEP_NODELIST'])}:{port}", count, index


# Open MPI 4's (ORTE's) URI of mpirun, e.g. "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"
_ORTE_URI = "OMPI_MCA_orte_hnp_uri"


def openmpi_settings(environ=os.environ) -> tuple:
  """(coordinator address, number of processes, process id) of this rank of an Open MPI 4
  mpirun, as jax.distributed.initialize() reads them: mpirun's host (its first address; jax
  takes rank 0 to run there), at JAX_COORDINATOR_PORT or else jax's port for the job (by the
  job id in OMPI_MCA_orte_hnp_uri); ConfigError outside such a launch."""
  names = (_ORTE_URI, "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")
  missing = [n for n in names if not environ.get(n)]
  if missing:
    raise ConfigError(f"dist.cluster is openmpi, but {', '.join(missing)} unset: start each "
                      "process with Open MPI 4's mpirun, or give dist.coordinator_address, "
                      "num_processes and process_id")
  uri = environ[_ORTE_URI]
  host = re.search(r"tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]", uri)
  try:
    count, index = int(environ[names[1]]), int(environ[names[2]])
    port = _jobs_port(int(uri.split(".", 1)[0]) // 2**12, environ)  # job ids step by 2**12
  except ValueError as e:
    raise ConfigError(f"dist.cluster is openmpi, but a variable is not an integer ({e})") from None
  if host is None:
    raise ConfigError(f"dist.cluster is openmpi, but {_ORTE_URI} names no TCP address: {uri!r}")
  host = host.group(1) or f"[{host.group(2)}]"  # an IPv6 one bracketed, or its port is lost
  return f"{host}:{port}", count, index


def lone_launched_task(config, environ=os.environ) -> Optional[str]:
  """A note for a process about to train as a run of its own while it is one of several that
  srun or mpirun started together (no dist.* settings, no dist.cluster): each would be a
  separate run, and all but one refused the workdir."""
  if config.dist.get("cluster", ""):
    return None
  for count, index, launch, cluster in (
      ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "this srun step", "slurm"),
      ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "this mpirun", "openmpi")):
    tasks = environ.get(count, "")
    if tasks.isdigit() and int(tasks) > 1:
      join = f"--config.dist.cluster={cluster} makes the tasks one run"
      if cluster == "openmpi" and not environ.get(_ORTE_URI):  # Open MPI 5's: openmpi refuses it
        join = ("dist.coordinator_address, num_processes and process_id (its "
                "OMPI_COMM_WORLD_RANK) make the tasks one run; dist.cluster=openmpi reads Open "
                "MPI 4's mpirun only")
      return (f"task {environ.get(index, '?')} of the {tasks} of {launch} trains as a run of "
              f"its own: {join}")
  return None


def _first_node(nodelist: str) -> str:
  """The first host of a SLURM node list: 'gpu[007-010,012],cpu1' -> 'gpu007'."""
  match = re.match(r"([^,\[]*)(?:\[([^,\-\]]*))?", nodelist)
  return match.group(1) + (match.group(2) or "")


class DistributedPlan(NamedTuple):
  """The checked settings of one process of a multi-host run."""
  address: str
  host: str
  port: int
  num_processes: int
  process_id: int
  timeout: float


def distributed_plan(config) -> Optional[DistributedPlan]:
  """This process's multi-host settings (`config.dist`, else the usual environment), checked,
  or None for a run of one process. ConfigError for settings that cannot work, and for process
  0's port where something holds it already (jax crashed there), before anything is done."""
  address, num_processes, process_id = dist_settings(config)
  dist = config.get("dist", None)
  if not address:
    if num_processes > 1:  # would train alone, as if one of one, and say nothing
      raise ConfigError(f"a run of {num_processes} processes (dist.num_processes or "
                        "JAX_NUM_PROCESSES) needs dist.coordinator_address (or "
                        "JAX_COORDINATOR_ADDRESS): process 0's HOST:PORT")
    return None
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ConfigError(f"multi-host run at {address} needs dist.num_processes >= 1 and "
                      f"0 <= dist.process_id < num_processes, got {num_processes}, {process_id}")
  timeout = dist.get("initialization_timeout", 300) if dist is not None else 300
  if timeout < 1:
    raise ConfigError(f"dist.initialization_timeout must be >= 1 second, got {timeout}")
  host, port = _host_and_port(address)
  if process_id == 0:
    taken = _port_taken(port)
    if taken:
      raise ConfigError(f"process 0 cannot run the coordinator on port {port} of this machine "
                        f"({taken}): free it, or choose another dist.coordinator_address port")
  return DistributedPlan(address, host, port, num_processes, process_id, timeout)


def initialize_distributed(plan: DistributedPlan, on_abandon=None) -> None:
  """Joins the processes of a multi-host run (`distributed_plan`'s).

  jax ends a process that cannot join in its C++ runtime, not with an exception: an abort after
  its timeout, with a message that blames another process, where the coordinator cannot be
  reached or some process never comes, and a segmentation fault where process 0's port is taken
  (`distributed_plan` checks it). So a watchdog thread (jax releases the GIL while it waits)
  ends the process with one line, naming what it found, before jax's own deadline; it calls
  `on_abandon()` first (what the process made for the run and would leave behind).
  """
  # Collectives between CPU processes (tests, CPU clusters); GPUs use NCCL regardless. gloo is
  # jax 0.10's default too; a user's JAX_CPU_COLLECTIVES_IMPLEMENTATION (mpi) is theirs.
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  watchdog = _JoinWatchdog(plan, on_abandon)
  watchdog.start()
  try:
    jax.distributed.initialize(coordinator_address=plan.address,
                               num_processes=plan.num_processes, process_id=plan.process_id,
                               initialization_timeout=plan.timeout + _JAX_DEADLINE_AFTER_OURS_S)
  finally:
    watchdog.joined.set()


# jax's own deadline comes this much after the watchdog's, so that the watchdog speaks first
_JAX_DEADLINE_AFTER_OURS_S = 60


def _host_and_port(address: str) -> tuple:
  """("host", port) of "host:port" or "[v6 address]:port"; ConfigError for anything else."""
  host, _, port = address.rpartition(":")
  host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"dist.coordinator_address must be HOST:PORT, got {address!r}")
  return host, int(port)


def _port_taken(port: int) -> Optional[str]:
  """The system's reason why a server cannot listen on `port` of every interface, as jax's
  coordinator does ([::]:port), or None where it can."""
  for family, anywhere in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:  # no IPv6 on this machine: the IPv4 one then
      continue
    with probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's listener does
      try:
        probe.bind((anywhere, port))
        return None
      except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
          return e.strerror
  return None


class _JoinWatchdog(threading.Thread):
  """Waits `timeout` seconds for `joined`, then ends the process with one line, exit status 2
  (the main thread is inside jax's C++ wait, so the process is ended from here). A process
  other than 0 tries the coordinator's port meanwhile, each second until it answers once, so
  that the line says whether it was ever reached, whatever process 0 did since."""

  def __init__(self, plan: DistributedPlan, on_abandon=None):
    super().__init__(name="cspgan-join-watchdog", daemon=True)
    self.host, self.port, self.timeout = plan.host, plan.port, plan.timeout
    self.num_processes, self.process_id = plan.num_processes, plan.process_id
    self.on_abandon = on_abandon
    self.joined = threading.Event()
    self.reached, self.refusal = plan.process_id == 0, "no answer yet"

  def run(self):
    deadline = time.monotonic() + self.timeout
    while not self.reached and not self.joined.is_set() and time.monotonic() < deadline:
      try:
        socket.create_connection((self.host, self.port), timeout=1).close()
        self.reached = True
      except OSError as e:
        self.refusal = e.strerror or first_line(e)
        self.joined.wait(min(1.0, max(0.0, deadline - time.monotonic())))
    if self.joined.wait(max(0.0, deadline - time.monotonic())):
      return
    if self.on_abandon is not None:
      try:
        self.on_abandon()
      except Exception:  # pylint: disable=broad-except  # the line below matters more
        pass
    sys.stdout.flush()
    sys.stderr.write(f"cspgan: error: {self.reason()}\n")
    sys.stderr.flush()
    os._exit(2)  # pylint: disable=protected-access

  def reason(self) -> str:
    where, n = f"{self.host}:{self.port}", self.num_processes
    if self.process_id == 0:
      return (f"process 0 runs the coordinator at {where}, and not all of the {n} processes "
              f"joined it within {self.timeout} s: start the others with this address and "
              f"dist.process_id 1 to {n - 1}")
    if self.reached:
      return (f"process {self.process_id} reached the coordinator at {where}, but not all of "
              f"the {n} processes joined it within {self.timeout} s: start each with its own "
              f"dist.process_id and process 0's dist.num_processes")
    return (f"process {self.process_id} cannot reach the coordinator at {where} "
            f"({self.refusal}) within {self.timeout} s: start process 0 there, or correct "
            f"dist.coordinator_address")


def steps_must_wait() -> bool:
  """True where a step's collectives must end before the next step's are dispatched: several
  CPU devices, in one process or several. XLA:CPU's collectives abort with two multi-device
  programs in flight (plain jax 0.10.2, nothing of ours: a pmap of one psum dispatched 100
  times on 2 CPU devices of one process ends in "Termination timeout for all reduce ... of 40
  seconds exceeded" every time, and 3,000 times in 3.3 s with a wait after each; gloo's between
  2 processes x 2 devices hang within 50 steps). One device a process never did. GPUs order
  their NCCL collectives on streams and keep dispatching ahead."""
  return jax.local_device_count() > 1 and jax.default_backend() == "cpu"


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
  without `jax.experimental.layout` or its `Layout.AUTO` (the step is then the same, with the
  transposes back).
  Imported here, not at the top: the API is experimental and has been renamed before (jax 0.10
  dropped its DeviceLocalLayout), and the GPU machine's jax is newer than this one's, so a
  rename costs the layouts, not the import of the package."""
  try:
    from jax.experimental.layout import Format, Layout  # pylint: disable=import-outside-toplevel
  except ImportError:
    return sharding
  auto = getattr(Layout, "AUTO", None)  # 0.10.2 and 0.11.2 have it
  return sharding if auto is None else Format(auto, sharding)


def _state_formats(compiled, outputs=False):
  """The state's formats in `compiled` (its first argument or result); its shardings on a jax
  whose compiled programs have no `input_formats` (the layout API's, which `_auto_format` may
  have done without): the state is then row-major, and a sharding places it."""
  name = "output" if outputs else "input"
  found = getattr(compiled, f"{name}_formats", None)
  if found is None:
    found = getattr(compiled, f"{name}_shardings")
  return found[0] if outputs else found[0][0]


def xla_options(train_config) -> dict:
  """`train.xla_options` ("name=value,..."; e.g. "xla_gpu_enable_pdl=true") as the compiler
  options of the training step: true/false, numbers and words, by XLA's DebugOptions names."""
  options = {}
  for item in filter(None, (p.strip() for p in train_config.get("xla_options", "").split(","))):
    name, sep, value = (x.strip() for x in item.partition("="))
    if not sep or not name.startswith("xla_") or not value:
      raise ConfigError(f"train.xla_options: {item!r} is not of the form xla_name=value")
    lowered = value.lower()
    if lowered in ("true", "false"):
      options[name] = lowered == "true"
      continue
    for kind in (int, float):
      try:
        options[name] = kind(value)
        break
      except ValueError:
        pass
    else:
      options[name] = value
  return options


def check_xla_options(train_config) -> None:
  """Raises the ConfigError `compile_lowered` would, for an option XLA does not know, before a
  run places its data and compiles its step: a one-op program compiled with the options."""
  options = xla_options(train_config)
  if options:
    compile_lowered(jax.jit(lambda x: x + 1).lower(np.float32(0)), options)


def compile_lowered(lowered, options):
  """`lowered.compile` with XLA's options; an option XLA does not know is one config error."""
  try:
    return lowered.compile(compiler_options=options or None)
  except Exception as e:  # pylint: disable=broad-except  # jax's runtime error type moves
    if "No such compile option" not in str(e):
      raise
    raise ConfigError(f"train.xla_options: {' '.join(str(e).split())}") from e


def compile_step(make, state, *args, options=None):
  """(compiled step, state placed as it expects): the state's layouts are the compiler's choice.

  `make(state_format)` builds the step (`make_step(..., state_format=...)`); it is compiled with
  the layouts left to XLA, and XLA's `options` (`xla_options`). `state` may be abstract
  (`jax.ShapeDtypeStruct`s) to compile only; the second result is then the state's formats.
  Where XLA chose other layouts for the state coming out than going in (it has not, so far),
  the step is compiled again with the input's layouts pinned on both sides, so that one
  iteration's result is the next one's argument.
  """
  # Layout.AUTO compiles against shapes only: an array would bring its own layout.
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  compiled = compile_lowered(make(None).lower(shapes, *args), options)
  formats = _state_formats(compiled)
  leaves = jax.tree_util.tree_leaves
  if leaves(_state_formats(compiled, outputs=True)) != leaves(formats):
    compiled = compile_lowered(make(formats).lower(shapes, *args), options)
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
      lambda fmt: make_step(config, kind, batch_fn, 1, mesh, state_format=fmt), state, *args,
      options=xla_options(config.train))
  if steps == 1:
    return one, placed
  return compile_like(one, config, kind, batch_fn, steps, state, *args, mesh=mesh), placed


def compile_like(compiled_one, config, kind, batch_fn, steps, state, *args, mesh=None):
  """The `steps`-iteration step, compiled for the state's layouts in `compiled_one`."""
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  step = make_step(config, kind, batch_fn, steps, mesh,
                   state_format=_state_formats(compiled_one))
  return compile_lowered(step.lower(shapes, *args), xla_options(config.train))


def place_for(state, formats):
  """`state` in the given per-leaf formats (a no-op where they already match)."""
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(state)):
    return formats
  return jax.device_put(state, formats, donate=True)


def step_memory_bytes(compiled) -> Optional[int]:
  """Device memory a compiled step needs, as XLA's buffer assignment sizes it: its arguments
  and results (the donated state counted once) and its temporaries (on a GPU, cuDNN's
  workspaces that autotuning picked among them). None where the backend gives no analysis
  (jax allows it; CPU and GPU give one)."""
  return analysed_bytes(compiled.memory_analysis())


def analysed_bytes(m) -> Optional[int]:
  """`step_memory_bytes` from a `Compiled.memory_analysis()` already taken (None stays None)."""
  if m is None:
    return None
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
    try:  # as in _auto_format
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
