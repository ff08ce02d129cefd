#!/usr/bin/env bash
# The GPU measurements of the performance issue, as one device call (about 8 minutes on an H100).
#
#   run: bash scripts/gpu_check.sh            (from the repository root; results under $OUT)
#
# The GPU machine has jax, flax, optax, orbax and torch but not ml-collections (configs) or
# tensorboardX (the end-to-end run's logging); both are pure Python. Fetch them here into .whl/
# (excluded from git) and carry them, as the device README says:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       ml-collections==1.1.0 tensorboardX==2.6.5
#   run(carry=[".whl"], command="python3 -m pip install -q --no-index --no-deps --no-compile
#       --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#       && bash scripts/gpu_check.sh")
set -euo pipefail
OUT=${OUT:-/tmp/cspgan_gpu}
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
{ date; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__)"
} > "$OUT/machine.txt" 2>&1
# 1. Correctness on the GPU (true float32: XLA would use TF32 for float32 convolutions):
#    modules and losses against PyTorch on the CPU, and five steps of every variant.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 python3 -m pytest -q tests/test_models.py \
    tests/test_losses.py tests/test_train_parity.py 2>&1 | tail -15 > "$OUT/tests.txt" || true
# 2. The table: fp32 / bf16 / bf16 with 8 steps a dispatch, PyTorch eager fp32 / bf16+channels_last
#    / torch.compile, batch 64 and 256, and the end-to-end loop at batch 64 over 2000 steps.
#    BENCH_ARGS replaces these arguments; a CPU dry run (about 2 minutes):
#    BENCH_ARGS="--config configs/tiny.py --batches 8 --iters 2 --repeats 1 --warmup 1
#    --no-compile --scan 2 --e2e 8" OUT=/tmp/dry bash scripts/gpu_check.sh
BENCH_ARGS=${BENCH_ARGS:---config configs/baseline.py --batches 64,256 --scan 8 --e2e 2000}
# shellcheck disable=SC2086
timeout 480 python3 scripts/bench.py $BENCH_ARGS --out "$OUT/bench.md" 2>&1 | tail -40 \
    > "$OUT/bench.log"
cat "$OUT/bench.md"
