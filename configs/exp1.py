"""Experiment 1: the smaller AvgPool discriminator, lr_d 3e-5 (SPEC.md, "The experiments").

  cspgan parity --config configs/exp1.py --steps 3

Training on CelebA prepared by `cspgan prepare-data`:
  cspgan prepare-data --input img_align_celeba --out ~/tensorflow_datasets   # once
  cspgan train --config configs/exp1.py --workdir runs/exp1

Hardware: one or more GPUs (all local ones are used). Time: not measured on a GPU yet (the
performance issue). On the 2-core CPU VM one baseline step (batch 64, 128x128) took 42 s,
i.e. weeks for the full run: the CPU is for the quickstart, tests and parity only.
"""

from configs import baseline


def get_config():
  config = baseline.get_config()
  config.model.discriminator = "avgpool"
  config.train.lr_d = 3e-5
  return config
