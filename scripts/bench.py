"""Training-iteration benchmark (`cspgan bench`); see cspgan_jax/bench.py for what it measures.

  python scripts/bench.py                                   # GPU: 128x128, batch 64 and 256
  python scripts/bench.py --config configs/tiny.py --batches 8 --iters 2 --repeats 2 \\
      --variants jax-fp32,jax-bf16,torch-fp32
"""

import os
import sys

# Runs from a checkout without `pip install`: the package is the folder above this one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cspgan_jax import cli  # pylint: disable=wrong-import-position

if __name__ == "__main__":
  sys.exit(cli.main(["bench", *sys.argv[1:]]))
