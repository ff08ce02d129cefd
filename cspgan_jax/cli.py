"""`cspgan` command line: train, info, prepare-data, convert, sample, parity, bench, compile.

User errors (bad config, file, checkpoint) print one line `cspgan: error: ...` and exit 2;
nothing existing is overwritten unless `--overwrite` says so, and an output file is written
whole under a temporary name, then renamed (`output_files.write_outputs`), or not at all.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback
from typing import List, Optional

import numpy as np

from cspgan_jax.errors import (CheckpointError, ConfigError, CspganError, DataError,
                               drop_closed_event_loop_reports, first_line, io_reason,
                               reader_left)
from cspgan_jax import output_files
from cspgan_jax.output_files import write_outputs


def _split_overrides(argv: List[str]):
  """Separates `--config.group.field=value` overrides (ml_collections style) from the rest;
  `--config.group.field value` is taken as the same, as absl's flags take it."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    item = argv[i]
    if not item.startswith("--config."):
      rest.append(item)
    elif "=" not in item and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
      overrides.append(f"{item}={argv[i + 1]}")
      i += 1
    else:
      overrides.append(item)
    i += 1
  return rest, overrides


class _Parser(argparse.ArgumentParser):
  """argparse's usage errors as the other errors are: one line, exit status 2."""

  def error(self, message):
    self.exit(2, f"cspgan: error: {message} (see `{self.prog} --help`)\n")


def _load_config(path, overrides):
  from cspgan_jax import config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.load_config(path, overrides)


SEED_MAX = 2 ** 32 - 1  # numpy's RandomState takes no more; jax's key wraps larger ones round


def _seed(text: str) -> int:
  """--seed's type: an int that every generator seeded with it takes as it is (jax's PRNGKey
  would give 2**32 the key of 0, and negatives the keys of large seeds)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"must be an integer from 0 to {SEED_MAX}, got {text!r}") from None
  if not 0 <= value <= SEED_MAX:
    raise argparse.ArgumentTypeError(f"must be from 0 to {SEED_MAX}, got {value}")
  return value


# ---- files ----

def _check_folder(folder: str, what: str) -> None:
  """Refuses a folder that cannot be made because a file is in its way (os.makedirs would say
  only "File exists" or "Not a directory"), before any work is done."""
  blocking = output_files.file_in_the_way(folder)
  if blocking:
    raise CspganError(f"{what}: {blocking} is a file, not a directory")


def _check_output(path: str, option: str, overwrite: bool) -> None:
  """An output file that may be written: its folder possible, nothing there the user keeps."""
  _check_folder(os.path.dirname(os.path.abspath(path)), f"{option} {path}")
  if os.path.isdir(path):
    raise CspganError(f"{option}: {path} is a folder, not a file")
  if os.path.lexists(path) and not overwrite:
    raise CspganError(f"{path} exists; not overwriting it (pass --overwrite to replace it)")


# ---- train, info ----

def cmd_train(args, overrides):
  from cspgan_jax import trainer  # pylint: disable=import-outside-toplevel
  config = _load_config(args.config, overrides)
  trainer.train_and_evaluate(config, args.workdir, progress=not args.no_progress)


def cmd_info(args, overrides):
  del overrides
  from cspgan_jax import checkpoint, trainer  # pylint: disable=import-outside-toplevel
  step = checkpoint._resolve_step(args.workdir, None)  # pylint: disable=protected-access
  config = checkpoint.read_config(args.workdir, step)
  print(f"workdir: {os.path.abspath(args.workdir)}")
  print(f"checkpoint step: {step} (all: {', '.join(map(str, checkpoint.all_steps(args.workdir)))})")
  records = trainer.logged_metrics(args.workdir)  # a killed run's unfinished line left out
  last = records[-1] if records else None
  if last:
    print("latest metrics (step {}): {}".format(
        last.pop("step"), ", ".join(f"{k} {v:.4g}" for k, v in last.items())))
  else:
    print("latest metrics: none logged yet")
  print("config:")
  print(config)


# ---- prepare-data ----

def cmd_prepare_data(args, overrides):
  del overrides
  from cspgan_jax import prepare_data  # pylint: disable=import-outside-toplevel
  if args.workers is not None and args.workers < 1:
    raise CspganError(f"--workers must be >= 1, got {args.workers}")
  _check_folder(args.out, f"--out {args.out}")
  summary = prepare_data.prepare(args.input, args.out, resolution=args.resolution, name=args.name,
                                 workers=args.workers, overwrite=args.overwrite)
  for line in summary.lines():
    print(f"[prepare-data] {line}")
  print(f"[prepare-data] read it with tfds.data_source({args.name!r}, data_dir={args.out!r}), or "
        f"train with --config.data.source=tfds --config.data.name={args.name} "
        f"--config.data.data_dir={args.out}")


def _require_torch(command: str) -> None:
  """PyTorch is an extra (`pip install -e .` leaves it out): a command that needs it says so in
  one line before it reads or writes anything."""
  try:
    importlib.import_module("torch")
  except (ImportError, OSError) as e:  # OSError: a wheel whose native libraries fail to load
    reason = first_line(e)  # a native library's loader can explain itself over several lines
    raise CspganError(f"{command} needs PyTorch, which is not importable here ({reason}): install "
                      "the CPU wheel, pip install torch==2.13.0 (or the `torch` extra)") from e


# ---- convert ----

def cmd_torch2flax(args, overrides):
  # pylint: disable-next=import-outside-toplevel
  from cspgan_jax import checkpoint, torch_port, train, trainer
  _require_torch("convert torch2flax")
  config = _load_config(args.config, overrides)
  made = _claim_workdir(args.workdir)  # refused before converting (seconds at 128x128)
  try:
    files = [(f"{role} ({path})", path, role, template) for role, path, template in zip(
        ("netG", "netD"), (args.netG, args.netD), train.variable_shapes(config))]
    loaded, converted = [], []
    for what, path, role, template in files:
      loaded.append(torch_port.load_torch_state_dict(path, role))
      converted.append(torch_port.torch_to_flax(loaded[-1], template, what))
    state = train.create_state(config, *converted)
    # A `cspgan train` there would write its checkpoints among this one (and take this step 0
    # for its own); the lock also keeps one from starting until this is written.
    with trainer.workdir_lock(args.workdir) as refusal:
      if refusal:  # a run that started there while this converted
        raise CheckpointError(refusal)
      _refuse_a_checkpoint(args.workdir)  # written while this converted
      step = checkpoint.save(args.workdir, state, config)
  except BaseException:
    output_files.remove_folders(made)  # a failed conversion leaves no new workdir behind
    raise
  print(f"wrote checkpoint step {step} to {checkpoint.checkpoint_dir(args.workdir)}")
  for (what, *_), sd in zip(files, loaded):
    note = torch_port.float64_rounding(sd, what)
    if note:  # said once it is done, so that an error stays the one line there is
      print(f"cspgan: note: {note}", file=sys.stderr)


def _claim_workdir(workdir: str) -> List[str]:
  """Refuses a workdir torch2flax cannot write into (a `cspgan train` holds it, it holds a
  checkpoint, it cannot be made) before any conversion; makes it and returns the folders made."""
  from cspgan_jax import trainer  # pylint: disable=import-outside-toplevel
  _check_folder(os.path.dirname(os.path.abspath(workdir)), f"--workdir {workdir}")
  # A run holds its lock file while it trains: without one there is no run, and none is made
  if os.path.isfile(os.path.join(workdir, trainer.LOCK_FILE)):
    with trainer.workdir_lock(workdir) as refusal:
      if refusal:
        raise CheckpointError(refusal)
  made = output_files.missing_folders(workdir)
  try:
    trainer.prepare_workdir(workdir)  # a file for it or its checkpoints, or no write access
    _refuse_a_checkpoint(workdir)
  except BaseException:
    output_files.remove_folders(made)
    raise
  return made


def _refuse_a_checkpoint(workdir: str) -> None:
  from cspgan_jax import checkpoint  # pylint: disable=import-outside-toplevel
  if checkpoint.latest_step(workdir) is not None:
    raise CheckpointError(f"{workdir} already holds a checkpoint; choose an empty workdir")


def _torch_writer(state_dict):
  def write(path):
    import torch  # pylint: disable=import-outside-toplevel
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)
  return write


def cmd_flax2torch(args, overrides):
  del overrides
  from cspgan_jax import checkpoint, torch_port  # pylint: disable=import-outside-toplevel
  _require_torch("convert flax2torch")
  _check_folder(args.out_dir, f"--out-dir {args.out_dir}")
  paths = [os.path.join(args.out_dir, n) for n in ("netG.pt", "netD.pt")]
  for p in paths:  # both checked before anything is read or written
    _check_output(p, "--out-dir", args.overwrite)
  state, config = checkpoint.restore(args.workdir, step=args.step)
  # Both converted, each checked against the PyTorch reference's keys, before either is written
  converted = [torch_port.flax_to_torch({"params": s.params, "batch_stats": s.batch_stats},
                                        config.model, role)
               for s, role in ((state.g, "netG"), (state.d, "netD"))]
  write_outputs([(p, _torch_writer(sd)) for p, sd in zip(paths, converted)])
  for p, sd in zip(paths, converted):
    print(f"wrote {p} ({len(sd)} tensors)")


# ---- sample ----

def read_latents(path: str, nz: int) -> np.ndarray:
  """z.npy shaped (N, nz) or (N, nz, 1, 1), of real numbers -> float32 (N, nz), finite."""
  if not os.path.isfile(path):
    raise DataError(f"latents file not found: {path}")
  try:
    z = np.load(path, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{path}: not a readable .npy file ({type(e).__name__})") from e
  if not isinstance(z, np.ndarray):  # np.load opens an .npz archive (np.savez) as a mapping
    z.close()
    raise DataError(f"{path}: an .npz archive; latents are one array saved with np.save (.npy)")
  if z.dtype.kind not in "fiu":  # complex would lose its imaginary part; text, records: no
    raise DataError(f"{path}: latents must be real numbers (a float or integer dtype), got "
                    f"dtype {z.dtype}")
  if z.ndim == 4 and z.shape[2:] == (1, 1):
    z = z[:, :, 0, 0]
  if z.ndim != 2 or z.shape[1] != nz or z.shape[0] < 1:
    raise DataError(f"{path}: latents must be shaped (N, {nz}) or (N, {nz}, 1, 1), "
                    f"got {z.shape}")
  with np.errstate(over="ignore"):  # beyond float32's range: inf, refused below
    z = z.astype(np.float32)
  if not np.all(np.isfinite(z)):
    raise DataError(f"{path}: latents contain NaN or inf, or values beyond float32's range "
                    f"(+-{np.finfo(np.float32).max:.3g})")
  return z


SAMPLE_CHUNK = 256  # latents a call of G in `sample`, where images do not depend on each other


def cmd_sample(args, overrides):
  del overrides
  import jax  # pylint: disable=import-outside-toplevel
  from cspgan_jax import checkpoint, train  # pylint: disable=import-outside-toplevel
  ext = os.path.splitext(args.out)[1].lower()
  if ext not in (".npy", ".png"):
    raise CspganError(f"--out must end in .npy or .png, got {args.out}")
  _check_output(args.out, "--out", args.overwrite)
  state, config = checkpoint.restore(args.workdir, step=args.step)
  if args.latents:
    z = read_latents(args.latents, config.model.nz)
  else:
    if args.n < 1:
      raise CspganError(f"--n must be positive, got {args.n}")
    z = np.asarray(train.sample_latents(jax.random.PRNGKey(args.seed), args.n, config.model.nz))
  use_ra = args.running_average or config.train.get("sample_use_running_average", False)
  if not use_ra and z.shape[0] < 2 and state.g.batch_stats:
    raise CspganError("a BatchNorm generator sampled with batch statistics needs >= 2 latents "
                      "(or pass --running-average)")
  generate = jax.jit(lambda p, s, z: train.generate(config, p, s, z, use_ra))
  # Each image depends on its latent alone unless G normalises with the batch's statistics:
  # then in chunks, so that thousands of samples (for FID, say) fit in device memory.
  chunk = len(z) if state.g.batch_stats and not use_ra else SAMPLE_CHUNK
  out = np.concatenate([np.asarray(generate(state.g.params, state.g.batch_stats, z[i:i + chunk]))
                        for i in range(0, len(z), chunk)])
  write_outputs([(args.out, _npy_writer(out) if ext == ".npy" else _png_writer(out))])
  print(f"wrote {out.shape[0]} images to {args.out}")


def _npy_writer(out):
  def write(path):
    with open(path, "wb") as f:  # np.save(path) would append ".npy" to "X.NPY"
      np.save(f, out.astype(np.float32))
  return write


def _png_writer(out):
  def write(path):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    from cspgan_jax import images  # pylint: disable=import-outside-toplevel
    Image.fromarray(images.to_uint8(images.make_grid(out))).save(path, format="PNG")
  return write


# ---- parity ----

def cmd_parity(args, overrides):
  from cspgan_jax import parity  # pylint: disable=import-outside-toplevel
  _require_torch("parity")
  config = _load_config(args.config, overrides)
  if args.steps < 0:
    raise ConfigError(f"--steps must be >= 0, got {args.steps}")
  log = lambda msg: print(f"[parity] {msg}", file=sys.stderr, flush=True)
  if args.dtype:
    config.train.dtype = args.dtype
  rows = parity.run_parity(config, args.netG, args.netD, steps=args.steps, seed=args.seed,
                           with_floor=not args.no_floor, log=log, images_kind=args.images,
                           find_ties=not args.no_ties)
  bf16 = config.train.dtype == "bfloat16"
  print(parity.format_table(rows, bfloat16=bf16))
  beyond = parity.rows_beyond(rows, bfloat16=bf16)
  if beyond:  # as diff and cmp do: 1 is a difference found, 2 an error
    print(f"cspgan: parity: {beyond} of {len(rows)} rows beyond max({parity.TABLE_TOL:g}, "
          f"{parity.FLOOR_FACTOR:g}x fp32_floor), as the table counts them", file=sys.stderr)
    return 1
  return 0


# ---- bench ----

def cmd_bench(args, overrides):
  from cspgan_jax import bench  # pylint: disable=import-outside-toplevel
  bench.emit(bench.run(args, overrides), args.out)


# ---- compile ----

def cmd_compile(args, overrides):
  from cspgan_jax import gpu_compile  # pylint: disable=import-outside-toplevel
  report = gpu_compile.run(args, overrides)
  if report is not None:
    print(report)


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="cspgan",
      description="CSPup-GAN in JAX: train, prepare data, convert, sample, parity with PyTorch, "
                  "benchmark, compile for a GPU.",
      epilog="Config fields can be overridden with --config.group.field=value. Compiled "
             "programs are kept in ~/.cache/cspgan/jax-compilation-cache across runs "
             "(CSPGAN_COMPILATION_CACHE=DIR moves it, =off turns it off).")
  sub = parser.add_subparsers(dest="command", required=True)

  trn = sub.add_parser("train", help="train (or resume) a run in WORKDIR")
  trn.add_argument("--config", required=True, help="ml_collections config file")
  trn.add_argument("--workdir", required=True,
                   help="checkpoints, tensorboard/, samples/, metrics.jsonl; resumed if present")
  trn.add_argument("--no-progress", action="store_true", help="no progress bar")
  trn.set_defaults(func=cmd_train)

  inf = sub.add_parser("info", help="a run's config, step and latest metrics")
  inf.add_argument("workdir")
  inf.set_defaults(func=cmd_info)

  prep = sub.add_parser(
      "prepare-data", help="image folder (e.g. CelebA's img_align_celeba) -> TFDS array_record")
  prep.add_argument("--input", required=True,
                    help="folder of images, searched recursively; list_eval_partition.txt beside "
                         "or inside it gives CelebA's train/validation/test splits")
  prep.add_argument("--out", required=True, help="TFDS data_dir to write NAME/1.0.0 into")
  prep.add_argument("--resolution", type=int, default=128, help="output size (default 128)")
  prep.add_argument("--name", default="celeba", help="TFDS dataset name (default celeba)")
  prep.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
  prep.add_argument("--overwrite", action="store_true",
                    help="rebuild a dataset already prepared there (the old one stays until "
                         "the new one is complete)")
  prep.set_defaults(func=cmd_prepare_data)

  conv = sub.add_parser("convert", help="convert checkpoints between PyTorch and Flax")
  conv_sub = conv.add_subparsers(dest="direction", required=True)
  t2f = conv_sub.add_parser("torch2flax", help="PyTorch state_dicts -> orbax checkpoint")
  t2f.add_argument("--netG", required=True, help="generator state_dict (.pt)")
  t2f.add_argument("--netD", required=True, help="discriminator state_dict (.pt)")
  t2f.add_argument("--config", required=True, help="config file describing the architecture")
  t2f.add_argument("--workdir", required=True, help="new workdir for the checkpoint")
  t2f.set_defaults(func=cmd_torch2flax)
  f2t = conv_sub.add_parser("flax2torch", help="orbax checkpoint -> netG.pt, netD.pt")
  f2t.add_argument("--workdir", required=True, help="a run's workdir (its checkpoint)")
  f2t.add_argument("--out-dir", required=True, help="folder for netG.pt and netD.pt")
  f2t.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  f2t.add_argument("--overwrite", action="store_true",
                   help="replace netG.pt and netD.pt already in --out-dir")
  f2t.set_defaults(func=cmd_flax2torch)

  smp = sub.add_parser("sample", help="generate images from a checkpoint")
  smp.add_argument("--workdir", required=True, help="a run's workdir (its checkpoint)")
  src = smp.add_mutually_exclusive_group()
  src.add_argument("--latents", help=".npy of shape (N, nz) or (N, nz, 1, 1)")
  src.add_argument("--n", type=int, default=64, help="number of images (with --seed; default 64)")
  smp.add_argument("--seed", type=_seed, default=0, help=f"0 to {SEED_MAX} (default 0)")
  smp.add_argument("--out", required=True, help=".npy (float32 NHWC in [-1, 1]) or .png grid")
  smp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  smp.add_argument("--running-average", action="store_true",
                   help="BatchNorm running statistics instead of the batch's own")
  smp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
  smp.set_defaults(func=cmd_sample)

  par = sub.add_parser("parity", help="compare with the PyTorch reference, layer by layer")
  par.add_argument("--config", required=True,
                   help="ml_collections config file: the model, loss and Adam compared")
  par.add_argument("--netG", default=None, help="start from this generator state_dict")
  par.add_argument("--netD", default=None, help="start from this discriminator state_dict")
  par.add_argument("--steps", type=int, default=3, help="training iterations to compare")
  par.add_argument("--seed", type=_seed, default=0,
                   help=f"weights (if not given), data, noise: 0 to {SEED_MAX} (default 0)")
  par.add_argument("--images", choices=("faces", "noise"), default="faces",
                   help="real-like synthetic faces (default) or tanh(N(0, 1)) noise")
  par.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="the config's train.dtype unless given; bfloat16 compares with PyTorch's "
                   "CPU bf16 autocast, its floor PyTorch's bf16 against its float32")
  par.add_argument("--no-floor", action="store_true",
                   help="skip the float64 PyTorch run that measures float32's own error")
  par.add_argument("--no-ties", action="store_true",
                   help="do not look for activation ties (nor run float64 again with our "
                   "branches there): about half the time and memory at 128x128")
  par.set_defaults(func=cmd_parity)

  # The module imports neither jax nor torch at load time, so the parser stays cheap.
  from cspgan_jax import bench  # pylint: disable=import-outside-toplevel
  bch = sub.add_parser("bench", help="time the training step against PyTorch (images/s, TFLOP/s)",
                       description=bench.__doc__.splitlines()[0])
  bench.add_arguments(bch)
  bch.set_defaults(func=cmd_bench)

  from cspgan_jax import gpu_compile  # pylint: disable=import-outside-toplevel  # no jax at load
  cmp = sub.add_parser("compile", help="compile the training step for a GPU this machine lacks, "
                                       "and report its kernels, layouts and copies",
                       description=gpu_compile.__doc__.splitlines()[0])
  gpu_compile.add_arguments(cmp)
  cmp.set_defaults(func=cmd_compile)
  return parser


class _OrbaxFailureReports(logging.Filter):
  """orbax logs a failed save from each of its threads, traceback and all (five reports, 450
  lines, for a full disk), before the failure reaches the command, which says it in one line
  (`checkpoint.finish_writes`), and warns of a step folder without its metadata file up to six
  times before the command says that checkpoint is unreadable. Those reports are dropped; the
  rest of orbax's log is not."""

  def filter(self, record):
    if record.levelno == logging.WARNING and str(record.msg).startswith(
        "Metadata file does not exist"):  # a step folder we report unreadable, in one line
      return False
    if record.levelno < logging.ERROR or not record.exc_info or record.exc_info[2] is None:
      return True
    # logged through absl.logging.exception, so the record's own path is absl's: the failure's
    # traceback says whose it is
    frames = traceback.extract_tb(record.exc_info[2])
    return not any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames)


class _AbandonedWriteReports(logging.Filter):
  """Once a checkpoint's write failed (a full disk), orbax leaves its other writes' futures
  unread; asyncio reports each as it is collected, "Future (or Task) exception was never
  retrieved" and the write's traceback (up to 27 lines, after the one line the command printed).
  A restore of a damaged checkpoint leaves its other reads so too (truncated array files: one
  fresh-clone CI run printed one such report, timing-dependent). Those reports, of writes the
  system refused and of tensorstore's failed reads and writes, are dropped once `main` has said
  a checkpoint failed (`failure_reported`); asyncio's other reports are not."""

  failure_reported = False

  def filter(self, record):
    if not type(self).failure_reported or record.levelno < logging.ERROR or not record.exc_info:
      return True
    if not str(record.msg).startswith(("Future exception was never retrieved",
                                       "Task exception was never retrieved")):
      return True
    error = record.exc_info[1]
    return error is None or (io_reason(error) is None
                             and "RESOURCE_EXHAUSTED" not in first_line(error)
                             and not _TENSORSTORE_ERROR.search(str(error)))


# What tensorstore appends to each error of its own (the spec of what it read or wrote)
_TENSORSTORE_ERROR = re.compile(r"\[tensorstore_spec='|\[source locations='")


def _quiet_orbax_failure_reports() -> None:
  for name, kind in (("absl", _OrbaxFailureReports),  # orbax logs through absl's logger
                     ("asyncio", _AbandonedWriteReports)):
    logger = logging.getLogger(name)
    if not any(isinstance(f, kind) for f in logger.filters):
      logger.addFilter(kind())


def main(argv: Optional[List[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = _split_overrides(argv)
  args = build_parser().parse_args(rest)
  if overrides and args.func not in (cmd_bench, cmd_compile, cmd_parity, cmd_torch2flax,
                                     cmd_train):
    # The other commands read the config stored in the checkpoint.
    print(f"cspgan: error: {args.command} takes no --config.* overrides (the checkpoint holds "
          "the config)", file=sys.stderr)
    return 2
  if args.func not in (cmd_compile, cmd_info, cmd_prepare_data):  # those compile nothing to keep
    from cspgan_jax import compilation_cache  # pylint: disable=import-outside-toplevel
    compilation_cache.enable()
  try:
    code = args.func(args, overrides)
  except CspganError as e:
    if isinstance(e, CheckpointError):  # what orbax then reports of its other writes is dropped
      _AbandonedWriteReports.failure_reported = True
    print(f"cspgan: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # a second Ctrl-C in `train`, or one anywhere else
    print(f"cspgan: {args.command} interrupted", file=sys.stderr)
    return 130
  except BrokenPipeError:  # `cspgan info DIR | head -1`
    return reader_left()
  except OSError as e:  # the file system's refusal (a full disk, a read-only one): not a bug
    where = getattr(args, "workdir", None) or getattr(args, "out", None)
    print(f"cspgan: error: {io_reason(e) or e}"
          + (f" (in {where})" if where and not e.filename else ""), file=sys.stderr)
    return 2
  return code or 0  # only parity returns one: 1, rows beyond its bound


def run() -> None:
  """The `cspgan` command: `main` in a process of its own. What orbax reports of a checkpoint it
  could not read or write, beside the one line `main` prints for it, is silenced for the
  process's life (a caller of `main` keeps its process's hooks as they are)."""
  drop_closed_event_loop_reports()
  _quiet_orbax_failure_reports()
  sys.exit(main())


if __name__ == "__main__":
  run()
