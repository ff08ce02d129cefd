"""Experiment 4: leaky_bn CSPup + AvgPool discriminator, batch 256, 15 epochs.

The report does not state lr_d here; the baseline's 5e-5 stands (SPEC.md).

  cspgan parity --config configs/exp4.py --steps 3

Training on CelebA prepared by `cspgan prepare-data`:
  cspgan prepare-data --input img_align_celeba --out ~/tensorflow_datasets   # once
  cspgan train --config configs/exp4.py --workdir runs/exp4

Hardware: one or more GPUs (all local ones are used). Time: not measured on a GPU yet (the
performance issue). On the 2-core CPU VM one baseline step (batch 64, 128x128) took 42 s,
i.e. weeks for the full run: the CPU is for the quickstart, tests and parity only.
"""

from configs import baseline


def get_config():
  config = baseline.get_config()
  config.model.block = "leaky_bn"
  config.model.discriminator = "avgpool"
  config.train.batch_size = 256
  config.train.epochs = 15
  return config
