"""Training-iteration benchmark: this project's step against the PyTorch reference, in one run.

  cspgan bench                                    # GPU: 128x128, batch 64 and 256, all variants
  python scripts/bench.py --config configs/tiny.py --batches 8 --iters 2 --repeats 2 \\
      --variants jax-fp32,jax-bf16,torch-fp32 --hlo hlo/ --profile traces/

Every variant runs the full iteration of the seed (D on real, D on fake, D's Adam step, G
through the updated D, G's Adam step) on data already on the device, after warm-up, with device
synchronisation, alternating variant by variant in rounds so that drift of the machine hits all
of them; the figure is the median round. JAX: the trainer's own compiled step (batch gathered
from device-resident data inside the step), float32 (jax-fp32), bfloat16 (jax-bf16), bfloat16
with `--scan K` steps per dispatch (jax-bf16-scan), and bfloat16 with the options that are
candidates for the default: D's real and fake passes as one batch (jax-bf16-dpair,
`train.d_real_fake_together`), the networks' first and last layers as matmuls (jax-bf16-edgemm,
`model.edge_layers_as_matmul`), both (jax-bf16-dpair-edgemm), both with `--scan K` steps per
dispatch (jax-bf16-dpair-edgemm-scan), and both with one of XLA's options (`train.xla_options`):
programmatic dependent launch (jax-bf16-dpair-edgemm-pdl) or cuBLAS for the matmuls
(jax-bf16-dpair-edgemm-cublas). PyTorch: eager float32 (torch-fp32; TF32 convolutions, PyTorch's
default), bf16 autocast with channels_last (torch-bf16), and `torch.compile` float32
(torch-compile), each with `cudnn.benchmark` on and no `.item()` per step, as a user tuning for
speed would run them. `--variants` picks among them (`jax-bf16-edgemm@64`: at batch 64 only).

FLOPs per iteration come from XLA's cost analysis of the single-step JAX iteration lowered for
the CPU, and are used for every row (the same useful work): XLA:GPU's analysis of the compiled
step leaves out the convolutions it hands to cuDNN (it counted 0.05 of 12 GFLOP an image on an
H200). XLA counts no convolution taps on padding (about 9% under PyTorch's count of the same
work), and PyTorch's iteration also computes D's weight gradients in G's backward pass, which
its rows are not credited with (docs/PERFORMANCE.md, "The harness").
Each row also projects the wall time of 10, 15 and 40 epochs of CelebA at its images/s. The
table goes to stdout, and with `--out` to a file (markdown) plus JSON. `--hlo DIR` keeps the
optimized HLO of each timed JAX step, `--profile DIR` a trace (Perfetto / Chrome JSON, gzipped)
of a few iterations of every variant (or of those `--profile-variants` names).
"""

from __future__ import annotations

import argparse
import functools
import glob
import gzip
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import List, Optional

import numpy as np

from cspgan_jax import output_files
from cspgan_jax.errors import CspganError

# jax and torch are imported inside the functions: `cspgan --help` and the argument checks
# must not pay for them.
# pylint: disable=import-outside-toplevel

# Dense bf16 TFLOP/s by device kind, for the "share of peak" column (the H100 figure).
PEAK_BF16_TFLOPS = {"H100": 790.0, "H200": 790.0, "A100": 312.0}

# The whole img_align_celeba, as the seed trains on it (10 epochs = 2.03 million images).
CELEBA_IMAGES = 202_599
PROJECTION_EPOCHS = (10, 15, 40)

# slug -> (framework, what): the order here is the order of the rows.
VARIANTS = {
    "jax-fp32": ("jax", "float32"),
    "jax-bf16": ("jax", "bfloat16"),
    "jax-bf16-scan": ("jax", "bfloat16"),
    "jax-bf16-dpair": ("jax", "bfloat16"),
    "jax-bf16-edgemm": ("jax", "bfloat16"),
    "jax-bf16-dpair-edgemm": ("jax", "bfloat16"),
    "jax-bf16-dpair-edgemm-scan": ("jax", "bfloat16"),
    "jax-bf16-dpair-edgemm-pdl": ("jax", "bfloat16"),
    "jax-bf16-dpair-edgemm-cublas": ("jax", "bfloat16"),
    "torch-fp32": ("torch", "fp32"),
    "torch-bf16": ("torch", "bf16"),
    "torch-compile": ("torch", "compile"),
}
# The options (off by default) that a JAX variant turns on, as (config key, value, how its row
# names it): a candidate for the default is timed beside what it would replace. XLA's own
# options (`train.xla_options`) are compiled in the same process, so their rows alternate with
# the others as any variant does, where XLA_FLAGS would need a process each.
OPTIONS = {
    "dpair": ("train.d_real_fake_together", True, "D on real + fake in one pass"),
    "edgemm": ("model.edge_layers_as_matmul", True, "edge layers as matmuls"),
    # Hopper's programmatic dependent launch: a kernel may start while the one before drains
    "pdl": ("train.xla_options", "xla_gpu_enable_pdl=true", "programmatic dependent launch"),
    # the matmuls (edge layers) by cuBLAS rather than XLA's Triton GEMM fusions
    "cublas": ("train.xla_options", "xla_gpu_enable_triton_gemm=false", "cuBLAS matmuls"),
}


def variant_options(slug: str) -> List[str]:
  """The config overrides a variant makes: `jax-bf16-dpair-edgemm` -> both options on (XLA
  options of one variant joined in one `train.xla_options`)."""
  values = {}
  for part in slug.split("-")[2:]:
    if part in OPTIONS:
      key, value, _ = OPTIONS[part]
      values[key] = value if value is True else ",".join(filter(None, (values.get(key), value)))
  return [f"--config.{key}={value}" for key, value in values.items()]


def peak_tflops(device_kind: str, override: Optional[float]):
  if override:
    return override
  for key, value in PEAK_BF16_TFLOPS.items():
    if key in device_kind:
      return value
  return None


def projected_minutes(images_per_s: float, batch: int) -> dict:
  """Epochs -> minutes over CelebA at this rate; an epoch drops the last partial batch."""
  per_epoch = (CELEBA_IMAGES // batch) * batch
  return {str(e): e * per_epoch / images_per_s / 60.0 for e in PROJECTION_EPOCHS}


# ---- JAX ----

def _jax_config(config_path, batch, dtype, scan, overrides, unroll=1):
  from cspgan_jax import config_lib
  return config_lib.load_config(config_path, [
      f"--config.train.batch_size={batch}", f"--config.train.dtype={dtype}",
      "--config.data.source=synthetic", f"--config.data.num_examples={max(4 * batch, 512)}",
      "--config.data.pipeline=device", f"--config.train.steps_per_dispatch={scan}",
      f"--config.train.scan_unroll={unroll}",
      # cadences unused here, but they must be multiples of steps_per_dispatch to validate
      *(f"--config.train.{e}={scan}" for e in ("log_every", "sample_every", "checkpoint_every")),
      *overrides])


def _option_on(config, key: str, value) -> bool:
  """Whether `config` has the option on (a flag set, or XLA's option among its options)."""
  section, name = key.split(".")
  held = config[section].get(name, False)
  return bool(held) if value is True else value in str(held).replace(" ", "")


def options_on(config) -> List[str]:
  """The options of OPTIONS that `config` has on, as `key=value`."""
  return [f"{key}={value}" for key, value, _ in OPTIONS.values()
          if _option_on(config, key, value)]


def count_flops(config_path, batch, overrides) -> Optional[float]:
  """FLOPs of one training iteration at `batch`: XLA's cost analysis of the step lowered (not
  compiled) for one CPU device, the same count on every machine. XLA:GPU's analysis of the
  compiled step misses every convolution it hands to cuDNN as a custom call."""
  import jax
  from cspgan_jax import parallel
  config = _jax_config(config_path, batch, "float32", 1, overrides)
  try:
    batch_fn, mesh, state, args = parallel.abstract_training_inputs(config, jax.devices("cpu")[:1])
    step = parallel.make_step(config, "device", batch_fn, 1, mesh,
                              parallel.replicated_sharding(mesh))
    cost = step.lower(state, *args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) or None
  except Exception as e:  # pylint: disable=broad-except  # the rows stand without it
    print(f"bench: warning: no FLOP count at batch {batch}: {type(e).__name__}: "
          f"{' '.join(str(e).split())[:300]}", file=sys.stderr, flush=True)
    return None


def jax_variant(config_path, batch, dtype, scan, overrides, unroll=1, hlo_path=None):
  import jax
  from cspgan_jax import input_pipeline, parallel, train
  config = _jax_config(config_path, batch, dtype, scan, overrides, unroll)
  data = input_pipeline.make_input(config)
  rng = jax.random.PRNGKey(1)
  # The trainer's own compiled step, the state in the layouts it chose.
  step, state = parallel.compile_training_step(
      config, "device", data.batch_fn(), scan,
      parallel.replicate(train.init_state(config, jax.random.PRNGKey(0))), data.images,
      data.shard_ids, rng)
  holder = {"state": state}

  def run(iters):  # iters iterations; returns when the device is done
    # Several CPU devices (XLA_FLAGS forcing them) abort with two steps in flight, as in the
    # trainer; such figures are orientation only, so the wait costs nothing that matters.
    wait_each_step = parallel.steps_must_wait()
    for _ in range(iters // scan):
      holder["state"], metrics = step(holder["state"], data.images, data.shard_ids, rng)
      if wait_each_step:
        jax.block_until_ready(metrics)
    jax.block_until_ready(metrics)

  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(step.as_text() or "")
  # XLA's buffer assignment, not the allocator's high-water mark: that one keeps the
  # autotuner's trial workspaces (10 GiB for every variant on an H200).
  memory = parallel.step_memory_bytes(step)

  name = f"JAX {dtype}" + (f", {scan} steps/dispatch" if scan > 1 else "") + (
      f" (unroll {unroll})" if scan > 1 and unroll > 1 else "") + "".join(
          f", {label}" for key, value, label in OPTIONS.values()
          if _option_on(config, key, value))
  return dict(name=name, run=run, memory=lambda: memory, unit=scan, framework="jax")


# ---- PyTorch ----

def torch_variant(config_path, batch, kind, overrides):
  import torch
  from torch import nn
  from cspgan_jax import config_lib, torch_reference
  config = config_lib.load_config(config_path, [f"--config.train.batch_size={batch}", *overrides])
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cudnn.benchmark = True
  net_g, net_d = torch_reference.build_reference(config.model, seed=0)
  net_g, net_d = net_g.to(device), net_d.to(device)
  fmt = torch.channels_last if kind == "bf16" else torch.contiguous_format
  net_g, net_d = net_g.to(memory_format=fmt), net_d.to(memory_format=fmt)
  opt_g, opt_d = torch_reference.make_optimizers(net_g, net_d, config.train)
  if kind == "compile":
    net_g, net_d = torch.compile(net_g), torch.compile(net_d)
  r, nz = config.model.resolution, config.model.nz
  real = (torch.rand(batch, 3, r, r, device=device) * 2 - 1).to(memory_format=fmt)
  criterion = nn.BCELoss()
  ones = torch.ones(batch, device=device)
  zeros = torch.zeros(batch, device=device)
  autocast = (functools.partial(torch.autocast, device_type=device, dtype=torch.bfloat16)
              if kind == "bf16" else None)

  def forward(net, x):
    if autocast is None:
      return net(x).view(-1)
    with autocast():
      out = net(x)
    return out.float().view(-1)  # BCELoss is not autocast-safe: probabilities in float32

  def iteration():
    net_d.zero_grad(set_to_none=True)
    err_real = criterion(forward(net_d, real), ones)
    err_real.backward()
    noise = torch.randn(batch, nz, 1, 1, device=device)
    fake = net_g(noise) if autocast is None else _autocast_call(autocast, net_g, noise)
    err_fake = criterion(forward(net_d, fake.detach()), zeros)
    err_fake.backward()
    opt_d.step()
    net_g.zero_grad(set_to_none=True)
    err_g = criterion(forward(net_d, fake), ones)
    err_g.backward()
    opt_g.step()
    return err_g

  def run(iters):
    for _ in range(iters):
      out = iteration()
    if device == "cuda":
      torch.cuda.synchronize()
    else:
      out.item()

  # The other variants' models, Adam states and inputs stay allocated beside this one's (the
  # rounds alternate), and torch's peak counts every live tensor: they are taken off.
  others = [0]

  def peak_memory():
    return torch.cuda.max_memory_allocated() - others[0] if device == "cuda" else None

  def reset_memory():  # before the last timed round: cudnn.benchmark's trials are not the run's
    if device == "cuda":
      torch.cuda.synchronize()
      others[0] = torch.cuda.memory_allocated() - torch_resident_bytes(
          (net_g, net_d), (opt_g, opt_d), (real, ones, zeros), device)
      torch.cuda.reset_peak_memory_stats()

  names = {"fp32": "PyTorch eager float32", "bf16": "PyTorch eager bf16 autocast, channels_last",
           "compile": "PyTorch torch.compile float32"}
  return dict(name=names[kind], run=run, memory=peak_memory, reset_memory=reset_memory, unit=1,
              framework="torch")


def torch_resident_bytes(nets, optimizers, tensors, device: str) -> int:
  """Bytes on `device` of the networks' parameters and gradients, the optimizers' state and
  `tensors`: what one PyTorch variant holds between its iterations."""
  import torch
  held = list(tensors)
  for net in nets:
    for p in net.parameters():
      held += [p] + ([p.grad] if p.grad is not None else [])
    held += list(net.buffers())
  for opt in optimizers:
    for state in opt.state.values():
      held += [v for v in state.values() if torch.is_tensor(v)]
  storages = {}
  for t in held:
    if t.device.type == device:
      storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
  return sum(storages.values())


def _autocast_call(autocast, net, x):
  with autocast():
    return net(x)


def _say(msg: str) -> None:
  """A progress line with the seconds a stage took (stderr, so the table stays on stdout)."""
  print(f"bench: {msg}", file=sys.stderr, flush=True)


# ---- profiles ----

def _profile_jax(variant, iters, dest):
  import jax
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0  # Python frames would swamp the trace (and its 16 MiB)
  with tempfile.TemporaryDirectory() as tmp:  # fresh per variant: the glob finds only this one
    with jax.profiler.trace(tmp, create_perfetto_trace=True, profiler_options=options):
      variant["run"](iters)
    found = sorted(glob.glob(os.path.join(tmp, "plugins", "profile", "*",
                                          "perfetto_trace.json.gz")))
    if not found:
      raise RuntimeError("jax.profiler wrote no perfetto_trace.json.gz")
    if jax.devices()[0].platform != "cpu":
      with gzip.open(found[-1], "rt") as f:
        if '"/device:' not in f.read():  # the process names of the device's lines
          raise RuntimeError("the trace holds no device events (another profiler holding CUPTI?)")
    shutil.copyfile(found[-1], dest + ".part")
  os.replace(dest + ".part", dest)


def _profile_torch(variant, iters, dest):
  import torch
  from torch.profiler import ProfilerActivity, profile
  activities = [ProfilerActivity.CPU] + (
      [ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "trace.json")
    with profile(activities=activities) as prof:
      variant["run"](iters)
    prof.export_chrome_trace(path)
    with open(path, "rb") as src, gzip.open(dest + ".part", "wb") as dst:
      shutil.copyfileobj(src, dst)
  os.replace(dest + ".part", dest)


def _profile(variant, slug, batch, iters, directory) -> Optional[str]:
  """One variant's trace; a failure is a warning line, never the end of the benchmark."""
  dest = os.path.join(directory, f"b{batch}_{slug}.trace.json.gz")
  iters = -(-iters // variant["unit"]) * variant["unit"]  # whole dispatches
  try:
    t = time.perf_counter()
    (_profile_jax if variant["framework"] == "jax" else _profile_torch)(variant, iters, dest)
    _say(f"{slug} at batch {batch} traced in {time.perf_counter() - t:.1f} s")
    return dest
  except Exception as e:  # pylint: disable=broad-except
    if os.path.exists(dest + ".part"):
      os.remove(dest + ".part")
    reason = " ".join(str(e).split())[:300]
    print(f"bench: warning: no profile of {slug} at batch {batch}: {type(e).__name__}: {reason}",
          file=sys.stderr, flush=True)
    return None


# ---- the real loop ----

# The variants `--e2e` can run as `cspgan train`: one step a dispatch (the scan's cadences would
# have to be multiples of its steps), each compared with its own bare row.
E2E_VARIANTS = ("jax-fp32", "jax-bf16", "jax-bf16-dpair", "jax-bf16-edgemm",
                "jax-bf16-dpair-edgemm")


# Steps traced after the timed half (with --profile): the loop just after a checkpoint and a
# grid were handed to the output thread, which is where a loop that waits on them would show it.
E2E_TRACE_STEPS = 20


def end_to_end(config_path, batch, steps, overrides, variant="jax-fp32", trace_to=None):
  """`cspgan train` with `variant`'s dtype and options on synthetic device-resident data;
  images/s over the second half.

  The second half holds a checkpoint (at its start) and two sample grids (at 1/2 and 3/4 of the
  run), a log at each end: at 1,000 steps a denser cadence than the seed's (a grid every 500
  steps, a checkpoint every 5,000), so the loss it shows is an upper bound. The trainer compiles
  the sampler before its loop; the first grid, at 1/4, is outside the window too. With
  `trace_to`, a few more steps run after the timed half under the profiler
  (`train.profile_steps`), and their trace and the step's HLO are kept as
  `{trace_to}.trace.json.gz` and `{trace_to}.hlo.txt`.
  """
  from cspgan_jax import config_lib, profiling, trainer
  half = max(steps // 2, 2)
  sample_every = half // 2
  tail = min(E2E_TRACE_STEPS, half) if trace_to else 0
  config = config_lib.load_config(config_path, [
      f"--config.train.batch_size={batch}", f"--config.train.num_steps={2 * half + tail}",
      f"--config.train.log_every={half}", f"--config.train.sample_every={sample_every}",
      f"--config.train.checkpoint_every={half}", "--config.data.source=synthetic",
      f"--config.train.dtype={VARIANTS[variant][1]}",
      *variant_options(variant),
      f"--config.train.profile_start={2 * half}", f"--config.train.profile_steps={tail}",
      # the bare iteration's data, so that the step is the very program timed there (and a
      # persistent compilation cache serves it)
      f"--config.data.num_examples={max(4 * batch, 512)}", "--config.data.pipeline=device",
      *overrides])
  with tempfile.TemporaryDirectory() as workdir:
    trainer.train_and_evaluate(config, workdir, progress=False)
    # the log that closes the timed half (a traced tail logs once more after it)
    timed = next(r for r in trainer.logged_metrics(workdir) if r["step"] == 2 * half)
    folders = sorted(glob.glob(os.path.join(workdir, trainer.TENSORBOARD_DIR, "plugins",
                                            "profile", "*")))
    if trace_to and folders:
      shutil.copyfile(os.path.join(folders[-1], profiling.STEP_HLO_FILE), trace_to + ".hlo.txt")
      shutil.copyfile(os.path.join(folders[-1], "perfetto_trace.json.gz"),
                      trace_to + ".trace.json.gz")
    elif trace_to:  # the trainer said why; the figure stands without its trace
      print(f"bench: warning: no trace of the end-to-end run's tail ({variant})",
            file=sys.stderr, flush=True)
      tail = 0
  return dict(variant=variant, dtype=config.train.dtype, batch=batch, steps=2 * half,
              options=options_on(config),
              sample_every=sample_every, checkpoint_every=half, data="synthetic",
              images_per_s=timed["images_per_sec"], traced_steps=tail)


# ---- arguments ----

def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", default="configs/baseline.py",
                      help="ml_collections config file (default configs/baseline.py)")
  parser.add_argument("--batches", default="64,256",
                      help="comma list of batch sizes (default 64,256)")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma list from {', '.join(VARIANTS)} (default: all); "
                           "VARIANT@B runs it at batch size B only (repeatable)")
  parser.add_argument("--iters", type=int, default=20, help="iterations per timed round")
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
  parser.add_argument("--scan", type=int, default=8,
                      help="steps per dispatch of the *-scan variants (default 8)")
  parser.add_argument("--unroll", type=int, default=1,
                      help="lax.scan unroll for --scan (XLA:CPU runs a rolled scan 15x slower)")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="the chip's dense bf16 peak, TFLOP/s (default: looked up by its kind)")
  parser.add_argument("--out", default=None, help="write the table here (and .json beside it)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the files of an earlier run at --out, --hlo, --profile")
  parser.add_argument("--e2e", type=int, default=0,
                      help="also run `cspgan train` for this many steps (>= 4) at the first "
                           "batch size and compare its images/s over the second half (a "
                           "checkpoint and two sample grids in it) with the bare iteration of "
                           "the same variant")
  parser.add_argument("--e2e-variants", default="jax-fp32",
                      help="comma list of the variants --e2e runs, each with its dtype and "
                           f"options and also in --variants: {', '.join(E2E_VARIANTS)} "
                           "(default jax-fp32)")
  parser.add_argument("--hlo", default=None, metavar="DIR",
                      help="write the optimized HLO of each timed JAX step to "
                           "DIR/b{batch}_{variant}.hlo.txt")
  parser.add_argument("--profile", default=None, metavar="DIR",
                      help="after the timed rounds, trace --profile-iters iterations of each "
                           "variant to DIR/b{batch}_{variant}.trace.json.gz (Perfetto / Chrome)")
  parser.add_argument("--profile-iters", type=int, default=3,
                      help="iterations per trace (rounded up to whole dispatches; default 3)")
  parser.add_argument("--profile-variants", default=None,
                      help="comma list: trace only these of --variants (default: all of them)")


def _parse_variants(text: str, option: str = "--variants", accepted=tuple(VARIANTS)) -> List[str]:
  asked = [v.strip() for v in text.split(",") if v.strip()]
  if not asked:
    raise CspganError(f"{option} is empty (accepted: {', '.join(accepted)})")
  unknown = [v for v in asked if v not in accepted]
  if unknown:
    raise CspganError(f"{option}: {unknown[0]!r} is not one of {', '.join(accepted)}")
  return [v for v in VARIANTS if v in asked]  # the table's order, each once


def variant_batches(text: str, batches: List[int]) -> dict:
  """--variants as {slug: the batch sizes it runs at}, in the table's order. `slug` runs at
  every batch size, `slug@B` only at batch size B (`slug@64,slug@256` at both): a GPU call's
  time goes to the rows its targets are read from."""
  items = [v.strip() for v in text.split(",") if v.strip()]
  if not items:
    raise CspganError(f"--variants is empty (accepted: {', '.join(VARIANTS)})")
  at = {}
  for item in items:
    slug, restricted, batch = item.partition("@")
    if slug not in VARIANTS:
      raise CspganError(f"--variants: {slug!r} is not one of {', '.join(VARIANTS)}")
    if not restricted:
      at[slug] = set(batches)
      continue
    if not batch.isdigit() or int(batch) not in batches:
      raise CspganError(f"--variants: {item!r}: {batch!r} is not one of --batches "
                        f"({','.join(map(str, batches))})")
    at.setdefault(slug, set()).add(int(batch))
  return {s: sorted(at[s]) for s in VARIANTS if s in at}


def profiled_variants(args, variants: List[str]) -> List[str]:
  """The variants `--profile` traces: `--profile-variants` (a subset of `--variants`) or all."""
  if args.profile_variants is None:
    return variants
  return _parse_variants(args.profile_variants, "--profile-variants", variants)


def _parse_batches(text: str) -> List[int]:
  try:
    batches = [int(b) for b in text.split(",")]
  except ValueError:
    batches = []
  if not batches or min(batches) < 1:
    raise CspganError(f"--batches must be a comma list of positive integers, got {text!r}")
  return batches


def _make_dir(path: str, option: str) -> None:
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    blocking = output_files.file_in_the_way(path)  # makedirs says only "File exists" of it
    why = (f"{blocking} is a file, not a directory" if blocking else
           f"cannot create the folder: {e.strerror or e}")
    raise CspganError(f"{option} {path}: {why}") from e


def _validate(args):
  """The arguments' own checks, before jax is even imported: (batches, {variant: batches})."""
  batches = _parse_batches(args.batches)
  at = variant_batches(args.variants, batches)
  variants = list(at)
  profiled = profiled_variants(args, variants)
  for option, value, low in (("--iters", args.iters, 1), ("--repeats", args.repeats, 1),
                             ("--warmup", args.warmup, 0), ("--e2e", args.e2e, 0),
                             ("--unroll", args.unroll, 1),
                             ("--profile-iters", args.profile_iters, 1)):
    if value < low:
      raise CspganError(f"{option} must be >= {low}, got {value}")
  scanned = [v for v in variants if v.endswith("-scan")]
  if scanned and args.scan < 2:
    raise CspganError(f"--scan must be >= 2 for {scanned[0]}, got {args.scan}")
  peak = args.peak_tflops
  if peak is not None and not (math.isfinite(peak) and peak > 0):  # the share's divisor
    raise CspganError(f"--peak-tflops must be a positive number, got {peak}")
  if 0 < args.e2e < 4:
    raise CspganError(f"--e2e needs >= 4 steps (a sampler warm-up before the timed half), "
                      f"got {args.e2e}")
  e2e_variants = _parse_variants(args.e2e_variants, "--e2e-variants", E2E_VARIANTS)
  if args.e2e > 0:
    missing = [v for v in e2e_variants if batches[0] not in at.get(v, ())]
    if missing:  # the end-to-end runs are at the first batch size
      raise CspganError(f"--e2e of {missing[0]} compares with its bare iteration at batch "
                        f"{batches[0]}: add {missing[0]} to --variants at that batch size")
  if args.out:
    if os.path.splitext(args.out)[1].lower() == ".json":
      raise CspganError(f"--out {args.out}: the markdown table goes there and the JSON beside "
                        "it, so it cannot end in .json")
    if os.path.isdir(args.out):
      raise CspganError(f"--out {args.out} is a folder; give a file name (e.g. bench.md)")
  if not args.overwrite:  # an earlier run's figures are not replaced unless asked
    targets = [args.out, os.path.splitext(args.out)[0] + ".json"] if args.out else []
    for v, runs_at in at.items():
      for b in runs_at:
        if args.hlo and VARIANTS[v][0] == "jax":
          targets.append(os.path.join(args.hlo, f"b{b}_{v}.hlo.txt"))
        if args.profile and v in profiled:
          targets.append(os.path.join(args.profile, f"b{b}_{v}.trace.json.gz"))
    if args.profile and args.e2e:  # the end-to-end runs' traced tails, at the first batch
      targets += [os.path.join(args.profile, f"b{batches[0]}_e2e-{v}.trace.json.gz")
                  for v in e2e_variants]
    existing = next((t for t in targets if os.path.exists(t)), None)
    if existing:
      raise CspganError(f"{existing} exists; not overwriting it (pass --overwrite to replace it)")
  return batches, at


# ---- measuring ----

def _build(slug, args, batch, overrides):
  framework, what = VARIANTS[slug]
  if framework == "torch":
    return torch_variant(args.config, batch, what, overrides)
  scan = args.scan if slug.endswith("-scan") else 1
  hlo_path = os.path.join(args.hlo, f"b{batch}_{slug}.hlo.txt") if args.hlo else None
  overrides = [*overrides, *variant_options(slug)]
  return jax_variant(args.config, batch, what, scan, overrides,
                     unroll=args.unroll if scan > 1 else 1, hlo_path=hlo_path)


def run(args, overrides) -> dict:
  """Measures every variant at every batch size: {header, rows, end_to_end, peak_tflops}."""
  batches, at = _validate(args)
  slugs = list(at)
  profiled = profiled_variants(args, slugs)
  from cspgan_jax import config_lib
  config_lib.load_config(args.config, overrides)  # a bad config or override fails before work
  # The output folders too: an unwritable one must not surface after minutes of measuring.
  out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else None
  for option, directory in (("--out", out_dir),
                            ("--hlo", args.hlo), ("--profile", args.profile)):
    if directory:
      _make_dir(directory, option)

  # JAX takes 75% of a GPU's memory at start-up by default; PyTorch, in the same process, would
  # then run its batch-256 iterations (and cuDNN's workspaces) in the rest. Both allocate as
  # they go instead (read when the backend starts, i.e. below). An explicit setting wins.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  peak = peak_tflops(kind, args.peak_tflops)
  versions = f"jax {jax.__version__}"
  torch_slugs = [s for s in slugs if VARIANTS[s][0] == "torch"]
  if torch_slugs:
    try:
      import torch
      versions += f", torch {torch.__version__}"
    except (ImportError, OSError) as e:  # OSError: a wheel whose native libraries fail to load
      print(f"note: torch is not importable ({e}); skipping {', '.join(torch_slugs)}", flush=True)
      slugs = [s for s in slugs if s not in torch_slugs]
      if not slugs:
        raise CspganError("no variant left to run: torch is not importable and --variants "
                          "names only PyTorch ones") from e
  header = (f"{kind} ({device.platform}) | {platform.node()} | {versions} | "
            f"{time.strftime('%Y-%m-%d %H:%M')}")
  print(header, flush=True)
  rows, written_hlo, written_traces = [], 0, 0
  # Traces come after every figure (the rows of each batch, the end-to-end runs), so that a run
  # cut short loses traces before figures. PyTorch's profiler keeps CUPTI once it has used it,
  # and a JAX trace taken after one then holds no GPU events: every JAX trace first.
  to_profile = []  # (variant, slug, batch), the variants kept alive until then
  e2e = []  # one entry per --e2e-variants value
  for index, batch in enumerate(batches):
    variants, build_s = {}, {}
    for s in (s for s in slugs if batch in at[s]):
      try:  # a variant that cannot be built is left out, not the end of a GPU's run
        t = time.perf_counter()
        variants[s] = _build(s, args, batch, overrides)
        # compilation and autotuning: what a GPU call's time budget is planned from
        build_s[s] = time.perf_counter() - t
        _say(f"{s} at batch {batch} built in {build_s[s]:.1f} s")
      except CspganError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        reason = " ".join(str(e).split())[:300]
        print(f"bench: warning: {s} at batch {batch} left out, it failed to build: "
              f"{type(e).__name__}: {reason}", file=sys.stderr, flush=True)
    if not variants:
      raise CspganError(f"no variant could be built at batch {batch} (see the warnings above)")
    written_hlo += sum(VARIANTS[s][0] == "jax" for s in variants) if args.hlo else 0
    flops = count_flops(args.config, batch, overrides)  # the same work for every row
    unit = max(v["unit"] for v in variants.values())
    iters = max(args.iters, unit)
    iters -= iters % unit
    times, memory, warmup_s = {s: [] for s in variants}, {}, {s: 0.0 for s in variants}
    rounds = args.warmup + args.repeats
    for round_ in range(rounds):
      for s, v in variants.items():
        if round_ == rounds - 1 and "reset_memory" in v:
          v["reset_memory"]()
        t = time.perf_counter()
        v["run"](iters)
        if round_ >= args.warmup:
          times[s].append((time.perf_counter() - t) / iters)
        else:  # torch.compile's compilation and cuDNN's benchmark trials happen here
          warmup_s[s] += time.perf_counter() - t
        if round_ == rounds - 1:
          memory[s] = v["memory"]()
    batch_rows = []
    for s, v in variants.items():
      sec = float(np.median(times[s]))
      row = dict(batch=batch, variant=v["name"], slug=s, images_per_s=batch / sec,
                 ms_per_iter=1e3 * sec, tflops=(flops / sec / 1e12) if flops else None,
                 device_memory=memory[s], build_s=build_s[s], warmup_s=warmup_s[s])
      row["share_of_peak"] = row["tflops"] / peak if (row["tflops"] and peak) else None
      row["projected_minutes"] = projected_minutes(row["images_per_s"], batch)
      batch_rows.append(row)
    base = next((r["images_per_s"] for r in batch_rows if r["slug"] == "torch-fp32"), None)
    for row in batch_rows:
      row["vs_torch_fp32"] = row["images_per_s"] / base if base else None
    rows += batch_rows
    if flops:
      print(f"batch {batch}: {flops / batch / 1e9:.2f} GFLOP per image per iteration (XLA)",
            flush=True)
    if args.out:  # each batch's rows are kept at once: a run stopped later loses only the rest
      write_files(dict(header=header, rows=rows, end_to_end=e2e or None, peak_tflops=peak),
                  args.out)
    if args.profile:
      to_profile += [(v, s, batch) for s, v in variants.items() if s in profiled]
    del variants  # the rest of this batch's programs and data are freed before the next one
    if index == 0:  # right after the rows it is read against: a run cut short later keeps it
      for run_ in _end_to_end_runs(args, batch, rows, overrides):
        e2e.append(run_)
        if args.out:
          write_files(dict(header=header, rows=rows, end_to_end=e2e, peak_tflops=peak), args.out)
  for v, s, batch in sorted(to_profile, key=lambda x: x[0]["framework"] == "torch"):  # stable
    written_traces += _profile(v, s, batch, args.profile_iters, args.profile) is not None
  del to_profile
  if args.hlo:
    print(f"optimized HLO: {written_hlo} files in {args.hlo}", flush=True)
  if args.profile:
    print(f"traces: {written_traces} files in {args.profile}", flush=True)
  return dict(header=header, rows=rows, end_to_end=e2e, peak_tflops=peak)


def _end_to_end_runs(args, batch, rows, overrides):
  """`cspgan train` at `batch` for each --e2e-variants value, each read against its bare row
  (skipped where that variant failed to build: its warning is printed already)."""
  for slug in (_parse_variants(args.e2e_variants, "--e2e-variants", E2E_VARIANTS)
               if args.e2e else []):
    bare = next((r for r in rows if r["slug"] == slug and r["batch"] == batch), None)
    if bare is None:
      continue
    t = time.perf_counter()
    trace_to = os.path.join(args.profile, f"b{batch}_e2e-{slug}") if args.profile else None
    run_ = end_to_end(args.config, batch, args.e2e, overrides, slug, trace_to)
    run_["wall_s"] = time.perf_counter() - t  # compilation, the steps and the last writes
    traced = f"; its tail traced into {trace_to}.trace.json.gz" if run_.get("traced_steps") else ""
    _say(f"end to end, {bare['variant']}, at batch {batch}: {run_['wall_s']:.1f} s{traced}")
    run_["name"] = bare["variant"]
    run_["vs_bare"] = run_["images_per_s"] / bare["images_per_s"]
    run_["projected_minutes"] = projected_minutes(run_["images_per_s"], run_["batch"])
    yield run_


# ---- the table ----

# The performance issue's targets (one H100; docs/PERFORMANCE.md), each read off the best row
# (or end-to-end run) that it applies to: (what, batch, JAX dtype, the row's field, bound).
TARGETS = (
    ("batch 64, JAX float32, vs PyTorch eager fp32", 64, "float32", "vs_torch_fp32", 1.5),
    ("batch 64, JAX bf16, vs PyTorch eager fp32", 64, "bfloat16", "vs_torch_fp32", 4.0),
    ("batch 256, JAX bf16, share of the bf16 peak", 256, "bfloat16", "share_of_peak", 0.35),
)
E2E_TARGET_MINUTES = 3.0  # 10 epochs of CelebA, end to end
E2E_TARGET_SHARE = 0.9  # of the bare iteration


def target_lines(report: dict) -> List[str]:
  """Each of the issue's targets against the best row of this run it applies to."""
  def show(field, value):
    # two decimals: a figure just short of its bound must not print as the bound
    return f"{100 * value:.2f}%" if field == "share_of_peak" else f"{value:.2f}x"

  lines = ["", "Against the performance issue's targets (set for one H100):"]
  for what, batch, dtype, field, bound in TARGETS:
    rows = [r for r in report["rows"] if r["batch"] == batch and r.get(field) is not None
            and VARIANTS[r["slug"]] == ("jax", dtype)]
    if not rows:
      lines.append(f"- {what} >= {show(field, bound)}: no such row in this run")
      continue
    best = max(rows, key=lambda r: r[field])
    verdict = "met" if best[field] >= bound else "not met"
    lines.append(f"- {what} >= {show(field, bound)}: {verdict}, {show(field, best[field])} "
                 f"({best['variant']})")
  runs = report.get("end_to_end") or []
  if not runs:
    lines.append("- end to end: no `--e2e` run in this run")
    return lines
  fastest = min(runs, key=lambda e: e["projected_minutes"]["10"])
  minutes = fastest["projected_minutes"]["10"]
  lines.append(f"- 10 epochs of CelebA end to end under {E2E_TARGET_MINUTES:.0f} min: "
               f"{'met' if minutes < E2E_TARGET_MINUTES else 'not met'}, {minutes:.2f} min "
               f"({fastest['name']}, batch {fastest['batch']})")
  for e in runs:
    lines.append(f"- the real loop within {100 * (1 - E2E_TARGET_SHARE):.0f}% of the bare "
                 f"iteration: {'met' if e['vs_bare'] >= E2E_TARGET_SHARE else 'not met'}, "
                 f"{100 * e['vs_bare']:.1f}% ({e['name']})")
  return lines


# What each change was expected to move, written down before a GPU timed it (docs/PERFORMANCE.md,
# "What is in place"): (variant, compared with, batch, low, high), the gain in images/s. "Compared
# with" is a variant of this run, or a float: the variant's ratio to PyTorch eager fp32 in the
# first GPU run (an H200, 2026-11-27), for the changes made to the default step since.
EXPECTED = (
    ("jax-bf16-dpair", "jax-bf16", 64, 0.08, 0.15),
    ("jax-bf16-edgemm", "jax-bf16", 64, 0.13, 0.15),
    ("jax-bf16-dpair-edgemm", "jax-bf16", 64, 0.22, 0.32),  # the two above, compounded
    ("jax-bf16-dpair", "jax-bf16", 256, 0.02, 0.05),
    ("jax-bf16-edgemm", "jax-bf16", 256, 0.09, 0.27),
    ("jax-bf16-dpair-edgemm", "jax-bf16", 256, 0.11, 0.33),
    # the first run: plain bf16 +1.8% in one process, +12% between fresh ones
    ("jax-bf16-dpair-edgemm-scan", "jax-bf16-dpair-edgemm", 64, 0.02, 0.12),
    ("jax-bf16-dpair-edgemm-scan", "jax-bf16-dpair-edgemm", 256, -0.01, 0.01),
    # per-channel sums per sample, ReLUs in cuDNN, bf16 parameter copies, BatchNorm-LeakyReLU
    # backward: +2-4%, +1%, +2.5-4%, +1.5-2% at batch 64; +1%, +1.5%, +1-1.5%, +3-3.5% at 256
    ("jax-bf16", 3.2533, 64, 0.07, 0.11),
    ("jax-bf16", 2.8834, 256, 0.07, 0.08),
)


def expectation_lines(report: dict) -> List[str]:
  """This run's rows against what each change was expected to move (EXPECTED)."""
  rows = {(r["batch"], r["slug"]): r for r in report["rows"]}
  lines = []
  for slug, against, batch, low, high in EXPECTED:
    row = rows.get((batch, slug))
    if row is None:
      continue
    if isinstance(against, str):
      base = rows.get((batch, against))
      if base is None:
        continue
      gain, what = row["images_per_s"] / base["images_per_s"] - 1, against
    elif row.get("vs_torch_fp32") is not None:
      gain = row["vs_torch_fp32"] / against - 1
      what = f"the first run's {against:.2f}x PyTorch eager fp32 (H200; the ratio's gain)"
    else:
      continue
    verdict = "below" if gain < low else "above" if gain > high else "within"
    lines.append(f"- {slug} against {what} at batch {batch}: {100 * gain:+.1f}% (expected "
                 f"{100 * low:+.0f}% to {100 * high:+.0f}%: {verdict})")
  if lines:
    lines = ["", "Against what each change was expected to move (docs/PERFORMANCE.md, written "
             "before timing; the gain in images/s):"] + lines
  return lines


def _projection(minutes: dict) -> str:
  return " / ".join(f"{minutes[str(e)]:,.1f}" for e in PROJECTION_EPOCHS)


def format_table(report: dict) -> str:
  def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)

  epochs = " / ".join(map(str, PROJECTION_EPOCHS))
  lines = [report["header"], "",
           "| batch | variant | images/s | ms/iter | TFLOP/s | share of peak | device memory GiB | "
           f"vs PyTorch eager fp32 | {epochs} epochs of CelebA (min) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in report["rows"]:
    mem = None if r["device_memory"] is None else r["device_memory"] / 2**30
    share = None if r["share_of_peak"] is None else f"{100 * r['share_of_peak']:.1f}%"
    ratio = r.get("vs_torch_fp32")
    lines.append(f"| {r['batch']} | {r['variant']} | {r['images_per_s']:,.0f} | "
                 f"{r['ms_per_iter']:.2f} | {fmt(r['tflops'], '.3g')} | {share or 'n/a'} | "
                 f"{fmt(mem, '.3g')} | {'n/a' if ratio is None else f'{ratio:.2f}x'} | "
                 f"{_projection(r['projected_minutes'])} |")
  for e2e in report.get("end_to_end") or []:
    lines += ["", f"end-to-end `cspgan train`, {e2e['name']} (batch {e2e['batch']}, steps "
              f"{e2e['steps']}, "
              f"{e2e['data']} data; logs every {e2e['steps'] // 2}, sample grids every "
              f"{e2e['sample_every']}, checkpoints every {e2e['checkpoint_every']}): "
              f"{e2e['images_per_s']:,.0f} images/s over the second half = "
              f"{100 * e2e['vs_bare']:.1f}% of the bare iteration of the same variant; "
              f"{epochs} epochs of CelebA: {_projection(e2e['projected_minutes'])} min"]
  lines += target_lines(report)
  lines += expectation_lines(report)
  lines.append("")
  lines.append(f"peak used for the share: {fmt(report.get('peak_tflops'), '.0f')} TFLOP/s (bf16 "
               "dense) and FLOPs counted by XLA (CPU) for the JAX iteration; device memory: JAX, "
               "the compiled step's arguments, results and temporaries (XLA's buffer assignment), "
               "PyTorch, max_memory_allocated over the variant's last timed round; an epoch of "
               f"CelebA is {CELEBA_IMAGES:,} images less the last partial batch")
  return "\n".join(lines)


def write_files(report: dict, out: str) -> None:
  """The table (markdown) to `out` and the JSON beside it, each whole or as it was (a full disk
  or a stopped run leaves the last batch's pair, not half a file)."""
  table, data = format_table(report) + "\n", json.dumps(report, indent=1)
  output_files.write_outputs([(out, _text_writer(table)),
                             (os.path.splitext(out)[0] + ".json", _text_writer(data))])


def _text_writer(text: str):
  def write(path):
    with open(path, "w") as f:
      f.write(text)
  return write


def emit(report: dict, out: Optional[str] = None) -> None:
  """Prints the table; with `out`, writes it there (markdown) and the JSON beside it."""
  print(format_table(report), flush=True)
  if out:
    write_files(report, out)
