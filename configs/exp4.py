"""Experiment 4: leaky_bn CSPup + AvgPool discriminator, batch 256, 15 epochs.

The report does not state lr_d here; the baseline's 5e-5 stands (SPEC.md).

  cspgan parity --config configs/exp4.py --steps 3

Train (CelebA prepared once, README "Data"): cspgan train --config configs/exp4.py --workdir runs/exp4
Not timed on a GPU; the baseline's times: docs/PERFORMANCE.md (CPU: about 10 s a baseline step).
"""

from configs import baseline


def get_config():
  config = baseline.get_config()
  config.model.block = "leaky_bn"
  config.model.discriminator = "avgpool"
  config.train.batch_size = 256
  config.train.epochs = 15
  # The report draws its fixed noise with the batch size (`torch.randn(batch_size, nz, 1, 1)`):
  # its grids at batch 256 hold 256 samples, normalised together (and, with BatchNorm in G,
  # sampled with those 256 latents' batch statistics).
  config.train.num_samples = 256
  return config
