"""Tiny model for tests: 32x32, narrow layers, batch 8, synthetic faces. Seconds on a CPU.

  cspgan parity --config configs/tiny.py --steps 5
  cspgan train --config configs/tiny.py --workdir /tmp/tiny

`shrink` makes any experiment this small, to try it in seconds before a GPU run, e.g. a
config file of your own holding
  from configs import exp2, tiny
  def get_config():
    return tiny.shrink(exp2.get_config())
"""

from configs import baseline


def shrink(config):
  """`config` at the tiny sizes and cadences, on synthetic faces; everything else kept."""
  config.model.ngf = 8
  config.model.ndf = 8
  config.model.nz = 16
  config.model.resolution = 32
  config.train.batch_size = 8
  config.train.num_steps = 8
  config.train.num_samples = 16
  config.train.log_every = 2
  config.train.sample_every = 4
  config.train.checkpoint_every = 4
  config.data.source = "synthetic"
  config.data.num_examples = 256
  return config


def get_config():
  return shrink(baseline.get_config())
