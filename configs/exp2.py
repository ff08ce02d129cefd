"""Experiment 2: CSPup with BatchNorm and LeakyReLU(0.2), lr_d 1e-4 (SPEC.md, "The experiments").

  cspgan parity --config configs/exp2.py --steps 3

Training on CelebA prepared by `cspgan prepare-data`:
  cspgan prepare-data --input img_align_celeba --out ~/tensorflow_datasets   # once
  cspgan train --config configs/exp2.py --workdir runs/exp2

Hardware: one or more GPUs (all local ones are used). Time: not measured on a GPU yet (the
performance issue). On the 2-core CPU VM one baseline step (batch 64, 128x128) took 42 s,
i.e. weeks for the full run: the CPU is for the quickstart, tests and parity only.
"""

from configs import baseline


def get_config():
  config = baseline.get_config()
  config.model.block = "leaky_bn"
  config.train.lr_d = 1e-4
  return config
