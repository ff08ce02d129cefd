"""`cspgan train`: multi-device steps, bit-exact resume, SIGTERM, two processes, outputs, errors."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import jax
import numpy as np
import pytest

from cspgan_jax import checkpoint, cli, config_lib, parallel, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tests", "scripts")
TINY = os.path.join(REPO, "configs", "tiny.py")


def _env(devices):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", PYTHONPATH=REPO)


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


def test_four_device_steps_match_references():
  proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, "multi_device_step.py"), TINY],
                        env=_env(4), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.split("RESULT", 1)[1])
  # Per-device BatchNorm: PyTorch's iteration per chunk with averaged gradients and statistics.
  assert r["a_replicas_identical"]
  assert r["a_params"][0] <= 1e-5 and r["a_batch_stats"][0] <= 1e-5 and r["a_metrics"] <= 1e-5
  # ... with BatchNorm in G too: its statistics averaged over the devices as well
  assert r["a_leaky_bn_replicas_identical"] and r["a_leaky_bn_g_batch_stats"][0] <= 1e-5, r
  # sync_bn: the single-device step on the whole batch.
  for block in ("relu", "leaky_bn"):
    assert r[f"b_{block}_replicas_identical"]
    assert r[f"b_{block}_state"][0] <= 1e-5, r
    assert r[f"b_{block}_metrics"] <= 1e-5, r
    assert r[f"b_{block}_adam"][0] <= 2e-5, r  # Adam's nu is g^2: twice the gradient's error
  # The trainer's step: noise fold_in(fold_in(rng, step), device), the streamed uint8 batch.
  assert r["c_equal"]
  # The device-resident input: each device its own shard's batch, as the streaming input feeds it.
  assert r["d_equal"]


def _train(workdir, *overrides):
  config = cli._load_config(TINY, list(overrides))  # pylint: disable=protected-access
  return trainer.train_and_evaluate(config, str(workdir), progress=False)


@pytest.mark.parametrize("resumed_pipeline", ["device", "streaming"])
def test_resume_is_bit_identical(tmp_path, resumed_pipeline):
  whole = _train(tmp_path / "whole", "--config.train.num_steps=8", "--config.data.pipeline=device")
  # Half, stop, resume: with the streaming input on the second leg's both halves, which must
  # read the very batches the device-resident input gathered.
  half = _train(tmp_path / "half", "--config.train.num_steps=4",
                f"--config.data.pipeline={resumed_pipeline}")
  assert int(half.step) == 4
  # As a run killed after its step-4 checkpoint would have left it: on the device input, the
  # lines the uninterrupted run logged past step 4, which the resumed run logs again (their file
  # aside goes); on the other, a line of other numbers and half a line, which stay aside.
  whole_lines = (tmp_path / "whole" / trainer.METRICS_FILE).read_bytes().splitlines(True)
  past = (b"".join(whole_lines[2:]) if resumed_pipeline == "device"
          else (json.dumps({"step": 6, "Loss_D": 123.0}) + '\n{"step": 8, "Los').encode())
  with open(tmp_path / "half" / trainer.METRICS_FILE, "ab") as f:
    f.write(past)
  resumed = _train(tmp_path / "half", "--config.train.num_steps=8",
                   f"--config.data.pipeline={resumed_pipeline}")
  assert int(resumed.step) == 8
  assert _leaves_equal(whole, resumed)
  # Logged once a step, as the uninterrupted run logged them; TensorBoard told to drop what
  # the interrupted run wrote after its checkpoint (tensorboardX's purge_step).
  strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows]
  logged = lambda run: [json.loads(l) for l in open(tmp_path / run / trainer.METRICS_FILE)]
  assert [r["step"] for r in logged("half")] == [2, 4, 6, 8]
  assert strip(logged("half")) == strip(logged("whole"))
  assert 5 in _purge_steps(tmp_path / "half") and 1 in _purge_steps(tmp_path / "whole")
  aside = tmp_path / "half" / f"{trainer.METRICS_FILE}.dropped-1"
  if resumed_pipeline == "device":
    assert not aside.exists()
  else:
    assert aside.read_bytes() == past
  restored, _ = checkpoint.restore(str(tmp_path / "half"))
  assert _leaves_equal(restored, resumed)
  assert checkpoint.all_steps(str(tmp_path / "half")) == [4, 8]
  assert not _leaves_equal(half.g.params, resumed.g.params)  # it did train on


def _events(workdir):
  """Every TensorBoard event the run's event files hold (TFRecord framing: length, crc,
  payload, crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  folder = os.path.join(workdir, trainer.TENSORBOARD_DIR)
  for name in sorted(os.listdir(folder)):
    if not name.startswith("events.out.tfevents"):
      continue
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      n = int.from_bytes(data[pos:pos + 8], "little")
      yield event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4


def _purge_steps(workdir):
  """The steps from which TensorBoard hides earlier runs' events (a session-start event)."""
  return [e.step for e in _events(workdir) if e.HasField("session_log")]


def test_grids_and_checkpoints_are_written_beside_the_running_loop(tmp_path, monkeypatch):
  """The step-2 grid and checkpoint are held on the output thread until the loop has logged
  step 6: a loop that waited for them would never get there (each would time out). The step-2
  checkpoint, taken from a device copy while steps 3-8 donated the state, is step 2's state.
  Nor does the loop wait for the compiler: the step and the sampler are compiled before it."""
  reached, logged, held = threading.Event(), [], []
  compiled = []  # jax's compilation events, and where the loop began

  class MarkedWriter(trainer.background.BackgroundWriter):
    def __init__(self, *args, **kwargs):
      compiled.append("the loop begins")
      super().__init__(*args, **kwargs)

  monkeypatch.setattr(trainer.background, "BackgroundWriter", MarkedWriter)
  listener = lambda event, secs, **kw: compiled.append(event) if "compile" in event else None
  console_line = trainer.console_line

  def counting_console_line(*args):
    logged.append(args)
    if len(logged) >= 3:  # steps 2, 4 and 6
      reached.set()
    return console_line(*args)

  def held_at_step_2(write, step_of):
    def job(*args):
      if step_of(*args) == 2:
        held.append(reached.wait(timeout=30))
      return write(*args)
    return job

  monkeypatch.setattr(trainer, "console_line", counting_console_line)
  monkeypatch.setattr(trainer, "_write_grid", held_at_step_2(trainer._write_grid,  # pylint: disable=protected-access
                                                             lambda log, step, samples: step))
  monkeypatch.setattr(checkpoint, "save_async", held_at_step_2(
      checkpoint.save_async, lambda mngr, state, config: int(np.asarray(state.step))))
  run = tmp_path / "run"
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    final = _train(run, "--config.train.num_steps=8", "--config.train.sample_every=2",
                   "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=10")
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  begins = compiled.index("the loop begins")
  assert any("backend_compile" in e for e in compiled[:begins]), compiled[:begins]
  assert compiled[begins + 1:] == []
  assert held == [True, True]  # the grid's job, then the checkpoint's
  assert checkpoint.all_steps(str(run)) == [2, 4, 6, 8]
  assert sorted(os.listdir(run / trainer.SAMPLES_DIR)) == [
      f"fixed_noise_{s:08d}.png" for s in (2, 4, 6, 8)]
  two = _train(tmp_path / "two", "--config.train.num_steps=2")
  assert _leaves_equal(checkpoint.restore(str(run), step=2)[0], two)
  assert _leaves_equal(checkpoint.restore(str(run), step=8)[0], final)


def test_sigterm_saves_and_the_run_completes(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "cspgan_jax.cli", "train", "--config", TINY, "--workdir",
         str(workdir), "--no-progress", "--config.train.num_steps=100000",
         "--config.train.log_every=1", "--config.train.sample_every=100000",
         "--config.train.checkpoint_every=100000"]
  proc = subprocess.Popen(cmd, env=_env(1), stderr=subprocess.PIPE, text=True)
  # A run that hangs before it trains would hold the loop below (and CI) for good: killed
  # after 300 s, its stderr ends and the test fails with what it had said.
  watchdog = threading.Timer(300, proc.kill)
  watchdog.start()
  try:
    said = []
    for line in proc.stderr:  # wait until it trains
      said.append(line)
      if "][3/32]" in line:
        break
    assert said and "][3/32]" in said[-1], "".join(said)[-2000:]
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, rest[-2000:]
  finally:
    watchdog.cancel()
    if proc.poll() is None:
      proc.kill()
  assert "signal 15: saved step" in rest
  stopped = checkpoint.latest_step(str(workdir))
  assert 3 <= stopped < 100000
  done = _train(workdir, f"--config.train.num_steps={stopped + 2}")
  assert int(done.step) == stopped + 2


def test_sigterm_while_the_last_checkpoint_is_written_waits_for_it(tmp_path):
  """A preemption notice as the run ends (the last save slowed, as on a network file system)."""
  workdir = tmp_path / "run"
  script = f"""
import os, signal, sys, time
from cspgan_jax import checkpoint, cli
real = checkpoint.save_async
def slow(mngr, state, config):
  if int(state.step) == 4:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1)
  return real(mngr, state, config)
checkpoint.save_async = slow
sys.exit(cli.main(["train", "--config", {TINY!r}, "--workdir", {str(workdir)!r}, "--no-progress",
                   "--config.train.num_steps=4"]))
"""
  proc = subprocess.run([sys.executable, "-c", script], env=_env(1), stderr=subprocess.PIPE,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert checkpoint.all_steps(str(workdir)) == [4]


def test_ctrl_c_outside_the_loop_is_one_line(tmp_path, capsys, monkeypatch):
  """Before the loop's handler is in place (compiling) or a second Ctrl-C in a save."""
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(trainer, "train_and_evaluate", interrupted)
  assert cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / "w")]) == 130
  assert capsys.readouterr().err.strip().splitlines() == ["cspgan: train interrupted"]


def _ephemeral_ports():
  """The ports the kernel hands out to connections and to binds to port 0."""
  try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
      low, high = (int(n) for n in f.read().split())
    return range(low, high + 1)
  except (OSError, ValueError):
    return range(32768, 65536)  # Linux's default start; without /proc, none above trusted


def _ports_not_handed_out():
  """From 10000 up, the ports below and above the ephemeral range, each side that holds 1000."""
  handed = _ephemeral_ports()
  sides = (range(10000, handed.start), range(handed.stop, 65536))
  return [port for side in sides if len(side) >= 1000 for port in side]


_PORTS_GIVEN = set()


def _free_port():
  """A free port for a test's coordinator, outside the kernel's ephemeral ports, never the same
  twice in a worker."""
  # One bound to port 0 and let go (as this took before) could be handed to another process's
  # connection, or to gloo's listeners (they bind port 0), in the seconds before the
  # coordinator binds it; none outside is handed out. Random: another worker or session draws
  # too. A range that starts low (1024) still leaves those above its end (60999 by default).
  draw, ports = random.SystemRandom(), _ports_not_handed_out()
  for _ in range(100 if ports else 0):
    port = draw.choice(ports)
    if port in _PORTS_GIVEN:
      continue
    if parallel._port_taken(port) is None:  # pylint: disable=protected-access
      _PORTS_GIVEN.add(port)
      return port
  with socket.socket() as s:  # a system that hands out (nearly) every port
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_coordinator_ports_are_none_the_kernel_hands_out():
  if not _ports_not_handed_out():
    pytest.skip("this system hands out (nearly) every port")
  ports = [_free_port() for _ in range(20)]
  assert len(set(ports)) == 20 and not set(ports) & set(_ephemeral_ports()), ports


def test_a_range_that_starts_low_leaves_the_ports_above_it(monkeypatch):
  """Where the kernel hands out 1024 to 60999, those above, not one bound to port 0."""
  monkeypatch.setattr(sys.modules[__name__], "_ephemeral_ports", lambda: range(1024, 61000))
  ports = [_free_port() for _ in range(5)]
  assert min(ports) >= 61000, ports


def test_two_processes_train_like_one(tmp_path):
  common = ["--config.train.batch_size=8", "--config.train.num_steps=6"]
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(SCRIPTS, "train_process.py"), TINY, str(tmp_path / "multi"),
       str(tmp_path / f"p{i}.npz"), *common, f"--config.dist.coordinator_address=localhost:{port}",
       "--config.dist.num_processes=2", f"--config.dist.process_id={i}"],
      env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
  single = subprocess.run(
      [sys.executable, os.path.join(SCRIPTS, "train_process.py"), TINY, str(tmp_path / "single"),
       str(tmp_path / "single.npz"), *common], env=_env(4), capture_output=True, text=True,
      timeout=600)
  assert single.returncode == 0, single.stderr[-2000:]
  p0, p1, one = (np.load(tmp_path / f"{n}.npz") for n in ("p0", "p1", "single"))
  assert (int(p0["process_count"]), int(p1["process_index"]), int(p0["device_count"])) == (2, 1, 4)
  keys = [k for k in p0.files if "/" in k]
  assert len(keys) > 10
  for k in keys:
    np.testing.assert_array_equal(p0[k], p1[k])  # the processes never drift apart
    # Same global batches and noise as one process on 4 devices; only the order of the
    # cross-process all-reduce (gloo) differs from the in-process one.
    np.testing.assert_allclose(p0[k], one[k], rtol=1e-5, atol=1e-7)
  # Only process 0 wrote logs; the checkpoint (written by both, as orbax does) restores.
  assert checkpoint.latest_step(str(tmp_path / "multi")) == 6
  state, _ = checkpoint.restore(str(tmp_path / "multi"))
  np.testing.assert_array_equal(np.asarray(state.d.params["main_0"]["kernel"]), p0["d/main_0/kernel"])
  assert len(open(tmp_path / "multi" / trainer.METRICS_FILE).read().splitlines()) == 3


def _srun_task(index, tasks, port, nodelist="localhost"):
  """The variables srun gives task `index` of a step of `tasks` on one node."""
  return dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST=nodelist, SLURM_STEP_NUM_TASKS=str(tasks),
              SLURM_NTASKS=str(tasks), SLURM_PROCID=str(index), SLURM_LOCALID=str(index),
              JAX_COORDINATOR_PORT=str(port))


def test_two_processes_of_two_cpu_devices_run_a_hundred_steps_without_a_sync(tmp_path):
  # Nothing logged, drawn or saved before the end, so only the per-step wait keeps two steps'
  # gloo collectives from being in flight together: without it, this deadlocked in each of 4
  # runs (killed after 100-240 s; it takes about 20 s). Started as srun starts two tasks, with
  # dist.cluster=slurm, the only way here to run that path.
  port = _free_port()
  every = "--config.train.{}=100"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "cspgan_jax.cli", "train", "--config", TINY, "--workdir",
       str(tmp_path / "run"), "--no-progress", "--config.train.num_steps=100",
       *(every.format(f) for f in ("log_every", "sample_every", "checkpoint_every")),
       "--config.dist.cluster=slurm"],
      env=dict(_env(2), **_srun_task(i, 2, port)), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()  # a deadlocked process ignores SIGTERM (it waits in the collective)
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
  assert checkpoint.latest_step(str(tmp_path / "run")) == 100
  assert checkpoint.read_layout(str(tmp_path / "run"), 100) == {"devices": 4, "processes": 2}


def test_one_process_of_two_cpu_devices_runs_three_hundred_steps_without_a_sync(tmp_path):
  # XLA:CPU's in-process collectives abort ("Termination timeout for all reduce") with two
  # steps in flight: without the per-step wait this ended in SIGABRT in 2 of 2 runs alone and
  # 3 of 3 beside two others (about 9 s with it).
  every = "--config.train.{}=300"
  proc = subprocess.run(
      [sys.executable, "-m", "cspgan_jax.cli", "train", "--config", TINY, "--workdir",
       str(tmp_path / "run"), "--no-progress", "--config.train.num_steps=300",
       *(every.format(f) for f in ("log_every", "sample_every", "checkpoint_every"))],
      env=_env(2), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert checkpoint.read_layout(str(tmp_path / "run"), 300) == {"devices": 2, "processes": 1}


def test_a_task_of_an_srun_step_that_trains_alone_says_how_to_join(tmp_path, capsys, monkeypatch):
  for name, value in _srun_task(1, 2, "").items():
    monkeypatch.setenv(name, value)
  def refused(*_):  # as another task's run, holding the workdir, refuses this one
    raise trainer.CspganError("in use")
  monkeypatch.setattr(trainer, "process_claim", refused)
  assert cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / "w")]) == 2
  assert capsys.readouterr().err.splitlines() == [
      "[train] note: task 1 of the 2 of this srun step trains as a run of its own: "
      "--config.dist.cluster=slurm makes the tasks one run", "cspgan: error: in use"]
  config = config_lib.load_config(TINY, ["dist.cluster=slurm"])
  assert parallel.lone_launched_task(config) is None  # joined
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
  assert parallel.lone_launched_task(config_lib.load_config(TINY, [])) is None


@pytest.mark.parametrize("nodelist, job, port, address", [
    ("localhost", "4242", None, "localhost:61586"),  # 4242 % 4096 + 61440
    ("gpu[007-010,012],cpu1", "9000", "1234", "gpu007:1234"),
    ("n7,n8", "12", None, "n7:61452"),
])
def test_dist_settings_of_an_srun_task_are_jaxs(monkeypatch, nodelist, job, port, address):
  """dist.cluster=slurm fills what the config and JAX_* leave unset as jax's own SLURM
  detection would, which then restricts the task to its SLURM_LOCALID's GPU."""
  from jax._src import clusters  # pylint: disable=import-outside-toplevel
  task = dict(_srun_task(1, 3, port or ""), SLURM_JOB_ID=job, SLURM_STEP_NODELIST=nodelist)
  for name, value in task.items():
    monkeypatch.setenv(name, value)
  config = config_lib.load_config(TINY, ["dist.cluster=slurm"])
  assert parallel.dist_settings(config) == (address, 3, 1)
  assert clusters.SlurmCluster.is_env_present()
  assert (clusters.SlurmCluster.get_coordinator_address(None, port), clusters.SlurmCluster.
          get_process_count(), clusters.SlurmCluster.get_process_id()) == (address, 3, 1)
  # what the config, then JAX_*, set wins; a process id of 0 is set
  monkeypatch.setenv("JAX_NUM_PROCESSES", "5")
  config = config_lib.load_config(TINY, ["dist.cluster=slurm", "dist.process_id=0"])
  assert parallel.dist_settings(config) == (address, 5, 0)
  assert parallel.dist_settings(config_lib.load_config(TINY, [])) == ("", 5, -1)


@pytest.mark.parametrize("chosen", ["", "mpi"])
def test_joining_keeps_a_users_choice_of_cpu_collectives(monkeypatch, chosen):
  """gloo, unless JAX_CPU_COLLECTIVES_IMPLEMENTATION names another (it was forced to gloo)."""
  updates, joined = [], []
  monkeypatch.setenv("JAX_CPU_COLLECTIVES_IMPLEMENTATION", chosen)
  monkeypatch.setattr(jax.config, "update", lambda *a: updates.append(a))
  monkeypatch.setattr(jax.distributed, "initialize", lambda **k: joined.append(k))
  plan = parallel.DistributedPlan("localhost:1", "localhost", 1, 2, 0, 5.0)
  parallel.initialize_distributed(plan)
  assert updates == ([] if chosen else [("jax_cpu_collectives_implementation", "gloo")])
  assert [k["process_id"] for k in joined] == [0]


def _mpirun_rank(index, size, uri):
  return {"OMPI_MCA_orte_hnp_uri": uri, "OMPI_COMM_WORLD_SIZE": str(size),
          "OMPI_COMM_WORLD_RANK": str(index), "OMPI_COMM_WORLD_LOCAL_RANK": str(index)}


@pytest.mark.parametrize("uri, port, address", [
    ("1531576320.0;tcp://10.96.0.1,10.148.0.1,10.108.0.1:34911", None, "10.96.0.1:62624"),
    ("1531576320.0;tcp://10.96.0.1:34911", "1234", "10.96.0.1:1234"),
    ("1314521088.0;tcp6://[fe80::b9b:ac5d:9cf0:b858,2620:10d:c083:150e::3000:2]:43370", None,
     "[fe80::b9b:ac5d:9cf0:b858]:62880"),
])
def test_dist_settings_of_an_mpirun_rank_are_jaxs(monkeypatch, uri, port, address):
  """dist.cluster=openmpi fills what the config and JAX_* leave unset as jax's own Open MPI
  detection would (an IPv6 host bracketed, which jax leaves bare)."""
  from jax._src.clusters import ompi_cluster  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
  for name, value in dict(_mpirun_rank(2, 3, uri), **(
      {"JAX_COORDINATOR_PORT": port} if port else {})).items():
    monkeypatch.setenv(name, value)
  config = config_lib.load_config(TINY, ["dist.cluster=openmpi"])
  assert parallel.dist_settings(config) == (address, 3, 2)
  jaxs = ompi_cluster.OmpiCluster
  assert jaxs.is_env_present()
  host, _, jax_port = jaxs.get_coordinator_address(None, port).rpartition(":")
  assert (f"[{host}]" if ":" in host else host, int(jax_port), jaxs.get_process_count(),
          jaxs.get_process_id()) == (address.rpartition(":")[0], int(address.rpartition(":")[2]),
                                     3, 2)
  config = config_lib.load_config(TINY, ["dist.cluster=openmpi", "dist.process_id=0"])
  assert parallel.dist_settings(config) == (address, 3, 0)
  monkeypatch.setenv("JAX_COORDINATOR_PORT", "0")  # not blamed on dist.coordinator_address
  with pytest.raises(config_lib.ConfigError, match="^JAX_COORDINATOR_PORT must be a port, 1 to "
                     "65535, got 0$"):
    parallel.distributed_plan(config)
  monkeypatch.delenv("JAX_COORDINATOR_PORT")
  monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "12.0;ipc://x")
  with pytest.raises(config_lib.ConfigError, match="names no TCP address: '12.0;ipc://x'"):
    parallel.dist_settings(config)
  # without dist.cluster, a rank of several says how to join the others
  assert parallel.lone_launched_task(config_lib.load_config(TINY, [])) == (
      "task 2 of the 3 of this mpirun trains as a run of its own: --config.dist.cluster=openmpi "
      "makes the tasks one run")
  assert parallel.lone_launched_task(config) is None


def test_a_lone_rank_of_open_mpi_5_is_not_sent_to_dist_cluster_openmpi():
  """Open MPI 5's mpirun sets no OMPI_MCA_orte_hnp_uri, so dist.cluster=openmpi refuses its
  ranks: the note names the settings that join them instead (it named openmpi)."""
  ranks = {k: v for k, v in _mpirun_rank(1, 2, "").items() if k != "OMPI_MCA_orte_hnp_uri"}
  with pytest.raises(config_lib.ConfigError, match="OMPI_MCA_orte_hnp_uri unset"):
    parallel.dist_settings(config_lib.load_config(TINY, ["dist.cluster=openmpi"]), ranks)
  assert parallel.lone_launched_task(config_lib.load_config(TINY, []), ranks) == (
      "task 1 of the 2 of this mpirun trains as a run of its own: dist.coordinator_address, "
      "num_processes and process_id (its OMPI_COMM_WORLD_RANK) make the tasks one run; "
      "dist.cluster=openmpi reads Open MPI 4's mpirun only")


def test_resuming_on_another_number_of_devices_is_said(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  first = subprocess.run([sys.executable, "-m", "cspgan_jax.cli", "train", "--config", TINY,
                          "--workdir", workdir, "--no-progress", "--config.train.num_steps=4"],
                         env=_env(2), capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-2000:]
  assert checkpoint.read_layout(workdir, 4) == {"devices": 2, "processes": 1}
  assert cli.main(["train", "--config", TINY, "--workdir", workdir, "--no-progress",
                   "--config.train.num_steps=6",
                   "--config.train.batch_size=16"]) == 0  # this process: one device
  err = capsys.readouterr().err
  assert ("[train] note: the checkpoint was written on 2 devices, this run has 1: the rest of "
          "this epoch may repeat or skip images") in err
  assert ("[train] note: the checkpoint's run trained at batch size 8, this run at 16: its 4 "
          "steps are counted as steps of 16 images, so the epoch and the position in it change"
          ) in err
  assert checkpoint.read_layout(workdir, 6) == {"devices": 1, "processes": 1}
  # the grids of every sample_every (4) steps and of the last step, though not a multiple of it
  assert sorted(os.listdir(os.path.join(workdir, trainer.SAMPLES_DIR))) == [
      "fixed_noise_00000004.png", "fixed_noise_00000006.png"]


def _two_cli_processes(workdir, extra=((), ()), env=({}, {})):
  """Both processes' exit codes and `cspgan:` lines (one CPU device each)."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "cspgan_jax.cli", "train", "--config", TINY, "--workdir",
       str(workdir), "--no-progress", f"--config.dist.coordinator_address=localhost:{port}",
       "--config.dist.num_processes=2", f"--config.dist.process_id={i}", *extra[i]],
      env=dict(_env(1), **env[i]), stderr=subprocess.PIPE, text=True) for i in range(2)]
  errs = [p.communicate(timeout=300)[1] for p in procs]
  return ([p.returncode for p in procs],
          [[l for l in e.splitlines() if l.startswith("cspgan:")] for e in errs])


def test_processes_that_cannot_train_together_say_so_alike(tmp_path):
  """Different configs, or a workdir process 0 may not lock: one line on every process, where
  it was a traceback on one and a hang or an abort on the other."""
  codes, lines = _two_cli_processes(tmp_path / "a", ((), ("--config.train.lr_d=1e-4",)))
  assert codes == [2, 2], lines
  assert lines == [["cspgan: error: the processes were started with different configs (files "
                    "or --config overrides; dist.* aside): start every process with the same "
                    "ones"]] * 2
  # jax takes process 0's count and joined them: process 1 believed in 3, unsaid
  codes, lines = _two_cli_processes(tmp_path / "n", ((), ("--config.dist.num_processes=3",)))
  assert codes == [2, 2], lines
  assert lines == [["cspgan: error: the processes were given different dist.num_processes "
                    "(process 0: 2, process 1: 3): give each the same"]] * 2
  (tmp_path / "b").mkdir()
  with trainer.workdir_lock(str(tmp_path / "b")) as refusal:  # another run holds it
    assert refusal is None
    codes, lines = _two_cli_processes(tmp_path / "b")
  assert codes == [2, 2], lines
  assert lines[0][0].startswith(f"cspgan: error: workdir {tmp_path / 'b'} is in use by another")
  assert lines[1] == [f"cspgan: error: workdir {tmp_path / 'b'} is in use by another `cspgan "
                      "train` (process 0 was refused its lock)"]
  assert not (tmp_path / "b" / "checkpoints").exists()
  # The same config, but one host lacks the data (TFDS_DATA_DIR differs): its own reason, and
  # the other process told, where it used to wait for the first's collective until jax's
  # heartbeat timed out.
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from cspgan_jax import prepare_data  # pylint: disable=import-outside-toplevel
  (tmp_path / "images").mkdir()
  for i in range(8):
    Image.fromarray(np.full((40, 36, 3), 30 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
  prepare_data.prepare(str(tmp_path / "images"), str(tmp_path / "tfds"), resolution=32, workers=1)
  tfds_run = ("--config.data.source=tfds", "--config.data.name=celeba", "--config.data.num_examples=0")
  codes, lines = _two_cli_processes(
      tmp_path / "c", (tfds_run, tfds_run),
      ({"TFDS_DATA_DIR": str(tmp_path / "tfds")}, {"TFDS_DATA_DIR": str(tmp_path / "none")}))
  assert codes == [2, 2], lines
  assert lines[0] == ["cspgan: error: another process of the run could not load its data (its "
                      "own error line says why)"]
  assert lines[1][0].startswith(f"cspgan: error: data_dir not found: {tmp_path / 'none'}")


def _train_as_process(workdir, port, num_processes, process_id, timeout=2, extra=()):
  """A `cspgan train` process of a multi-host run: its exit code and stderr lines."""
  proc = subprocess.run(
      [sys.executable, "-m", "cspgan_jax.cli", "train", "--config", TINY, "--workdir",
       str(workdir), "--no-progress", f"--config.dist.coordinator_address=localhost:{port}",
       f"--config.dist.num_processes={num_processes}", f"--config.dist.process_id={process_id}",
       f"--config.dist.initialization_timeout={timeout}", *extra],
      env=_env(1), capture_output=True, text=True, timeout=120)
  return proc.returncode, proc.stderr.strip().splitlines()


def test_a_process_that_cannot_join_the_others_says_why_in_one_line(tmp_path):
  """Where jax aborted after 5 minutes blaming "another task" (coordinator unreachable, a
  process missing) or crashed (process 0's port taken)."""
  workdir = tmp_path / "run"
  port = _free_port()
  assert _train_as_process(workdir, port, 2, 1) == (2, [
      f"cspgan: error: process 1 cannot reach the coordinator at localhost:{port} (Connection "
      "refused) within 2 s: start process 0 there, or correct dist.coordinator_address"])
  assert _train_as_process(workdir, port, 3, 0) == (2, [
      f"cspgan: error: process 0 runs the coordinator at localhost:{port}, and not all of the 3 "
      "processes joined it within 2 s: start the others with this address and dist.process_id "
      "1 to 2"])
  with socket.socket() as taken:
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the last run's connections
    taken.bind(("127.0.0.1", port))
    taken.listen()
    assert _train_as_process(workdir, port, 1, 0) == (2, [
        f"cspgan: error: process 0 cannot run the coordinator on port {port} of this machine "
        "(Address already in use): free it, or choose another dist.coordinator_address port"])
    # Something answers there (here, not jax's coordinator: nothing joins), and that is said
    code, lines = _train_as_process(workdir, port, 2, 1)
    assert (code, lines) == (2, [
        f"cspgan: error: process 1 reached the coordinator at localhost:{port}, but not all of "
        "the 2 processes joined it within 2 s: start each with its own dist.process_id and "
        "process 0's dist.num_processes"])
  # Joined (a run of one), then stopped by a setting checked only once jax runs
  assert _train_as_process(workdir, _free_port(), 1, 0,
                           extra=["--config.train.xla_options=xla_no_such_option=1"]) == (2, [
      "cspgan: error: train.xla_options: INVALID_ARGUMENT: No such compile option: "
      "'xla_no_such_option'"])
  assert not workdir.exists()  # made before the join for its lock, and taken away


def test_a_second_process_given_a_taken_process_id_stops_alone(tmp_path):
  """jax's coordinator ended every process of the run, with an abort, when a second process
  registered under a taken id. The second one now stops before it joins, with one line."""
  workdir, port = tmp_path / "run", _free_port()

  def process(process_id, timeout):
    return subprocess.Popen(
        [sys.executable, "-m", "cspgan_jax.cli", "train", "--config", TINY, "--workdir",
         str(workdir), "--no-progress", "--config.train.num_steps=2",
         f"--config.dist.coordinator_address=localhost:{port}", "--config.dist.num_processes=2",
         f"--config.dist.process_id={process_id}",
         f"--config.dist.initialization_timeout={timeout}"],
        env=_env(1), stderr=subprocess.PIPE, text=True)

  first = process(1, 120)  # waits for process 0, its id's lock held
  lock = workdir / trainer.PROCESS_LOCK_FILE.format(1)
  deadline = time.monotonic() + 60
  while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
    time.sleep(0.1)
  holder = lock.read_text()
  assert holder == f"{first.pid} on {socket.gethostname()}"
  second = process(1, 2)  # were it to join, it would wait for process 0 and say so after 2 s
  err = second.communicate(timeout=120)[1]
  assert (second.returncode, [l for l in err.splitlines() if l.startswith("cspgan")]) == (2, [
      f"cspgan: error: dist.process_id 1 is in use on workdir {workdir}: a process of a run "
      f"there holds its lock (pid {holder}); give each process its own dist.process_id (a "
      "second one would have ended that run), or use another --workdir"])
  zero = process(0, 120)  # the run the second process would have ended trains to its end
  errs = [p.communicate(timeout=300)[1] for p in (zero, first)]
  assert [zero.returncode, first.returncode] == [0, 0], "\n".join(e[-2000:] for e in errs)
  assert checkpoint.latest_step(str(workdir)) == 2
  assert lock.read_text() == ""  # released: the id is free for the next run


_PROCESS_1_OF_2 = ("--config.dist.coordinator_address=localhost:1", "--config.dist.num_processes=2",
                   "--config.dist.process_id=1")


@pytest.mark.parametrize("args, message", [
    ((*_PROCESS_1_OF_2, "--config.dist.coordinator_address=localhost"),
     "dist.coordinator_address must be HOST:PORT, got 'localhost'"),
    ((*_PROCESS_1_OF_2, "--config.dist.initialization_timeout=0"),
     "dist.initialization_timeout must be >= 1 second, got 0"),
    # It trained alone, as one process of one, and said nothing
    (("--config.dist.num_processes=2",), "a run of 2 processes (dist.num_processes or "
     "JAX_NUM_PROCESSES) needs dist.coordinator_address (or JAX_COORDINATOR_ADDRESS): process "
     "0's HOST:PORT"),
    (("--config.dist.cluster=slurm",), "dist.cluster is slurm, but SLURM_JOB_ID, "
     "SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_STEP_NUM_TASKS unset: start each process with "
     "srun, or give dist.coordinator_address, num_processes and process_id"),
    (("--config.dist.cluster=pbs",),
     "dist.cluster must be one of ('', 'slurm', 'openmpi'), got 'pbs'"),
    (("--config.dist.cluster=openmpi",), "dist.cluster is openmpi, but OMPI_MCA_orte_hnp_uri, "
     "OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_RANK unset: start each process with Open MPI 4's "
     "mpirun, or give dist.coordinator_address, num_processes and process_id"),
])
def test_bad_multi_host_settings_are_one_line(tmp_path, capsys, monkeypatch, args, message):
  for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
               "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE",
               "OMPI_COMM_WORLD_RANK"):
    monkeypatch.delenv(name, raising=False)
  assert cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / "w"), *args]) == 2
  assert capsys.readouterr().err.strip().splitlines() == [f"cspgan: error: {message}"]
  assert not (tmp_path / "w").exists()


def test_train_command_leaves_samples_events_checkpoints_and_info(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  assert cli.main(["train", "--config", TINY, "--workdir", workdir]) == 0
  err = capsys.readouterr().err
  assert "[0/1][8/32]\tLoss_D:" in err and "Loss_G:" in err
  assert "8/8" in err and " steps" in err  # the progress bar
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
      "fixed_noise_00000004.png", "fixed_noise_00000008.png"]
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert len(events) == 1 and events[0].startswith("events.out.tfevents")
  tags = {v.tag for event in _events(workdir) for v in event.summary.value}
  assert {"iter/Loss_D", "iter/Loss_G", "iter/D_x", "iter/D_G_z1", "iter/D_G_z2",
          "perf/images_per_sec", "samples/fixed_noise", "samples/tile_spread"} <= tags
  spreads = {e.step: v.simple_value for e in _events(workdir) for v in e.summary.value
             if v.tag == "samples/tile_spread"}
  assert sorted(spreads) == [4, 8] and all(0 < v <= 1.2 for v in spreads.values()), spreads
  assert checkpoint.all_steps(workdir) == [4, 8]
  metrics = [json.loads(l) for l in open(os.path.join(workdir, trainer.METRICS_FILE))]
  assert [m["step"] for m in metrics] == [2, 4, 6, 8] and all(np.isfinite(m["Loss_D"]) for m in metrics)
  with open(os.path.join(workdir, trainer.METRICS_FILE), "a") as f:
    f.write('{"step": 10, "Loss_D": 0.')  # what a run killed while writing a line leaves
  assert cli.main(["info", workdir]) == 0
  out = capsys.readouterr().out
  assert "checkpoint step: 8 (all: 4, 8)" in out and "latest metrics (step 8)" in out
  assert f"Loss_D {metrics[-1]['Loss_D']:.4g}" in out and "resolution: 32" in out
  assert cli.main(["sample", "--workdir", workdir, "--out", str(tmp_path / "g.png"), "--n", "4"]) == 0


def test_out_of_device_memory_is_one_line_and_the_checkpoint_stays(tmp_path, capsys,
                                                                  monkeypatch):
  """A step that exhausts the device's memory (simulated: XLA's error from the third call) ends
  the run with one line saying what the step and the dataset take, and what to change."""
  workdir = str(tmp_path / "run")
  assert cli.main(["train", "--config", TINY, "--workdir", workdir, "--no-progress",
                   "--config.train.num_steps=4"]) == 0
  compile_training_step = parallel.compile_training_step

  class ExhaustedOnTheThirdCall:
    def __init__(self, compiled):
      self.compiled, self.calls = compiled, 0

    def __call__(self, *args):
      self.calls += 1
      if self.calls == 3:
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 bytes.")
      return self.compiled(*args)

    def __getattr__(self, name):
      return getattr(self.compiled, name)

  monkeypatch.setattr(parallel, "compile_training_step", lambda *a, **k: (
      lambda compiled, placed: (ExhaustedOnTheThirdCall(compiled), placed))(
          *compile_training_step(*a, **k)))
  capsys.readouterr()
  assert cli.main(["train", "--config", TINY, "--workdir", workdir, "--no-progress",
                   "--config.train.num_steps=8"]) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("cspgan:")]
  assert len(err) == 1, err
  assert err[0].startswith("cspgan: error: out of device memory (RESOURCE_EXHAUSTED: Out of "
                           "memory while trying to allocate 8589934592 bytes.): the step takes ")
  assert "GiB a device at train.batch_size=8 and the dataset 0.0 GiB" in err[0]
  assert err[0].endswith("lower train.batch_size, or set train.dtype=bfloat16 or "
                         "data.pipeline=streaming")
  assert checkpoint.latest_step(workdir) == 4  # the run's last checkpoint, untouched
  assert int(checkpoint.restore(workdir)[0].step) == 4

  # Before the loop too (here: compiling the step), with what is known then.
  def exhausted(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                     "allocate 4096 bytes.")

  monkeypatch.setattr(parallel, "compile_training_step", exhausted)
  assert cli.main(["train", "--config", TINY, "--workdir", workdir, "--no-progress",
                   "--config.train.num_steps=8"]) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("cspgan:")]
  assert err == ["cspgan: error: out of device memory compiling the step (RESOURCE_EXHAUSTED: "
                 "Out of memory while trying to allocate 4096 bytes.): lower train.batch_size "
                 "(now 8), or set train.dtype=bfloat16 or data.pipeline=streaming"], err
  assert checkpoint.latest_step(workdir) == 4


def test_out_of_memory_without_xlas_memory_analysis_is_still_one_line(tiny_config):
  """jax lets `memory_analysis()` return None: the line then leaves the step's size out (it
  was a TypeError in place of the line), and the other readers say there is none."""
  from cspgan_jax import gpu_compile  # pylint: disable=import-outside-toplevel

  class NoAnalysis:
    def memory_analysis(self):
      return None

  class Streamed:
    kind = "streaming"

  assert parallel.step_memory_bytes(NoAnalysis()) is None
  line = trainer._out_of_memory(  # pylint: disable=protected-access
      tiny_config(), NoAnalysis(), Streamed(), RuntimeError("RESOURCE_EXHAUSTED: out of memory"))
  assert line.startswith("out of device memory (RESOURCE_EXHAUSTED: out of memory): the step "
                         "takes an unknown amount (XLA gave no memory analysis) at "
                         "train.batch_size=8;")
  assert line.endswith("; lower train.batch_size, or set train.dtype=bfloat16")
  assert gpu_compile.memory_line(NoAnalysis()) == (
      "device memory: XLA gave no analysis of this program")


def test_a_diverged_run_stops_in_one_line_before_writing_anything_of_it(tmp_path, capsys):
  """Losses that turn NaN (here: G's Adam at lr 1e30 from step 4's checkpoint) end the run at the
  next step that would write something, before it is logged, drawn or saved: saving it with
  keep_checkpoints=1 would have deleted the last good checkpoint."""
  workdir = str(tmp_path / "run")
  assert cli.main(["train", "--config", TINY, "--workdir", workdir, "--no-progress",
                   "--config.train.num_steps=4"]) == 0
  capsys.readouterr()
  assert cli.main(["train", "--config", TINY, "--workdir", workdir, "--no-progress",
                   "--config.train.num_steps=12", "--config.train.lr_g=1e30",
                   "--config.train.log_every=1",
                   "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=1"]) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("cspgan:")]
  # Step 5 ran on step 4's finite parameters; its update made G's ~1e30, so G's images are
  # NaN at step 6 (D on the real batch is still finite).
  assert err == ["cspgan: error: training diverged: Loss_D=nan, Loss_G=nan, D_G_z1=nan, "
                 "D_G_z2=nan at step 6, somewhere after step 5, the last checked; "
                 "nothing after step 5 was logged or saved and the checkpoint at step 4 is the "
                 "latest (resumed, the run repeats these steps bit for bit: lower train.lr_d / "
                 "train.lr_g or change the config)"], err
  assert checkpoint.all_steps(workdir) == [4]
  restored, _ = checkpoint.restore(workdir)
  assert int(restored.step) == 4
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(restored))
  assert [r["step"] for r in trainer.logged_metrics(workdir)] == [2, 4, 5]
  assert sorted(os.listdir(os.path.join(workdir, trainer.SAMPLES_DIR))) == [
      "fixed_noise_00000004.png"]


def test_a_full_disk_under_the_logs_is_one_line(tmp_path, capsys, monkeypatch):
  """The disk fills while the output thread writes a grid (seen on a tmpfs): one line, exit 2."""
  from cspgan_jax import images  # pylint: disable=import-outside-toplevel

  def full(grid, path):
    raise OSError(28, "No space left on device")  # as a PNG chunk's write() raises it

  monkeypatch.setattr(images, "save_png", full)
  workdir = str(tmp_path / "run")
  assert cli.main(["train", "--config", TINY, "--workdir", workdir, "--no-progress"]) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("cspgan:")]
  assert err == [f"cspgan: error: No space left on device (in {workdir})"], err


@pytest.mark.parametrize("args, message", [
    (["--config.train.lr_g=-1e-4"], "train.lr_g must be positive"),
    (["--config.train.nonsense=1"], "unknown config field 'train.nonsense'"),
    (["--config.model.block=cspx"], "model.block must be one of"),
    (["--config.data.source=imagenet"], "data.source must be one of"),
    (["--config.train.profile_steps=-1"], "train.profile_steps and profile_start must be >= 0"),
    (["--config.train.xla_options=pdl=true"], "train.xla_options: 'pdl=true' is not of the form"),
    # an option XLA does not know: XLA's own message, one line, before any step or checkpoint
    (["--config.train.xla_options=xla_gpu_enable_pdll=true"],
     "train.xla_options: INVALID_ARGUMENT: No such compile option: 'xla_gpu_enable_pdll'"),
    (["--config.train.batch_size=6", "--config.data.num_examples=4"], "fewer than one batch"),
    (["--config.model.nc=1"], "model.nc must be 3 (the data are RGB images), got 1"),
    (["--config.model.resolution=48"], "model.resolution must be a power of two >= 32, got 48"),
    (["--config.train.seed=True"], "config field 'train.seed' is int, got 'True'"),
    # each of these ended in a traceback where first used (inf: a diverged run at step 2)
    (["--config.train.lr_g=1e400"], "train.lr_g must be positive and finite, got inf"),
    (["--config.train.adam_eps=-1e-8"], "train.adam_eps must be >= 0 and finite, got -1e-08"),
    (["--config.train.seed=99999999999999999999"],
     "train.seed, data.synthetic_seed and data.shuffle_seed must be in [0, 2**32), got "
     "99999999999999999999, 0 and 0"),
    (["--config.data.synthetic_seed=-1"], "must be in [0, 2**32), got 0, -1 and 0"),
    (["--config.train.steps_per_dispatch=0"], "train.steps_per_dispatch must be >= 1, got 0"),
    (["--config.train.epochs=40"], "train.epochs has no effect: tiny.py sets train.num_steps=8, "
                                   "which wins; add --config.train.num_steps=0"),
    # config files of the user's (below): a field of another type, a field missing
    (["@config.train.num_steps = None"], "config field train.num_steps must be int, got None"),
    (["@del config.train.seed"], "config lacks the field train.seed"),
    (["@config.train.seed = True"], "config field train.seed must be int, got True"),
    # a misspelt field, read by nothing: the baseline's value would have trained unsaid
    (["@config.train.lr_G = 1e-4"], "config field train.lr_G is not one that cspgan reads (a "
     "typo? a new field goes into configs/baseline.py and config_lib.FIELD_TYPES)"),
    (["@config.extra = 5"], "config has a group 'extra' that nothing reads (groups: model, "
     "train, data, dist)"),
])
def test_train_config_errors_are_one_line(tmp_path, capsys, args, message):
  config = TINY
  if args[0].startswith("@"):  # a variant config file with that line
    config = str(tmp_path / "variant.py")
    with open(config, "w") as f:
      f.write(f"import sys\nsys.path.insert(0, {REPO!r})\nfrom configs import tiny\n\n"
              f"def get_config():\n  config = tiny.get_config()\n  {args.pop(0)[1:]}\n"
              "  return config\n")
  assert cli.main(["train", "--config", config, "--workdir", str(tmp_path / "w"), *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("cspgan: error: ") and message in err[0], err
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_an_error_line_has_no_terminal_colour_codes():
  """torch's unpickler bolds the global it refuses: escape codes in a one-line error."""
  from cspgan_jax.errors import first_line  # pylint: disable=import-outside-toplevel
  error = RuntimeError("Unsupported global: GLOBAL \x1b[1mos.system\x1b[0m was not an allowed "
                       "global by default.\n\nCheck the documentation")
  assert first_line(error) == ("Unsupported global: GLOBAL os.system was not an allowed global "
                               "by default.")


def test_a_checkpoint_of_a_seed_now_refused_still_reads(tmp_path):
  """Seeds outside [0, 2**32) are refused in the configs a user gives; a checkpoint trained
  with one (-1 worked: jax's key of 2**32 - 1) stays readable for info, sample and convert."""
  from cspgan_jax import train  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config(TINY)
  config.train.seed = -1
  checkpoint.save(str(tmp_path), train.init_state(config, jax.random.PRNGKey(0)), config)
  assert checkpoint.read_config(str(tmp_path)).train.seed == -1
  with pytest.raises(config_lib.ConfigError, match=r"must be in \[0, 2\*\*32\), got -1, 0"):
    config_lib.check_seeds(config)


def test_a_frozen_config_takes_overrides(tmp_path):
  """A config file may return a FrozenConfigDict; the first override was a traceback."""
  (tmp_path / "frozen.py").write_text(
      f"import sys\nsys.path.insert(0, {REPO!r})\nimport ml_collections\n"
      "from configs import tiny\n\ndef get_config():\n"
      "  return ml_collections.FrozenConfigDict(tiny.get_config())\n")
  config = config_lib.load_config(str(tmp_path / "frozen.py"), ["--config.train.lr_g=0.5"])
  assert config.train.lr_g == 0.5 and config.to_dict() == config_lib.load_config(
      TINY, ["--config.train.lr_g=0.5"]).to_dict()


def test_a_workdir_in_use_is_refused_in_one_line(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with trainer.workdir_lock(str(workdir)) as refusal:  # another run, training there
    assert refusal is None
    assert cli.main(["train", "--config", TINY, "--workdir", str(workdir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cspgan: error: workdir {workdir} is in use by another `cspgan train` (pid "
                   f"{os.getpid()}, by its lock); wait for it to end, or use another --workdir"]
    assert not (workdir / "checkpoints").exists()
  assert cli.main(["train", "--config", TINY, "--workdir", str(workdir), "--no-progress",
                   "--config.train.num_steps=2"]) == 0  # free again once that run ended


def test_a_config_kept_outside_the_checkout_loads(tmp_path):
  """`from configs import baseline` in a researcher's own folder, with only the package
  importable (as an editable install provides it): it found no module `configs`."""
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "exp.py").write_text(  # README's example: an experiment, made tiny
      "from configs import exp2, tiny\n\ndef get_config():\n"
      "  return tiny.shrink(exp2.get_config())\n")
  (tmp_path / "site").mkdir()
  os.symlink(os.path.join(REPO, "cspgan_jax"), tmp_path / "site" / "cspgan_jax")
  script = ("import sys; from cspgan_jax import config_lib; "
            "print(config_lib.load_config(sys.argv[1]).to_json())")
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "mine" / "exp.py")],
                        env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")), cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  from configs import exp2, tiny  # pylint: disable=import-outside-toplevel
  expected = tiny.shrink(exp2.get_config())
  assert (expected.model.block, expected.model.resolution) == ("leaky_bn", 32)
  assert json.loads(proc.stdout) == json.loads(expected.to_json())


def test_overrides_take_the_fields_types():
  """An int for a float field is that float (`device_budget_gb=2`); a string field takes the
  text as written, even where it reads as a number (a dataset named `1`)."""
  config = config_lib.load_config(TINY, ["--config.data.device_budget_gb=2",
                                         "--config.model.bn_momentum=0", "--config.data.name=1"])
  assert (config.data.device_budget_gb, config.model.bn_momentum, config.data.name) == (
      2.0, 0.0, "1")
  assert isinstance(config.data.device_budget_gb, float)
  assert isinstance(config.model.bn_momentum, float)


def test_a_fresh_start_drops_the_metrics_a_run_killed_before_its_first_checkpoint_left(
    tmp_path, capsys):
  """Started at step 0 (no checkpoint), the run logs its steps again: rows of the killed run
  would appear twice. They are kept aside, until this run logs them again."""
  rows = (json.dumps({"step": 2, "Loss_D": 1.0}) + "\n" + json.dumps({"step": 4}) + "\n").encode()
  (tmp_path / trainer.METRICS_FILE).write_bytes(rows)
  trainer.RunLog(str(tmp_path), True, 0).close()
  assert trainer.logged_metrics(str(tmp_path)) == []
  aside = tmp_path / f"{trainer.METRICS_FILE}.dropped-1"
  assert aside.read_bytes() == rows
  assert capsys.readouterr().err.splitlines() == [
      f"[train] 2 line(s) of metrics.jsonl past step 0: kept in {aside} until this run logs "
      "those steps again with the same numbers"]


def test_a_second_run_in_the_same_second_keeps_the_first_runs_tensorboard_events(
    tmp_path, monkeypatch):
  """tensorboardX names its event file by the second and host and opens it with "wb": a run
  started in the second another's log was opened emptied that one's events."""
  from tensorboardX import event_file_writer  # pylint: disable=import-outside-toplevel
  clock = types.SimpleNamespace(time=lambda: 1_800_000_000.25)  # one second for both
  monkeypatch.setattr(event_file_writer, "time", clock)
  metrics = dict.fromkeys(trainer.METRIC_TAGS, 0.5)
  first = trainer.RunLog(str(tmp_path), True, 0)
  first.scalars(2, metrics, 100.0)
  first.close()
  folder = tmp_path / trainer.TENSORBOARD_DIR
  [name] = os.listdir(folder)
  written = (folder / name).read_bytes()
  assert len(written) > 200  # the file's header, a purge event and six scalars
  trainer.RunLog(str(tmp_path), True, 2).close()
  assert len(os.listdir(folder)) == 2
  assert (folder / name).read_bytes() == written


def test_metrics_lines_of_no_run_are_left_out_not_a_traceback(tmp_path, capsys):
  """`cspgan info` formatted every value as a number, and a resume decoded the file as UTF-8:
  a value edited to text or null, or bytes of no encoding, ended each in a traceback."""
  good = [{"step": 2, "Loss_D": 1.5}, {"step": 4, "Loss_D": 0.5, "images_per_sec": 10}]
  odd = b'{"step": 3, "Loss_D": "abc"}\n{"step": 3, "Loss_D": null}\n\xff\xfe\n'
  odd += b'{"step": 3, "Loss_D": true}\n'
  with open(tmp_path / trainer.METRICS_FILE, "wb") as f:
    f.write((json.dumps(good[0]) + "\n").encode())
    f.write(odd + (json.dumps(good[1]) + "\n").encode())
  assert trainer.logged_metrics(str(tmp_path)) == good
  trainer.RunLog(str(tmp_path), True, 3).close()  # resumed from step 3
  assert trainer.logged_metrics(str(tmp_path)) == good[:1]
  assert (tmp_path / trainer.METRICS_FILE).read_text() == json.dumps(good[0]) + "\n"
  # kept byte for byte, for good: no run logs those lines again
  aside = tmp_path / f"{trainer.METRICS_FILE}.dropped-1"
  assert aside.read_bytes() == odd + (json.dumps(good[1]) + "\n").encode()
  assert capsys.readouterr().err.splitlines() == [
      f"[train] 5 line(s) of metrics.jsonl past step 3 or not a run's record: kept in {aside}"]


def test_metrics_set_aside_take_a_new_name_and_keep_the_bytes(tmp_path):
  """Files of earlier set-asides (or the user's) are never overwritten, nor a metrics.jsonl.tmp
  (the rewrite's temporary name was that); odd line ends and an unended last line stay."""
  kept, past = b'{"step": 2}\r\n', b'{"step": 4}\r\nmy note\n{"step": 6, "Lo'
  (tmp_path / trainer.METRICS_FILE).write_bytes(kept + past)
  for name in ("dropped-1", "dropped-3", "dropped-x", "tmp"):
    (tmp_path / f"{trainer.METRICS_FILE}.{name}").write_text(name)
  aside, moved = trainer.set_aside_metrics_past(str(tmp_path), 2)
  assert aside == str(tmp_path / f"{trainer.METRICS_FILE}.dropped-4")
  assert moved == [{"step": 4}, None, None]
  assert (tmp_path / trainer.METRICS_FILE).read_bytes() == kept
  assert (tmp_path / f"{trainer.METRICS_FILE}.dropped-4").read_bytes() == past
  for name in ("dropped-1", "dropped-3", "dropped-x", "tmp"):
    assert (tmp_path / f"{trainer.METRICS_FILE}.{name}").read_text() == name
  assert len(os.listdir(tmp_path)) == 6
  assert trainer.set_aside_metrics_past(str(tmp_path), 2) == (None, [])  # nothing past: no file
  assert len(os.listdir(tmp_path)) == 6


def test_metrics_set_aside_on_a_full_disk_loses_no_line(tmp_path, monkeypatch):
  """The disk fills as the rewritten metrics.jsonl is written, after the lines set aside were:
  one line naming the file, metrics.jsonl as it was and nothing else left behind."""
  lines = b'{"step": 2}\n{"step": 4}\n'
  (tmp_path / trainer.METRICS_FILE).write_bytes(lines)
  calls, fsync = [], os.fsync

  def second_fills_the_disk(fd):
    calls.append(fd)
    if len(calls) == 2:
      raise OSError(28, "No space left on device")
    fsync(fd)

  monkeypatch.setattr(os, "fsync", second_fills_the_disk)
  with pytest.raises(trainer.CspganError) as e:
    trainer.RunLog(str(tmp_path), True, 2)
  assert str(e.value) == (f"cannot write {tmp_path / trainer.METRICS_FILE}: No space left on "
                          "device")
  assert os.listdir(tmp_path) == [trainer.METRICS_FILE]
  assert (tmp_path / trainer.METRICS_FILE).read_bytes() == lines


def _metrics(x):
  return {k: np.float32(x) for k in trainer.METRIC_TAGS}


def _row(step, x, rate):
  """metrics.jsonl's line of `_metrics(x)` at `step`."""
  return json.dumps(
      {"step": step, **{k: float(v) for k, v in _metrics(x).items()}, "images_per_sec": rate})


@pytest.mark.parametrize("same", [True, False])
def test_metrics_set_aside_go_once_logged_again_the_same(tmp_path, same):
  """A resume after a kill logs the steps past its checkpoint again with the same numbers
  (images_per_sec aside): their file aside goes then, and stays where any differs."""
  metrics, row = _metrics, _row
  past = f"{row(4, 0.1, 5.0)}\n{row(6, 0.3, 6.0)}\n".encode()
  (tmp_path / trainer.METRICS_FILE).write_bytes(f"{row(2, 0.7, 4.0)}\n".encode() + past)
  aside = tmp_path / f"{trainer.METRICS_FILE}.dropped-1"
  log = trainer.RunLog(str(tmp_path), True, 2)
  log.scalars(4, metrics(0.1), 50.0)
  assert aside.read_bytes() == past  # step 6 not logged yet
  log.scalars(6, metrics(0.3 if same else 0.30001), None)
  log.close()
  assert aside.exists() != same
  assert [r["step"] for r in trainer.logged_metrics(str(tmp_path))] == [2, 4, 6]


@pytest.mark.parametrize("last", [0.4, 0.40001])
def test_a_set_aside_a_second_kill_kept_goes_once_a_later_run_logs_it_again(tmp_path, last):
  """Killed again before it had logged the steps set aside, a run leaves their file: the next
  start takes it up, with its own, and each goes once metrics.jsonl holds all of its records
  with the same numbers. A file with a line of no run's record stays."""
  steps = {2: 0.1, 4: 0.2, 6: 0.3, 8: 0.4}
  (tmp_path / trainer.METRICS_FILE).write_text("".join(
      f"{_row(s, x, 1.0)}\n" for s, x in steps.items()))
  first = trainer.RunLog(str(tmp_path), True, 2)  # resumed from step 2: 4, 6 and 8 set aside
  first.scalars(4, _metrics(0.2), 2.0)
  first.scalars(6, _metrics(0.3), 2.0)
  first.close()  # killed; its checkpoint at step 4
  aside = [tmp_path / f"{trainer.METRICS_FILE}.dropped-{n}" for n in (1, 2, 3)]
  aside[2].write_text(f"{_row(4, 0.2, 1.0)}\nmy note\n")
  # 6 set aside again, beside 6 and 8, in dropped-4 (no name below the highest is reused)
  second = trainer.RunLog(str(tmp_path), True, 4)
  assert [p.exists() for p in aside] + [(tmp_path / "metrics.jsonl.dropped-4").exists()] == [
      True, False, True, True]
  second.scalars(6, _metrics(0.3), 3.0)
  assert [p.exists() for p in aside] + [(tmp_path / "metrics.jsonl.dropped-4").exists()] == [
      True, False, True, False]
  second.scalars(8, _metrics(last), 3.0)
  second.close()
  assert aside[0].exists() == (last != 0.4) and aside[2].exists()
  # a start whose metrics.jsonl holds every record of an earlier file already removes it
  if last == 0.4:
    aside[1].write_text(f"{_row(2, 0.1, 9.0)}\n{_row(8, 0.4, 9.0)}\n")
    trainer.RunLog(str(tmp_path), True, 8).close()
    assert not aside[1].exists() and aside[2].exists()


def test_field_types_are_the_baselines():
  """A field added to configs/baseline.py goes into config_lib.FIELD_TYPES too, and into
  checkpoint._LATER_FIELDS with what the code did before it (README, "Extending it")."""
  baseline = config_lib.load_config(os.path.join(REPO, "configs", "baseline.py"))
  fields = {f"{g}.{k}": type(v).__name__ for g in baseline for k, v in baseline[g].items()}
  declared = {f"{g}.{k}": t.__name__ for g, group in config_lib.FIELD_TYPES.items()
              for k, t in group.items()}
  assert fields == declared, (
      f"only in baseline.py: {sorted(set(fields.items()) - set(declared.items()))}; only in "
      f"FIELD_TYPES: {sorted(set(declared.items()) - set(fields.items()))}")


def test_unwritable_workdir_and_foreign_checkpoint_are_one_line(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  assert cli.main(["train", "--config", TINY, "--workdir", str(blocker / "run")]) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("cspgan: error: workdir ") and "is not writable" in err
  assert cli.main(["train", "--config", TINY, "--workdir", str(blocker)]) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err == f"cspgan: error: workdir {blocker} is a file, not a directory"
  assert blocker.read_text() == "not a folder"
  workdir = str(tmp_path / "run")
  assert cli.main(["train", "--config", TINY, "--workdir", workdir,
                   "--config.train.num_steps=2", "--no-progress"]) == 0
  before = checkpoint.all_steps(workdir)
  capsys.readouterr()
  assert cli.main(["train", "--config", TINY, "--workdir", workdir,
                   "--config.model.ngf=16", "--no-progress"]) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "different architecture: model.ngf: checkpoint 8, config 16" in err
  assert checkpoint.all_steps(workdir) == before
  assert cli.main(["train", "--config", TINY, "--workdir", workdir,
                   "--config.train.optimizer=adam", "--no-progress"]) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
      "holds 'torch_adam''s optimizer state, the config asks for 'adam': resume with "
      "--config.train.optimizer=torch_adam")
  # Asked for fewer steps than the checkpoint has: said, and nothing else done
  assert cli.main(["train", "--config", TINY, "--workdir", workdir,
                   "--config.train.num_steps=1", "--no-progress"]) == 0
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == ("[train] the checkpoint is at step 2, at or past this run's 1: nothing to "
                     "train (raise train.num_steps or train.epochs to go on)")
  assert checkpoint.all_steps(workdir) == before
  # A file where the run keeps a folder: found before the first step, not at the first save
  other = tmp_path / "other"
  other.mkdir()
  (other / "checkpoints").write_text("the user's")
  assert cli.main(["train", "--config", TINY, "--workdir", str(other), "--no-progress"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"cspgan: error: {other / 'checkpoints'} is a file, where the run keeps a "
                 "folder: move it away"]
  assert (other / "checkpoints").read_text() == "the user's"


def test_output_thread_runs_jobs_in_order_and_raises_their_error_in_the_loop():
  from cspgan_jax import background
  writer, done = background.BackgroundWriter(), []
  gate = threading.Event()
  writer.submit(lambda: gate.wait(30) and done.append(1))
  writer.submit(lambda: done.append(2))
  assert done == []  # submit does not wait
  gate.set()

  def fail():
    raise OSError("No space left on device")

  writer.submit(fail)
  writer.submit(lambda: done.append(3))
  with pytest.raises(OSError, match="No space left"):
    writer.drain()
  assert done == [1, 2, 3]
  writer.drain()  # an error is raised once
  writer.close()


def test_a_jax_without_device_copies_checkpoints_through_the_host(tmp_path, monkeypatch, capsys):
  """The GPU machine runs another jax: if it cannot copy the state on the device, checkpoints
  still hold the right step's state (copied to the host in the loop), with one note line."""
  put = jax.device_put

  def no_may_alias(x, *args, may_alias=None, **kwargs):
    if may_alias is not None:
      raise TypeError("device_put() got an unexpected keyword argument 'may_alias'")
    return put(x, *args, **kwargs)

  monkeypatch.setattr(jax, "device_put", no_may_alias)
  monkeypatch.setattr(trainer._device_snapshot, "warned", False, raising=False)  # pylint: disable=protected-access
  run = tmp_path / "run"
  _train(run, "--config.train.num_steps=4", "--config.train.checkpoint_every=2",
         "--config.train.sample_every=2")
  notes = [l for l in capsys.readouterr().err.splitlines() if "no device copy" in l]
  assert len(notes) == 1 and "may_alias" in notes[0], notes
  monkeypatch.setattr(jax, "device_put", put)
  two = _train(tmp_path / "two", "--config.train.num_steps=2")
  assert _leaves_equal(checkpoint.restore(str(run), step=2)[0], two)
