"""Experiment 2: CSPup with BatchNorm and LeakyReLU(0.2), lr_d 1e-4 (SPEC.md, "The experiments").

  cspgan parity --config configs/exp2.py --steps 3

Train (CelebA prepared once, README "Data"): cspgan train --config configs/exp2.py --workdir runs/exp2
Not timed on a GPU; the baseline's times: docs/PERFORMANCE.md (CPU: about 10 s a baseline step).
"""

from configs import baseline


def get_config():
  config = baseline.get_config()
  config.model.block = "leaky_bn"
  config.train.lr_d = 1e-4
  return config
