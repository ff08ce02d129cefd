"""Quickstart: the embedded default. Synthetic cartoon faces, a small model, no download.

  cspgan train --config configs/quickstart.py --workdir runs/quickstart

32x32 faces, ngf = ndf = 32, batch 64, 300 steps: 38-52 s on an idle 2-core CPU, compilation
included, 35-46 s again with the compiled programs from the compilation cache (two VMs, measured
2026-11-28); a GPU is not measured yet. At the seed's learning rates the grid still
looks like noise with faint structure after 300 steps, its 64 tiles alike: this run shows the
pipeline, not a trained model. The PyTorch reference collapses the same way in the same 300
steps (docs/PARITY.md, "The quickstart's 300 steps"); the seed never converged either.
Leaves runs/quickstart/samples/*.png, TensorBoard events in runs/quickstart/tensorboard
(`pip install tensorboard`, then `tensorboard --logdir runs/quickstart`: tensorboardX writes
the events, the viewer is a package of its own) and a checkpoint (`cspgan sample --workdir
runs/quickstart --out grid.png`, `cspgan info runs/quickstart`).
"""

from configs import baseline


def get_config():
  config = baseline.get_config()
  config.model.resolution = 32
  config.model.ngf = 32
  config.model.ndf = 32
  config.data.source = "synthetic"
  config.data.num_examples = 4096
  config.train.num_steps = 300
  config.train.log_every = 50
  config.train.sample_every = 100
  config.train.checkpoint_every = 100
  return config
