"""hlo_report and trace_report: what a compiled step launches and where its time goes.

Checked on this CPU's real compiled step and profile, and on hand-written GPU-shaped HLO and
traces (cuDNN custom calls, a scan's while loop, stream and derived lines), since CI has no GPU.
"""

import glob
import gzip
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from cspgan_jax import config_lib, hlo_report, input_pipeline, parallel, train, trace_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")

GPU_HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={()}

%fused_transpose (param_0: bf16[64,16,16,256]) -> bf16[64,256,16,16] {
  %param_0 = bf16[64,16,16,256]{3,2,1,0} parameter(0)
  ROOT %transpose.1 = bf16[64,256,16,16]{3,2,1,0} transpose(%param_0), dimensions={0,3,1,2}
}

%fused_slice (param_0.1: bf16[64,4,4,1024]) -> bf16[64,4,4,512] {
  %param_0.1 = bf16[64,4,4,1024]{3,2,1,0} parameter(0)
  ROOT %slice.7 = bf16[64,4,4,512]{3,2,1,0} slice(%param_0.1), slice={[0:64], [0:4], [0:4], [0:512]}, metadata={op_name="jit(step)/jvp(Generator)/main_1/slice"}
}

%fused_add (param_0.2: f32[256], param_1.2: f32[256]) -> f32[256] {
  %param_0.2 = f32[256]{0} parameter(0)
  %param_1.2 = f32[256]{0} parameter(1)
  ROOT %add.3 = f32[256]{0} add(%param_0.2, %param_1.2)
}

%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]{0}) parameter(0)
  %gte.1 = f32[256]{0} get-tuple-element(%p), index=1
  %cudnn-conv-bw-input.2 = (bf16[64,16,16,256]{3,2,1,0}, u8[0]{0}) custom-call(%gte.1, %gte.1), window={size=4x4 stride=2x2 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardInput", metadata={op_name="jit(step)/transpose(jvp(Discriminator))/main_2/conv_general_dilated"}
  %loop_add_fusion = f32[256]{0} fusion(%gte.1, %gte.1), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/jvp(Generator)/main_0/right_1/add"}
  ROOT %tuple.9 = (s32[], f32[256]{0}) tuple(%gte.1, %loop_add_fusion)
}

%cond (q: (s32[], f32[256])) -> pred[] {
  %q = (s32[], f32[256]{0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main (arg0: bf16[64,16,16,256], arg1: bf16[64,4,4,1024], arg2: f32[256]) -> f32[256] {
  %arg0 = bf16[64,16,16,256]{3,2,1,0} parameter(0)
  %arg1 = bf16[64,4,4,1024]{3,2,1,0} parameter(1)
  %arg2 = f32[256]{0} parameter(2)
  %copy.1 = f32[256]{0} copy(%arg2)
  %cudnn-conv.1 = (bf16[64,8,8,512]{3,2,1,0}, u8[0]{0}) custom-call(%arg0, %arg0), window={size=4x4 stride=2x2 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/jvp(Discriminator)/main_2/conv_general_dilated"}
  %transpose_fusion = bf16[64,256,16,16]{3,2,1,0} fusion(%arg0), kind=kInput, calls=%fused_transpose
  %slice_fusion = bf16[64,4,4,512]{3,2,1,0} fusion(%arg1), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(step)/jvp(Generator)/main_1/slice"}
  %while.5 = (s32[], f32[256]{0}) while(%copy.1), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"8"}}
  ROOT %gte.2 = f32[256]{0} get-tuple-element(%while.5), index=1
}
"""


def test_hlo_report_classifies_gpu_shaped_hlo():
  report = hlo_report.HloReport(GPU_HLO)
  assert report.module == "jit_step" and report.entry == "main"
  kinds = {k.name: (k.category, k.detail, k.layer) for k in report.kernels}
  assert kinds == {
      "copy.1": ("data movement", "copy", ""),
      "cudnn-conv.1": ("convolution", "conv forward", "D main_2"),
      "transpose_fusion": ("data movement", "transpose", ""),
      "slice_fusion": ("data movement", "slice", "G main_1"),
      # inside the scan's while loop:
      "cudnn-conv-bw-input.2": ("convolution", "conv backward-input", "D main_2 (bwd)"),
      "loop_add_fusion": ("elementwise/reduction", "kLoop", "G main_0/right_1"),
  }
  assert report.control == {"while.5"}
  assert report.data_dependent_loops() == []  # its trip count is known
  assert report.counts() == {"data movement": 3, "convolution": 2, "elementwise/reduction": 1}
  # Bytes written: 64*256*16*16 bf16 (2 B) and 64*4*4*512 bf16 and 256 f32.
  assert [k.inst.out_bytes for k in report.data_movement()] == [8388608, 1048576, 1024]
  assert [k.name for k in report.copied_inputs()] == ["copy.1"]
  # Each kernel's distinct operands read once and its result written once (a scan body's once):
  # the convolutions 8 MiB in + 4 MiB out, 1 KiB in + 8 MiB out; the moves 1+1 KiB, 8+8 MiB,
  # 1+1 MiB (the slice reads half its 2 MiB operand); the add 1+1 KiB.
  assert report.traffic() == {"convolution": 12582912 + 8389632,
                              "data movement": 2048 + 16777216 + 2097152,
                              "elementwise/reduction": 2048}
  assert report.channel_split_slices() == {"G main_1": "own kernel"}
  assert hlo_report.Instruction("t", "tuple", "(f32[2]{0}, bf16[3,4]{1,0}, u8[0]{0})", "",
                                "c").out_bytes == 8 + 24
  text = report.markdown()
  assert "1 conv forward" in text and "1 conv backward-input" in text
  assert "data-movement kernels: 3, writing 9.0 MiB" in text
  assert "MiB per step: convolution 20, data movement 18, elementwise/reduction 0; total 38" in text


SLICED_HLO = """HloModule jit_step, is_scheduled=true

%fused_shift (p0: f32[64,8,8,256], p1: f32[64,8,8,256]) -> f32[256] {
  %p0 = f32[64,8,8,256]{3,2,1,0} parameter(0)
  %p1 = f32[64,8,8,256]{3,2,1,0} parameter(1)
  %row0 = f32[1,1,1,256]{3,2,1,0} slice(%p0), slice={[0:1], [0:1], [0:1], [0:256]}
  %row1 = f32[1,1,1,256]{3,2,1,0} slice(%p1), slice={[0:1], [0:1], [0:1], [0:256]}
  %sum = f32[1,1,1,256]{3,2,1,0} add(%row0, %row1)
  %whole = f32[64,8,8,256]{3,2,1,0} negate(%p1)
  ROOT %b = f32[256]{0} bitcast(%sum)
}

ENTRY %main (x: f32[64,8,8,256], y: f32[64,8,8,256], i: s32[]) -> f32[256] {
  %x = f32[64,8,8,256]{3,2,1,0} parameter(0)
  %y = f32[64,8,8,256]{3,2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %ds = f32[1,8,8,256]{3,2,1,0} dynamic-slice(%x, %i, %i, %i, %i), dynamic_slice_sizes={1,8,8,256}
  ROOT %loop_slice_fusion = f32[256]{0} fusion(%x, %y), kind=kLoop, calls=%fused_shift
}
"""


def test_traffic_counts_an_operand_a_kernel_only_slices_at_the_slices_size():
  """BatchNorm's shifted sums read one row of an activation: a kernel reading x's first row
  moves 1 KiB of x's 4 MiB, but all of y, which it also reads whole."""
  report = hlo_report.HloReport(SLICED_HLO)
  assert sorted(k.name for k in report.kernels) == ["ds", "loop_slice_fusion"]
  # the fusion: x's row 1 KiB + y whole 4 MiB + 1 KiB out; the dynamic slice: 64 KiB of x and
  # its 4-byte index in, 64 KiB out
  assert report.traffic() == {"elementwise/reduction": 1024 + 4194304 + 1024,
                              "data movement": 65536 + 4 + 65536}


SUMS_HLO = """HloModule jit_step, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_reduce (param_0: bf16[64,8,8,512]) -> f32[512] {
  %param_0 = bf16[64,8,8,512]{3,2,1,0} parameter(0)
  %convert.1 = f32[64,8,8,512]{3,2,1,0} convert(%param_0)
  %bitcast.1 = f32[4096,512]{1,0} bitcast(%convert.1)
  %zero = f32[] constant(0)
  ROOT %reduce.1 = f32[512]{0} reduce(%bitcast.1, %zero), dimensions={0}, to_apply=%add, metadata={op_name="jit(step)/transpose(jvp(Generator))/main_1/right_5/reduce_sum"}
}

%fused_rows (param_0.1: f32[512,64]) -> f32[512] {
  %param_0.1 = f32[512,64]{1,0} parameter(0)
  %zero.1 = f32[] constant(0)
  ROOT %reduce.2 = f32[512]{0} reduce(%param_0.1, %zero.1), dimensions={1}, to_apply=%add
}

ENTRY %main (x: bf16[64,8,8,512], w: bf16[512,1,1,512], b: bf16[512], r: f32[512,64]) -> (f32[512], f32[512], bf16[64,8,8,512]) {
  %x = bf16[64,8,8,512]{3,2,1,0} parameter(0)
  %w = bf16[512,1,1,512]{3,2,1,0} parameter(1)
  %b = bf16[512]{0} parameter(2)
  %r = f32[512,64]{1,0} parameter(3)
  %input_reduce_fusion = f32[512]{0} fusion(%x), kind=kInput, calls=%fused_reduce
  %input_rows = f32[512]{0} fusion(%r), kind=kInput, calls=%fused_rows
  %cudnn-conv-bias-activation.1 = (bf16[64,8,8,512]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w, %b), window={size=1x1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBiasActivationForward", backend_config={"cudnn_conv_backend_config":{"activation_mode":"kRelu","conv_result_scale":1}}
  %gte = bf16[64,8,8,512]{3,2,1,0} get-tuple-element(%cudnn-conv-bias-activation.1), index=0
  ROOT %t = (f32[512]{0}, f32[512]{0}, bf16[64,8,8,512]{3,2,1,0}) tuple(%input_reduce_fusion, %input_rows, %gte)
}
"""


def test_hlo_report_finds_long_column_sums_and_folded_relus():
  """A per-channel sum over 4,096 rows in one kernel (dimensions={0} of a matrix) is listed; a
  row reduction (dimensions={1}) is not; a cuDNN convolution with its ReLU is counted."""
  report = hlo_report.HloReport(SUMS_HLO)
  assert report.column_sums() == [("input_reduce_fusion", "G main_1/right_5 (bwd)", 4096, 512)]
  text = report.markdown()
  assert "1 conv forward (fused bias/act); 1 with the ReLU after them folded in" in text
  assert "the longest 4,096 rows x 512 (G main_1/right_5 (bwd))" in text


CASTS_HLO = """HloModule jit_step, is_scheduled=true

%fused_convert (p0: f32[512,4,4,512]) -> bf16[512,4,4,512] {
  %p0 = f32[512,4,4,512]{3,2,1,0} parameter(0)
  ROOT %c0 = bf16[512,4,4,512]{3,2,1,0} convert(%p0)
}

%fused_bn (p1: f32[64], p2: bf16[64,8,8,64]) -> bf16[64,8,8,64] {
  %p1 = f32[64]{0} parameter(0)
  %p2 = bf16[64,8,8,64]{3,2,1,0} parameter(1)
  %b1 = f32[64,8,8,64]{3,2,1,0} broadcast(%p1), dimensions={3}
  %c1 = f32[64,8,8,64]{3,2,1,0} convert(%p2)
  %a1 = f32[64,8,8,64]{3,2,1,0} add(%c1, %b1)
  ROOT %c2 = bf16[64,8,8,64]{3,2,1,0} convert(%a1)
}

%fused_copy (p3: bf16[512,4,4,512]) -> bf16[512,4,4,512] {
  %p3 = bf16[512,4,4,512]{3,2,1,0} parameter(0)
  ROOT %n3 = bf16[512,4,4,512]{3,2,1,0} negate(%p3)
}

ENTRY %main (state_g_params__k.1: f32[512,4,4,512], state_d_params__bias.1: f32[64], x: bf16[64,8,8,64], state_g_compute_params__k.1: bf16[512,4,4,512]) -> (bf16[512,4,4,512], bf16[64,8,8,64], bf16[512,4,4,512]) {
  %state_g_params__k.1 = f32[512,4,4,512]{3,2,1,0} parameter(0)
  %state_d_params__bias.1 = f32[64]{0} parameter(1)
  %x = bf16[64,8,8,64]{3,2,1,0} parameter(2)
  %state_g_compute_params__k.1 = bf16[512,4,4,512]{3,2,1,0} parameter(3)
  %bitcast.1 = f32[512,4,4,512]{3,2,1,0} bitcast(%state_g_params__k.1)
  %loop_convert_fusion = bf16[512,4,4,512]{3,2,1,0} fusion(%bitcast.1), kind=kLoop, calls=%fused_convert, metadata={op_name="jit(step)/jvp(Generator)/main_1/left_0/convert_element_type"}
  %loop_bn_fusion = bf16[64,8,8,64]{3,2,1,0} fusion(%state_d_params__bias.1, %x), kind=kLoop, calls=%fused_bn
  %loop_negate_fusion = bf16[512,4,4,512]{3,2,1,0} fusion(%state_g_compute_params__k.1), kind=kLoop, calls=%fused_copy
  ROOT %t = (bf16[512,4,4,512]{3,2,1,0}, bf16[64,8,8,64]{3,2,1,0}, bf16[512,4,4,512]{3,2,1,0}) tuple(%loop_convert_fusion, %loop_bn_fusion, %loop_negate_fusion)
}
"""


def test_hlo_report_finds_casts_of_float32_parameters():
  """A kernel writing bf16 from a float32 parameter (through a bitcast) is a cast; one that
  uses a parameter to write a larger activation is not, nor one reading a bf16 copy."""
  report = hlo_report.HloReport(CASTS_HLO)
  assert [k.name for k in report.parameter_casts()] == ["loop_convert_fusion"]
  assert ("casts of float32 parameters to bf16 where the step starts: 1, writing 8.0 MiB"
          in report.markdown())


def test_hlo_report_refuses_what_is_not_hlo(tmp_path, capsys):
  path = tmp_path / "x.hlo.txt"
  path.write_text("not hlo\n")
  assert hlo_report.main([str(path)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "no ENTRY computation" in err


def _tiny_step():
  config = config_lib.load_config(TINY, ["--config.data.pipeline=device"])
  data = input_pipeline.make_input(config)
  args = (data.images, data.shard_ids, jax.random.PRNGKey(1))
  step, state = parallel.compile_step(
      lambda fmt: parallel.make_step(config, "device", data.batch_fn(), state_format=fmt),
      parallel.replicate(train.init_state(config, jax.random.PRNGKey(0))), *args)
  return config, step, state, args


def _param_layers(config):
  """'G main_1/left_0', ... for every module with parameters, from the models themselves."""
  layers = set()
  for prefix, variables in zip("GD", train.init_variables(config, jax.random.PRNGKey(0))):
    for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
      layers.add(prefix + " " + "/".join(p.key for p in path[:-1]))
  return layers


@pytest.fixture(scope="module")
def profiled_step(tmp_path_factory):
  config, step, state, args = _tiny_step()
  hlo = step.as_text()
  state, metrics = step(state, *args)
  jax.block_until_ready(metrics)
  trace_dir = tmp_path_factory.mktemp("trace")
  with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
    for _ in range(3):
      state, metrics = step(state, *args)
      jax.block_until_ready(metrics)
  (path,) = glob.glob(str(trace_dir / "plugins" / "profile" / "*" / "perfetto_trace.json.gz"))
  return config, hlo, path


def test_hlo_report_of_the_real_step_names_every_layer(profiled_step):
  config, hlo, _ = profiled_step
  report = hlo_report.HloReport(hlo)
  counts = report.counts()
  n_convs = sum(1 for layer in _param_layers(config) if "main_" in layer)
  assert counts["convolution"] >= n_convs  # every conv layer runs forward at least
  found = {k.layer.replace(" (bwd)", "") for k in report.kernels if k.layer}
  assert _param_layers(config) <= found, sorted(_param_layers(config) - found)
  # The channel split of every CSPup block is found (tiny: 32x32, three blocks).
  assert sorted(report.channel_split_slices()) == ["G main_0", "G main_1", "G main_2"]


def test_the_trainers_step_updates_the_donated_state_in_place(profiled_step):
  """The state is replicated, not stacked: through pmap's stacked `[1, ...]` shape XLA copied it
  instead (73 of 113 inputs at the baseline's widths, 32x32). Scalars may remain."""
  _, hlo, _ = profiled_step
  copied = hlo_report.HloReport(hlo).copied_inputs()
  assert all(k.inst.out_bytes <= 8 for k in copied), [(k.name, k.inst.type) for k in copied]


def test_the_trainers_step_has_no_loop_of_data_dependent_length(profiled_step):
  """The batch's positions come from a fixed number of shuffle rounds; a cycle-walking loop
  (as a Feistel permutation needs) would stop the host once a step on a GPU."""
  _, hlo, _ = profiled_step
  assert hlo_report.HloReport(hlo).data_dependent_loops() == []


def test_trace_report_of_the_real_step_accounts_for_its_kernels(profiled_step):
  _, hlo, path = profiled_step
  report = trace_report.TraceReport(trace_report.load_trace(path), hlo_report.HloReport(hlo))
  assert report.source == "XLA:CPU thunks"
  assert report.iterations == 3
  kinds = dict(report.grouped(0))
  total = sum(kinds.values())
  assert kinds.get("unmatched HLO op", 0.0) < 0.05 * total  # the join works
  assert kinds["convolution"] > 0.2 * total  # convolutions dominate even on a CPU
  assert 0 < report.busy_us <= report.span_us
  text = report.markdown("tiny")
  assert "| convolution |" in text and "G main_" in text


def _event(pid, tid, name, ts, dur, **args):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": args}


def test_trace_report_reads_gpu_stream_lines_and_skips_derived_ones(tmp_path):
  meta = [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
      {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name",
       "args": {"name": "Stream #7(Compute)"}},
      {"ph": "M", "pid": 2, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}},
  ]
  events = []
  for it in range(2):  # two iterations, 100 us apart; a 10 us gap inside each
    t0 = 100.0 * it
    events += [
        _event(2, 7, "sm90_xmma_fprop", t0, 40, hlo_op="cudnn-conv.1", hlo_module="jit_step"),
        _event(2, 7, "loop_add_fusion", t0 + 50, 10, hlo_op="loop_add_fusion"),
        _event(2, 7, "transpose_fusion", t0 + 60, 20),  # no hlo_op: matched by kernel name
        _event(2, 9, "cudnn-conv.1", t0, 40),             # derived line: must not count twice
        # inside a CUDA graph the kernel may carry the command buffer's name (a control op):
        _event(2, 7, "loop_add_fusion", t0 + 85, 5, hlo_op="while.5"),
        # or one XLA:GPU (jax 0.11) names `command_buffer_N`, absent from the HLO's text
        _event(2, 7, "loop_add_fusion", t0 + 40, 5, hlo_op="command_buffer_3"),
        # a cuDNN kernel XLA's HLO does not name: its kernel name says convolution
        _event(2, 7, "sm90_xmma_dgrad_implicit_gemm", t0 + 90, 5, hlo_op="custom-call.99"),
        _event(1, 3, "ThunkExecutor", t0, 80, hlo_op="cudnn-conv.1"),  # host side
    ]
  path = tmp_path / "b64_jax-bf16.trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": meta + events}, f)
  (tmp_path / "b64_jax-bf16.hlo.txt").write_text(GPU_HLO)
  report = trace_report.report_file(str(path))
  assert report.source == "device streams"
  assert report.iterations == 2
  assert dict(report.grouped(0)) == {"convolution": 45.0, "data movement": 20.0,
                                     "elementwise/reduction": 20.0}
  assert dict(report.grouped(1)) == {"D main_2": 40.0, "-": 25.0, "G main_0/right_1": 20.0}
  assert report.busy_us == 2 * 85.0 and report.span_us == 195.0
  # idle between kernels: 45-50 and 80-85 in each iteration, 95-100 between them
  assert report.gaps == [5.0] * 5
  assert ("idle between kernels: 0.013 ms/iteration in 2 gaps under 50 us (median 5.0 us); "
          "kernels under 5 us: 0/iteration, 0.000 ms/iteration") in report.markdown()
  assert trace_report.main([str(tmp_path)]) == 0


def test_trace_report_keeps_host_transfers_apart_from_the_kernels():
  """A trace of the real loop holds the checkpoint's and the grid's copies to the host, on the
  copy engines beside the kernels: a kind of their own, outside the busy share and the gaps."""
  meta = [{"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name",
           "args": {"name": "Stream #7(Compute)"}},
          {"ph": "M", "pid": 2, "tid": 8, "name": "thread_name",
           "args": {"name": "Stream #8(MemcpyD2H)"}}]
  events = []
  for it in range(2):
    t0 = 100.0 * it
    events += [_event(2, 7, "sm90_xmma_fprop", t0, 40, hlo_op="cudnn-conv.1"),
               _event(2, 7, "loop_add_fusion", t0 + 45, 10, hlo_op="loop_add_fusion"),
               _event(2, 8, "MemcpyD2H", t0 + 30, 60)]  # across the gap between the two
  report = trace_report.TraceReport({"traceEvents": meta + events}, iterations=2)
  assert dict(report.grouped(0)) == {"host transfer": 60.0, "convolution": 40.0,
                                     "unmatched HLO op": 10.0}
  assert report.busy_us == 2 * 50.0 and report.span_us == 155.0
  assert report.gaps == [5.0, 45.0, 5.0]  # 40-45, 55-100 (between the iterations), 140-145
  torch = [{"ph": "X", "cat": "gpu_memcpy", "pid": 0, "tid": 7, "ts": 0, "dur": 9,
            "name": "Memcpy DtoH (Device -> Pageable)"},
           {"ph": "X", "cat": "gpu_memcpy", "pid": 0, "tid": 7, "ts": 10, "dur": 3,
            "name": "Memcpy DtoD (Device -> Device)"}]
  assert dict(trace_report.TraceReport({"traceEvents": torch}).grouped(0)) == {
      "host transfer": 9.0, "data movement": 3.0}


def test_trace_report_keeps_other_programs_apart_from_the_step():
  """A trace of the real loop (`cspgan train --config.train.profile_steps=N`) holds the sampler's
  kernels beside the step's (the output thread's grids): XLA:GPU names each kernel's module, so
  those of another program are a row and a kind of their own, outside the step's kernel count
  and its iteration count; the device's busy time still holds them."""
  meta = [{"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
  events = []
  for it in range(3):
    t0 = 100.0 * it
    events += [_event(2, 7, "sm90_xmma_fprop", t0, 40, hlo_op="cudnn-conv.1",
                      hlo_module="jit_step"),
               _event(2, 7, "loop_add_fusion", t0 + 45, 10, hlo_op="loop_add_fusion",
                      hlo_module="jit_step")]
  # the sampler: three kernels once in the window, one named like a fusion of the step's
  events += [_event(2, 7, "loop_add_fusion", 60 + 5 * i, 4, hlo_op="loop_add_fusion",
                    hlo_module="jit__lambda") for i in range(3)]
  hlo = hlo_report.HloReport(GPU_HLO)
  report = trace_report.TraceReport({"traceEvents": meta + events}, hlo)
  assert report.iterations == 3 and report.step_kernels() == 6
  assert report.rows["jit__lambda (another program)"] == [12.0, 3]
  assert report.rows["loop_add_fusion"] == [30.0, 3]
  assert dict(report.grouped(0)) == {"convolution": 40.0, "elementwise/reduction": 10.0,
                                     "another program": 4.0}
  assert report.busy_us == 3 * 50.0 + 12.0
  text = report.markdown()
  assert ("3 iteration(s); kernels 0.050 ms/iteration (other programs: 0.012 ms in all); "
          in text) and "2 kernels/iteration" in text
  assert "| jit__lambda (another program) | another program | - | 0.004 | 1 | - |" in text
  # without the step's HLO, nothing tells the programs apart: every kernel is the step's
  assert trace_report.TraceReport({"traceEvents": meta + events}).step_kernels() == 9


def test_trace_report_names_the_kernels_that_leave_the_chip_idle():
  """CUPTI's grid in each kernel's details: an op's blocks are its longest kernel's (cuDNN adds
  a one-block helper beside its main kernel); ops on few blocks and long enough are listed."""
  grid = lambda n: f"regs:32 static_shared:8256 grid:{n},1,1 block:1024,1,1 occ_pct:100"
  events = []
  for it in range(2):
    t0 = 100.0 * it
    events += [
        _event(2, 7, "nhwcAddPaddingKernel", t0, 2, hlo_op="cudnn-conv.1", kernel_details=grid(1)),
        _event(2, 7, "sm90_xmma_fprop", t0 + 2, 40, hlo_op="cudnn-conv.1",
               kernel_details=grid(264)),
        _event(2, 7, "input_add_reduce_fusion", t0 + 50, 30, hlo_op="input_add_reduce_fusion",
               kernel_details=grid(4)),
        _event(2, 7, "loop_add_fusion", t0 + 80, 3, hlo_op="loop_add_fusion",
               kernel_details=grid(2)),  # few blocks, but too short to matter
    ]
  meta = [{"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
  report = trace_report.TraceReport({"traceEvents": meta + events}, iterations=2)
  assert report.blocks == {"cudnn-conv.1": 264, "input_add_reduce_fusion": 4,
                           "loop_add_fusion": 2}
  assert report.few_blocks() == [("input_add_reduce_fusion", 60.0)]
  assert report.gaps == [8.0, 17.0, 8.0]  # 42-50, 83-100 (between iterations), 142-150
  text = report.markdown()
  assert "(median 8.0 us); kernels under 5 us: 2/iteration, 0.005 ms/iteration" in text
  assert "| input_add_reduce_fusion | unmatched HLO op | - | 0.030 | 1 | 4 |" in text
  assert "fewer than 33 thread blocks" in text and ": 0.030 ms/iteration" in text


def test_trace_report_reads_torch_gpu_kernels():
  events = [{"ph": "X", "cat": "kernel", "pid": 0, "tid": 7, "name": name, "ts": ts, "dur": dur}
            for name, ts, dur in (("sm90_xmma_dgrad_implicit_gemm", 0, 30),
                                  ("elementwise_kernel<add>", 30, 5),
                                  ("multi_tensor_apply_kernel<Adam>", 40, 5))]
  events += [{"ph": "X", "cat": "cpu_op", "pid": 1, "tid": 1, "name": "Optimizer.step#Adam.step",
              "ts": 40, "dur": 6}] * 2
  # With CUDA the profiler repeats each annotation on the GPU's line (seen on the H200).
  events += [{"ph": "X", "cat": "gpu_user_annotation", "pid": 0, "tid": 9,
              "name": "Optimizer.step#Adam.step", "ts": 40, "dur": 5}] * 2
  report = trace_report.TraceReport({"traceEvents": events})
  assert report.source == "PyTorch GPU kernels" and report.iterations == 1
  assert dict(report.grouped(0)) == {"convolution": 30.0, "elementwise/other": 5.0,
                                     "optimizer": 5.0}
  assert np.isclose(report.busy_us, 40.0) and report.span_us == 45.0


def test_trace_report_refuses_an_empty_folder(tmp_path, capsys):
  (tmp_path / "profile").mkdir()
  (tmp_path / "profile" / "train_step.hlo.txt").write_text(GPU_HLO)  # an HLO is no trace
  assert trace_report.main([str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no *.trace.json" in err[0], err


GRAPH_HLO = """HloModule jit_step, is_scheduled=true

ENTRY %main (a: bf16[8,4,4,16], w: bf16[16,3,3,16]) -> bf16[8,4,4,16] {
  %a = bf16[8,4,4,16]{3,2,1,0} parameter(0)
  %w = bf16[16,3,3,16]{3,2,1,0} parameter(1)
  %cudnn-graph = (bf16[8,4,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%a, %w), custom_call_target="__cudnn$convForwardGraph"
  ROOT %g = bf16[8,4,4,16]{3,2,1,0} get-tuple-element(%cudnn-graph), index=0
}
"""


def test_an_unlisted_cudnn_conv_target_is_a_convolution():
  (k,) = hlo_report.HloReport(GRAPH_HLO).kernels
  assert (k.category, k.detail) == ("convolution", "__cudnn$convForwardGraph")


def _trace_event(tid, name, ts, dur, **args):
  return {"ph": "X", "pid": 2, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": args}


GPU_PROCESS = [{"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}}]


def test_overlapping_kernels_on_two_streams_count_once():
  """Kernels on several streams overlap on a GPU: busy time is the union of their intervals,
  idle gaps lie outside it, and the markdown's figures are per iteration."""
  # iteration: a 0-40 on stream 7, b 20-60 on stream 8 (overlaps a), c 30-35 inside both, d 70-80
  events = []
  for it in range(2):
    t0 = 100.0 * it
    events += [_trace_event(7, "conv_a", t0, 40), _trace_event(8, "gemm_b", t0 + 20, 40),
               _trace_event(7, "add_c", t0 + 30, 5),
               _trace_event(7, "add_d", t0 + 70, 10)]
  r = trace_report.TraceReport({"traceEvents": GPU_PROCESS + events}, iterations=2)
  assert r.busy_us == 2 * 70.0 and r.span_us == 180.0
  assert r.gaps == [10.0, 20.0, 10.0]  # 60-70, 80-100, 160-170: none inside the 0-60 block
  text = r.markdown()
  assert "busy 0.070 ms of a 0.090 ms span per iteration (78%)" in text
  # shares of all kernel time (2 * 95 us): the kind column's ms and share agree
  assert "| convolution | 0.040 | 42.1% |" in text
  assert "| matmul | 0.040 | 42.1% |" in text


# ---- bad inputs: one line on stderr and exit 2, no traceback ----

_SELF_CALLING_FUSION = """HloModule m

%fused (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %f = f32[2]{0} fusion(%p), kind=kLoop, calls=%fused
}

ENTRY %main (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %x = f32[2]{0} fusion(%p), kind=kLoop, calls=%fused
}
"""


@pytest.mark.parametrize("content, code, needle", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", 2, "not a text file"),  # an image: no codec's message
    (GRAPH_HLO[:-4].encode(), 2, "ends inside computation main"),  # cut short: not reported
    (b"HloModule \n" + GRAPH_HLO.split("\n", 1)[1].encode(), 0, "kernel-level"),  # no name
    (_SELF_CALLING_FUSION.encode(), 0, "kernel-level"),  # corrupt: once a RecursionError
], ids=["binary", "truncated", "unnamed-module", "self-calling-fusion"])
def test_hlo_report_answers_a_bad_file_in_one_line(tmp_path, capsys, content, code, needle):
  path = tmp_path / "x.hlo.txt"
  path.write_bytes(content)
  assert hlo_report.main([str(path)]) == code
  out, err = capsys.readouterr()
  if code:
    assert len(err.strip().splitlines()) == 1 and needle in err, err
  else:
    assert needle in out and not err


def _write_trace(path, data):
  with gzip.open(path, "wt") as f:
    json.dump(data, f)
  return str(path)


_THUNK = {"ph": "X", "pid": 1, "tid": 1, "name": "copy.1", "ts": 0, "dur": 5,
          "args": {"hlo_op": "copy.1", "hlo_module": "jit_local"}}


@pytest.mark.parametrize("data, extra, needle", [
    ({"traceEvents": 5}, [], "no list of traceEvents"),  # once a TypeError
    (7, [], "no list of traceEvents"),
    ({"foo": 1}, [], "no list of traceEvents"),  # once an empty report and exit 0
    ({"traceEvents": []}, [], "no device work"),
    ({"traceEvents": [dict(_THUNK, dur="abc")]}, [], "has dur 'abc'"),
    ({"traceEvents": [dict(_THUNK, dur=None)]}, [], "has dur None"),  # once a TypeError
    ({"traceEvents": [{k: v for k, v in _THUNK.items() if k != "ts"}]}, [], "has ts None"),
    ("CUT", [], "truncated gzip"),  # the gzip stream cut short: once an EOFError
    ({"traceEvents": [_THUNK]}, ["--iters", "0"], "--iters: must be >= 1"),  # once ignored
    ({"traceEvents": [_THUNK]}, ["--iters", "x"], "not a whole number"),  # once 2 lines
    ({"traceEvents": [_THUNK]}, ["--hlo", "HLO"], "names none of the kernels"),  # another step's
    ({"traceEvents": [_THUNK]}, ["--hlo", "BAD"], "bad.hlo.txt: no ENTRY"),  # the HLO named
], ids=["events-not-a-list", "a-number", "no-events-key", "no-events", "dur-text", "dur-null",
        "no-ts", "truncated-gzip", "iters-0", "iters-text", "mismatched-hlo", "bad-hlo"])
def test_trace_report_answers_a_bad_trace_in_one_line(tmp_path, capsys, data, extra, needle):
  path = _write_trace(tmp_path / "t.trace.json.gz", {"traceEvents": [_THUNK] * 200}
                      if data == "CUT" else data)
  if data == "CUT":
    with open(path, "rb") as f:
      whole = f.read()
    with open(path, "wb") as f:
      f.write(whole[:len(whole) // 2])
  (tmp_path / "x.hlo.txt").write_text(GRAPH_HLO)
  (tmp_path / "bad.hlo.txt").write_text("not hlo\n")
  extra = [{"HLO": str(tmp_path / "x.hlo.txt"), "BAD": str(tmp_path / "bad.hlo.txt")}.get(a, a)
           for a in extra]
  try:
    code = trace_report.main([path, *extra])
  except SystemExit as e:  # argparse's errors end the process
    code = e.code
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("trace_report: error: ") and needle in err[0], err


def test_trace_report_refuses_one_hlo_for_a_folder_of_traces(tmp_path, capsys):
  for name in ("a", "b"):
    _write_trace(tmp_path / f"{name}.trace.json.gz", {"traceEvents": [_THUNK]})
  (tmp_path / "x.hlo.txt").write_text(GRAPH_HLO)
  # once silently ignored: each trace reported without it
  assert trace_report.main([str(tmp_path), "--hlo", str(tmp_path / "x.hlo.txt")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--hlo takes one trace" in err[0], err


def test_a_folders_unreadable_trace_leaves_the_others_reported(tmp_path, capsys):
  """The GPU call reports its whole profile folder at once, and the first H200 run had a trace
  with no device events (CUPTI lost them): one line for it, the others' tables still."""
  _write_trace(tmp_path / "a.trace.json.gz", {"traceEvents": []})
  _write_trace(tmp_path / "b.trace.json.gz", {"traceEvents": [_THUNK]})
  assert trace_report.main([str(tmp_path)]) == 2
  out, err = capsys.readouterr()
  assert err.strip().splitlines() == [
      f"trace_report: error: {tmp_path / 'a.trace.json.gz'}: no device work in it (no GPU "
      "kernels, XLA thunks or aten ops)"]
  assert "## b" in out and "## a" not in out, out


_PROFILED = {"traceEvents": GPU_PROCESS + [
    e for t0 in (0.0, 100.0) for e in (_trace_event(7, "sm90_xmma_fprop", t0, 40,
                                                    hlo_op="cudnn-conv.1"),
                                       _trace_event(7, "loop_add_fusion", t0 + 50, 10,
                                                    hlo_op="loop_add_fusion"))]}
_SESSION = os.path.join("tensorboard", "plugins", "profile", "2026_11_28_14_50_57")


@pytest.mark.parametrize("names, below, titles, note", [
    (["perfetto_trace", "vm.trace"], True, [os.path.join(_SESSION, "perfetto_trace.json.gz")],
     "(xprof's vm.trace.json.gz beside it is the same trace: reported once, from "
     "perfetto_trace.json.gz)"),
    (["perfetto_trace"], True, [os.path.join(_SESSION, "perfetto_trace.json.gz")], None),
    (["vm.trace"], False, ["vm"], None),
    (["perfetto_trace", "a.trace", "b.trace"], False, ["a", "b"],
     "(perfetto_trace.json.gz beside it repeats one of these 2 hosts' traces: left out)"),
], ids=["both-forms", "perfetto-only", "xprof-only", "two-hosts"])
def test_trace_report_reads_the_trainers_profile_folder(tmp_path, capsys, names, below, titles,
                                                        note):
  """`train.profile_steps` writes jax's perfetto_trace.json.gz and xprof's <host>.trace.json.gz
  (the same trace) in plugins/profile/<time>/, the step's HLO as train_step.hlo.txt beside them:
  once no trace found in the workdir, and the session folder's reported without its HLO."""
  session = tmp_path / _SESSION
  session.mkdir(parents=True)
  for name in names:
    _write_trace(session / f"{name}.json.gz", _PROFILED)
  (session / "train_step.hlo.txt").write_text(GPU_HLO)
  assert trace_report.main([str(tmp_path if below else session)]) == 0
  out, err = capsys.readouterr()
  assert not err and re.findall(r"^### (.*)$", out, re.M) == titles, out
  # each joined to the step's HLO: a layer for the convolution, a kind for the fusion
  assert out.count("| D main_2 | 0.040 | 80.0% |") == len(titles), out
  assert out.count("| elementwise/reduction | 0.010 | 20.0% |") == len(titles), out
  assert [line for line in out.splitlines() if line.startswith("(")] == ([note] if note else [])


@pytest.mark.parametrize("module", ["hlo_report", "trace_report"])
def test_a_reader_that_left_is_no_traceback(tmp_path, module):
  """`python -m cspgan_jax.trace_report T | head -1`: the closed pipe ends the report quietly."""
  hlo = tmp_path / "x.hlo.txt"
  hlo.write_text(GRAPH_HLO)
  path = str(hlo) if module == "hlo_report" else _write_trace(
      tmp_path / "t.trace.json.gz", {"traceEvents": [_THUNK]})
  read, write = os.pipe()
  os.close(read)  # every write to the pipe fails with EPIPE, as once `head` has exited
  try:
    proc = subprocess.run([sys.executable, "-m", f"cspgan_jax.{module}", path], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=REPO))
  finally:
    os.close(write)
  assert proc.returncode == 141 and not proc.stderr, proc.stderr


def test_trace_report_reads_events_with_odd_names_and_ids():
  """A name that is a number, a pid that is a list: once TypeErrors (a regex on an int, an
  unhashable key); JSON allows them, and the sums need only text and scalars."""
  events = [dict(_THUNK, name=5, pid=[1]), dict(_THUNK, ts=10, args={"hlo_op": None}, name=None)]
  r = trace_report.TraceReport({"traceEvents": events}, iterations=1)
  assert r.total_us() == 10.0 and "| copy.1 |" in r.markdown()


def test_the_memory_line_sums_one_analysis_of_the_step():
  """`cspgan compile`'s memory line: arguments + results - donated + temporaries, from a single
  `memory_analysis()` (each call asks XLA again)."""
  from cspgan_jax import gpu_compile  # pylint: disable=import-outside-toplevel

  class Analysis:  # pylint: disable=too-few-public-methods
    argument_size_in_bytes = 300 * 2**20
    output_size_in_bytes = 200 * 2**20
    alias_size_in_bytes = 150 * 2**20
    temp_size_in_bytes = 70 * 2**20

  class Compiled:
    calls = 0

    def memory_analysis(self):
      self.calls += 1
      return Analysis()

  compiled = Compiled()
  line = gpu_compile.memory_line(compiled)
  assert compiled.calls == 1
  assert line.startswith("device memory (XLA's buffer assignment; cuDNN workspaces")
  assert line.endswith("arguments 300 MiB (of which 150 MiB donated and reused for the results), "
                       "temporaries 70 MiB; the step needs about 420 MiB")
  assert parallel.step_memory_bytes(compiled) == 420 * 2**20
