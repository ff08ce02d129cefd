"""Experiment 3: the baseline architecture with batch 256 for 15 epochs; lr "left the same".

  cspgan parity --config configs/exp3.py --steps 3

Train (CelebA prepared once, README "Data"): cspgan train --config configs/exp3.py --workdir runs/exp3
On GPUs; times in docs/PERFORMANCE.md (CPU: 42 s a baseline step).
"""

from configs import baseline


def get_config():
  config = baseline.get_config()
  config.train.batch_size = 256
  config.train.epochs = 15
  return config
