"""The training step as XLA's GPU compiler builds it for an H100, compiled here without a GPU.

The layout work of docs/PERFORMANCE.md is checked on the program a GPU would run: every
convolution a cuDNN call on NHWC activations, the state in the layouts the compiler chose
(as the trainer runs it) moving far fewer bytes than row-major state, no copy of the donated
state, no loop of data-dependent length. Needs jax's CUDA plugin in its cache folder, which the
README's test command puts there (`cspgan compile --install-plugin`).
"""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest

from cspgan_jax import cli, gpu_compile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


@pytest.fixture(scope="module")
def compiled_for_h100():
  plugin_dir = gpu_compile.default_plugin_dir()
  assert os.path.isdir(plugin_dir), (
      f"jax's CUDA plugin is not in {plugin_dir}: run `cspgan compile --install-plugin` "
      "(part of the README's test command)")
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "scripts",
                                                      "gpu_compile_step.py"), TINY, plugin_dir],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (line,) = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
  return json.loads(line[len("RESULT"):])


def test_the_step_compiles_for_an_h100_into_cudnn_convolutions_on_nhwc(compiled_for_h100):
  r = compiled_for_h100
  assert r["device_kind"] == "NVIDIA H100 80GB HBM3"
  for variant in ("float32_auto", "float32_default", "bfloat16_auto", "bfloat16_default"):
    v = r[variant]
    assert v["conv_kinds"][:3] == ["conv backward-filter", "conv backward-input", "conv forward"]
    assert v["counts"]["convolution"] >= 60, v["counts"]  # tiny: 7 conv layers in G, 5 in D
    assert v["conv_labels"] == ["b01f_o01i->b01f"], v["conv_labels"]  # NHWC, filters OHWI
    assert v["loops"] == 0  # no host sync inside the step
    assert "the step needs about" in v["memory"]
  # bf16 activations: the step's temporaries shrink (parameters and Adam stay float32)
  assert r["bfloat16_auto"]["temp_bytes"] < 0.8 * r["float32_auto"]["temp_bytes"]


def test_the_compilers_state_layouts_remove_the_weight_transposes(compiled_for_h100):
  """Row-major state (HWIO kernels) makes XLA:GPU transpose every kernel for cuDNN, every
  gradient back, and copy donated inputs; the layouts it picks itself (OHWI in memory) do not."""
  r = compiled_for_h100
  for dtype in ("float32", "bfloat16"):
    auto, default = r[f"{dtype}_auto"], r[f"{dtype}_default"]
    assert auto["move_kernels"] < 0.5 * default["move_kernels"], (auto, default)
    assert auto["move_bytes"] < 0.6 * default["move_bytes"], (auto, default)
    assert auto["counts"]["convolution"] == default["counts"]["convolution"]
    # float32 keeps relayout copies of two kernels that feed two kinds of convolution (which
    # two is XLA's tie-break, moved by unrelated changes: D main_2 and G main_2/left_0, for a
    # while D main_2 and main_5, 0.11 and 0.38 of the row-major state's bytes); in bfloat16
    # the cast to bf16 is that relayout.
    assert len([b for b in auto["copied_inputs"] if b >= 1024]) <= 2, auto["copied_inputs"]
    assert sum(auto["copied_inputs"]) < 0.5 * sum(default["copied_inputs"])
  # bf16: no kernel copied; the step counter is, and in this tiny program two of D's BatchNorm
  # vectors too (16 values; the baseline's program copies none of those)
  assert all(b <= 64 for b in r["bfloat16_auto"]["copied_inputs"])


def test_transposed_convolutions_get_cudnn_gradients_without_flipped_copies(compiled_for_h100):
  """`ops.conv_transpose`'s custom VJP takes the kernel gradient as the strided convolution's
  backward-filter. Plain autodiff gave XLA a convolution with batch and features swapped, which
  it bracketed with reversed, channels-first copies of the activations."""
  for variant in ("float32_auto", "bfloat16_auto"):
    assert compiled_for_h100[variant]["reversing"] == [], compiled_for_h100[variant]


def test_compile_errors_are_one_line(tmp_path, capsys):
  existing = tmp_path / "step.hlo.txt"
  existing.write_text("keep me")
  cases = [(["--target", "tpu9"], "neither one of"),
           (["--devices", "0"], "must be >= 1"),
           (["--plugin-dir", str(tmp_path)], "no jax CUDA plugin"),
           (["--hlo", str(existing)], "exists"),
           (["--batch", "0"], "must be >= 1")]
  for args, needle in cases:
    assert cli.main(["compile", "--config", TINY, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
  assert existing.read_text() == "keep me"


def test_a_scanned_step_moves_what_single_steps_move(compiled_for_h100):
  """Several iterations a dispatch (`lax.scan`) pin the carried state to the single step's
  layouts; left free, XLA:GPU relayouted kernels and Adam moments every iteration (46% more
  bytes on tiny.py, 150% on the baseline)."""
  scan, single = compiled_for_h100["bfloat16_scan"], compiled_for_h100["bfloat16_auto"]
  assert scan["move_bytes"] <= 1.05 * single["move_bytes"], (scan, single)
  assert scan["loops"] == 0 and scan["copied_inputs"] == []


def test_edge_layers_as_matmul_leave_cudnn_for_matmuls(compiled_for_h100):
  """`model.edge_layers_as_matmul`: each network's first and last layers (on the H200 at batch
  64 in bf16 the 3-channel ones alone took 0.72 of 2.97 ms of convolutions) leave cuDNN for
  matmuls, every other convolution stays, and the data moved does not grow with the im2col /
  col2im rearrangements (the baseline at batch 64: 174 -> 127 MiB, docs/PERFORMANCE.md)."""
  conv, mm = compiled_for_h100["bfloat16_auto"], compiled_for_h100["bfloat16_edgemm"]
  # tiny.py, 32x32: D main_0 (3 channels in), D main_8 (a 4x4 window over 4x4 -> 1 logit),
  # G main_0's transposed convolutions (1x1 -> 4x4), G main_3 (3 channels out)
  edge = {"D main_0", "D main_8", "G main_0/left_0", "G main_0/right_2", "G main_3"}
  assert edge <= set(conv["conv_layers"]), conv["conv_layers"]
  assert not edge & set(mm["conv_layers"]), mm["conv_layers"]
  assert set(mm["conv_layers"]) == set(conv["conv_layers"]) - edge
  # D's last matmul has one output column: XLA makes it a multiply-and-reduce fusion
  assert edge - {"D main_8"} <= set(mm["matmul_layers"]), mm["matmul_layers"]
  assert mm["counts"]["convolution"] < conv["counts"]["convolution"]
  assert mm["move_bytes"] <= 1.05 * conv["move_bytes"], (conv["move_bytes"], mm["move_bytes"])
  # at most the edge layers' own float32 kernels copied into the layout their matmuls read
  # (here D main_0's and G main_3's 4x4x3x8, D main_8's 4x4x32x1; at 128x128 none is)
  assert mm["loops"] == 0
  # D's last matmul, strength-reduced to a multiply and a sum, multiplies in float32: its
  # products are not rounded to bf16 before the float32 sum (conv_matmul.conv2d).
  assert mm["bf16_dot_products"] == 0
  edge_kernels = 4 * (2 * 4 * 4 * 3 * 8 + 4 * 4 * 32 * 1)
  assert sum(mm["copied_inputs"]) <= sum(conv["copied_inputs"]) + edge_kernels


def test_every_biased_convolution_is_cudnns_convolution_with_bias(compiled_for_h100):
  """`layers.Conv2d` leaves the bf16 bias add as written off the CPU because XLA:GPU fuses it
  into cuDNN's convolution-with-bias, which adds it before its one rounding (PyTorch's CPU
  arithmetic; the CPU gets float32 sums instead): G's biased 1x1 convolutions, all of them,
  and no other layer (tiny.py: three CSPup blocks)."""
  biased = {f"G main_{b}/right_{i}" for b in range(3) for i in (0, 3, 5)}
  for variant in ("float32_auto", "bfloat16_auto", "bfloat16_edgemm"):
    fused = compiled_for_h100[variant]["fused_bias_layers"]
    # (XLA may also run a backward convolution as a fused forward one: D's, in float32)
    assert {l for l in fused if "(bwd)" not in l} == biased, (variant, fused)


def test_no_sum_accumulates_in_bf16(compiled_for_h100):
  """In bf16 every reduction the GPU runs accumulates in float32: the bias gradients
  (`ops.add_bias`), BatchNorm's statistics, the losses. The program the H200 ran on
  2026-11-27 summed G's 15 bias gradients in bf16 (23 reductions), 9% off at batch 64."""
  for variant in ("bfloat16_auto", "bfloat16_scan", "bfloat16_edgemm"):
    assert compiled_for_h100[variant]["bf16_reduces"] == 0, variant


def test_every_relu_is_in_its_cudnn_convolution(compiled_for_h100):
  """`ops.relu` (its backward reads the output, behind an optimization barrier): XLA:GPU
  folds each of G's ReLUs into the 1x1 convolution before it, cuDNN's convolution with bias and
  ReLU (tiny.py: three CSPup blocks, two ReLUs each). With jax.nn.relu the convolution had a
  second reader and each ReLU ran as a kernel of its own."""
  for variant in ("float32_auto", "bfloat16_auto", "bfloat16_scan", "bfloat16_edgemm"):
    v = compiled_for_h100[variant]
    assert v["relu_convs"] == 6 and v["max_kernels"] == 0, (variant, v["relu_convs"],
                                                             v["max_kernels"])


def test_bf16_steps_start_from_the_states_bf16_copies(compiled_for_h100):
  """No kernel casts a float32 parameter to bf16 where a bf16 step starts: the convolutions
  read `ModelState.compute_params`, which the previous step's Adam kernels wrote (the H200
  run's program, before them, had 47 such casts at batch 64)."""
  for variant in ("bfloat16_auto", "bfloat16_scan", "bfloat16_edgemm"):
    assert compiled_for_h100[variant]["param_casts"] == 0, variant


def test_per_channel_sums_run_per_sample_first(compiled_for_h100):
  """`ops.channel_sum`: no kernel sums more than a batch's rows into per-channel values
  (tiny.py: batch 8; bias gradients and BatchNorm statistics over up to 8 x 16 x 16 rows).
  Summed in one go, XLA:GPU runs such a sum on a block per 64-128 channels: G main_1/right_5's
  bias gradient took 61 us on 4 blocks in the H200 run."""
  for variant in ("float32_auto", "bfloat16_auto", "bfloat16_scan", "bfloat16_edgemm"):
    assert compiled_for_h100[variant]["column_sum_rows"] <= 8, variant


def test_two_gpus_average_the_gradients_in_a_few_asynchronous_all_reduces(compiled_for_h100):
  """Over two GPUs XLA combines the gradients' pmean into a few all-reduces that start early and
  overlap the rest of the step; together they carry every parameter's gradient once (plus
  BatchNorm's running statistics)."""
  two = compiled_for_h100["two_devices"]
  assert 1 <= two["all_reduces"] <= 8 and two["asynchronous"] == two["all_reduces"], two
  assert two["param_bytes"] <= two["reduced_bytes"] <= 1.05 * two["param_bytes"], two


def test_a_target_the_plugin_refuses_is_one_line_with_the_reason(tmp_path):
  plugin_dir = gpu_compile.default_plugin_dir()
  bad = tmp_path / "bad.txtpb"  # complete, with a field the plugin's parser does not know
  bad.write_text(gpu_compile.target_config("h100").replace("gpu_device_info {",
                                                           "gpu_device_info {\n  bogus_field: 3"))
  proc = subprocess.run([sys.executable, "-m", "cspgan_jax.cli", "compile", "--config", TINY,
                         "--target", str(bad), "--plugin-dir", plugin_dir],
                        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                        timeout=300)
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(err) == 1, proc.stderr
  assert "refused target" in err[0] and "bogus_field" in err[0], err


@pytest.mark.parametrize("content, needle", [
    (b"\x89PNG\r\n\x1a\n\x00", "not a text file"),  # once a UnicodeDecodeError traceback
    (b"", "no positive threads_per_block_limit"),  # once SIGFPE inside XLA, no message
    (b"DROP threads_per_warp", "no positive threads_per_warp"),  # likewise (jax 0.10)
    (b"ZERO core_count", "no positive core_count"),
], ids=["binary", "empty", "no-threads-per-warp", "zero-cores"])
def test_a_target_file_that_is_no_gpus_config_is_one_line(tmp_path, capsys, content, needle):
  h100 = gpu_compile.target_config("h100")
  if content.startswith(b"DROP "):
    field = content.split()[1].decode()
    content = "\n".join(l for l in h100.splitlines() if field not in l).encode()
  elif content.startswith(b"ZERO "):
    field = content.split()[1].decode()
    content = re.sub(rf"{field}: \d+", f"{field}: 0", h100).encode()
  target = tmp_path / "t.txtpb"
  target.write_bytes(content)
  # refused before the plugin loads: with no plugin folder at all, the target is what is named
  assert cli.main(["compile", "--config", TINY, "--target", str(target), "--plugin-dir",
                   str(tmp_path / "none")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("hlo, needle", [
    ("", "a file name is needed"),  # once ignored: compiled, nothing written
    ("FOLDER", "is a folder, not a file"),  # once refused only after the compile
    ("FILE/x.hlo.txt", "is a file, not a folder"),  # once "folder ... does not exist"
], ids=["empty", "folder", "under-a-file"])
def test_an_hlo_output_that_cannot_be_written_is_refused_first(tmp_path, capsys, hlo, needle):
  (tmp_path / "FOLDER").mkdir()
  (tmp_path / "FILE").write_text("keep me")
  path = str(tmp_path / hlo) if hlo else ""
  assert cli.main(["compile", "--config", TINY, "--hlo", path, "--overwrite", "--plugin-dir",
                   str(tmp_path / "none")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and needle in err[0], err
  assert (tmp_path / "FILE").read_text() == "keep me"


class _Seen(Exception):
  pass


def test_compile_passes_dtype_batch_and_scan_to_the_step(monkeypatch, tmp_path):
  """`cspgan compile --dtype bfloat16` compiles the bf16 program, at the batch, scan, layout and
  device count asked (stopped before XLA runs)."""
  seen = {}
  monkeypatch.setattr(gpu_compile, "compile_only_devices", lambda t, p, n: ["dev"] * n)

  def compile_step(config, devices, layout, steps):
    seen.update(dtype=config.train.dtype, batch=config.train.batch_size, steps=steps,
                spd=config.train.steps_per_dispatch, layout=layout, n=len(devices))
    raise _Seen
  monkeypatch.setattr(gpu_compile, "compile_step", compile_step)
  parser = argparse.ArgumentParser()
  gpu_compile.add_arguments(parser)
  args = parser.parse_args(["--config", TINY, "--dtype", "bfloat16", "--batch", "16", "--scan",
                            "2", "--devices", "2", "--state-layout", "default", "--plugin-dir",
                            str(tmp_path)])
  with pytest.raises(_Seen):
    gpu_compile.run(args, [])
  assert seen == dict(dtype="bfloat16", batch=16, steps=2, spd=2, layout="default", n=2)
