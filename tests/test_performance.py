"""Mixed precision, several steps per dispatch, and the benchmark (`cspgan bench`, at CPU sizes:
it is tested for correctness here; its figures only mean something on a GPU)."""

import argparse
import gzip
import importlib
import json
import os
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cspgan_jax import checkpoint, cli, config_lib, parallel, train, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def test_bfloat16_runs_convolutions_in_bf16_and_keeps_state_in_float32():
  results = {}
  for dtype in ("float32", "bfloat16"):
    config = config_lib.load_config(TINY, [f"--config.train.dtype={dtype}",
                                           "--config.model.block=leaky_bn",
                                           "--config.model.discriminator=avgpool"])
    state = train.init_state(config, jax.random.PRNGKey(0))
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (8, 32, 32, 3), minval=-1, maxval=1))
    step = jax.jit(lambda s, x, r, c=config: train.train_step(s, x, r, config=c))
    hlo = step.lower(state, x, jax.random.PRNGKey(1)).as_text()
    convs = [line for line in hlo.splitlines() if "convolution" in line]
    results[dtype] = (step(state, x, jax.random.PRNGKey(1)), convs)
  (new32, m32), convs32 = results["float32"]
  (new16, m16), convs16 = results["bfloat16"]
  assert convs16 and all("bf16" in line for line in convs16)
  assert convs32 and not any("bf16" in line for line in convs32)
  # params, Adam, BN statistics; beside them, the convolutions' parameters rounded to bf16
  for leaf in jax.tree_util.tree_leaves(new16.without_compute_params()):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(
      (new16.g.compute_params, new16.d.compute_params))} == {jnp.dtype(jnp.bfloat16)}
  for k in m32:
    assert m16[k].dtype == jnp.float32
    assert abs(float(m16[k]) - float(m32[k])) <= 2e-2 * abs(float(m32[k])), (k, m16[k], m32[k])
  assert not np.allclose(float(m16["Loss_D"]), float(m32["Loss_D"]), rtol=1e-6)  # really bf16


def test_several_steps_per_dispatch_follow_the_same_arithmetic(tmp_path):
  runs = {}
  for k in (1, 4):
    config = config_lib.load_config(TINY, [f"--config.train.steps_per_dispatch={k}",
                                           "--config.train.num_steps=10",
                                           "--config.train.log_every=4",
                                           "--config.train.sample_every=8",
                                           "--config.train.checkpoint_every=8"])
    workdir = str(tmp_path / f"k{k}")
    state = trainer.train_and_evaluate(config, workdir, progress=False)
    runs[k] = (state, [r["step"] for r in trainer.logged_metrics(workdir)])
  assert runs[1][1] == runs[4][1] == [4, 8, 10]
  assert int(runs[4][0].step) == 10  # two scans of 4, then two single steps
  # The compiler may fuse a scanned body differently, so not bit for bit (2.4e-6 measured).
  for a, b in zip(jax.tree_util.tree_leaves(runs[1][0]), jax.tree_util.tree_leaves(runs[4][0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # Extended from step 10, which is no multiple of 4: single steps to 12, then scans again, so
  # the cadences hold (they used to be missed to the end: 14, 18, 19, 20).
  config.train.num_steps = 20
  trainer.train_and_evaluate(config, str(tmp_path / "k4"), progress=False)
  assert [r["step"] for r in trainer.logged_metrics(str(tmp_path / "k4"))] == [
      4, 8, 10, 12, 16, 20]
  assert checkpoint.all_steps(str(tmp_path / "k4")) == [10, 16, 20]


def test_cadences_must_be_multiples_of_steps_per_dispatch():
  with pytest.raises(Exception, match="multiples of train.steps_per_dispatch"):
    config_lib.load_config(TINY, ["--config.train.steps_per_dispatch=3"])


def test_bench_script_measures_writes_hlo_and_traces(tmp_path):
  out, hlo, prof = tmp_path / "bench.md", tmp_path / "hlo", tmp_path / "prof"
  # jax-bf16-dpair-edgemm: both candidate options (each alone is the same code path); -scan:
  # the same with several steps a dispatch (as jax-bf16-scan, which differs only in its options)
  slugs = ["jax-fp32", "jax-bf16", "jax-bf16-dpair-edgemm", "jax-bf16-dpair-edgemm-scan",
           "torch-fp32", "torch-bf16"]
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "bench.py"), "--config", TINY,
       "--batches", "8", "--iters", "2", "--repeats", "1", "--warmup", "1",
       "--variants", ",".join(slugs), "--scan", "2", "--e2e", "8",
       "--e2e-variants", "jax-fp32,jax-bf16-dpair-edgemm", "--hlo", str(hlo),
       "--profile", str(prof), "--profile-iters", "2", "--out", str(out)],
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "bench: warning" not in proc.stderr, proc.stderr[-3000:]
  report = json.loads((tmp_path / "bench.json").read_text())
  rows = report["rows"]
  assert [r["variant"] for r in rows] == [
      "JAX float32", "JAX bfloat16",
      "JAX bfloat16, D on real + fake in one pass, edge layers as matmuls",
      "JAX bfloat16, 2 steps/dispatch, D on real + fake in one pass, edge layers as matmuls",
      "PyTorch eager float32",
      "PyTorch eager bf16 autocast, channels_last"]
  assert [r["slug"] for r in rows] == slugs
  from cspgan_jax import bench
  flops = bench.count_flops(TINY, 8, [])
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(
      jax.eval_shape(lambda: train.init_state(config_lib.load_config(TINY), jax.random.PRNGKey(0)))))
  for r in rows:
    assert r["images_per_s"] > 0
    assert abs(r["tflops"] * 1e12 * r["ms_per_iter"] / 1e3 - flops) <= 1e-9 * flops, r["slug"]
    if r["slug"].startswith("jax"):  # the state, its donated successor and the temporaries
      assert state_bytes < r["device_memory"] < 20 * state_bytes, (r["slug"], r["device_memory"])
    else:  # no device memory to read on a CPU
      assert r["device_memory"] is None
    assert abs(r["ms_per_iter"] * r["images_per_s"] / 1e3 - 8) < 1e-6 * 8
    # the seconds its build took (a GPU call's budget is planned from them), also in the log
    assert r["build_s"] > 0 and f"bench: {r['slug']} at batch 8 built in " in proc.stderr
    assert r["warmup_s"] > 0  # one untimed round
    epoch = (202_599 // 8) * 8  # the last partial batch dropped
    assert set(r["projected_minutes"]) == {"10", "15", "40"}
    for epochs, minutes in r["projected_minutes"].items():
      expected = int(epochs) * epoch / r["images_per_s"] / 60
      assert abs(minutes - expected) <= 1e-9 * expected, (r["slug"], epochs)
  assert rows[4]["vs_torch_fp32"] == 1.0
  # each end-to-end run trains with its variant's dtype and options, read against its bare row
  assert [(e["variant"], e["dtype"], e["options"]) for e in report["end_to_end"]] == [
      ("jax-fp32", "float32", []),
      ("jax-bf16-dpair-edgemm", "bfloat16",
       ["train.d_real_fake_together=True", "model.edge_layers_as_matmul=True"])]
  for e2e, bare in zip(report["end_to_end"], (rows[0], rows[2])):
    assert e2e["images_per_s"] > 0 and e2e["batch"] == 8
    # The timed second half holds a checkpoint and two grids; the first grid compiled before it.
    assert (e2e["steps"], e2e["sample_every"], e2e["checkpoint_every"]) == (8, 2, 4)
    assert abs(e2e["vs_bare"] - e2e["images_per_s"] / bare["images_per_s"]) < 1e-9
    assert e2e["name"] == bare["variant"]
    assert e2e["wall_s"] > 0 and f"end to end, {e2e['name']}, at batch 8: " in proc.stderr
  table = out.read_text()
  assert "| 8 | JAX float32 |" in table
  assert "end-to-end `cspgan train`, JAX float32 (batch 8" in table
  assert ("end-to-end `cspgan train`, JAX bfloat16, D on real + fake in one pass, edge layers as "
          "matmuls (batch 8") in table
  assert table.count("of the bare iteration of the same variant") == 2
  assert "\n".join(bench.target_lines(report)) in table  # the issue's targets, under the rows
  assert "10 / 15 / 40 epochs of CelebA (min)" in table
  for slug in slugs[:4]:
    text = (hlo / f"b8_{slug}.hlo.txt").read_text()
    assert "HloModule" in text and "ENTRY" in text
  assert sorted(os.listdir(hlo)) == sorted(f"b8_{s}.hlo.txt" for s in slugs[:4])
  for slug in slugs:
    with gzip.open(prof / f"b8_{slug}.trace.json.gz", "rt") as f:
      events = json.load(f)["traceEvents"]
    assert isinstance(events, list) and events, slug
    assert f"bench: {slug} at batch 8 traced in " in proc.stderr
    if slug.startswith("jax"):  # XLA's per-op events name the HLO instruction
      assert any("hlo_op" in (e.get("args") or {}) for e in events), slug
  # With --profile each end-to-end run also traces 4 steps after its timed half (the tail's
  # log is not the figure's), kept beside the others with the step's HLO for trace_report.
  from cspgan_jax import trace_report
  for e2e in report["end_to_end"]:
    assert e2e["traced_steps"] == 4
    traced = trace_report.report_file(str(prof / f"b8_e2e-{e2e['variant']}.trace.json.gz"))
    assert traced.iterations == 4 and traced.hlo is not None


def test_bench_keeps_an_earlier_runs_files(tmp_path, capsys):
  from cspgan_jax import cli
  out = tmp_path / "bench.md"
  out.write_text("an earlier table\n")
  assert cli.main(["bench", "--config", TINY, "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "not overwriting" in err and str(out) in err, err
  assert out.read_text() == "an earlier table\n"


@pytest.mark.parametrize("flag,value,needle", [
    ("--variants", "jax-fp32,jax-fp64", "'jax-fp64'"),
    ("--batches", "8,0", "--batches"),
    ("--e2e-variants", "jax-fp32,jax-bf16-scan", "--e2e-variants: 'jax-bf16-scan' is not"),
    ("--profile-variants", "jax-fp64", "--profile-variants: 'jax-fp64' is not one of"),
    ("--variants", "jax-fp32@32", "--variants: 'jax-fp32@32': '32' is not one of --batches"),
    ("--variants", "jax-fp32@", "--variants: 'jax-fp32@': '' is not one of --batches"),
])
def test_bench_rejects_bad_arguments_in_one_line(capsys, flag, value, needle):
  from cspgan_jax import cli
  assert cli.main(["bench", "--config", TINY, flag, value]) == 2
  err = capsys.readouterr().err
  assert err.startswith("cspgan: error: ") and err.count("\n") == 1 and needle in err, err


def test_matmul_precision_reaches_every_convolution():
  """float32 on a GPU: "default" lets XLA use TF32 (as PyTorch's convs do); parity asks "highest"."""
  import functools
  for precision, marker in (("default", "precision DEFAULT"), ("highest", "precision HIGHEST")):
    config = config_lib.load_config(TINY, [f"--config.train.matmul_precision={precision}"])
    state = train.init_state(config, jax.random.PRNGKey(0))
    text = jax.jit(functools.partial(train.train_step, config=config)).lower(
        state, np.zeros((8, 32, 32, 3), np.float32), jax.random.PRNGKey(1)).as_text()
    convs = [line for line in text.splitlines() if "convolution" in line]
    assert len(convs) > 20 and all(marker in line for line in convs)


def test_the_step_computes_the_same_with_the_state_in_gpu_layouts():
  """On a GPU XLA stores conv kernels and their Adam moments OHWI in memory (Layout.AUTO); on
  this CPU it keeps row-major, so that path is pinned here by hand: the state placed in GPU-like
  layouts, three steps, the state read back to the host, G sampled from its device copy. All
  equal the row-major run bit for bit: layouts change where bytes lie, not the arithmetic."""
  from jax.experimental.layout import Format, Layout
  from cspgan_jax import input_pipeline
  config = config_lib.load_config(TINY, ["--config.data.pipeline=device"])
  data = input_pipeline.make_input(config)
  args = (data.images, data.shard_ids, jax.random.PRNGKey(1))
  state0 = train.init_state(config, jax.random.PRNGKey(0))
  make = lambda fmt: parallel.make_step(config, "device", data.batch_fn(), state_format=fmt)
  rep = parallel.replicated_sharding()
  gpu_like = jax.tree_util.tree_map(
      lambda x: Format(Layout((3, 0, 1, 2) if np.ndim(x) == 4 else tuple(range(np.ndim(x)))),
                       rep), state0)
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state0)
  runs = {}
  for name in ("row-major", "gpu-like"):
    if name == "row-major":
      step, state = parallel.compile_step(make, parallel.replicate(state0), *args)
    else:
      step = make(gpu_like).lower(shapes, *args).compile()
      state = parallel.place_for(parallel.replicate(state0), gpu_like)
      kernel = state.g.params["main_1"]["left_0"]["kernel"]
      assert kernel.format.layout.major_to_minor == (3, 0, 1, 2)
    for _ in range(3):
      state, metrics = step(state, *args)
    if name == "gpu-like":  # the donated state comes back in the same layouts
      kernel = state.g.params["main_1"]["left_0"]["kernel"]
      assert kernel.format.layout.major_to_minor == (3, 0, 1, 2)
    g = parallel.first_local_copy(state.g)
    sample = train.generate(config, g.params, g.batch_stats,
                            train.sample_latents(jax.random.PRNGKey(5), 4, config.model.nz))
    runs[name] = (parallel.unreplicate(state), parallel.unreplicate(metrics), np.asarray(sample))
  (s_a, m_a, x_a), (s_b, m_b, x_b) = runs["row-major"], runs["gpu-like"]
  for a, b in zip(jax.tree_util.tree_leaves((s_a, m_a, x_a)),
                  jax.tree_util.tree_leaves((s_b, m_b, x_b))):
    np.testing.assert_array_equal(a, b)


def test_bench_leaves_out_a_variant_that_fails_to_build(tmp_path, capsys, monkeypatch):
  """On a GPU's one call, a variant that breaks (a jax or torch version's API, memory) costs its
  own row, one warning line, not the whole table."""
  from cspgan_jax import bench

  def broken(*args, **kwargs):
    raise RuntimeError("no such API\nin this version")

  monkeypatch.setattr(bench, "torch_variant", broken)
  out = tmp_path / "bench.md"
  assert cli.main(["bench", "--config", TINY, "--batches", "8", "--iters", "1", "--repeats", "1",
                   "--warmup", "1", "--variants", "jax-fp32,torch-fp32", "--out", str(out)]) == 0
  err = [l for l in capsys.readouterr().err.splitlines() if "bench: warning" in l]
  assert err == ["bench: warning: torch-fp32 at batch 8 left out, it failed to build: "
                 "RuntimeError: no such API in this version"]
  rows = [l for l in out.read_text().splitlines() if l.startswith("| 8 |")]
  assert len(rows) == 1 and "| JAX float32 |" in rows[0], rows


def test_flop_count_is_xlas_count_of_the_compiled_step():
  """The bench counts FLOPs on the step lowered for a CPU, since XLA:GPU's count of its compiled
  step leaves out cuDNN's convolutions; it is the count XLA:CPU gives the compiled step."""
  from cspgan_jax import bench
  counted = bench.count_flops(TINY, 8, [])
  config = bench._jax_config(TINY, 8, "float32", 1, [])  # pylint: disable=protected-access
  batch_fn, mesh, state, args = parallel.abstract_training_inputs(config, jax.devices()[:1])
  compiled = parallel.make_step(config, "device", batch_fn, 1, mesh,
                                parallel.replicated_sharding(mesh)).lower(state, *args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # Convolutions are most of it: G and D forward, and their two backward passes.
  assert counted == pytest.approx(cost["flops"], rel=0.01)
  assert counted > 8 * 1e6


def test_pytorch_memory_is_one_variants_own(tiny_config):
  """What is taken off torch's peak for the other variants is what one variant holds: after an
  iteration, parameters, gradients, two Adam moments (float32) and the inputs."""
  import torch  # pylint: disable=import-outside-toplevel
  from cspgan_jax import bench, torch_reference
  config = tiny_config("model.block=leaky_bn")
  net_g, net_d = torch_reference.build_reference(config.model, seed=0)
  opt_g, opt_d = torch_reference.make_optimizers(net_g, net_d, config.train)
  real = torch.rand(4, 3, 32, 32)
  torch_reference.train_iteration(net_g, net_d, opt_g, opt_d, real, torch.randn(4, 16, 1, 1))
  params = sum(p.numel() for net in (net_g, net_d) for p in net.parameters())
  buffers = sum(b.numel() * b.element_size() for net in (net_g, net_d) for b in net.buffers())
  got = bench.torch_resident_bytes((net_g, net_d), (opt_g, opt_d), (real, real[:1]), "cpu")
  # Adam's step counters are 4-byte CPU tensors too; a view of `real` is not counted twice.
  steps = 4 * sum(len(opt.state) for opt in (opt_g, opt_d))
  assert got == 4 * params * 4 + buffers + steps + real.numel() * 4


def test_bench_traces_after_every_figure_and_jax_before_pytorch(tmp_path, monkeypatch, capsys):
  """PyTorch's profiler keeps CUPTI on a GPU (a JAX trace after it came back without GPU events
  on the H200): the bench traces every JAX variant, all batches, before any PyTorch one; and
  only the variants `--profile-variants` names (the GPU call leaves PyTorch's out). The
  end-to-end run comes right after the first batch's rows, so that a GPU call cut short in the
  second batch keeps it."""
  from cspgan_jax import bench
  order = []
  monkeypatch.setattr(bench, "_profile", lambda v, s, b, i, d: order.append((s, b)) or "x")

  def end_to_end(config, batch, steps, overrides, variant, trace_to=None):
    order.append(("end to end", batch))
    assert trace_to == str(tmp_path / "prof" / f"b{batch}_e2e-{variant}")
    return dict(variant=variant, dtype="float32", batch=batch, steps=steps, sample_every=2,
                checkpoint_every=4, data="synthetic", images_per_s=1.0)
  monkeypatch.setattr(bench, "end_to_end", end_to_end)
  out = tmp_path / "bench.md"
  # jax-bf16@16: at batch 16 only, so neither its row nor its trace at batch 8
  assert cli.main(["bench", "--config", TINY, "--batches", "8,16", "--iters", "1", "--repeats",
                   "1", "--warmup", "0", "--variants", "jax-fp32,jax-bf16@16,torch-fp32",
                   "--profile", str(tmp_path / "prof"), "--e2e", "8", "--out", str(out)]) == 0
  # every figure first (the end-to-end run right after the rows of its batch), then every JAX
  # trace, then PyTorch's
  assert order == [("end to end", 8), ("jax-fp32", 8), ("jax-fp32", 16), ("jax-bf16", 16),
                   ("torch-fp32", 8), ("torch-fp32", 16)]
  rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
  assert [(r["batch"], r["slug"]) for r in rows] == [
      (8, "jax-fp32"), (8, "torch-fp32"), (16, "jax-fp32"), (16, "jax-bf16"), (16, "torch-fp32")]
  assert "end-to-end `cspgan train`, JAX float32 (batch 8" in out.read_text()
  args = lambda profile_variants: argparse.Namespace(profile_variants=profile_variants)
  measured = ["jax-fp32", "jax-bf16", "torch-fp32"]
  assert bench.profiled_variants(args(None), measured) == measured
  assert bench.profiled_variants(args("torch-fp32,jax-fp32"), measured) == ["jax-fp32",
                                                                            "torch-fp32"]
  # a traced variant must be a measured one: one line, before any work
  capsys.readouterr()
  assert cli.main(["bench", "--config", TINY, "--variants", "jax-fp32", "--profile",
                   str(tmp_path / "prof"), "--profile-variants", "torch-fp32"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--profile-variants: 'torch-fp32' is not one of jax-fp32" in err


def test_bench_end_to_end_needs_its_bare_variant(capsys):
  assert cli.main(["bench", "--config", TINY, "--variants", "jax-fp32", "--e2e", "8",
                   "--e2e-variants", "jax-fp32,jax-bf16"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "add jax-bf16 to --variants" in err, err
  # the end-to-end runs are at the first batch size: their variant must run there
  assert cli.main(["bench", "--config", TINY, "--batches", "8,16", "--variants",
                   "jax-fp32,jax-bf16@16", "--e2e", "8", "--e2e-variants", "jax-bf16"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "at batch 8: add jax-bf16 to --variants at that" in err, err


def test_bench_reads_the_issues_targets_off_the_best_row_of_each():
  from cspgan_jax import bench

  def row(batch, slug, ratio, share):
    return dict(batch=batch, slug=slug, variant=f"{slug} name", vs_torch_fp32=ratio,
                share_of_peak=share)

  def e2e(slug, minutes, vs_bare):
    return dict(name=f"{slug} name", batch=64, vs_bare=vs_bare,
                projected_minutes={"10": minutes, "15": 1.5 * minutes, "40": 4 * minutes})

  rows = [row(64, "jax-fp32", 2.12, 0.118), row(64, "jax-bf16", 3.25, 0.18),
          row(64, "jax-bf16-dpair-edgemm", 4.02, 0.22), row(64, "torch-fp32", 1.0, 0.05),
          row(64, "torch-bf16", 4.5, 0.3),  # a PyTorch row never counts for JAX's targets
          row(256, "jax-bf16", 2.9, 0.289), row(256, "jax-bf16-scan", 2.9, 0.3499)]
  report = dict(rows=rows, end_to_end=[e2e("jax-fp32", 4.6, 0.93),
                                       e2e("jax-bf16-dpair-edgemm", 2.95, 0.88)])
  assert bench.target_lines(report)[1:] == [
      "Against the performance issue's targets (set for one H100):",
      "- batch 64, JAX float32, vs PyTorch eager fp32 >= 1.50x: met, 2.12x (jax-fp32 name)",
      "- batch 64, JAX bf16, vs PyTorch eager fp32 >= 4.00x: met, 4.02x "
      "(jax-bf16-dpair-edgemm name)",
      "- batch 256, JAX bf16, share of the bf16 peak >= 35.00%: not met, 34.99% "
      "(jax-bf16-scan name)",
      "- 10 epochs of CelebA end to end under 3 min: met, 2.95 min (jax-bf16-dpair-edgemm name, "
      "batch 64)",
      "- the real loop within 10% of the bare iteration: met, 93.0% (jax-fp32 name)",
      "- the real loop within 10% of the bare iteration: not met, 88.0% "
      "(jax-bf16-dpair-edgemm name)"]
  # a run without batch 256, without JAX float32 and without --e2e says so, line by line
  lines = bench.target_lines(dict(rows=rows[1:3], end_to_end=None))
  assert lines[2].endswith(">= 1.50x: no such row in this run")
  assert lines[4].endswith(">= 35.00%: no such row in this run")
  assert lines[5] == "- end to end: no `--e2e` run in this run"


def test_bench_reads_each_expectation_against_its_rows():
  """bench.md says, for each change, whether this run's gain fell within what was written down
  before timing it; an expectation whose rows this run lacks is left out, not guessed."""
  from cspgan_jax import bench

  def row(batch, slug, images_per_s, ratio):
    return dict(batch=batch, slug=slug, images_per_s=images_per_s, vs_torch_fp32=ratio)

  rows = [row(64, "jax-bf16", 12000.0, 3.25 * 1.09), row(64, "jax-bf16-edgemm", 13440.0, None),
          row(64, "jax-bf16-dpair", 12900.0, None), row(64, "jax-bf16-dpair-edgemm", 16200.0, None),
          row(256, "jax-bf16", 20000.0, None)]  # no PyTorch row at 256: no ratio there
  expected = {(slug, against, batch): (low, high)
              for slug, against, batch, low, high in bench.EXPECTED}
  assert expected[("jax-bf16-edgemm", "jax-bf16", 64)] == (0.13, 0.15)
  lines = bench.expectation_lines(dict(rows=rows))
  assert lines[:2] == ["", "Against what each change was expected to move (docs/PERFORMANCE.md, "
                       "written before timing; the gain in images/s):"]
  assert lines[2:] == [
      "- jax-bf16-dpair against jax-bf16 at batch 64: +7.5% (expected +8% to +15%: below)",
      "- jax-bf16-edgemm against jax-bf16 at batch 64: +12.0% (expected +13% to +15%: below)",
      "- jax-bf16-dpair-edgemm against jax-bf16 at batch 64: +35.0% (expected +22% to +32%: "
      "above)",
      "- jax-bf16 against the first run's 3.25x PyTorch eager fp32 (H200; the ratio's gain) at "
      "batch 64: +8.9% (expected +7% to +11%: within)"]
  assert bench.expectation_lines(dict(rows=rows[:1])) == lines[:2] + lines[-1:]
  assert bench.expectation_lines(dict(rows=[row(8, "jax-fp32", 1.0, 1.0)])) == []


def test_bench_variants_turn_on_their_options_xlas_among_them():
  from cspgan_jax import bench
  overrides = bench.variant_options("jax-bf16-dpair-edgemm-pdl-cublas")
  assert overrides == ["--config.train.d_real_fake_together=True",
                       "--config.model.edge_layers_as_matmul=True",
                       "--config.train.xla_options=xla_gpu_enable_pdl=true,"
                       "xla_gpu_enable_triton_gemm=false"]
  config = config_lib.load_config(TINY, overrides)
  assert parallel.xla_options(config.train) == {"xla_gpu_enable_pdl": True,
                                                "xla_gpu_enable_triton_gemm": False}
  assert bench.options_on(config) == [
      "train.d_real_fake_together=True", "model.edge_layers_as_matmul=True",
      "train.xla_options=xla_gpu_enable_pdl=true",
      "train.xla_options=xla_gpu_enable_triton_gemm=false"]
  assert bench.options_on(config_lib.load_config(TINY)) == []
  assert bench.variant_options("jax-bf16-scan") == []


@pytest.mark.parametrize("dry", ["", "1"])
def test_the_gpu_calls_arguments_are_valid(tmp_path, dry):
  """scripts/gpu_check.sh's stages, as the GPU call (and its CPU dry run) would pass them: the
  bench's arguments and the options stage's pass the bench's own checks, and every test file
  named exists, so that a slip in the script is found here and not in a rare GPU call."""
  from cspgan_jax import bench
  env = dict(os.environ, GPU_CHECK_PRINT_ARGS="1", GPU_CHECK_DRY=dry, OUT=str(tmp_path / "out"))
  proc = subprocess.run(["bash", os.path.join("scripts", "gpu_check.sh")], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  bench_args, option_args, tests = proc.stdout.splitlines()
  parser = argparse.ArgumentParser()
  bench.add_arguments(parser)
  for line, dest in ((bench_args, "bench"), (option_args, "options")):
    args = parser.parse_args(line.split() + [
        "--out", str(tmp_path / dest / "bench.md"), "--hlo", str(tmp_path / dest),
        "--profile", str(tmp_path / dest)])
    batches, at = bench._validate(args)  # raises on a bad variant, batch or e2e pairing
    bench.profiled_variants(args, list(at))
    assert os.path.exists(os.path.join(REPO, args.config))
    if not dry and dest == "bench":  # the issue's targets are read at these batch sizes
      assert batches == [64, 256] and args.e2e >= 1000
      assert {"jax-fp32", "jax-bf16", "torch-fp32"} <= {s for s, b in at.items() if b == batches}
  for test in tests.split():
    assert os.path.isfile(os.path.join(REPO, test)), test


def _bench_args(tmp_path, **kw):
  from cspgan_jax import bench  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser()
  bench.add_arguments(parser)
  a = parser.parse_args(["--config", TINY, "--batches", "64", "--variants",
                         "jax-fp32,jax-bf16-scan,torch-fp32,torch-bf16", "--iters", "20",
                         "--scan", "8", "--warmup", "2", "--repeats", "3",
                         "--peak-tflops", "100", "--out", str(tmp_path / "b.md")])
  for k, v in kw.items():
    setattr(a, k, v)
  return a


def test_measuring_loop_arithmetic(tmp_path, monkeypatch):
  """bench.run with a fake clock and fake variants of known seconds an iteration, at the GPU
  call's settings (--iters 20 --scan 8): whole dispatches, variants alternating round by
  round, warm-ups left out, the median, memory reset before the last round, and every column
  derived from them."""
  from cspgan_jax import bench  # pylint: disable=import-outside-toplevel
  clock = [0.0]
  log = []  # (event, slug, iters)
  # seconds per iteration of each variant, by timed round; warm-up rounds cost 1000 s extra
  per_iter = {"jax-fp32": [0.010, 0.020, 0.100], "jax-bf16-scan": [0.004, 0.005, 0.050],
              "torch-fp32": [0.040, 0.050, 0.060], "torch-bf16": [0.020, 0.025, 0.030]}
  calls = {s: 0 for s in per_iter}

  def make(slug, args, batch, overrides):
    unit = args.scan if slug.endswith("-scan") else 1

    def run(iters):
      n = calls[slug]
      calls[slug] += 1
      log.append(("run", slug, iters))
      clock[0] += (1000.0 if n < args.warmup else 0.0) + iters * per_iter[slug][
          max(n - args.warmup, 0)]

    v = dict(name=slug, run=run, memory=lambda: 1000 * calls[slug], unit=unit,
             framework=bench.VARIANTS[slug][0])
    if slug.startswith("torch"):
      v["reset_memory"] = lambda: log.append(("reset", slug, calls[slug]))
    return v

  monkeypatch.setattr(bench, "_build", make)
  monkeypatch.setattr(bench, "count_flops", lambda *a: 2e12)
  monkeypatch.setattr(bench, "time", types.SimpleNamespace(
      perf_counter=lambda: clock[0], strftime=time.strftime))
  report = bench.run(_bench_args(tmp_path), [])
  rows = {r["slug"]: r for r in report["rows"]}
  # iterations per round: --iters 20 rounded down to whole 8-step dispatches, the same for all
  assert {it for ev, _, it in log if ev == "run"} == {16}
  # rounds alternate variant by variant
  runs = [s for ev, s, _ in log if ev == "run"]
  assert runs == list(per_iter) * 5
  # the memory figure: reset right before the last round, read after it
  for s in ("torch-fp32", "torch-bf16"):
    assert ("reset", s, 4) in log
  assert all(r["device_memory"] == 5000 for r in rows.values())
  for s, r in rows.items():
    sec = sorted(per_iter[s])[1]  # median of the timed rounds, warm-ups out
    assert r["ms_per_iter"] == pytest.approx(1e3 * sec)
    assert r["images_per_s"] == pytest.approx(64 / sec)
    assert r["tflops"] == pytest.approx(2 / sec)
    assert r["share_of_peak"] == pytest.approx(2 / sec / 100)
    assert r["vs_torch_fp32"] == pytest.approx(0.050 / sec)
    assert r["warmup_s"] == pytest.approx(2000 + 16 * per_iter[s][0] * 2)


def test_peak_by_device_kind():
  from cspgan_jax import bench  # pylint: disable=import-outside-toplevel
  assert bench.peak_tflops("NVIDIA H200", 0.0) == 790.0
  assert bench.peak_tflops("NVIDIA H100 80GB HBM3", 0.0) == 790.0
  assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", 0.0) == 312.0
  assert bench.peak_tflops("NVIDIA H200", 500.0) == 500.0
  assert bench.peak_tflops("cpu", 0.0) is None


def test_jax_variant_runs_whole_dispatches_and_waits(monkeypatch):
  """A scanned variant runs iters / scan dispatches, and a round ends when the device is done."""
  from cspgan_jax import bench  # pylint: disable=import-outside-toplevel
  real = parallel.compile_training_step
  dispatches, waited = [0], []

  def counting(*a, **k):
    step, state = real(*a, **k)

    def wrapped(*x):
      dispatches[0] += 1
      return step(*x)
    wrapped.as_text = step.as_text
    return wrapped, state
  monkeypatch.setattr(parallel, "compile_training_step", counting)
  monkeypatch.setattr(parallel, "step_memory_bytes", lambda step: 1)
  v = bench.jax_variant(TINY, 8, "float32", 2, [], unroll=1)
  orig = jax.block_until_ready
  monkeypatch.setattr(jax, "block_until_ready", lambda x: waited.append(1) or orig(x))
  v["run"](4)
  assert dispatches[0] == 2 and v["unit"] == 2
  assert len(waited) == 1  # the round ends when the device is done
  # Where several CPU devices abort with two steps in flight (XLA_FLAGS forcing 2 devices, 200
  # iterations: SIGABRT, "Termination timeout for all reduce"), each dispatch is waited for.
  monkeypatch.setattr(parallel, "steps_must_wait", lambda: True)
  v["run"](4)
  assert dispatches[0] == 4 and len(waited) == 4


def test_a_target_exactly_at_its_bound_is_met():
  from cspgan_jax import bench  # pylint: disable=import-outside-toplevel
  rows = [dict(batch=256, slug="jax-bf16", variant="v", vs_torch_fp32=None, share_of_peak=0.35)]
  assert "- batch 256, JAX bf16, share of the bf16 peak >= 35.00%: met, 35.00% (v)" in \
      bench.target_lines(dict(rows=rows))


def test_a_jax_without_the_layout_api_gets_row_major_state(monkeypatch):
  """jax.experimental.layout is experimental and has been renamed before; the GPU machine's jax
  is newer than this one's. Without it the state keeps plain shardings, and the package still
  imports (its import is inside the two functions that use it)."""
  sharding = parallel.replicated_sharding()
  assert parallel._auto_format(sharding) is not sharding  # pylint: disable=protected-access
  monkeypatch.setitem(sys.modules, "jax.experimental.layout", None)  # import -> ImportError
  assert parallel._auto_format(sharding) is sharding  # pylint: disable=protected-access
  with pytest.raises(ImportError):
    importlib.import_module("jax.experimental.layout")


def test_a_jax_without_compiled_formats_places_the_state_by_its_shardings(monkeypatch):
  """Where the layout API is gone, its `Compiled.input_formats` / `output_formats` may be too:
  the step then compiles, places and updates a row-major state by its shardings."""
  no_auto = types.SimpleNamespace(Format=lambda *a: None, Layout=object)  # a Layout without AUTO
  monkeypatch.setitem(sys.modules, "jax.experimental.layout", no_auto)
  sharding = parallel.replicated_sharding()
  assert parallel._auto_format(sharding) is sharding  # pylint: disable=protected-access
  monkeypatch.setitem(sys.modules, "jax.experimental.layout", None)
  for name in ("input_formats", "output_formats"):
    monkeypatch.delattr(jax.stages.Compiled, name)
  make = lambda fmt: parallel.map_over_devices(
      lambda s, x: ({"w": s["w"] + x.sum()}, x.sum()), (True,), state_format=fmt)
  x = np.arange(jax.device_count() * 3, dtype=np.float32).reshape(jax.device_count(), 3)
  step, state = parallel.compile_step(make, parallel.replicate({"w": np.ones(2, np.float32)}), x)
  assert state["w"].sharding == parallel.replicated_sharding()
  state, metric = step(state, x)
  np.testing.assert_array_equal(parallel.unreplicate(state)["w"], 1 + x[0].sum())
  assert parallel.unreplicate(metric) == x[0].sum()
