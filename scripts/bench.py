"""Training-iteration benchmark: this project's step against the PyTorch reference, in one run.

  python scripts/bench.py                                   # GPU: 128x128, batch 64 and 256
  python scripts/bench.py --config configs/tiny.py --batches 8 --iters 2 --repeats 2 --no-compile

Every variant runs the full iteration of the seed (D on real, D on fake, D's Adam step, G
through the updated D, G's Adam step) on data already on the device, after warm-up, with device
synchronisation, alternating variant by variant in rounds so that drift of the machine hits all
of them; the figure is the median round. JAX: the trainer's own pmapped step (batch gathered
from device-resident data inside the step), float32 and bfloat16, and with `--scan K` also K
steps per dispatch. PyTorch: eager float32 (TF32 convolutions, PyTorch's default), bf16
autocast with channels_last, and `torch.compile` float32, each with `cudnn.benchmark` on and no
`.item()` per step, as a user tuning for speed would run them.

FLOPs per iteration come from XLA's cost analysis of the float32 step and are used for every
row (the same work). The table goes to stdout, and with `--out` to a file (markdown) plus JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dense bf16 TFLOP/s by device kind, for the "share of peak" column (the issue's H100 figure).
PEAK_BF16_TFLOPS = {"H100": 790.0, "H200": 790.0, "A100": 312.0}


def peak_tflops(device_kind: str, override: float):
  if override:
    return override
  for key, value in PEAK_BF16_TFLOPS.items():
    if key in device_kind:
      return value
  return None


# ---- JAX ----

def jax_variant(config_path, batch, dtype, scan, overrides, unroll=1):
  import jax
  from cspgan_jax import config_lib, input_pipeline, train, trainer
  config = config_lib.load_config(config_path, [
      f"--config.train.batch_size={batch}", f"--config.train.dtype={dtype}",
      "--config.data.source=synthetic", f"--config.data.num_examples={max(4 * batch, 512)}",
      "--config.data.pipeline=device", f"--config.train.steps_per_dispatch={scan}",
      f"--config.train.scan_unroll={unroll}",
      # cadences unused here, but they must be multiples of steps_per_dispatch to validate
      *(f"--config.train.{e}={scan}" for e in ("log_every", "sample_every", "checkpoint_every")),
      *overrides])
  data = input_pipeline.make_input(config)
  step = trainer.make_step(config, "device", data.batch_fn(), steps=scan)
  state = trainer.replicate(train.init_state(config, jax.random.PRNGKey(0)))
  rng = jax.random.PRNGKey(1)
  holder = {"state": state}

  def run(iters):  # iters iterations; returns when the device is done
    for _ in range(iters // scan):
      holder["state"], metrics = step(holder["state"], data.images, data.shard_ids, rng)
    jax.block_until_ready(metrics)

  flops = None
  if scan == 1 and dtype == "float32":
    try:
      cost = step.lower(holder["state"], data.images, data.shard_ids, rng).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      flops = float(cost.get("flops", 0.0)) or None
    except Exception:  # pylint: disable=broad-except  # cost analysis is best effort
      flops = None

  def peak_memory():
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")

  name = f"JAX {dtype}" + (f", {scan} steps/dispatch" if scan > 1 else "") + (
      f" (unroll {unroll})" if scan > 1 and unroll > 1 else "")
  return dict(name=name, run=run, flops=flops, memory=peak_memory, unit=scan)


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

  def peak_memory():
    return torch.cuda.max_memory_allocated() if device == "cuda" else None

  names = {"fp32": "PyTorch eager float32", "bf16": "PyTorch eager bf16 autocast, channels_last",
           "compile": "PyTorch torch.compile float32"}
  return dict(name=names[kind], run=run, flops=None, memory=peak_memory, unit=1)


def _autocast_call(autocast, net, x):
  with autocast():
    return net(x)


# ---- the real loop ----

def end_to_end(config_path, batch, steps, overrides):
  """`cspgan train` on synthetic device-resident data; images/s over the second half."""
  import tempfile
  from cspgan_jax import config_lib, trainer
  half = max(steps // 2, 1)
  sample_every = min(500, half)
  config = config_lib.load_config(config_path, [
      f"--config.train.batch_size={batch}", f"--config.train.num_steps={2 * half}",
      f"--config.train.log_every={half}", f"--config.train.sample_every={sample_every}",
      f"--config.train.checkpoint_every={2 * half}", "--config.data.source=synthetic",
      f"--config.data.num_examples={max(64 * batch, 2048)}", "--config.data.pipeline=device",
      *overrides])
  with tempfile.TemporaryDirectory() as workdir:
    trainer.train_and_evaluate(config, workdir, progress=False)
    with open(os.path.join(workdir, trainer.METRICS_FILE)) as f:
      last = json.loads(f.read().splitlines()[-1])
  return dict(batch=batch, steps=2 * half, sample_every=sample_every, data="synthetic",
              images_per_s=last["images_per_sec"])


# ---- the table ----

def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/baseline.py")
  parser.add_argument("--batches", default="64,256")
  parser.add_argument("--iters", type=int, default=20, help="iterations per timed round")
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
  parser.add_argument("--scan", type=int, default=0, help="also JAX with K steps per dispatch")
  parser.add_argument("--unroll", type=int, default=1,
                      help="lax.scan unroll for --scan (XLA:CPU runs a rolled scan 15x slower)")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
  parser.add_argument("--peak-tflops", type=float, default=0.0, help="override the chip's peak")
  parser.add_argument("--out", default=None, help="write the table here (and .json beside it)")
  parser.add_argument("--e2e", type=int, default=0,
                      help="also run `cspgan train` for this many steps at the first batch size "
                           "(seed's sample cadence, a log at the middle and the end, a checkpoint "
                           "at the end) and compare its images/s over the second half with the "
                           "bare JAX float32 iteration")
  args, overrides = parser.parse_known_args(argv)

  import jax
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  peak = peak_tflops(kind, args.peak_tflops)
  versions = f"jax {jax.__version__}"
  try:
    import torch
    versions += f", torch {torch.__version__}"
  except ImportError:
    args.no_torch = True
  header = (f"{kind} ({device.platform}) | {platform.node()} | {versions} | "
            f"{time.strftime('%Y-%m-%d %H:%M')}")
  print(header, flush=True)
  results = []
  for batch in [int(b) for b in args.batches.split(",")]:
    variants = [jax_variant(args.config, batch, "float32", 1, overrides),
                jax_variant(args.config, batch, "bfloat16", 1, overrides)]
    if args.scan > 1:
      variants.append(jax_variant(args.config, batch, "bfloat16", args.scan, overrides,
                                  unroll=args.unroll))
    if not args.no_torch:
      variants.append(torch_variant(args.config, batch, "fp32", overrides))
      variants.append(torch_variant(args.config, batch, "bf16", overrides))
      if not args.no_compile:
        variants.append(torch_variant(args.config, batch, "compile", overrides))
    flops = next((v["flops"] for v in variants if v["flops"]), None)
    iters = max(args.iters, max(v["unit"] for v in variants))
    iters -= iters % max(v["unit"] for v in variants)
    times = {v["name"]: [] for v in variants}
    for round_ in range(args.warmup + args.repeats):
      for v in variants:
        t = time.perf_counter()
        v["run"](iters)
        if round_ >= args.warmup:
          times[v["name"]].append((time.perf_counter() - t) / iters)
    base = None
    for v in variants:
      sec = float(np.median(times[v["name"]]))
      row = dict(batch=batch, variant=v["name"], images_per_s=batch / sec, ms_per_iter=1e3 * sec,
                 tflops=(flops / sec / 1e12) if flops else None, peak_memory=v["memory"]())
      row["share_of_peak"] = row["tflops"] / peak if (row["tflops"] and peak) else None
      if v["name"] == "PyTorch eager float32":
        base = row["images_per_s"]
      results.append(row)
    for row in results:
      if row["batch"] == batch:
        row["vs_torch_fp32"] = row["images_per_s"] / base if base else None
    if flops:
      print(f"batch {batch}: {flops / batch / 1e9:.2f} GFLOP per image per iteration (XLA)",
            flush=True)

  e2e = None
  if args.e2e:
    e2e = end_to_end(args.config, int(args.batches.split(",")[0]), args.e2e, overrides)
    bare = next(r for r in results if r["variant"] == "JAX float32")["images_per_s"]
    e2e["vs_bare"] = e2e["images_per_s"] / bare

  def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)

  lines = [header, "",
           "| batch | variant | images/s | ms/iter | TFLOP/s | share of peak | peak memory GiB | vs PyTorch eager fp32 |",
           "|---|---|---|---|---|---|---|---|"]
  for r in results:
    mem = None if r["peak_memory"] is None else r["peak_memory"] / 2**30
    share = None if r["share_of_peak"] is None else f"{100 * r['share_of_peak']:.1f}%"
    ratio = r.get("vs_torch_fp32")
    lines.append(f"| {r['batch']} | {r['variant']} | {r['images_per_s']:,.0f} | "
                 f"{r['ms_per_iter']:.2f} | {fmt(r['tflops'], '.3g')} | {share or 'n/a'} | "
                 f"{fmt(mem, '.2f')} | {'n/a' if ratio is None else f'{ratio:.2f}x'} |")
  if e2e:
    lines += ["", f"end-to-end `cspgan train` (batch {e2e['batch']}, steps {e2e['steps']}, "
              f"{e2e['data']} data, logging + samples every {e2e['sample_every']} + checkpoint): "
              f"{e2e['images_per_s']:,.0f} images/s over the second half = "
              f"{100 * e2e['vs_bare']:.1f}% of the bare JAX float32 iteration"]
  lines.append("")
  lines.append(f"peak used for the share: {fmt(peak, '.0f')} TFLOP/s (bf16 dense); peak memory is "
               "the process's high-water mark so far (JAX) or torch's max_memory_allocated")
  table = "\n".join(lines)
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(table + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
      json.dump(dict(header=header, rows=results, end_to_end=e2e), f, indent=1)
  return results


if __name__ == "__main__":
  main()
