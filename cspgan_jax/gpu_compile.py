"""The training step compiled by XLA's GPU compiler on a machine without a GPU.

  cspgan compile --install-plugin                      # once: jax's CUDA plugin, into a cache
  cspgan compile --target h100 --batch 64 --dtype bfloat16 --hlo b64_bf16.hlo.txt

jax's CUDA plugin can compile for a GPU it is only told about (a "target config": the chip's
compute capability, memory, cuDNN version), without a driver or a device. This compiles the
trainer's own step (`parallel.make_step`, the batch gathered from device-resident data) for such a
compile-only device and prints what `hlo_report` finds in the optimized program: the kernels by
kind, the cuDNN convolutions, every kernel that only moves data, copies of the step's inputs and
loops of data-dependent length. It answers the layout questions of the performance work (which
transposes XLA:GPU inserts, what becomes of CSPup's channel split, what the state's memory
layout costs: `--state-layout default` against the compiler's choice) on any machine. It times
nothing, and convolution algorithms are not autotuned here (that needs the GPU): kernel counts,
layouts and bytes are the compiler's, not timings.

The plugin is kept out of the Python environment (in `--plugin-dir`, by default a cache folder
named after the installed jaxlib version): installed there, every jax program would print its
failed CUDA start-up on a machine without a GPU. This command alone puts it on the path, before
jax starts, and keeps jax itself on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional

from cspgan_jax import compilation_cache, output_files
from cspgan_jax.errors import CspganError

# pylint: disable=import-outside-toplevel  # jax must not start before the plugin is on the path

TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")
TARGETS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
PLUGIN_PACKAGES = ("jax-cuda12-plugin", "jax-cuda12-pjrt")
PLUGIN_MODULE = "jax_plugins.xla_cuda12"
STATE_LAYOUTS = ("auto", "default")


def _jaxlib_version() -> str:
  from importlib import metadata
  return metadata.version("jaxlib")


def default_plugin_dir() -> str:
  return os.path.join(compilation_cache.cache_root(), f"jax-cuda12-{_jaxlib_version()}")


def install_plugin(directory: str) -> str:
  """pip-installs the CUDA plugin matching this jaxlib into `directory` (no CUDA libraries)."""
  version = _jaxlib_version()
  cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target",
         directory, *(f"{p}=={version}" for p in PLUGIN_PACKAGES)]
  if subprocess.run(cmd, check=False).returncode != 0:
    raise CspganError(f"could not install {' and '.join(PLUGIN_PACKAGES)} {version} into "
                      f"{directory} (pip failed: see above)")
  return directory


# The device figures XLA's GPU compiler divides by or sizes kernels with: the plugin parses a
# config without them (an empty file, a field left out) and the compiler then dies of SIGFPE,
# no message, in the middle of the compile (`threads_per_warp` left out did so, jax 0.10).
REQUIRED_FIELDS = ("threads_per_block_limit", "threads_per_warp", "shared_memory_per_block",
                   "shared_memory_per_core", "threads_per_core_limit", "core_count",
                   "fpus_per_core", "block_dim_limit_x", "block_dim_limit_y", "block_dim_limit_z",
                   "memory_bandwidth", "l2_cache_size", "clock_rate_ghz", "device_memory_size",
                   "registers_per_core_limit", "registers_per_block_limit")


def target_config(target: str) -> str:
  """The text of a GpuTargetConfigProto: a name in TARGETS or a path to a .txtpb file."""
  path = os.path.join(TARGETS_DIR, TARGETS[target]) if target in TARGETS else target
  if not os.path.isfile(path):
    raise CspganError(f"--target {target!r} is neither one of {sorted(TARGETS)} nor a file")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise CspganError(f"--target {path}: not a text file (byte {e.start} is not UTF-8); a "
                      "GpuTargetConfigProto in text form is expected") from e
  except OSError as e:
    raise CspganError(f"--target {path}: cannot read it ({e.strerror or e})") from e
  missing = [f for f in REQUIRED_FIELDS if not _positive_field(text, f)]
  if missing or not _positive_field(text, "major"):  # cuda_compute_capability's
    raise CspganError(f"--target {path}: not a GPU's target config: no positive "
                      f"{', '.join(missing or ['cuda_compute_capability major'])} (see "
                      f"{TARGETS_DIR} for complete ones)")
  return text


def _positive_field(text: str, field: str) -> bool:
  """Whether `field: N` (text format, outside comments) appears with some N > 0."""
  for line in text.splitlines():
    m = re.match(rf"\s*{field}\s*:\s*([-+0-9.eE]+)\s*(#.*)?$", line)
    if m:
      try:
        if float(m.group(1)) > 0:
          return True
      except ValueError:
        pass
  return False


def compile_only_devices(target: str, plugin_dir: str, count: int = 1):
  """`count` compile-only CUDA devices on one host, described by `target` (before jax starts)."""
  config_text = target_config(target)
  if not os.path.isdir(os.path.join(plugin_dir, *PLUGIN_MODULE.split("."))):
    raise CspganError(f"no jax CUDA plugin in {plugin_dir}: run `cspgan compile "
                      f"--install-plugin` (or pass --plugin-dir)")
  sys.path.insert(0, plugin_dir)
  import jax
  # jax on the CPU: the plugin is registered for compiling only, and no CUDA start is tried.
  jax.config.update("jax_platforms", "cpu")
  from jax.experimental import topologies
  if importlib.util.find_spec(PLUGIN_MODULE) is None:
    raise CspganError(f"{PLUGIN_MODULE} cannot be imported from {plugin_dir}")
  held = []
  try:
    with _quiet_stderr(held):  # the plugin's C++ start-up says, several times, it found no GPU
      topology = topologies.get_topology_desc(platform="cuda", target_config=config_text,
                                              topology=f"1x1x{count}")
  except NotImplementedError as e:  # the plugin was not registered: jax had started before
    raise CspganError(f"jax's CUDA plugin did not load from {plugin_dir} ({e})") from e
  except Exception as e:  # pylint: disable=broad-except  # a target config the plugin refuses
    why = [line.split("] ", 1)[-1] for line in held if "rror" in line]
    raise CspganError(f"the CUDA plugin refused target {target!r}: {str(e).splitlines()[0]}"
                      + (f" ({why[-1]})" if why else "")) from e
  return list(topology.devices)


@contextlib.contextmanager
def _quiet_stderr(held: list):
  """Holds back what C++ code writes to file descriptor 2 for the duration; where the block
  fails, its lines go to `held` (they may say why)."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+") as capture:
    try:
      os.dup2(capture.fileno(), 2)
      yield
    except BaseException:
      capture.seek(0)
      held.extend(capture.read().splitlines())
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def compile_step(config, devices, state_layout: str = "auto", steps: int = 1):
  """The trainer's step for `config`, compiled for `devices`; -> jax's Compiled."""
  from cspgan_jax import parallel
  batch_fn, mesh, state, args = parallel.abstract_training_inputs(config, devices)
  if state_layout == "default":  # row-major, as an unannotated jit would take the state
    return parallel.compile_lowered(
        parallel.make_step(config, "device", batch_fn, steps, mesh,
                           parallel.replicated_sharding(mesh)).lower(state, *args),
        parallel.xla_options(config.train))
  compiled, _ = parallel.compile_training_step(config, "device", batch_fn, steps, state, *args,
                                               mesh=mesh)
  return compiled


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--target", default="h100",
                      help=f"GPU to compile for: one of {sorted(TARGETS)} or a "
                           "GpuTargetConfigProto text file (default h100)")
  parser.add_argument("--config", default="configs/baseline.py",
                      help="ml_collections config file (default configs/baseline.py)")
  parser.add_argument("--batch", type=int, default=64, help="global batch (default 64)")
  parser.add_argument("--devices", type=int, default=1,
                      help="GPUs on one host, the batch split over them (default 1); the "
                           "report then shows the gradients' all-reduces")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="the step's train.dtype (default float32)")
  parser.add_argument("--scan", type=int, default=1, help="iterations per dispatch (default 1)")
  parser.add_argument("--state-layout", choices=STATE_LAYOUTS, default="auto",
                      help="the state's memory layout: the compiler's choice, as the trainer "
                           "runs (auto), or row-major (default), to compare")
  parser.add_argument("--hlo", default=None, metavar="FILE", help="write the optimized HLO here")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --hlo file")
  parser.add_argument("--plugin-dir", default=None,
                      help="where jax's CUDA plugin is (default: a cache folder per jaxlib "
                           "version, which --install-plugin fills)")
  parser.add_argument("--install-plugin", action="store_true",
                      help="pip-install jax-cuda12-plugin and -pjrt matching this jaxlib into "
                           "--plugin-dir, then stop")


def run(args, overrides) -> Optional[str]:
  """Validates, then compiles and returns the report (None with --install-plugin)."""
  plugin_dir = args.plugin_dir or default_plugin_dir()
  if args.install_plugin:
    install_plugin(plugin_dir)
    print(f"jax CUDA plugin {_jaxlib_version()} in {plugin_dir}")
    return None
  if min(args.batch, args.scan, args.devices) < 1:
    raise CspganError(f"--batch, --scan and --devices must be >= 1, got {args.batch}, "
                      f"{args.scan} and {args.devices}")
  if args.hlo is not None:
    _check_hlo_output(args.hlo, args.overwrite)
  from cspgan_jax import config_lib
  config = config_lib.load_config(args.config, [
      f"--config.train.batch_size={args.batch}", f"--config.train.dtype={args.dtype}",
      f"--config.train.steps_per_dispatch={args.scan}",
      *(f"--config.train.{e}={args.scan}" for e in ("log_every", "sample_every",
                                                    "checkpoint_every")),
      "--config.data.source=synthetic",
      f"--config.data.num_examples={max(4 * args.batch, 512 * args.devices)}", *overrides])
  devices = compile_only_devices(args.target, plugin_dir, args.devices)
  compiled = compile_step(config, devices, args.state_layout, args.scan)
  text = compiled.as_text()
  if args.hlo is not None:  # whole or not at all: a full disk leaves no half-written file
    output_files.write_outputs([(args.hlo, lambda name: _write_text(name, text))])
  from cspgan_jax import hlo_report
  head = (f"{len(devices)} x {devices[0].device_kind} (compile-only, {args.target}): "
          f"{args.config}, global batch "
          f"{args.batch}, {args.dtype}, {args.scan} step(s) a dispatch, state layout "
          f"{args.state_layout}; jax {_jaxlib_version()}\n\n")
  return head + hlo_report.HloReport(text).markdown() + "\n\n" + memory_line(compiled)


def _check_hlo_output(path: str, overwrite: bool) -> None:
  """Refuses an --hlo the write would fail on, before the compile (minutes at batch 256)."""
  folder = os.path.dirname(os.path.abspath(path))
  if not path or path.endswith(os.sep):
    raise CspganError(f"--hlo {path!r}: a file name is needed")
  if os.path.isdir(path):
    raise CspganError(f"--hlo {path}: is a folder, not a file")
  if os.path.exists(path) and not overwrite:
    raise CspganError(f"{path} exists (pass --overwrite to replace it)")
  blocking = output_files.file_in_the_way(folder)
  if blocking:
    raise CspganError(f"--hlo {path}: {blocking} is a file, not a folder")
  if not os.path.isdir(folder):
    raise CspganError(f"--hlo: folder {folder} does not exist")
  if not os.access(folder, os.W_OK | os.X_OK):
    raise CspganError(f"--hlo {path}: folder {folder} is not writable")


def _write_text(name: str, text: str) -> None:
  with open(name, "w", encoding="utf-8") as f:
    f.write(text)


def memory_line(compiled) -> str:
  """Device memory of the step as XLA's buffer assignment sizes it."""
  from cspgan_jax import parallel
  m = compiled.memory_analysis()
  if m is None:
    return "device memory: XLA gave no analysis of this program"
  mib = lambda n: f"{n / 2**20:,.0f} MiB"
  total = parallel.analysed_bytes(m)  # one analysis: each call asks XLA again
  return (f"device memory (XLA's buffer assignment; cuDNN workspaces, which autotuning picks, "
          f"not included): arguments {mib(m.argument_size_in_bytes)} (of which "
          f"{mib(m.alias_size_in_bytes)} donated and reused for the results), temporaries "
          f"{mib(m.temp_size_in_bytes)}; the step needs about {mib(total)}")
