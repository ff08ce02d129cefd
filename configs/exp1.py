"""Experiment 1: the smaller AvgPool discriminator, lr_d 3e-5 (SPEC.md, "The experiments").

  cspgan parity --config configs/exp1.py --steps 3

Train (CelebA prepared once, README "Data"): cspgan train --config configs/exp1.py --workdir runs/exp1
Not timed on a GPU; the baseline's times: docs/PERFORMANCE.md (CPU: about 10 s a baseline step).
"""

from configs import baseline


def get_config():
  config = baseline.get_config()
  config.model.discriminator = "avgpool"
  config.train.lr_d = 3e-5
  return config
