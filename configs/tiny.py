"""Tiny model for tests: 32x32, narrow layers, batch 8. Seconds on a CPU.

  cspgan parity --config configs/tiny.py --steps 5
"""

from configs import baseline


def get_config():
  config = baseline.get_config()
  config.model.ngf = 8
  config.model.ndf = 8
  config.model.nz = 16
  config.model.resolution = 32
  config.train.batch_size = 8
  config.data.source = "synthetic"
  config.data.num_examples = 256
  return config
