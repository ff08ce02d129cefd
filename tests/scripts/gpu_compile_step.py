"""Compiles the trainer's step for an H100 without one (jax's CUDA plugin, compile-only device),
in float32 and bfloat16, with the state in the compiler's layouts and in row-major ones, and
(bfloat16) four iterations a dispatch and the edge layers as matmuls; prints RESULT json of
what hlo_report finds. `python gpu_compile_step.py CONFIG PLUGIN_DIR`."""
import json
import re
import sys

from cspgan_jax import config_lib, gpu_compile, hlo_report

config_path, plugin_dir = sys.argv[1:3]
devices = gpu_compile.compile_only_devices("h100", plugin_dir)
result = {"device_kind": devices[0].device_kind}
for dtype in ("float32", "bfloat16"):
  config = config_lib.load_config(config_path, [f"--config.train.dtype={dtype}",
                                                "--config.data.source=synthetic"])
  for layout, steps in (("auto", 1), ("default", 1), ("scan", 4), ("edgemm", 1)):
    if dtype == "float32" and layout in ("scan", "edgemm"):
      continue
    config.model.edge_layers_as_matmul = layout == "edgemm"
    compiled = gpu_compile.compile_step(config, devices,
                                        "default" if layout == "default" else "auto", steps)
    text = compiled.as_text()
    report = hlo_report.HloReport(text)
    moves = report.data_movement()
    result[f"{dtype}_{layout}"] = dict(
        counts=report.counts(),
        conv_kinds=sorted({k.detail for k in report.kernels if k.category == "convolution"}),
        conv_layers=sorted({k.layer.replace(" (bwd)", "") for k in report.kernels
                            if k.category == "convolution"}),
        matmul_layers=sorted({k.layer.replace(" (bwd)", "") for k in report.kernels
                              if k.category == "matmul"}),
        fused_bias_layers=sorted({k.layer for k in report.kernels
                                  if k.detail == "conv forward (fused bias/act)"}),
        # reductions that accumulate in bf16 (the H200 run's program had 23: bias gradients)
        bf16_reduces=len(re.findall(r"= bf16\[[0-9,]*\]\{[^}]*\} reduce\(", text)),
        # forward matmul products XLA computes as bf16 multiplies (a dot it strength-reduced)
        bf16_dot_products=len(re.findall(
            r"= bf16\[[^\]]*\][^ ]* multiply\([^\n]*op_name=\"[^\"]*/jvp\(Discriminator\)"
            r"/[^\"]*dot_general", text)),
        conv_labels=sorted(set(re.findall(r"dim_labels=([^,\s]+)", text))),
        move_kernels=len(moves), move_bytes=sum(k.inst.out_bytes for k in moves),
        reversing=[k.detail for k in moves if "reverse" in k.detail],
        copied_inputs=[k.inst.out_bytes for k in report.copied_inputs()],
        param_casts=len(report.parameter_casts()),
        column_sum_rows=max(rows for _, _, rows, _ in report.column_sums()),
        relu_convs=text.count('"activation_mode":"kRelu"'),
        # kernels that only take a maximum: a ReLU XLA did not fold into its convolution
        max_kernels=sum(1 for k in report.kernels if k.inst.op == "fusion" and
                        {b.op for b in report._body_ops(k.inst)} - {"parameter", "constant",
                                                                     "broadcast"} == {"maximum"}),
        loops=len(report.data_dependent_loops()),
        split=report.channel_split_slices(),
        temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
        memory=gpu_compile.memory_line(compiled))
# Two GPUs: the gradients' all-reduces (combined by XLA, asynchronous)
import jax  # noqa: E402  (after the plugin is registered)
from cspgan_jax import train  # noqa: E402
two = gpu_compile.compile_only_devices("h100", plugin_dir, 2)
config = config_lib.load_config(config_path, ["--config.train.dtype=bfloat16",
                                              "--config.data.source=synthetic"])
report = hlo_report.HloReport(gpu_compile.compile_step(config, two).as_text())
reduces = [k for k in report.kernels if k.inst.op in ("all-reduce", "all-reduce-start")]
variables = jax.eval_shape(lambda: train.init_variables(config, jax.random.PRNGKey(0)))
result["two_devices"] = dict(
    all_reduces=len(reduces), asynchronous=sum(k.inst.op == "all-reduce-start" for k in reduces),
    reduced_bytes=sum(k.inst.out_bytes for k in reduces),
    param_bytes=sum(4 * x.size for v in variables for x in jax.tree_util.tree_leaves(v["params"])))
print("RESULT" + json.dumps(result))
