"""Data benchmark: preparation speed, input throughput of both paths, and the training step
with device-resident data against the same step on a constant batch.

  python scripts/bench_data.py                      # CPU-sized defaults, a few minutes
  python scripts/bench_data.py --prepare 2000,8000 --resolution 128 --batch 64 --train-config configs/baseline.py

Prints one table; `--json PATH` also writes the figures. Preparation runs on CelebA-shaped
(178x218) JPEGs drawn from the synthetic faces, at two sizes so that linearity shows; the
projected CelebA time is the fit through both (a fixed start-up plus 202,599 images at the
sustained rate, the slope between them).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CELEBA_IMAGES = 202_599


def write_celeba_like_jpegs(folder: str, n: int, start: int = 0) -> None:
  """n JPEGs of 178x218 (CelebA's aligned size), quality 95 like the originals."""
  from PIL import Image
  from cspgan_jax import synthetic
  os.makedirs(folder, exist_ok=True)
  for i in range(0, n, 256):
    faces = synthetic.cartoon_faces(min(256, n - i), 218, seed=1, start=start + i)
    for k, face in enumerate(faces):
      Image.fromarray(face[:, 20:198]).save(os.path.join(folder, f"{start + i + k:06d}.jpg"),
                                            quality=95)


def bench_prepare(sizes, resolution, workers, root):
  from cspgan_jax import prepare_data
  rows, made = [], 0
  images = os.path.join(root, "img_align_celeba")
  for n in sizes:
    write_celeba_like_jpegs(images, n - made, start=made)
    made = n
    out = os.path.join(root, f"tfds_{n}")
    s = prepare_data.prepare(images, out, resolution=resolution, name="celeba", workers=workers)
    rows.append(dict(images=n, seconds=s.seconds, images_per_s=s.images_per_second,
                     workers=s.workers, data_dir=out))
  return rows


def timed(fn, repeats: int, warmup: int = 2) -> float:
  """Median seconds of fn() (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def bench_input(data_dir, resolution, batch, steps, synthetic_n):
  """images/s delivered to the device: device-resident gather, and streaming from array_record."""
  import jax
  import ml_collections
  from cspgan_jax import datasets, input_pipeline
  rows = []
  cfg = ml_collections.ConfigDict(dict(source="synthetic", num_examples=synthetic_n,
                                       synthetic_seed=0, name="", data_dir="", split="train"))
  sources = [("synthetic, in memory", datasets.load_source(cfg, resolution))]
  if data_dir:
    cfg = ml_collections.ConfigDict(dict(source="tfds", name="celeba", data_dir=data_dir,
                                         split="train", num_examples=0))
    sources.append(("prepared array_record", datasets.load_source(cfg, resolution)))
  for name, source in sources:
    layout = input_pipeline.make_layout(len(source), batch)
    resident = input_pipeline.DeviceResidentInput(source, layout, seed=0)
    gather = jax.pmap(resident.batch_fn(), in_axes=(0, 0, None))
    counter = iter(range(10**9))
    dev_s = timed(lambda: gather(resident.images, resident.shard_ids,
                                 np.int32(next(counter))).block_until_ready(), 5 * steps)
    rows.append(dict(path="device-resident gather", source=name, images_per_s=batch / dev_s))
    streaming = input_pipeline.StreamingInput(source, layout, seed=0)
    warm, n = 3, 10 * steps  # the first batches include compiling the permutation
    batches = streaming.batches(0, warm + n)
    convert = jax.pmap(input_pipeline.to_unit_range)
    for _ in range(warm):
      convert(next(batches)).block_until_ready()
    t = time.perf_counter()
    for b in batches:
      convert(b).block_until_ready()  # the step's own conversion, as the device path includes it
    rows.append(dict(path="streaming (4 readers)", source=name,
                     images_per_s=batch * n / (time.perf_counter() - t)))
  return rows


def bench_train_step(config_path, batch, steps, overrides):
  """The training step on a constant device batch vs gathering from the device-resident data."""
  import jax
  from cspgan_jax import config_lib, input_pipeline, parallel, train
  config = config_lib.load_config(config_path, [f"--config.train.batch_size={batch}",
                                                "--config.data.source=synthetic", *overrides])
  r = config.model.resolution
  inp = input_pipeline.make_input(config)
  batch_fn = inp.batch_fn() if inp.kind == "device" else None
  step_fn = functools.partial(train.train_step, config=config, axis_name=parallel.AXIS)

  def constant_step(state, real, rng):
    return step_fn(state, real, jax.random.fold_in(rng, state.step))

  def device_data_step(state, images, shard_id, rng):
    return step_fn(state, batch_fn(images, shard_id, state.step),
                   jax.random.fold_in(rng, state.step))

  n_dev = jax.local_device_count()
  rng = jax.random.PRNGKey(0)
  real = input_pipeline.put_sharded(
      [np.zeros((batch // n_dev, r, r, 3), np.float32)] * n_dev)
  init = train.init_state(config, jax.random.PRNGKey(0))
  # Mapped and compiled as the trainer does its step (parallel.make_step): the state replicated
  # in the compiler's layouts, the data per device.
  const, const_state = parallel.compile_step(
      lambda fmt: parallel.map_over_devices(constant_step, (True, False), state_format=fmt),
      parallel.replicate(init), real, rng)
  runs = {"constant batch": lambda s: const(s, real, rng)}
  states = {"constant batch": const_state}
  if batch_fn is not None:
    dev, dev_state = parallel.compile_step(
        lambda fmt: parallel.map_over_devices(device_data_step, (True, True, False),
                                              state_format=fmt),
        parallel.replicate(init), inp.images, inp.shard_ids, rng)
    runs["device-resident data"] = lambda s: dev(s, inp.images, inp.shard_ids, rng)
    states["device-resident data"] = dev_state
  # Alternate the two in rounds so that drift of the machine (clocks, other load) hits both.
  times = {k: [] for k in runs}
  for round_ in range(steps + 2):
    for k, run in runs.items():
      t = time.perf_counter()
      states[k], m = run(states[k])
      m["Loss_D"].block_until_ready()
      if round_ >= 2:  # the first two rounds compile and warm up
        times[k].append(time.perf_counter() - t)
  results = {k: batch / float(np.median(v)) for k, v in times.items()}
  return dict(config=os.path.basename(config_path), resolution=r, batch=batch, **results)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prepare", default="2000,8000",
                      help="comma-separated image counts for the preparation runs ('' to skip)")
  parser.add_argument("--resolution", type=int, default=128)
  parser.add_argument("--workers", type=int, default=None)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=20, help="timed repeats per figure")
  parser.add_argument("--synthetic", type=int, default=2048, help="in-memory dataset size")
  parser.add_argument("--train-config", default="configs/tiny.py")
  parser.add_argument("--train-batch", type=int, default=64)
  parser.add_argument("--json", default=None, help="also write the figures here")
  args, overrides = parser.parse_known_args(argv)

  import jax
  import tensorflow_datasets as tfds
  device = jax.devices()[0]
  header = (f"{platform.node()} | {os.cpu_count()} CPU cores | {device.platform}: "
            f"{getattr(device, 'device_kind', '')} x{jax.device_count()} | jax {jax.__version__}, "
            f"tfds {tfds.__version__} | {time.strftime('%Y-%m-%d')}")
  report = dict(machine=header)
  with tempfile.TemporaryDirectory() as root:
    sizes = [int(s) for s in args.prepare.split(",") if s]
    prep = bench_prepare(sizes, args.resolution, args.workers, root) if sizes else []
    report["prepare"] = [{k: v for k, v in r.items() if k != "data_dir"} for r in prep]
    report["input"] = bench_input(prep[-1]["data_dir"] if prep else None, args.resolution,
                                  args.batch, args.steps, args.synthetic)
  report["train_step"] = bench_train_step(args.train_config, args.train_batch, args.steps,
                                          overrides)

  print(header)
  if prep:
    print(f"\nprepare-data at {args.resolution}x{args.resolution} "
          f"(CelebA-shaped 178x218 JPEGs, {prep[-1]['workers']} workers)")
    print(f"{'images':>8} {'seconds':>9} {'images/s':>9}")
    for r in prep:
      print(f"{r['images']:>8} {r['seconds']:>9.1f} {r['images_per_s']:>9.0f}")
    if len(prep) >= 2:  # time = fixed + n / rate: the fit's slope is the sustained rate
      n0, n1 = prep[0]["images"], prep[-1]["images"]
      t0, t1 = prep[0]["seconds"], prep[-1]["seconds"]
      per_image = (t1 - t0) / (n1 - n0)
      fixed = t0 - n0 * per_image
    else:
      per_image, fixed = prep[-1]["seconds"] / prep[-1]["images"], 0.0
    report["prepare_sustained_images_per_s"] = 1 / per_image
    report["celeba_projected_minutes"] = (fixed + CELEBA_IMAGES * per_image) / 60
    print(f"sustained {1 / per_image:.0f} images/s (fixed start-up {fixed:.1f} s); projected for "
          f"CelebA ({CELEBA_IMAGES:,} images): {report['celeba_projected_minutes']:.1f} min")
  print(f"\ninput delivered to the device as float batches in [-1, 1], batch {args.batch} at "
        f"{args.resolution}x{args.resolution}")
  print(f"{'path':<26} {'source':<24} {'images/s':>10}")
  for r in report["input"]:
    print(f"{r['path']:<26} {r['source']:<24} {r['images_per_s']:>10.0f}")
  t = report["train_step"]
  print(f"\ntraining step ({t['config']}, {t['resolution']}x{t['resolution']}, batch {t['batch']}), images/s")
  for k in ("constant batch", "device-resident data"):
    if k in t:
      print(f"  {k:<22} {t[k]:>10.0f}")
  if "device-resident data" in t:
    print(f"  ratio device-resident / constant: {t['device-resident data'] / t['constant batch']:.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
