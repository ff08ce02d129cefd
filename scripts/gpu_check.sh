#!/usr/bin/env bash
# The GPU measurements of the performance issue, as one device call (about 8 minutes on an H100).
#
#   run: bash scripts/gpu_check.sh            (from the repository root; results under $OUT)
#
# The GPU machine has jax, flax, optax, orbax and torch but not tensorboardX or
# tensorflow-datasets: carry their wheels as the device README says and install them into
# /tmp/site first (the trainer imports tensorboardX for the end-to-end run).
set -euo pipefail
OUT=${OUT:-/tmp/cspgan_gpu}
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
{ date; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__)"
} > "$OUT/machine.txt" 2>&1
# 1. Correctness on the GPU: the four-device-free tests that need no TensorFlow datasets.
python3 -m pytest -q -x tests/test_models.py tests/test_losses.py 2>&1 | tail -3 > "$OUT/tests.txt" || true
# 2. The table: fp32 / bf16 / bf16 with 8 steps a dispatch, PyTorch eager fp32 / bf16+channels_last
#    / torch.compile, batch 64 and 256, and the end-to-end loop at batch 64 over 2000 steps.
timeout 480 python3 scripts/bench.py --config configs/baseline.py --batches 64,256 --scan 8 \
    --e2e 2000 --out "$OUT/bench.md" 2>&1 | tail -40 > "$OUT/bench.log"
cat "$OUT/bench.md"
