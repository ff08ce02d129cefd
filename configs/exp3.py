"""Experiment 3: the baseline architecture with batch 256 for 15 epochs; lr "left the same".

  cspgan parity --config configs/exp3.py --steps 3
"""

from configs import baseline


def get_config():
  config = baseline.get_config()
  config.train.batch_size = 256
  config.train.epochs = 15
  return config
